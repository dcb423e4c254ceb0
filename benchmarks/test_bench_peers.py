"""The runner beside what users would pick instead, in one interleaved session (issue 17).

Peers (benchmarks/peers.py), all on the shared RabbitMQ broker, the studio peers on one S3
endpoint (moto) with requests made by the real ``studioml`` 0.0.49 client:

* **runner**: a ``runner-supervisor`` (executors = cores, options as deployed, sandbox off
  as in the dispatch suite) serving an ``rmq_*`` queue;
* **reference**: the StudioML 0.0.49 reference worker loop, one process, from its own
  virtualenv holding the client's ``pip freeze``;
* **celery**: a bare Celery worker (prefork, concurrency = cores) whose task is
  ``subprocess.run(argv)``, no artifacts.

Every experiment writes ``time.time()`` to a mark file first thing.  Measures, each a ratio
of the runner's median to the peer's median in the same run:

* **publish → start**: publish (the client's payload, as the client publishes it; for Celery
  ``apply_async``) until the experiment writes its mark, the peer idle and its environment
  ready (``ROUNDS`` rounds, the peers taking turns within each round);
* **20 back to back**: 20 trivial experiments published at once, from the first publish until
  the last is done (its database record ``finished``; for Celery, its result back);
* **changed environment**: publish → start of the first experiment of a new ``pip freeze``
  (the client's, one line changed) and of the second experiment of that set (runner and
  reference worker only: a bare Celery worker has no environments).

A peer that makes no progress for ``STALL`` seconds is reported "stalled after N" (N of its
experiments started), never waited for: the studio peers' queue is purged and the reference
worker restarted; Celery's driver gives up on its results after the batch's timeout.  Ratios are
recorded with :func:`benchmarks.figures.record`; nothing asserts a time.

``BENCH_PROFILE=1`` adds a back-to-back run of the runner alone with ``py-spy`` sampling the
supervisor and its five roles; the summary goes to ``.bench/profile/summary.md``
(docs/benchmarks.md, "Where the runner's time goes").

Run: bash scripts/bench.sh --peers   (or python3 -m pytest benchmarks/test_bench_peers.py -s)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from tests.rabbitmq_support import SHARED_MGT, SHARED_URL, Broker, PrivateBroker, port_open, unique
from tests.studio_client import client_config, interop_runner
from tests.support import Runner, free_port, short_tempdir

from . import peers
from .figures import QUICK, REPO, cpu_seconds, machine_cpu_seconds, record, results_path

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.interop]

ROUNDS = 3 if QUICK else 7
BACK_TO_BACK = 20
BACK_TO_BACK_ROUNDS = 1 if QUICK else 3
EXECUTORS = os.cpu_count() or 1
STALL = 30.0            # seconds without a new start or finish: the peer is stalled
BUILD_TIMEOUT = 900.0   # a whole environment from the index (the runner's first set)
PROFILE = os.environ.get("BENCH_PROFILE", "").strip().lower() in ("1", "true", "yes", "on")
PROFILE_RATE = 100      # py-spy samples per second
PEERS = ("runner", "reference", "celery")


class Stalled(Exception):
    """A peer made no progress for STALL seconds: ``started`` of its experiments began."""

    def __init__(self, started: int, detail: str = ""):
        super().__init__(f"stalled after {started}")
        self.started, self.detail = started, detail


@dataclass
class Batch:
    published: list[float]  # unix seconds, one per experiment
    started: list[float]    # the marks
    done: float             # when the last one was seen done
    keys: list[str] = field(default_factory=list)  # the experiments (studio peers)
    # Busy CPU seconds of the whole machine and of the S3 endpoint from just before the
    # first publish until the last was seen done (requests are made before it).
    machine_cpu: float = 0.0
    moto_cpu: float = 0.0

    @property
    def first_start(self) -> float:
        return self.started[0] - self.published[0]

    @property
    def span(self) -> float:
        return self.done - min(self.published)


def peers_broker() -> tuple[Broker, PrivateBroker | None]:
    """The shared broker when its management API answers (the runner lists queues with
    it), else a RabbitMQ node of the suite's own: (broker, the node to stop or None)."""
    if port_open(5672):
        shared = Broker(SHARED_URL, SHARED_MGT)
        try:
            shared.api("overview")
            return shared, None
        except Exception:  # noqa: BLE001 - no management API there
            pass
    node = PrivateBroker().start()
    return node, node


@pytest.fixture(scope="module")
def session(moto):
    broker, node = peers_broker()
    root = short_tempdir("peers")
    stem = unique("peers")
    runner_stem, ref_queue = stem + "runner_", stem + "ref"
    celery_queue = f"peers{uuid.uuid4().hex[:8]}_celery"
    meta, artifacts = moto.create_bucket(), moto.create_bucket()
    config = client_config(moto, broker, meta, artifacts, verbose="error",
                           saveWorkspaceFrequency="1m", saveMetricsFrequency="1m")
    opened = []
    try:
        client = peers.ClientRequests(root, config)
        opened.append(client)
        freeze = peers.pip_freeze(client.python)
        ref_python = peers.reference_worker_python(freeze)
        # The reference worker installs into its own interpreter: put back what an earlier
        # session changed, so that the client's set is the stored one.
        peers.pip_install(ref_python, sorted(set(freeze) - set(peers.pip_freeze(ref_python))))

        runner = interop_runner(root / "runner", broker, runner_stem, executors=EXECUTORS,
                                prom_address=f"127.0.0.1:{free_port()}", log_format="json")
        runner.options.pop("min-save-interval")  # the defaults, as deployed
        runner.start()
        opened.append(runner)
        broker.declare(runner.queue)
        reference = peers.ReferenceWorker(root / "reference", ref_python, ref_queue, broker.url)
        (root / "reference").mkdir(exist_ok=True)
        reference.start()
        opened.append(reference)
        celery = peers.CeleryPeer(root / "celery", celery_queue, broker.url, EXECUTORS)
        opened.append(celery)
        publisher = peers.Publisher(broker)
        opened.append(publisher)
        s = Session(root=root, client=client, runner=runner, reference=reference,
                    celery=celery, publisher=publisher,
                    records=peers.Records(moto.client(), meta), ref_python=ref_python,
                    moto_pid=moto.process.pid)
        # Warm-ups, not measured: the runner builds the client's set (the stored one), the
        # reference worker fetches its first request, Celery forks its pool.
        for peer in PEERS:
            s.batch(peer, 1, timeout=BUILD_TIMEOUT, stall=BUILD_TIMEOUT)
        yield s
    finally:
        for thing in reversed(opened):
            try:
                thing.close() if hasattr(thing, "close") else thing.stop()
            except Exception:  # noqa: BLE001 - cleanup goes on
                pass
        broker.delete(stem + "runner_q", ref_queue, celery_queue)
        if node is not None:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Session:
    """The peers of one session and the means to run experiments on each (:meth:`batch`)."""
    root: Path
    client: peers.ClientRequests
    runner: Runner
    reference: peers.ReferenceWorker
    celery: peers.CeleryPeer
    publisher: peers.Publisher
    records: peers.Records
    ref_python: Path
    moto_pid: int

    def queue(self, peer: str) -> str:
        return self.runner.queue if peer == "runner" else self.reference.queue_name

    def marks(self, n: int) -> list[Path]:
        folder = self.root / "marks"
        folder.mkdir(exist_ok=True)
        return [folder / uuid.uuid4().hex for _ in range(n)]

    batches: list[tuple[str, Batch]] = field(default_factory=list)

    def batch(self, peer: str, n: int, *, pythonenv: list[str] | None = None,
              timeout: float = 300.0, stall: float = STALL) -> Batch:
        """Run ``n`` experiments on ``peer`` published at once; Stalled when no experiment
        started or finished for ``stall`` seconds or all took over ``timeout`` (then
        :meth:`recover`; Celery: when its driver's wait for the results times out)."""
        marks = self.marks(n)
        if peer == "celery":
            script = str(self.client.workspace / "start.py")
            cpu = self.cpu_now()
            try:
                reply = self.celery.run([[str(self.celery.python), script, str(m)]
                                         for m in marks], timeout=timeout)
            except peers.PeerError as exc:
                raise Stalled(sum(peers.read_mark(m) is not None for m in marks), str(exc)) from exc
            return Batch(reply["sent"], [peers.read_mark(m) for m in marks], reply["done"],
                         **self.cpu_since(cpu))
        keys = [f"peers-{peer[:3]}-{uuid.uuid4().hex[:10]}" for _ in range(n)]
        payloads = [self.client.make(self.queue(peer), key, mark, pythonenv)
                    for key, mark in zip(keys, marks)]
        cpu = self.cpu_now()
        published = [self.publisher.publish(self.queue(peer), body) for body in payloads]
        try:
            started, done = self.wait(peer, keys, marks, timeout, stall)
        except Stalled:
            self.recover(peer)
            raise
        found = Batch(published, started, done, keys, **self.cpu_since(cpu))
        self.batches.append((peer, found))
        return found

    def cpu_now(self) -> tuple[float, float]:
        return machine_cpu_seconds(), cpu_seconds(self.moto_pid)

    def cpu_since(self, then: tuple[float, float]) -> dict[str, float]:
        machine, moto = self.cpu_now()
        return {"machine_cpu": machine - then[0], "moto_cpu": moto - then[1]}

    def wait(self, peer: str, keys: list[str], marks: list[Path], timeout: float,
             stall: float) -> tuple[list[float], float]:
        """Wait for every mark and every record ``finished``: (start times, last done)."""
        started: dict[int, float] = {}
        finished: set[int] = set()
        done = 0.0
        progress = time.monotonic()
        deadline = progress + timeout
        while len(finished) < len(keys):
            now = time.monotonic()
            before = len(started) + len(finished)
            for i, mark in enumerate(marks):
                if i not in started and (at := peers.read_mark(mark)) is not None:
                    started[i] = at
            # The records, once every experiment has started (the last to finish cannot
            # have finished before that; each GET costs moto CPU the measure counts), of
            # those not yet finished, oldest first, a few at a time.
            waiting = [i for i in sorted(started, key=started.get) if i not in finished]
            for i in waiting[:4] if len(started) == len(keys) else []:
                if self.records.status(keys[i]) == "finished":
                    finished.add(i)
                    done = time.time()
            if len(started) + len(finished) > before:
                progress = now
            alive = self.reference.alive() if peer == "reference" else \
                self.runner.process.poll() is None
            if not alive or now - progress > stall or now > deadline:
                raise Stalled(len(started), f"{len(finished)} finished")
            time.sleep(0.05)
        return [started[i] for i in range(len(keys))], done

    def recover(self, peer: str) -> None:
        """After a stall: the reference worker is restarted on a purged queue; the runner
        is left as it is (its queue purged)."""
        if peer == "reference":
            self.reference.stop()
            self.publisher.purge(self.queue(peer))
            self.reference.start()
        else:
            self.publisher.purge(self.queue(peer))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def interleaved(rounds: int, measure) -> tuple[dict[str, list[float]], dict[str, str]]:
    """``measure(peer)`` for each peer in turn, ``rounds`` times: values, and per peer
    that stalled a note ("stalled after 9, 7 (of 3 rounds)")."""
    values: dict[str, list[float]] = defaultdict(list)
    stalled: dict[str, list[int]] = defaultdict(list)
    for _ in range(rounds):
        for peer in PEERS:
            try:
                values[peer].append(measure(peer))
            except Stalled as exc:
                stalled[peer].append(exc.started)
                print(f"\n[peers] {peer}: {exc} ({exc.detail})")
    return values, {peer: f"stalled after {', '.join(map(str, counts))} (of {rounds} rounds)"
                    for peer, counts in stalled.items()}


def record_ratios(measure: str, values: dict[str, list[float]], stalls: dict[str, str],
                  bars: dict[str, float], unit_note: str) -> None:
    """One figure per peer: the runner's median over the peer's (ratio, ×)."""
    runner = median(values["runner"])
    for peer in [p for p in PEERS if p != "runner" and (values.get(p) or p in stalls)]:
        ours = f"runner {runner:.3g} s"
        if not values.get(peer):
            record("peers", f"{measure}: runner / {peer}", float("nan"), "×",
                   note=f"{ours}; {peer} {stalls[peer]} ({unit_note})",
                   bar=f"<= {bars[peer]}" if peer in bars else "",
                   met=None)
            continue
        theirs = median(values[peer])
        ratio = runner / theirs
        note = f"{ours}, {peer} {theirs:.3g} s ({unit_note})"
        if peer in stalls:
            note += f"; {peer} {stalls[peer]}"
        bar = bars.get(peer)
        record("peers", f"{measure}: runner / {peer}", ratio, "×", note=note,
               bar=f"<= {bar}" if bar is not None else "",
               met=None if bar is None else ratio <= bar)


# Hand-overs of one experiment in the runner, from its JSON log (ms resolution): the log
# line that marks each, in order.  "start" is the experiment's own mark.
HANDOVERS = [("taken", " taken from "), ("launched", " started pid "), ("start", None),
             ("ended", " ended "), ("uploaded", " final uploads done"), ("settled", " ack: ")]


def runner_timeline(runner, batches: list[Batch]) -> dict[str, float]:
    """Median seconds between consecutive hand-overs (:data:`HANDOVERS`) of the runner's
    experiments in ``batches``, from publish to the ack: ``{"publish → taken": s, ...}``."""
    events: dict[str, dict[str, float]] = defaultdict(dict)
    for line in runner.log().splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        for name, marker in HANDOVERS:
            if marker and entry.get("key") and marker in entry.get("message", ""):
                at = datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
                events[entry["key"]].setdefault(name, at)
    spans: dict[str, list[float]] = defaultdict(list)
    for batch in batches:
        for key, published, started in zip(batch.keys, batch.published, batch.started):
            times = dict(events.get(key, {}), publish=published, start=started)
            order = ["publish"] + [name for name, _ in HANDOVERS]
            for a, b in zip(order, order[1:]):
                if a in times and b in times:
                    spans[f"{a} → {b}"].append(times[b] - times[a])
    return {span: median(values) for span, values in spans.items()}


def phase_sums(runner) -> dict[str, tuple[float, float]]:
    """``runner_phase_seconds`` from the supervisor's /metrics: phase → (sum, count)."""
    address = runner.status()["supervisor"]["prom_address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for line in text.splitlines():
        match = re.match(r'runner_phase_seconds_(sum|count)\{phase="(\w+)"\} (\S+)', line)
        if match:
            found[match[2]][0 if match[1] == "sum" else 1] = float(match[3])
    return {phase: (s, c) for phase, (s, c) in found.items()}


def phase_means(before: dict, after: dict) -> dict[str, float]:
    """Mean seconds per attempt of each phase observed between two :func:`phase_sums`
    (``queue_wait`` left out: it counts from the client's ``time_added``, not the publish)."""
    means = {}
    for phase, (total, count) in after.items():
        t0, c0 = before.get(phase, (0.0, 0.0))
        if count > c0 and phase != "queue_wait":
            means[phase] = (total - t0) / (count - c0)
    return means


@pytest.mark.timeout(900)
def test_publish_to_start(session):
    before, first = phase_sums(session.runner), len(session.batches)
    values, stalls = interleaved(ROUNDS, lambda peer: session.batch(peer, 1).first_start)
    phases = phase_means(before, phase_sums(session.runner))
    record_ratios("publish → start", values, stalls, {"celery": 3.0},
                  f"medians of {ROUNDS}, environment ready")
    spans = runner_timeline(session.runner, [b for peer, b in session.batches[first:]
                                             if peer == "runner"])
    taken = spans.get("publish → taken", float("nan"))
    record("peers", "runner publish → start: publish → taken", taken, "s",
           note="; ".join(f"{span} {seconds:.3f} s" for span, seconds in spans.items()
                          if span not in ("publish → taken",))
           + f" (medians); download {phases.get('download', 0.0):.3f} s, environment "
             f"{phases.get('environment', 0.0):.3f} s (means)")


@pytest.mark.timeout(1200)
def test_back_to_back(session):
    runner = session.runner
    pids = {"supervisor": runner.process.pid, **runner.role_pids()}
    cpu: dict[str, list[float]] = defaultdict(list)
    first = len(session.batches)

    machine: dict[str, list[tuple[float, float]]] = defaultdict(list)  # (all, moto) per experiment

    def measure(peer: str) -> float:
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        batch = session.batch(peer, BACK_TO_BACK)
        machine[peer].append((batch.machine_cpu / BACK_TO_BACK, batch.moto_cpu / BACK_TO_BACK))
        if peer == "runner":
            for name, pid in pids.items():
                cpu[name].append((cpu_seconds(pid) - before[name]) / BACK_TO_BACK)
        return batch.span

    values, stalls = interleaved(BACK_TO_BACK_ROUNDS, measure)
    record_ratios(f"{BACK_TO_BACK} back to back", values, stalls, {"celery": 3.0},
                  f"first publish → last done, medians of {BACK_TO_BACK_ROUNDS}")
    spans = runner_timeline(runner, [b for peer, b in session.batches[first:]
                                     if peer == "runner"])
    cycle = sum(seconds for span, seconds in spans.items()
                if span in ("taken → launched", "launched → start", "start → ended"))
    record("peers", f"runner {BACK_TO_BACK} back to back: slot cycle (taken → ended)", cycle,
           "s", note="; ".join(f"{span} {seconds:.3f} s" for span, seconds in spans.items())
           + f" (medians); {EXECUTORS} slots")
    # The floor on this machine: the CPU the whole machine spends per experiment from the
    # first publish to the last done (the peer, its runs, moto, the broker, the suite's own
    # polling of the records), spread over every core.
    for peer, samples in machine.items():
        whole = median([all_cpu for all_cpu, _ in samples])
        record("peers", f"{peer}: machine CPU per experiment ({BACK_TO_BACK} back to back)",
               1000 * whole, "ms",
               note=f"S3 endpoint (moto_server) {1000 * median([m for _, m in samples]):.0f} ms of it; "
                    f"{BACK_TO_BACK} of them on {os.cpu_count()} cores need at least "
                    f"{whole * BACK_TO_BACK / (os.cpu_count() or 1):.2f} s (/proc/stat)")
    per_role = {name: 1000 * median(values) for name, values in cpu.items()}
    record("peers", f"runner CPU per experiment ({BACK_TO_BACK} back to back)",
           sum(per_role.values()), "ms",
           note=", ".join(f"{name} {ms:.0f}" for name, ms in per_role.items())
           + " (user+system, children excluded)")


def changed_set(freeze: list[str]) -> tuple[list[str], str]:
    """The client's freeze with one line changed (``six`` to another release): the set,
    and the line it changed."""
    for i, line in enumerate(freeze):
        if line.lower().startswith("six=="):
            other = "six==1.16.0" if line != "six==1.16.0" else "six==1.15.0"
            return freeze[:i] + [other] + freeze[i + 1:], line
    raise AssertionError(f"no six in the client's freeze: {freeze}")


@pytest.mark.timeout(2400)
def test_changed_environment(session):
    changed, original = changed_set(session.client.pythonenv)
    firsts: dict[str, list[float]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(list)
    stalls: dict[str, str] = {}
    try:
        for peer in ("runner", "reference"):
            try:
                firsts[peer].append(session.batch(peer, 1, pythonenv=changed,
                                                  timeout=BUILD_TIMEOUT,
                                                  stall=BUILD_TIMEOUT).first_start)
                seconds[peer].append(session.batch(peer, 1, pythonenv=changed).first_start)
            except Stalled as exc:
                stalls[peer] = f"stalled after {exc.started}"
    finally:
        # The reference worker installed the changed line into its interpreter.
        peers.pip_install(session.ref_python, [original], env=session.reference.env)
    note = f"{len(changed)}-line freeze, {original} changed"
    record_ratios("new set, first experiment", firsts, stalls, {"reference": 0.3}, note)
    record_ratios("same set, second experiment", seconds, stalls, {}, note)


# -- where the runner's time goes (BENCH_PROFILE=1) ---------------------------------------

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """``function (path/file.py:12)`` → ``path-from-site/file.py:function``."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = os.path.relpath(path, REPO) if path.startswith(str(REPO)) else path
    return f"{path}:{match['function']}"


def summarize(raw: Path, top: int = 8):
    """A py-spy raw (collapsed) profile: sampled seconds, and the top frames by self and
    by inclusive share of the samples (``runner/`` frames only for inclusive), and the
    self share by package (``runner``, ``botocore``, ``zmq``, stdlib module ...)."""
    own: Counter = Counter()
    inclusive: Counter = Counter()
    packages: Counter = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if frames:
            own[frames[-1]] += n
            packages[frames[-1].split("/", 1)[0].split(".py", 1)[0]] += n
        for name in set(frames):
            if name.startswith("runner/"):
                inclusive[name] += n
    share = (lambda c: [(name, n / total) for name, n in c.most_common(top)]) if total else \
        (lambda c: [])
    return total / PROFILE_RATE, share(own), share(inclusive), share(packages)


@pytest.mark.timeout(900)
@pytest.mark.skipif(not PROFILE, reason="BENCH_PROFILE=1 profiles the runner's roles")
def test_profile_back_to_back(session):
    runner = session.runner
    pids = {"supervisor": runner.process.pid, **runner.role_pids()}
    out = results_path().parent / "profile"
    out.mkdir(parents=True, exist_ok=True)
    spy = str(peers.py_spy())
    samplers = {name: subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", str(PROFILE_RATE), "--format", "raw",
         "--nonblocking", "--output", str(out / f"{name}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        for name, pid in pids.items()}
    time.sleep(2.0)  # py-spy attaches
    before, cpu_before = phase_sums(runner), {n: cpu_seconds(p) for n, p in pids.items()}
    batch = session.batch("runner", BACK_TO_BACK)
    after, cpu_after = phase_sums(runner), {n: cpu_seconds(p) for n, p in pids.items()}
    for sampler in samplers.values():
        sampler.send_signal(signal.SIGINT)
    for sampler in samplers.values():
        try:
            sampler.wait(30)
        except subprocess.TimeoutExpired:
            peers.stop_process(sampler)
    starts = [s - p for s, p in zip(batch.started, batch.published)]
    cpu = {name: cpu_after[name] - cpu_before[name] for name in pids}
    lines = [f"# {BACK_TO_BACK} trivial experiments back to back on the runner, profiled", "",
             f"span {batch.span:.2f} s (first publish → last record finished; py-spy slows "
             f"it); publish → start: first {starts[0]:.3f} s, median {median(starts):.3f} s",
             "", "| phase | mean s per experiment |", "|---|---|"]
    lines += [f"| {phase} | {mean:.3f} |" for phase, mean in
              sorted(phase_means(before, after).items())]
    lines += ["", "| hand-over | median s |", "|---|---|"]
    lines += [f"| {span} | {seconds:.3f} |" for span, seconds in
              runner_timeline(runner, [batch]).items()]
    lines += ["", "CPU (user+system, /proc, children excluded) per experiment: "
              + ", ".join(f"{name} {1000 * seconds / BACK_TO_BACK:.0f} ms"
                          for name, seconds in cpu.items())
              + f"; total {1000 * sum(cpu.values()) / BACK_TO_BACK:.0f} ms", "",
              f"Shares below: py-spy at {PROFILE_RATE} Hz, samples of threads py-spy "
              "does not take for idle (on the CPU or waiting for it).", ""]
    for name in pids:
        raw = out / f"{name}.txt"
        if not raw.exists():
            lines.append(f"## {name}: no profile ({samplers[name].stderr.read().decode()[-300:]})")
            continue
        _, own, inclusive, packages = summarize(raw)
        lines += [f"## {name}: {1000 * cpu[name] / BACK_TO_BACK:.0f} ms CPU per experiment", "",
                  "by package (self): " + ", ".join(f"{p} {share:.0%}" for p, share in packages),
                  "", "self:"]
        lines += [f"- {share:.0%} {frame}" for frame, share in own]
        lines += ["", "inclusive (runner/ frames):"]
        lines += [f"- {share:.0%} {frame}" for frame, share in inclusive]
        lines.append("")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    assert len(batch.started) == BACK_TO_BACK
