"""No request can wedge, crash-loop or hot-loop a runner: the reproductions, end to end.

Each test runs a real ``runner-supervisor`` (five role processes) on a real local queue and
a real ``file://`` store.  Hostile bodies must be dead-lettered with a reason while no
role crashes or restarts; a request that never fits must not block the ones behind it and
is reported once, with its reason, in the log, ``runner-ctl queues``, the metadata record
and ``runner-submit --wait``; a request handed back for the host's fault backs off and
ends failed after ``--max-requeues``; a fault retrying cannot fix ends it at once.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import sys

import pytest

ROLES = ("fetcher", "cache_manager", "executor", "scraper", "uploader")


def restarts(runner) -> dict:
    return {name: role["restarts"] for name, role in runner.status()["roles"].items()}


def queue_files(runner) -> list[str]:
    """Every message file left in the test queue: waiting or claimed (not dead)."""
    folder = runner.root / "q" / runner.queue
    found = [p.name for p in folder.iterdir() if p.is_file()]
    claimed = folder / ".claimed"
    if claimed.is_dir():
        found += [p.name for p in claimed.rglob("*") if p.is_file()]
    return found


def dead_reasons(runner) -> list[str]:
    dead = runner.root / "q" / runner.queue / ".dead"
    return sorted(p.read_text() for p in dead.glob("*.reason.txt")) if dead.is_dir() else []


def hostile(runner, good: dict) -> list[tuple[str, bytes]]:
    """The bodies of the reproductions, each made from a good request."""
    def variant(change) -> bytes:
        request = json.loads(json.dumps(good))
        request["experiment"]["key"] += "-" + str(len(made))
        change(request)
        return json.dumps(request).encode()

    made: list[tuple[str, bytes]] = []
    cases = [
        ("nested", lambda r: r["experiment"].update(info=json.loads("[" * 1100 + "]" * 1100))),
        ("msgpack-deep", lambda r: r["experiment"].update(
            info=json.loads("[" * 600 + "]" * 600))),
        ("cpus inf", lambda r: r["experiment"]["resources_needed"].update(cpus="inf")),
        ("cpus 1e400", lambda r: r["experiment"]["resources_needed"].update(cpus="1e400")),
        ("cpus list", lambda r: r["experiment"]["resources_needed"].update(cpus=[1])),
        ("time_added", lambda r: r["experiment"].update(time_added=10 ** 400)),
        ("2^64", lambda r: r["experiment"].update(info={"n": 2 ** 64})),
        ("env list", lambda r: r["config"].update(env=["A=1"])),
        ("NUL arg", lambda r: r["experiment"].update(args=["a\0b"])),
        ("absolute filename", lambda r: r["experiment"].update(filename="/bin/true")),
        ("escaping filename", lambda r: r["experiment"].update(filename="../../x.py")),
        ("key .", lambda r: r["experiment"].update(key=".")),
        ("key into another's metadata", lambda r: r["experiment"].update(key="a/_metadata")),
        ("project ..", lambda r: r["experiment"].update(project="..")),
        ("pythonver injection", lambda r: r["experiment"].update(pythonver="3.11; rm -rf /")),
        ("index redirect", lambda r: r["experiment"].update(
            pythonenv=["--index-url http://127.0.0.1:1/simple", "tinypkg==1.0"])),
        ("find-links", lambda r: r["config"].update(pip=["-f /tmp", "tinypkg"])),
        ("env too large to exec", lambda r: r["config"].update(env={"BIG": "x" * 200_000})),
    ]
    for name, change in cases:
        if name == "nested":  # json.dumps itself cannot write 1,100 levels: splice it in
            request = json.loads(json.dumps(good))
            request["experiment"]["key"] += "-nested"
            request["experiment"]["info"] = "SPLICE"
            text = json.dumps(request).replace('"SPLICE"', "[" * 1100 + "]" * 1100)
            made.append((name, text.encode()))
            continue
        made.append((name, variant(change)))
    return made


def test_hostile_bodies_are_dead_lettered_and_no_role_crashes(runner):
    runner.start()
    before = runner.role_pids()
    workspace = runner.workspace({"ok.py": "print('fine')", "x.py": "print('x')"})
    good = runner.request(workspace, "ok.py")
    bodies = hostile(runner, good)
    for _name, body in bodies:
        runner.publish(body)
    runner.publish(good)

    assert runner.wait_final(good, timeout=180)["status"] == "completed"
    runner.wait_for(lambda: len(dead_reasons(runner)) == len(bodies), timeout=60,
                    what="every hostile body dead-lettered")
    reasons = dead_reasons(runner)
    for expected in ("nested deeper", "cpus", "64 bits", "config.env", "NUL",
                     "inside the workspace", "experiment.key '.' is a relative folder",
                     "experiment.key 'a/_metadata' holds a path separator",
                     "experiment.project '..'", "pythonver '3.11; rm -rf /' is not a version",
                     "'--index-url http://127.0.0.1:1/simple' is an installer option",
                     "'-f /tmp' is an installer option", "per value"):
        assert any(expected in r for r in reasons), (expected, reasons)
    assert queue_files(runner) == []
    assert runner.role_pids() == before
    assert set(restarts(runner).values()) == {0}
    assert runner.process.poll() is None


def test_file_artifacts_outside_the_file_store_roots_are_never_read_or_written(runner):
    """A request naming host files (an input secret, a mutable output to clobber) is
    dead-lettered at admission: nothing is read from or written to them, also through a
    symlink inside the store or a root given with ``..``."""
    import tempfile
    from pathlib import Path

    runner.start()
    victim = Path(tempfile.mkdtemp(prefix="victim-"))
    try:
        (victim / "secret.txt").write_text("TOPSECRET-host-file")
        (victim / "modeldir.tar").write_bytes(b"precious")
        store = runner.store_path(runner.store_root)
        (store / "experiments").mkdir(parents=True, exist_ok=True)
        (store / "experiments" / "escape").symlink_to(victim)
        workspace = runner.workspace({"peek.py": """
            import os
            data = os.path.join("..", "data")
            for name in (os.listdir(data) if os.path.isdir(data) else []):
                print(open(os.path.join(data, name)).read())
        """})
        requests = []
        for name, url, mutable in (
                ("data", (victim / "secret.txt").as_uri(), False),
                ("modeldir", (victim / "modeldir.tar").as_uri(), True),
                ("data", f"{runner.store_root}/experiments/escape/secret.txt", False),
                ("modeldir", f"{runner.store_root}/experiments/escape/modeldir.tar", True)):
            request = runner.request(workspace, "peek.py")
            request["experiment"]["artifacts"][name] = {"qualified": url, "mutable": mutable,
                                                        "unpack": False}
            requests.append(request)
            runner.publish(request)
        good = runner.request(workspace, "peek.py")
        runner.publish(good)
        assert runner.wait_final(good, timeout=120)["status"] == "completed"
        runner.wait_for(lambda: len(dead_reasons(runner)) == len(requests), timeout=60,
                        what="every escaping request dead-lettered")
        reasons = dead_reasons(runner)
        assert all("outside the runner's file stores" in r for r in reasons), reasons
        assert sum("really" in r for r in reasons) == 2, reasons  # the symlinked ones
        assert (victim / "modeldir.tar").read_bytes() == b"precious"
        assert sorted(os.listdir(victim)) == ["modeldir.tar", "secret.txt"]
        assert "TOPSECRET" not in runner.log()
        for request in requests:
            assert not runner.experiment_dir(request).exists()
        assert queue_files(runner) == []
    finally:
        import shutil
        shutil.rmtree(victim, ignore_errors=True)


def test_a_hostile_archive_ends_the_request_after_one_attempt(runner):
    """An archive the runner refuses to unpack is the same on every retry: acked failed
    after one counted attempt, whatever --max-attempts says (SPEC section 12)."""
    import io
    import tarfile

    runner.start()
    workspace = runner.workspace({"ok.py": "print('fine')"})
    blob = runner.store_path(f"{runner.store_root}/blobstore/hostile.tar")
    blob.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(blob, "w") as tar:
        for name in ("ok.py", "../escaped.py"):
            info = tarfile.TarInfo(name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"pass\n"))
    garbage = runner.store_path(f"{runner.store_root}/blobstore/garbage.tar")
    garbage.write_bytes(b"\x1f\x8b" + os.urandom(3000))  # gzip magic, then noise
    hostile_request = runner.request(workspace, "ok.py", blob="blobstore/hostile.tar")
    garbage_request = runner.request(workspace, "ok.py", blob="blobstore/garbage.tar")
    for request in (hostile_request, garbage_request):
        runner.publish(request)
    for request, why in ((hostile_request, "'../escaped.py' has a '..' component"),
                         (garbage_request, "corrupt or unreadable archive")):
        record = runner.wait_final(request, timeout=120)
        assert (record["status"], record["attempts"]) == ("failed", 1), record
        documents = [d["runner"] for d in runner.scrape_documents(request)]
        assert len(documents) == 1, documents  # one attempt only
        assert documents[0]["error"] == "ArchiveError" and why in documents[0]["message"]
    log = runner.log()
    assert log.count("failed, not retried (ArchiveError") == 2, log[-3000:]
    assert "attempt 1 of 3 failed" not in log
    assert queue_files(runner) == []


def test_a_request_that_never_fits_does_not_block_the_ones_behind_it(runner):
    runner.start()
    workspace = runner.workspace({"ok.py": "print('fine')"})
    gpu = runner.request(workspace, "ok.py", key="needs-a-gpu")
    gpu["experiment"]["resources_needed"]["gpus"] = 1
    cpus = runner.request(workspace, "ok.py", key="needs-1000-cpus")
    cpus["experiment"]["resources_needed"]["cpus"] = 1000
    good = runner.request(workspace, "ok.py")
    for request in (gpu, cpus, good):
        runner.publish(request)

    assert runner.wait_final(good, timeout=180)["status"] == "completed"
    shown = runner.wait_for(
        lambda: (lambda out: "needs 1 GPU; this runner has 0" in out and out)(
            runner.ctl("queues").stdout), what="the reason in runner-ctl queues")
    assert "needs-a-gpu" in shown and "needs 1000 CPUs; this runner has" in shown
    record = runner.record(gpu)
    assert record["status"] == "waiting" and not record["final"]
    assert "needs 1 GPU; this runner has 0" in record["reason"]
    log = runner.log()
    assert log.count("key=needs-a-gpu cannot run on this runner") == 1
    assert log.count("key=needs-1000-cpus cannot run on this runner") == 1


def test_runner_submit_wait_says_why_a_request_cannot_run(runner):
    runner.start()
    workspace = runner.workspace({"main.py": "print('never here')"})
    result = subprocess.run(
        [sys.executable, "-m", "runner.submit", "--queue", runner.queue,
         "--queue-root", str(runner.options["queue-root"]), "--storage", runner.store_root,
         "--project", "cli", "--key", "gpu-exp", "--gpus", "1", "--wait",
         "--wait-timeout", "20s", str(workspace), "main.py"],
        capture_output=True, text=True, timeout=120, env=runner.env)
    assert result.returncode == 3, result.stderr + runner.log()
    assert "needs 1 GPU; this runner has 0" in result.stderr


def test_a_file_renamed_into_a_local_queue_by_another_tool_is_run(runner):
    runner.start()
    good = runner.request(runner.workspace({"ok.py": "print('fine')"}), "ok.py")
    folder = runner.root / "q" / runner.queue
    folder.mkdir(parents=True, exist_ok=True)
    staging = runner.root / "staging.json"
    staging.write_text(json.dumps(good))
    os.rename(staging, folder / "my-tool-request.json")
    assert runner.wait_final(good, timeout=180)["status"] == "completed"
    assert queue_files(runner) == []


@pytest.mark.runner_options(max_requeues=2)
def test_host_faults_back_off_are_bounded_and_leave_no_metadata_files(runner):
    runner.start()
    workspace = runner.workspace({"ok.py": "print('fine')"})
    good = runner.request(workspace, "ok.py")  # its upload makes the blobstore folder
    missing = runner.request(workspace, "ok.py", blob="blobstore/never-uploaded.tar")
    too_long = runner.request(workspace, "ok.py", blob="blobstore/" + "n" * 300 + ".tar")
    for request in (missing, too_long, good):
        runner.publish(request)

    record = runner.wait_final(missing, timeout=180)
    assert record["status"] == "failed"
    assert "handed back 2 times (--max-requeues 2)" in record["reason"]
    assert "--max-requeues 2" in runner.log() and "handed back 2 times" in runner.log()
    assert runner.scrape_documents(missing) == []  # retries that never ran leave no files
    assert not (runner.experiment_dir(missing) / "_metadata").exists()
    permanent = runner.wait_final(too_long, timeout=60)
    assert permanent["status"] == "failed" and "File name too long" in permanent["reason"]
    assert "retrying cannot fix it" in runner.log() and "File name too long" in runner.log()
    assert runner.wait_final(good)["status"] == "completed"
    assert queue_files(runner) == []
    assert set(restarts(runner).values()) == {0}


@pytest.mark.runner_options(executors=3, max_cores=3)
def test_a_request_that_does_not_fit_now_lets_smaller_ones_pass_then_runs(runner):
    from runner import _fast

    from .support import BLOCKING

    runner.start()
    flag = runner.root / "flag"
    blocking = runner.request(runner.workspace({"block.py": BLOCKING}), "block.py",
                              env={"FLAG": str(flag)})
    blocking["experiment"]["resources_needed"]["cpus"] = 2
    workspace = runner.workspace({"ok.py": "print('fine')"})
    big = runner.request(workspace, "ok.py", key="big-later")
    big["experiment"]["resources_needed"]["cpus"] = 2
    small = runner.request(workspace, "ok.py")
    runner.publish(blocking)
    runner.wait_for(lambda: any(j["phase"] == "running" for j in runner.status()["attempts"]),
                    what="the blocking run")
    runner.publish(big)    # 1 CPU free: does not fit now, and must not block ...
    runner.publish(small)  # ... this one
    assert runner.wait_final(small, timeout=120)["status"] == "completed"
    assert runner.record(big) is None  # not started yet: it waits, held aside
    flag.write_text("go")
    record = runner.wait_final(big, timeout=120)
    assert record["status"] == "completed"
    assert runner.wait_final(blocking)["status"] == "completed"
    # Trying a held-aside request again and again takes no attempt ids: the clock that
    # makes them stays at the present.
    seconds = _fast.b62decode(record["attempt"].rsplit("-", 1)[1])
    assert seconds <= time.time() + 5
    assert queue_files(runner) == []


def test_a_run_the_kernel_refuses_to_start_ends_after_one_attempt(runner):
    """E2BIG: the request's environment passes admission (under 1 MiB) but, with the
    variables the runner passes on, is too large to start a process with; no retry can
    change that, so the request ends failed after one attempt."""
    runner.env.update({f"RUNNER_TEST_PAD_{i}": "p" * 100_000 for i in range(12)})
    runner.start()
    workspace = runner.workspace({"ok.py": "print('fine')"})
    request = runner.request(workspace, "ok.py",
                             env={f"REQUEST_PAD_{i}": "r" * 100_000 for i in range(9)})
    runner.publish(request)
    record = runner.wait_final(request, timeout=120)
    assert (record["status"], record["attempts"]) == ("failed", 1), record
    documents = [d["runner"] for d in runner.scrape_documents(request)]
    assert [d["error"] for d in documents] == ["StartRefused"], documents
    assert "Argument list too long" in documents[0]["message"]
    assert "failed, not retried (StartRefused" in runner.log()


def test_runner_submit_refuses_what_the_runner_would_dead_letter(runner):
    """A key or project that is no single folder name, or a requirements file with an
    installer option (a common ``--extra-index-url`` line), is said by runner-submit before
    anything is published."""
    workspace = runner.workspace({"ok.py": "print('fine')"})
    with_index = runner.workspace({"ok.py": "print('fine')", "requirements.txt":
                                   "--extra-index-url https://example.invalid/simple\nsix\n"})
    base = [sys.executable, "-m", "runner.submit", "--queue", runner.queue, "--queue-root",
            str(runner.options["queue-root"]), "--storage", runner.store_root]
    for extra, directory, expected in (
            (["--key", "../x"], workspace, "experiment.key '../x' holds a path separator"),
            (["--key", "."], workspace, "experiment.key '.' is a relative folder name"),
            (["--project", "a/b"], workspace,
             "experiment.project 'a/b' holds a path separator"),
            ([], with_index, "experiment.pythonenv: '--extra-index-url "
                             "https://example.invalid/simple' is an installer option"),
            (["--pip", "-i http://127.0.0.1:1/simple"], workspace, "config.pip: '-i http")):
        done = subprocess.run([*base, *extra, str(directory), "ok.py"], capture_output=True,
                              text=True, env=runner.env, timeout=60)
        assert done.returncode == 2, (extra, done.stdout, done.stderr)
        assert expected in done.stderr, (expected, done.stderr)
    folder = runner.root / "q" / runner.queue
    assert not folder.is_dir() or queue_files(runner) == []  # nothing was published
