"""A seeded fuzz suite fed to a real supervisor: no body may crash or restart a role.

:func:`fuzz_bodies` makes, from one seed, more than 1,000 bodies: random bytes,
truncations and bit flips of a good request, every field of SPEC section 2 set to wrong
types and extreme values, deep nesting, huge integers, NUL and right-to-left text,
50 MB bodies and envelopes.  Most are built on a request that is already stale (its
``experimentLifetime`` ended), so a body that is accepted is acked ``expired`` at once
instead of running; a few dozen more are built on a fresh request and really run.

The suite passes when no role crashed or restarted, every body was dead-lettered (those
the fetcher's admission refuses: :func:`runner.envelope.open_body`,
:func:`runner.requests.parse_request`, then
:func:`runner.metadata.check_object_names`) or reached a final fate (the others), the
queue is empty, and a good request published afterwards completes.  It is deterministic
(``FUZZ_SEED``, default 13) and bounded: a few minutes on a loaded two-core machine.
"""
from __future__ import annotations

import json
import os
import random
import re
import socket
import time

from runner import envelope, metadata, storage
from runner.errors import BadRequest
from runner.requests import parse_request
from runner.storage.file import real_roots

SEED = int(os.environ.get("FUZZ_SEED", "13"))
HUGE = 50 * 1024 * 1024

EXTREMES = [None, True, False, 0, -1, 1.5, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -2 ** 64, 10 ** 400,
            1e308, -1e308, "", "0", "-1", "inf", "-inf", "NaN", "1e400", "x" * 10_000, "\0",
            "a\0b", "\u202etxt.py\u202c", "\ud800", [], [1], [None], ["a", 2], {}, {"a": {}},
            {"": None}, "1h30m", "2gib", "../../etc/passwd", "/bin/sh", "-m"]

FIELDS = [
    "experiment", "config", "experiment.key", "experiment.project", "experiment.filename",
    "experiment.args", "experiment.pythonver", "experiment.pythonenv",
    "experiment.resources_needed", "experiment.resources_needed.cpus",
    "experiment.resources_needed.gpus", "experiment.resources_needed.ram",
    "experiment.resources_needed.hdd", "experiment.resources_needed.gpuMem",
    "experiment.resources_needed.gpuCount", "experiment.max_duration",
    "experiment.time_added", "experiment.artifacts", "experiment.artifacts.workspace",
    "experiment.artifacts.workspace.unpack", "experiment.artifacts.workspace.mutable",
    "experiment.artifacts.workspace.key", "experiment.artifacts.workspace.bucket",
    "experiment.artifacts.workspace.qualified", "experiment.artifacts.workspace.url",
    "experiment.artifacts.workspace.local", "experiment.artifacts.workspace.hash",
    "experiment.artifacts.workspace.credentials",
    "experiment.artifacts.workspace.saveFrequency", "experiment.artifacts.output",
    "experiment.status", "experiment.time_started", "experiment.owner", "experiment.git",
    "experiment.info", "experiment.metric", "experiment.from_compl_service",
    "config.env", "config.pip", "config.saveWorkspaceFrequency",
    "config.experimentLifetime", "config.resources_needed", "config.cloud",
    "config.database", "config.storage",
]


def _set(request: dict, path: str, value) -> None:
    node = request
    *parents, last = path.split(".")
    for name in parents:
        child = node.get(name)
        if not isinstance(child, dict):
            child = node[name] = {}
        node = child
    node[last] = value


def _dumps(request: dict) -> bytes:
    """JSON as a careless client may write it: NaN allowed, lone surrogates kept."""
    return json.dumps(request, allow_nan=True).encode("utf-8", "surrogatepass")


def fuzz_bodies(stale: dict, fresh: dict, seed: int = SEED) -> list[tuple[str, bytes]]:
    """``(what, body)`` pairs, the same for the same seed (see the module docstring)."""
    rng = random.Random(seed)
    good = _dumps(stale)
    bodies: list[tuple[str, bytes]] = []
    serial = iter(range(1_000_000))

    def fresh_copy(base: dict) -> dict:
        request = json.loads(json.dumps(base))
        request["experiment"]["key"] = f"{base['experiment']['key']}-{next(serial)}"
        return request

    for _ in range(150):
        bodies.append(("random bytes", rng.randbytes(rng.randint(0, 2000))))
    for _ in range(150):
        bodies.append(("truncated", good[:rng.randrange(len(good))]))
    for _ in range(150):
        data = bytearray(_dumps(fresh_copy(stale)))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        bodies.append(("bit flips", bytes(data)))
    for path in FIELDS:
        for value in EXTREMES:
            request = fresh_copy(stale)
            _set(request, path, value)
            bodies.append((f"{path}={str(value)[:20]!r}", _dumps(request)))
    for depth in (10, 63, 64, 65, 100, 511, 512, 1000, 5000, 100_000):
        for opener, closer in (("[", "]"), ('{"a":', "}")):
            request = fresh_copy(stale)
            request["experiment"]["info"] = "SPLICE"
            text = _dumps(request).replace(b'"SPLICE"',
                                           (opener * depth + "1" + closer * depth).encode())
            bodies.append((f"nesting {depth}", text))
    for _ in range(30):
        request = fresh_copy(stale)
        digits = rng.choice([20, 40, 400, 5000])
        request["experiment"]["info"] = "SPLICE"
        bodies.append(("huge integer", _dumps(request).replace(
            b'"SPLICE"', b"-" * rng.randint(0, 1) + b"9" * digits)))
    for text in ("\0", "a\0", "\u202e", "\u200f\u202b", "\u061c", "\ufeff", "\U0010ffff"):
        for path in ("experiment.key", "experiment.project", "experiment.filename",
                     "experiment.args", "config.env"):
            request = fresh_copy(stale)
            value = {"K": text} if path == "config.env" else [text] if path.endswith(
                "args") else request["experiment"].get(path.split(".")[-1], "x") + text
            _set(request, path, value)
            bodies.append((f"text {path}", _dumps(request)))
    filler = "f" * HUGE
    request = fresh_copy(stale)
    request["experiment"]["info"] = filler
    bodies.append(("50 MB request", _dumps(request)))
    bodies.append(("50 MB string", json.dumps(filler).encode()))
    bodies.append(("50 MB of bytes", rng.randbytes(1024) * (HUGE // 1024)))
    for sealed in ({"message": {}}, {"message": None}, {"message": "x"},
                     {"message": {"experiment": {"key": "k"}, "payload": "a,b",
                                  "signature": "!", "fingerprint": "SHA256:x"}},
                     {"message": {"payload": "\0" * 100}, "experiment": None}):
        bodies.append(("envelope", _dumps(sealed)))
    # On a fresh request: hostile-but-valid values that really run.
    for path, value in (("experiment.info", {"\u202e": [1, {"\0": None}]}),
                        ("experiment.metric", 2 ** 63 - 1), ("experiment.args", ["\u202e", "-"]),
                        ("config.env", {"RTL": "\u202e", "N": 1, "B": True, "E": ""}),
                        ("experiment.project", "p\u202eq"), ("experiment.owner", "\ufeff"),
                        ("experiment.git", {"a": [[[]]]}), ("config.cloud", None)):
        request = fresh_copy(fresh)
        _set(request, path, value)
        bodies.append((f"runs {path}", _dumps(request)))
    return bodies


def _plain(request: dict) -> bool:
    """Whether the request's record can be looked up (a short, plain key and project)."""
    experiment = request["experiment"]
    return all(isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", v)
               for v in (experiment["key"], str(experiment.get("project") or "e2e")))


def test_the_generator_is_seeded_and_large_enough() -> None:
    stale = {"experiment": {"key": "k"}, "config": {}}
    first = fuzz_bodies(stale, stale, seed=5)
    assert len(first) >= 1000
    assert first == fuzz_bodies(stale, stale, seed=5)
    assert first != fuzz_bodies(stale, stale, seed=6)


def test_fuzzed_bodies_never_crash_a_role_and_each_reaches_a_fate(runner) -> None:
    runner.start()
    before = runner.role_pids()
    workspace = runner.workspace({"ok.py": "print('fine')"})
    fresh = runner.request(workspace, "ok.py", key="fuzz-fresh")
    blob = fresh["experiment"]["artifacts"]["workspace"]["key"]
    stale = runner.request(workspace, "ok.py", key="fuzz-stale", blob=blob, lifetime="1s",
                           time_added=time.time() - 3600)
    bodies = fuzz_bodies(stale, fresh)
    accepted = []
    saved = storage.base.SETTINGS  # the runner's file:// confinement (bit flips leave it)
    roots = str(runner.options["file-store-roots"]).split(os.pathsep)  # a path list
    storage.configure(file_roots=real_roots(roots))
    try:
        for _what, body in bodies:  # the fetcher's admission, in the same order
            try:
                opened = envelope.open_body(body, runner.queue, envelope.Keys())  # no keys
                request = parse_request(opened)[0]
                metadata.check_object_names(request, socket.gethostname())
            except BadRequest:
                continue
            accepted.append(request)
    finally:
        storage.base.SETTINGS = saved
    for _what, body in bodies:
        runner.publish(body)

    folder = runner.root / "q" / runner.queue
    dead = folder / ".dead"

    def settled() -> bool:
        waiting = [p for p in folder.iterdir() if p.is_file()]
        claimed = [p for p in (folder / ".claimed").rglob("*") if p.is_file()] \
            if (folder / ".claimed").is_dir() else []
        return not waiting and not claimed

    runner.wait_for(settled, timeout=600, what="every fuzzed body settled")
    dead_letters = [p for p in dead.iterdir() if not p.name.endswith(".reason.txt")]
    assert len(dead_letters) == len(bodies) - len(accepted)
    for request in accepted:
        if _plain(request):
            record = runner.wait_final(request, timeout=60)
            assert record["status"] in ("expired", "completed", "failed"), record
    assert runner.role_pids() == before
    assert {r["restarts"] for r in runner.status()["roles"].values()} == {0}

    good = runner.request(workspace, "ok.py", key="fuzz-after", blob=blob)
    runner.publish(good)
    assert runner.wait_final(good, timeout=120)["status"] == "completed"
    assert runner.process.poll() is None
