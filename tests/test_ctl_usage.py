"""``runner-ctl`` as people type it: extra words, odd keys, bad numbers, pipes closed early,
and a supervisor that was killed (real runner-ctl and runner-supervisor processes)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .test_e2e_cancel import start_blocking

REPO = Path(__file__).resolve().parent.parent


def ctl(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.ctl", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv, said", [
    (["watch", "--interval", "-1"], "argument --interval: must be more than 0 seconds"),
    (["--timeout", "-5", "status"], "argument --timeout: must be more than 0 seconds"),
    (["--timeout", "soon", "status"], "argument --timeout: not a number of seconds"),
    (["watch", "--count", "-2"], "argument --count: must be 0 (no limit) or more"),
    (["drain", "extra"], "drain takes no further words, not 'extra'"),
    (["status", "running"], "status takes no further words, not 'running'"),
])
def test_bad_usage_is_a_usage_error_before_anything_is_asked(tmp_path: Path, argv, said) -> None:
    proc = ctl("--runtime-dir", str(tmp_path), *argv)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert said in proc.stderr
    assert "Traceback" not in proc.stderr


def test_extra_words_do_not_drain_and_a_key_named_status_can_be_cancelled(runner) -> None:
    runner.start()
    request, flag = start_blocking(runner, "status")
    assert runner.ctl("drain", "extra").returncode == 2
    assert runner.status()["supervisor"]["drain"] is None  # nothing happened
    done = runner.ctl("cancel", "status")
    assert done.returncode == 0, done.stderr
    assert "stopping status" in done.stdout
    assert runner.wait_final(request)["status"] == "cancelled"
    assert not flag.exists()
    assert runner.process.poll() is None and runner.stop() == 0


def test_a_pipe_closed_early_ends_quietly(runner) -> None:
    runner.start()
    proc = subprocess.Popen([sys.executable, "-m", "runner.ctl", "--runtime-dir",
                             str(runner.options["runtime-dir"]), "--json", "status"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before runner-ctl writes (`| head -0`)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_a_killed_supervisor_is_reported_at_once_not_after_the_timeout(runner) -> None:
    runner.start()
    runner.kill()  # SIGKILL: the control socket file stays behind
    socket_file = Path(runner.options["runtime-dir"]) / "control"
    assert socket_file.exists()
    # A command line that would wait an hour if it waited at all (the subprocess guard is 60 s).
    proc = ctl("--runtime-dir", str(runner.options["runtime-dir"]), "--timeout", "3600", "status")
    assert proc.returncode == 1
    assert "nothing listens on the control socket" in proc.stderr
