"""Linux process trees: children, descendants, identity, and killing a whole tree.

Only the standard library (the run launcher, :mod:`runner.launcher`, imports this before
anything else).  Pids are ints; a process is identified across time by ``(pid, start
ticks)`` (field 22 of ``/proc/<pid>/stat``, clock ticks since boot), so a pid the kernel
reused is never taken for the process it once was.
"""
from __future__ import annotations

import ctypes
import os
import signal
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = None


def prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where the call is not available or fails."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        return _libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Make this process the child subreaper of its descendants: an orphan among them is
    re-parented here instead of to init.  False where the kernel refuses."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(signum: int) -> bool:
    """Have the kernel send ``signum`` to this process when the thread that started it ends."""
    return prctl(PR_SET_PDEATHSIG, int(signum))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name may hold spaces and parentheses: the fields start after the last ")"
    return data[data.rfind(")") + 2:].split()


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None when it does not exist."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def started_at(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch (boot time from ``/proc/stat`` plus
    its start ticks), or None when it does not exist."""
    ticks = start_ticks(pid)
    if ticks is None:
        return None
    try:
        with open("/proc/stat", "rb") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def command_line(pid: int) -> bytes:
    """``/proc/<pid>/cmdline`` (arguments NUL-separated); empty when unreadable or gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def is_running(pid: int, ticks: int | None) -> bool:
    """True when the process ``pid`` that started at ``ticks`` still exists (not a zombie)."""
    fields = _stat_fields(pid)
    if not fields or len(fields) <= 19:
        return False
    return fields[0] not in ("Z", "X") and (ticks is None or int(fields[19]) == ticks)


def has_stopped(pid: int) -> bool:
    """True only when ``pid`` is surely no live process: no such pid (``ESRCH``) or a
    zombie.  A process this one may not see (``/proc`` mounted ``hidepid``, another
    user's: ``EPERM``) counts as live: what it owns must not be taken from it."""
    fields = _stat_fields(pid)
    if fields:
        return fields[0] in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's), from ``/proc/<pid>/task/*/children``,
    or by scanning ``/proc`` where the kernel lacks those files."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    try:
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as handle:
                found.extend(int(p) for p in handle.read().split())
        return found
    except FileNotFoundError:
        pass
    except OSError:
        return found
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and len(fields) > 1 and fields[1] == str(pid):
                found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def kill_descendants(pid: int) -> int:
    """SIGKILL every process below ``pid`` (stopped first, so that none forks out of
    reach); returns how many were signalled."""
    below = descendants(pid)
    for target in below:
        try:
            os.kill(target, signal.SIGSTOP)
        except (ProcessLookupError, PermissionError):
            pass
    below = descendants(pid)  # complete now that nothing runs
    for target in below:
        try:
            os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return len(below)


def kill_tree(pid: int, ticks: int | None = None, rounds: int = 20) -> int:
    """SIGKILL ``pid`` (when it is still the process that started at ``ticks``), its process
    group and every descendant, until none is left; returns how many were signalled.

    Children are stopped before they are killed, so that none forks out of reach between
    the look and the kill.  Used on leftovers of a dead runner: processes it can no longer
    wait for (their parent is gone), so their exit is observed, not reaped."""
    if not is_running(pid, ticks):
        return 0
    signalled = 0
    for _ in range(rounds):
        tree = [pid] + descendants(pid) if is_running(pid, ticks) else []
        if not tree:
            break
        for target in tree:
            try:
                os.kill(target, signal.SIGSTOP)
            except (ProcessLookupError, PermissionError):
                pass
        for target in descendants(pid) + tree:
            try:
                os.kill(target, signal.SIGKILL)
                signalled += 1
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        time.sleep(0.05)
    return signalled
