"""The attempt files and the process-tree helpers,
with real files and real processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from runner import attempt_files, proctree, protocol

from .support import processes_with


def make_attempt(attempt_id: str = "host-1r31eq", workdir: str = "/tmp/nowhere") -> protocol.Attempt:
    return protocol.Attempt(attempt_id=attempt_id, queue="local_q", token="tok", attempts=0, key="exp-1",
                        project="proj", request={"experiment": {"key": "exp-1"}},
                        workdir=workdir, resources={"cpus": 1}, taken_at=1700000000.0)


def test_attempt_files_round_trip_and_forget(tmp_path):
    runtime = str(tmp_path)
    attempt = make_attempt()
    attempt_files.write_attempt(runtime, attempt)
    attempt_files.write_ended(runtime, attempt.attempt_id, protocol.Outcome(status="completed", exit_code=0))
    assert attempt_files.attempt_ids(runtime) == [attempt.attempt_id]
    assert attempt_files.read_attempt(runtime, attempt.attempt_id) == attempt
    assert attempt_files.read_ended(runtime, attempt.attempt_id).status == "completed"
    attempt_files.forget(runtime, attempt.attempt_id)
    assert attempt_files.attempt_ids(runtime) == []
    assert attempt_files.read_attempt(runtime, attempt.attempt_id) is None


def test_attempt_files_refuse_a_path_as_attempt_id(tmp_path):
    try:
        attempt_files.write(str(tmp_path), "../escape", "attempt", {})
    except ValueError:
        pass
    else:
        raise AssertionError("an attempt id with a slash was accepted")
    assert not (tmp_path.parent / "escape.attempt").exists()


def test_a_damaged_entry_is_dropped_on_recovery(tmp_path):
    runtime = str(tmp_path)
    attempt_files.folder(runtime).mkdir()
    (attempt_files.folder(runtime) / "host-1.attempt").write_text("{not json")
    [leftover] = attempt_files.recover(runtime)
    assert leftover.attempt is None and leftover.attempt_id == "host-1"
    assert attempt_files.attempt_ids(runtime) == []


def test_recover_kills_a_run_tree_and_spares_a_reused_pid(tmp_path):
    runtime = str(tmp_path)
    mark = f"reg-{os.getpid()}-{time.time_ns()}"
    code = ("import subprocess, sys, time; "
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', {mark!r}],"
            " start_new_session=True); time.sleep(300)")
    run = subprocess.Popen([sys.executable, "-c", code, mark], start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        deadline = time.monotonic() + 30
        while len(processes_with(mark)) < 2:
            assert time.monotonic() < deadline, "the run did not start its helper"
            time.sleep(0.05)
        attempt_files.write(runtime, "host-1", "run", {"pid": run.pid,
                                                  "ticks": proctree.start_ticks(run.pid),
                                                  "attempt": protocol.to_map(make_attempt("host-1"))})
        # the same pid number with another start time is another process: left alone
        attempt_files.write(runtime, "host-2", "run", {"pid": other.pid, "ticks": 1,
                                                  "attempt": protocol.to_map(make_attempt("host-2"))})
        leftovers = {entry.attempt_id: entry for entry in attempt_files.recover(runtime)}
        assert leftovers["host-1"].killed >= 2 and leftovers["host-2"].killed == 0
        assert run.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while processes_with(mark):
            assert time.monotonic() < deadline, "the run's helper survived"
            time.sleep(0.05)
        assert other.poll() is None
        assert leftovers["host-1"].attempt == make_attempt("host-1")
    finally:
        for process in (run, other):
            process.kill()
            process.wait()
