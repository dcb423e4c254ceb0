"""The run launcher in spare mode (``launcher.py PARENT --spare``), as the executor starts
it ahead of need: it waits for one spec on its standard input, then runs that command like
a launcher started for it.  Real processes throughout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from runner import launcher, proctree
from runner.roles.executor import spare_command

from .support import processes_with
from .test_launcher import helper, run_dies_with_its_parent, wait_until


def start_spare(command: list[str] | None = None) -> subprocess.Popen:
    """A spare launcher of this process, started as the executor starts one."""
    return subprocess.Popen(command or spare_command(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd="/",
                            start_new_session=True, close_fds=True)


def hand(spare: subprocess.Popen, argv: list[str], cwd: str, env: dict[str, str],
         timeout: float = 60) -> tuple[str, str]:
    """Send the spec, close the pipe, wait for the spare's end: (stdout, stderr)."""
    assert spare.stdin is not None
    spare.stdin.write(launcher.encode_spec(argv, cwd, env))
    spare.stdin.close()
    spare.stdin = None
    out, err = spare.communicate(timeout=timeout)
    return out.decode(errors="replace"), err.decode(errors="replace")


def test_a_spec_runs_its_command_with_its_cwd_env_and_no_stdin(tmp_path):
    spare = start_spare()
    code = ("import json, os, sys; print(json.dumps([os.getcwd(), dict(os.environ), "
            "sys.stdin.read(), os.getpgrp() == os.getsid(0)]))")
    env = {"PATH": os.defpath, "ODD": "a=b c\N{DEGREE SIGN}", "UNDECODABLE": "x\udcff"}
    out, err = hand(spare, [sys.executable, "-c", code], str(tmp_path), env)
    assert spare.returncode == 0, err
    cwd, seen_env, stdin, own_session = json.loads(out)
    assert cwd == str(tmp_path) and stdin == "" and own_session
    seen_env.pop("LC_CTYPE", None)  # set by Python's own C-locale coercion, when it applies
    assert seen_env == {"PATH": os.defpath, "ODD": "a=b c\N{DEGREE SIGN}",
                        "UNDECODABLE": "x\udcff"}


def test_end_of_file_without_a_spec_exits_quietly():
    spare = start_spare()
    assert spare.stdin is not None
    spare.stdin.write(b"\0\0")  # half a header: the executor went away mid-write
    spare.stdin.close()
    spare.stdin = None
    out, err = spare.communicate(timeout=60)
    assert (spare.returncode, out, err) == (0, b"", b"")


def test_exit_status_signal_and_missing_command_are_kept(tmp_path):
    env = {"PATH": os.defpath}
    spare = start_spare()
    hand(spare, ["sh", "-c", "exit 7"], str(tmp_path), env)
    assert spare.returncode == 7
    spare = start_spare()
    hand(spare, ["sh", "-c", "kill -TERM $$"], str(tmp_path), env)
    assert spare.returncode == -signal.SIGTERM
    spare = start_spare()
    _, err = hand(spare, ["/nonexistent/command"], str(tmp_path), env)
    assert spare.returncode == 127 and "cannot start /nonexistent/command" in err
    spare = start_spare()
    _, err = hand(spare, ["true"], str(tmp_path / "gone"), env)
    assert spare.returncode == 127 and "cannot start true" in err


def test_what_left_the_session_is_killed_when_the_command_ends(tmp_path):
    mark = f"launch-{time.time_ns()}"
    spare = start_spare()
    out, _ = hand(spare, [sys.executable, "-c", helper(mark) + "; print('started', flush=True)"],
                  str(tmp_path), {"PATH": os.defpath})
    assert spare.returncode == 0 and out == "started\n"
    wait_until(lambda: not processes_with(mark), what="the helper to be killed")


def test_an_idle_spare_blocks_without_cpu():
    spare = start_spare()
    try:
        def cpu_ticks() -> tuple[str, int]:
            fields = open(f"/proc/{spare.pid}/stat").read().rsplit(")", 1)[1].split()
            return fields[0], int(fields[11]) + int(fields[12])  # state, utime + stime

        # started and settled: asleep, its CPU time no longer moving
        wait_until(lambda: cpu_ticks()[0] == "S" and "read" in open(
            f"/proc/{spare.pid}/wchan").read(), what="the spare to block on its input")
        before = cpu_ticks()
        time.sleep(1.5)
        assert cpu_ticks() == before
    finally:
        spare.kill()
        spare.wait()


def test_an_idle_spare_ends_with_the_process_that_started_it():
    parent_code = ("import subprocess, sys, time; from runner.roles.executor import spare_command; "
                   "subprocess.Popen(spare_command(), stdin=subprocess.PIPE, "
                   "start_new_session=True); print('ok', flush=True); time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None and parent.stdout.readline() == b"ok\n"
        spares = proctree.children(parent.pid)
        assert len(spares) == 1
        parent.kill()  # SIGKILL: the spare sees the end of its input and exits
        parent.wait()
        wait_until(lambda: not proctree.is_running(spares[0], None),
                   what="the idle spare to exit")
    finally:
        parent.kill()
        parent.wait()


def test_the_run_dies_with_the_process_that_started_the_spare():
    mark = f"launch-{time.time_ns()}"
    code = helper(mark, ignore_term=True) + "; import time; time.sleep(300)"
    parent_code = (
        "import os, subprocess, sys, time\n"
        "from runner import launcher\n"
        "from runner.roles.executor import spare_command\n"
        "spare = subprocess.Popen(spare_command(), stdin=subprocess.PIPE, start_new_session=True)\n"
        f"spare.stdin.write(launcher.encode_spec([sys.executable, '-c', {code!r}, {mark!r}], "
        "'/', dict(os.environ)))\n"
        "spare.stdin.close()\n"
        "time.sleep(300)\n")
    # the parent, the experiment and its helper (the spare's command line has no mark)
    run_dies_with_its_parent(subprocess.Popen([sys.executable, "-c", parent_code, mark]), mark, 3)


def test_a_spare_whose_parent_is_already_gone_starts_nothing(tmp_path):
    command = spare_command()
    command[command.index("--spare") - 1] = "1"
    spare = start_spare(command)
    hand(spare, ["touch", str(tmp_path / "ran")], str(tmp_path), {"PATH": os.defpath})
    assert spare.returncode == 137 and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("argv, env", [
    (["a\0b"], {}),
    (["ok"], {"A=B": "x"}),
    (["ok"], {"A": "x\0y"}),
])
def test_what_no_process_could_be_started_with_is_refused(argv, env):
    with pytest.raises(ValueError):
        launcher.encode_spec(argv, "/", env)


def test_a_spec_reads_back_as_it_was_written():
    read, write = os.pipe()
    try:
        argv, env = ["prog", "", "two words", "x\udcfe"], {"A": "", "B": "=x=", "C": "\N{SNOWMAN}"}
        os.write(write, launcher.encode_spec(argv, "/some/where", env))
        assert launcher.read_spec(read) == (argv, "/some/where", env)
        os.close(write)
        write = -1
        assert launcher.read_spec(read) is None
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
