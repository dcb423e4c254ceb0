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

**Spare mode** (``launcher.py PARENT --spare``): the executor starts one launcher ahead of
need, so that no interpreter start lies between a prepared attempt and its experiment.  The
spare sets itself up as above, then blocks reading one *spec* from its standard input (no
CPU while it waits): the command, its working directory and its environment
(:func:`encode_spec`).  It then makes ``/dev/null`` its standard input, changes into the
working directory and goes on exactly as a launcher started with that command (the command
gets that environment; the launcher's own is the executor's minimal one).  End of file
before a whole spec (the executor is gone, or retired the spare) ends it quietly, status 0.
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
SPEC_HEADER = 4  # bytes of the spec's length (big-endian), before the spec itself


def encode_spec(argv: list[str], cwd: str, env: dict[str, str]) -> bytes:
    """The spec a spare launcher reads: its length, then NUL-terminated fields as ``execve``
    takes them (``cwd``, the number of arguments, the arguments, ``NAME=value`` for each
    variable), file-system encoded.  ValueError for what no process could be started with
    (a NUL in a string, ``=`` in a name): the executor then starts the run the direct way,
    which raises the same error as before."""
    fields = [os.fsencode(cwd), str(len(argv)).encode(), *map(os.fsencode, argv)]
    for name, value in env.items():
        key = os.fsencode(name)
        if not key or b"=" in key:
            raise ValueError(f"illegal environment variable name {name!r}")
        fields.append(key + b"=" + os.fsencode(value))
    if any(b"\0" in f for f in fields):
        raise ValueError("embedded null byte")
    body = b"".join(f + b"\0" for f in fields)
    return len(body).to_bytes(SPEC_HEADER, "big") + body


def _read_exactly(fd: int, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_spec(fd: int) -> tuple[list[str], str, dict[str, str]] | None:
    """(argv, cwd, env) of the spec on ``fd`` (blocks until it is there); None at end of
    file before a whole spec.  ValueError when it is malformed."""
    header = _read_exactly(fd, SPEC_HEADER)
    body = _read_exactly(fd, int.from_bytes(header, "big")) if header is not None else None
    if body is None:
        return None
    fields = [os.fsdecode(f) for f in body.split(b"\0")]  # as os.environ has them
    if len(fields) < 3 or fields.pop() != "" or not fields[1].isdigit():
        raise ValueError("malformed spec")
    cwd, count = fields[0], int(fields[1])
    argv, variables = fields[2:2 + count], fields[2 + count:]
    if not argv or len(argv) != count:
        raise ValueError("malformed spec")
    env = {}
    for variable in variables:
        name, sep, value = variable.partition("=")
        if not sep:
            raise ValueError("malformed spec")
        env[name] = value
    return argv, cwd, env


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


def _prepare() -> None:
    """Block the signals the launcher waits for, become the run's subreaper, die with the
    thread that started this process."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
    proctree.become_subreaper()
    proctree.die_with_parent(signal.SIGTERM)


def spare(parent: int) -> int:
    """Spare mode: wait for the spec on fd 0, then run it as :func:`launch` does."""
    _prepare()
    if os.getppid() != parent:  # the executor died before _prepare
        return 137
    try:
        spec = read_spec(0)
    except ValueError as exc:
        print(f"runner launcher: {exc}", file=sys.stderr)
        return 127
    if spec is None:  # retired, or the executor is gone: nothing was asked
        return 0
    argv, cwd, env = spec
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the command's standard input, as the direct start gives it
    os.close(null)
    if os.getppid() != parent:
        return 137
    try:
        os.chdir(cwd)
    except OSError as exc:
        print(f"runner launcher: cannot start {argv[0]}: {exc}", file=sys.stderr)
        return 127
    return launch(parent, argv, env)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0].isdigit() and argv[1] == "--spare":
        return spare(int(argv[0]))
    if len(argv) < 3 or not argv[0].isdigit() or argv[1] != "--":
        print("usage: python -I -S runner/launcher.py PARENT_PID -- COMMAND [ARG...]\n"
              "       python -I -S runner/launcher.py PARENT_PID --spare  (spec on stdin)",
              file=sys.stderr)
        return 2
    parent = int(argv[0])
    _prepare()
    if os.getppid() != parent:  # the executor died before the line above
        return 137
    return launch(parent, argv[2:])


def launch(parent: int, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Start ``argv`` (with ``env``; None: this process's), watch it and its run to the
    end; the command's exit status."""
    me = os.getpid()
    try:
        main_pid = os.fork()
    except OSError as exc:
        print(f"runner launcher: cannot start {argv[0]}: {exc}", file=sys.stderr)
        return 127
    if main_pid == 0:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            if env is None:
                os.execvp(argv[0], argv)
            else:
                os.execvpe(argv[0], argv, env)
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
