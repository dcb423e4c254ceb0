"""The five role processes as the supervisor sees them: start, watch, stop.

* Each role runs as ``python -P -m runner.rolehost <role>`` in the runtime directory, in a
  session of its own (a signal sent to the supervisor's process group reaches the
  supervisor alone), with the options as JSON in ``RUNNER_ROLE_CONFIG`` and the
  supervisor's pid in ``RUNNER_SUPERVISOR_PID``; systemd's and Slack's variables are never
  passed on (:data:`PRIVATE_VARIABLES`).
* ``<runtime-dir>/roles.json`` holds the roles' pids and start times (rewritten at each
  start), so that the next supervisor kills roles of this one still alive
  (:meth:`RoleProcesses.kill_previous`).
* :meth:`RoleProcesses.failed` names the roles that exited or went silent for
  :data:`HEARTBEAT_TIMEOUT` seconds (killed), counting their crashes; more than
  :data:`CRASH_LIMIT` within :data:`CRASH_WINDOW` seconds raises :class:`CrashLoop`.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import _fast, proctree
from .bus import ROLES
from .systemd import NOTIFY_VARIABLES

log = logging.getLogger("runner.supervisor")

HEARTBEAT_TIMEOUT = 30.0      # seconds of silence after which a ready role is killed
HEALTHY_HEARTBEAT_AGE = 10.0  # a ready role silent for longer is unhealthy
CRASH_WINDOW, CRASH_LIMIT = 60.0, 5
STOP_WAIT = 10.0              # seconds the roles get to stop before they are killed
ROLES_FILE = "roles.json"     # in the runtime directory: the roles' pids, for the next supervisor
# Roles never import from their working directory (``-P``, Python 3.11+; before that their
# working directory, the runtime directory, holds no package).
SAFE_PATH = ("-P",) if sys.version_info >= (3, 11) else ()
# Never passed to roles (and so never to experiments): systemd's and Slack's.
PRIVATE_VARIABLES = NOTIFY_VARIABLES + ("SLACK_HOOK", "RUNNER_SLACK_HOOK")


class CrashLoop(Exception):
    """A role crashed more than CRASH_LIMIT times within CRASH_WINDOW seconds."""


@dataclass
class RoleProcess:
    """A role's process as the supervisor sees it."""

    name: str
    process: subprocess.Popen | None = None
    ready: bool = False
    started: float = 0.0          # time.monotonic() of the last start
    last_heartbeat: float = 0.0   # time.monotonic()
    crashes: list = field(default_factory=list)  # time.monotonic() of recent crashes
    stats: dict = field(default_factory=dict)    # from its last heartbeat
    needs_adopt: bool = False     # a restarted fetcher: send Adopt once it is up

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class RoleProcesses:
    """The roles by name (in :data:`runner.bus.ROLES` order) and their processes."""

    def __init__(self, runtime_dir: str):
        self.runtime_dir = runtime_dir
        self.by_name = {name: RoleProcess(name) for name in ROLES}

    def __iter__(self) -> Iterator[RoleProcess]:
        return iter(self.by_name.values())

    def __getitem__(self, name: str) -> RoleProcess:
        return self.by_name[name]

    def get(self, name: str) -> RoleProcess | None:
        return self.by_name.get(name)

    def spawn(self, role: RoleProcess, config_json: str) -> None:
        """Start ``role``'s process with the options ``config_json``; note its pid."""
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_VARIABLES}
        env["RUNNER_ROLE_CONFIG"] = config_json
        env["RUNNER_SUPERVISOR_PID"] = str(os.getpid())
        role.process = subprocess.Popen(
            [sys.executable, *SAFE_PATH, "-m", "runner.rolehost", role.name], env=env,
            stdin=subprocess.DEVNULL, cwd=self.runtime_dir, start_new_session=True)
        role.ready = False
        role.started = role.last_heartbeat = time.monotonic()
        log.debug("started %s (pid %d)", role.name, role.process.pid)
        self.save_pids()

    def save_pids(self) -> None:
        """Write the roles' pids (and start times) to ``<runtime-dir>/roles.json``."""
        roles = {r.name: {"pid": r.process.pid, "ticks": proctree.start_ticks(r.process.pid)}
                 for r in self if r.process is not None}
        path = Path(self.runtime_dir) / ROLES_FILE
        temporary = path.with_name(f".{ROLES_FILE}.tmp")
        temporary.write_text(json.dumps(roles, sort_keys=True))
        os.replace(temporary, path)

    def kill_previous(self) -> None:
        """Kill the role processes of a previous supervisor still alive (a role busy when
        its supervisor was SIGKILLed may still hold the caches' locks), with what they
        started (environment builds, runs)."""
        try:
            previous = json.loads((Path(self.runtime_dir) / ROLES_FILE).read_text())
        except (OSError, ValueError):
            return
        for name, entry in sorted(previous.items() if isinstance(previous, dict) else ()):
            pid, ticks = (entry or {}).get("pid"), (entry or {}).get("ticks")
            if isinstance(pid, int) and pid > 1 and proctree.is_running(pid, ticks):
                proctree.kill_tree(pid, ticks)
                log.warning("role %s (pid %d) of the previous runner was still running; "
                            "killed it and what it had started", name, pid)

    def heartbeat(self, name: str, pid: int, stats: dict) -> RoleProcess | None:
        """Record a heartbeat; the role when it just became ready, else None.  A heartbeat
        from a process that is not the role's current one is ignored."""
        role = self.by_name.get(name)
        if role is None or role.process is None or role.process.pid != pid:
            return None
        role.last_heartbeat, role.stats = time.monotonic(), stats
        if role.ready:
            return None
        role.ready = True
        return role

    def failed(self) -> list[RoleProcess]:
        """The roles whose process exited, or that went silent (killed here); each crash
        is counted.  Raises :class:`CrashLoop` for a role that keeps crashing."""
        found = []
        for role in self:
            process = role.process
            if process is None:  # not started
                continue
            code = process.poll()
            stale = role.ready and time.monotonic() - role.last_heartbeat > HEARTBEAT_TIMEOUT
            if code is None and not stale:
                continue
            if stale:
                log.error("role %s sent no heartbeat for %.0fs; killing it", role.name,
                          HEARTBEAT_TIMEOUT)
                process.kill()
                process.wait()
            else:
                log.error("role %s (pid %d) exited with status %s", role.name, process.pid, code)
            now = time.monotonic()
            role.crashes = [t for t in role.crashes if now - t < CRASH_WINDOW] + [now]
            if len(role.crashes) > CRASH_LIMIT:
                raise CrashLoop(f"role {role.name} crashed {len(role.crashes)} times within "
                                f"{CRASH_WINDOW:.0f}s")
            found.append(role)
        return found

    def stop(self, ask: Callable[[str], None]) -> None:
        """``ask(name)`` every running role to stop, wait, then kill what is left."""
        started = [(r, r.process) for r in self if r.process is not None and r.alive]
        if not started:
            return
        for role, _ in started:
            ask(role.name)
        deadline = time.monotonic() + STOP_WAIT
        for role, process in started:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("role %s did not stop; killing it", role.name)
                process.kill()
                process.wait()
        log.info("stopped")

    def health(self) -> tuple[bool, str, dict[str, bool]]:
        """``(healthy, reason, up)``: every role alive, ready and heard from within
        :data:`HEALTHY_HEARTBEAT_AGE` seconds; ``reason`` names what is not ("ok" when all
        is); ``up`` says it per role."""
        now = time.monotonic()
        problems, up = [], {}
        for role in self:
            age = now - role.last_heartbeat
            if not role.alive:
                problems.append(f"{role.name} down")
            elif not role.ready:
                problems.append(f"{role.name} not ready")
            elif age > HEALTHY_HEARTBEAT_AGE:
                problems.append(f"{role.name} silent for {age:.0f}s")
            up[role.name] = role.alive and role.ready and age <= HEALTHY_HEARTBEAT_AGE
        return not problems, "; ".join(problems) or "ok", up

    def hot_path(self) -> str:
        """The hot path the roles report running (each from its own process): one name
        when they agree, ``mixed: role=name, …`` when not; the supervisor's own before any
        role has reported."""
        found = {role.name: role.stats.get("hot_path") for role in self
                 if role.stats.get("hot_path")}
        kinds = set(found.values())
        if not kinds:
            return _fast.IMPLEMENTATION
        if len(kinds) == 1:
            return str(kinds.pop())
        return "mixed: " + ", ".join(f"{n}={k}" for n, k in sorted(found.items()))

    def document(self) -> dict:
        """Each role's part of ``runner-ctl status``."""
        now = time.monotonic()
        return {role.name: {"pid": role.process.pid if role.process else None,
                            "alive": role.alive, "ready": role.ready,
                            "restarts": len(role.crashes),
                            "heartbeat_age": round(now - role.last_heartbeat, 1),
                            "hot_path": role.stats.get("hot_path", ""), "stats": role.stats}
                for role in self}
