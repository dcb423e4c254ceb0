"""The run launcher: ``python -I -S …/runner/launcher.py PARENT -- COMMAND...``, the process the
executor starts for every run, which starts the experiment's command and makes the run one
unit that cannot outlive its runner.

* It is the child subreaper of the run: a process of the run that leaves the session
  (``setsid``, a daemon's double fork) and loses its parent is re-parented to the launcher,
  not to init, so the launcher still sees it.
* It dies with the executor (``PR_SET_PDEATHSIG``): when the executor process is gone,
  however it ended, the launcher kills every process of the run and exits.  ``PARENT`` is
  the executor's pid, so that an executor gone before the launcher could ask for that
  signal is noticed too (the launcher then starts nothing).
* SIGTERM, SIGINT and SIGHUP from the executor (sent to the run's process group) are passed
  on to the process groups of the run's processes that left that group, at any depth.
* When the command's process exits, every process left in the run is killed (SIGKILL) and
  reaped; then the launcher exits with the command's status (killed by the same signal
  when the command was), so that the executor sees the experiment's own result.

Standard library only, started isolated and without ``site`` (``-I -S``, by path: the
package folder it lives in is the one path it adds): it imports nothing from the working
directory or ``PYTHONPATH`` and starts in about 10 ms.
"""
from __future__ import annotations

import os
import signal
import sys

if not __package__:  # started by path: import this file's own package, nothing else
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runner import proctree  # noqa: E402

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WAITED = {signal.SIGCHLD, *FORWARDED}
CHECK_PARENT_EVERY = 1.0


def _kill_leftovers(me: int) -> None:
    """SIGKILL every process below the launcher and reap them all."""
    while True:
        for child in proctree.children(me):
            for target in [child] + proctree.descendants(child):
                try:
                    os.kill(target, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _forward(me: int, signum: int) -> None:
    """Pass ``signum`` on to the process groups of the run that are not the run's own
    (processes that left it with ``setsid``, at any depth)."""
    own_group = os.getpgrp()
    groups = set()
    for pid in proctree.descendants(me):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    for group in groups - {own_group}:
        try:
            os.killpg(group, signum)
        except (ProcessLookupError, PermissionError):
            pass


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not argv[0].isdigit() or argv[1] != "--":
        print("usage: python -I -S runner/launcher.py PARENT_PID -- COMMAND [ARG...]",
              file=sys.stderr)
        return 2
    parent, argv = int(argv[0]), argv[2:]
    me = os.getpid()
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
    proctree.become_subreaper()
    proctree.die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the executor died before the line above
        return 137
    try:
        main_pid = os.fork()
    except OSError as exc:
        print(f"runner launcher: cannot start {argv[0]}: {exc}", file=sys.stderr)
        return 127
    if main_pid == 0:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"runner launcher: cannot start {argv[0]}: {exc}\n".encode())
        os._exit(127)
    status = None
    while status is None:
        info = signal.sigtimedwait(WAITED, CHECK_PARENT_EVERY)
        if os.getppid() != parent:  # the executor is gone: the run goes with it
            _kill_leftovers(me)
            return 137
        if info is None:
            continue
        if info.si_signo in FORWARDED:
            _forward(me, info.si_signo)
            continue
        while True:  # SIGCHLD: reap what ended (orphans of the run included)
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == main_pid:
                status = wait_status
    _kill_leftovers(me)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: end the same way, so the executor sees that signal
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL and SIGSTOP have no handler to reset
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.kill(me, -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
