"""The run launcher (``runner/launcher.py``) as the executor starts it, on real processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from runner import proctree
from runner.roles.executor import launched

from .support import processes_with


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    left = [(p, open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[:3],
             [line.strip() for line in open(f"/proc/{p}/status")
              if line.startswith(("SigBlk", "SigPnd", "ShdPnd", "SigIgn"))])
            for p in processes_with("launch-")]
    raise AssertionError(f"timed out waiting for {what}: {left}")


def helper(mark: str, ignore_term: bool = False) -> str:
    body = ("import signal, time; "
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore_term else "")
            + "time.sleep(300)")
    return (f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {body!r}, "
            f"{mark!r}], start_new_session=True)")


def test_exit_status_and_signal_of_the_command_are_kept():
    assert subprocess.run(launched(["sh", "-c", "exit 7"])).returncode == 7
    assert subprocess.run(launched(["sh", "-c", "kill -TERM $$"])).returncode == -signal.SIGTERM
    missing = subprocess.run(launched(["/nonexistent/command"]), capture_output=True, text=True)
    assert missing.returncode == 127 and "cannot start /nonexistent/command" in missing.stderr


def test_what_left_the_session_is_killed_when_the_command_ends():
    mark = f"launch-{time.time_ns()}"
    code = helper(mark) + "; print('started', flush=True)"
    result = subprocess.run(launched([sys.executable, "-c", code]), capture_output=True,
                            text=True, timeout=60)  # the helper would hold stdout for 300 s
    assert result.returncode == 0 and result.stdout == "started\n"
    wait_until(lambda: not processes_with(mark), what="the helper to be killed")


def helpers(mark: str) -> list[int]:
    """The helpers marked ``mark`` (not the processes whose code merely names the mark)."""
    found = []
    for pid in processes_with(mark):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"subprocess" not in handle.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_sigterm_to_the_run_group_reaches_a_helper_outside_it():
    mark = f"launch-{time.time_ns()}"
    code = (helper(mark) + "; import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)")
    run = subprocess.Popen(launched([sys.executable, "-c", code]), start_new_session=True)
    try:
        wait_until(lambda: helpers(mark), what="the helper to start")
        os.killpg(run.pid, signal.SIGTERM)  # what the executor sends at a stop
        wait_until(lambda: not helpers(mark), what="the helper to get the SIGTERM")
        assert run.poll() is None  # the experiment ignores it and runs on
    finally:
        proctree.kill_tree(run.pid)
        run.wait()


def test_the_run_dies_with_the_process_that_started_it():
    mark = f"launch-{time.time_ns()}"
    code = helper(mark, ignore_term=True) + "; import time; time.sleep(300)"
    parent_code = ("import subprocess, sys, time; from runner.roles.executor import launched; "
                   f"subprocess.Popen(launched([sys.executable, '-c', {code!r}, {mark!r}])); "
                   "time.sleep(300)")
    # the parent, the launcher, the experiment and its helper
    run_dies_with_its_parent(subprocess.Popen([sys.executable, "-c", parent_code]), mark, 4)


def run_dies_with_its_parent(parent: subprocess.Popen, mark: str, processes: int) -> None:
    """Once ``processes`` processes carry ``mark``, SIGKILL ``parent`` (a launcher's
    parent-death signal is all that is left) and see every one of them end."""
    try:
        wait_until(lambda: len(processes_with(mark)) >= processes, what="the run and its helper")
        parent.kill()
        parent.wait()
        wait_until(lambda: not processes_with(mark), what="the run to die with its parent")
    finally:
        parent.kill()
        parent.wait()
        for pid in processes_with(mark):  # only when the test failed
            os.kill(pid, signal.SIGKILL)


def test_a_launcher_whose_parent_is_already_gone_starts_nothing(tmp_path):
    marker_file = tmp_path / "ran"
    command = launched(["touch", str(marker_file)])
    parent_index = command.index("--") - 1
    command[parent_index] = "1"  # as if its real parent had died before it started
    assert subprocess.run(command).returncode == 137
    assert not marker_file.exists()
    assert subprocess.run(launched(["touch", str(marker_file)])).returncode == 0
    assert marker_file.exists()
