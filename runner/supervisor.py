"""``runner-supervisor``: starts the five roles, watches them, and owns every lifetime.

* Options are validated all at once before anything starts (exit 2 with every problem).
* One supervisor per ``--runtime-dir`` (a lock file; exit 5 when another one holds it).
* Each role runs as ``python -m runner.rolehost <role>``; a role that exits before its first
  heartbeat stops the runner with exit 3 and the role's reason.  A role that crashes later
  is restarted (exit 4 if it keeps crashing), and the jobs it held are recovered: the
  fetcher gets them back with ``Adopt``; attempts held by another role end as cancelled
  (``RoleCrashed``) so that their request goes back to its queue, not counted.
* Signals only record.  The first SIGTERM/SIGINT stops taking work and ends running
  attempts (they are uploaded and their requests handed back); once nothing is in flight
  (or ``--shutdown-timeout`` passed) the roles are stopped.  A second signal stops at once;
  local claims left behind return to their queue when a runner next starts.
* ``runner-ctl`` talks to it over the control socket (:mod:`runner.ctl`).
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from . import __version__, _fast, config as config_module, fates, protocol
from .bus import ROLES, Bus, Endpoints, control_server
from .errors import ConfigError, ProtocolError
from .logs import setup_logging

log = logging.getLogger("runner.supervisor")

EXIT_CONFIG, EXIT_BOOT, EXIT_CRASH_LOOP, EXIT_LOCKED = 2, 3, 4, 5
BOOT_TIMEOUT = 60.0
HEARTBEAT_TIMEOUT = 30.0
CRASH_WINDOW, CRASH_LIMIT = 60.0, 5
STOP_WAIT = 10.0

# Which role holds a job in each phase (for recovery when that role dies).
PHASE_OWNER = {"taken": "cache_manager", "preparing": "cache_manager", "running": "executor",
               "ending": "scraper", "uploading": "uploader"}


@dataclass
class RoleProcess:
    """A role's process as the supervisor sees it."""

    name: str
    process: subprocess.Popen | None = None
    ready: bool = False
    started: float = 0.0
    last_heartbeat: float = 0.0
    crashes: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    needs_adopt: bool = False


class FatalError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class Supervisor:
    """The supervisor's state and loop; ``run()`` returns the process exit status."""

    def __init__(self, config: config_module.Config):
        self.started = time.time()
        self.config = config.with_instance(
            f"{config.hostname}-{os.getpid()}-{_fast.b62encode(int(self.started))}")
        self.endpoints = Endpoints(self.config.runtime_dir)
        self.roles = {name: RoleProcess(name) for name in ROLES}
        self.jobs: dict[str, dict] = {}
        self.queues: dict = {}
        self.fetcher_taking = True
        self.signals: list[int] = []
        self.stopping_since: float | None = None
        self.state = "starting"
        self.finished = {"completed": 0, "failed": 0, "expired": 0, "cancelled": 0,
                         "requeued": 0, "dead": 0}

    # -- start-up -------------------------------------------------------------------
    def lock_runtime_dir(self) -> None:
        runtime = Path(self.config.runtime_dir)
        runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_file = open(runtime / "supervisor.lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FatalError(EXIT_LOCKED, f"another runner-supervisor is running with "
                                          f"--runtime-dir {runtime}") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()

    def spawn(self, role: RoleProcess) -> None:
        env = dict(os.environ, RUNNER_ROLE_CONFIG=self.config.to_json())
        role.process = subprocess.Popen([sys.executable, "-m", "runner.rolehost", role.name],
                                        env=env, stdin=subprocess.DEVNULL)
        role.ready = False
        role.started = role.last_heartbeat = time.monotonic()
        log.debug("started %s (pid %d)", role.name, role.process.pid)

    def boot(self) -> None:
        """Start every role and wait until each has sent its first heartbeat."""
        for role in self.roles.values():
            self.spawn(role)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not all(r.ready for r in self.roles.values()):
            for role in self.roles.values():
                code = role.process.poll()
                if code is not None:
                    raise FatalError(EXIT_BOOT, f"role {role.name} failed to boot "
                                                f"(exit status {code}); see its message above")
            if time.monotonic() > deadline:
                late = ", ".join(r.name for r in self.roles.values() if not r.ready)
                raise FatalError(EXIT_BOOT, f"roles did not boot within {BOOT_TIMEOUT:.0f}s: {late}")
            if self.signals:
                raise FatalError(0, "stopped while booting")
            self.serve_once(0.1)

    # -- the loop -------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.lock_runtime_dir()
            self.bus = Bus(self.endpoints, "supervisor")
            self.control = control_server(self.endpoints)
            self.poller = zmq.Poller()
            self.poller.register(self.bus.inbox, zmq.POLLIN)
            self.poller.register(self.control, zmq.POLLIN)
            self.install_signal_handlers()
            log.info("runner-supervisor %s starting: instance %s, queues under %s, %d executors, "
                     "hot path %s", __version__, self.config.instance, self.config.queue_root,
                     self.config.executors, _fast.IMPLEMENTATION)
            self.boot()
            self.state = "running"
            log.info("all roles up; serving queues matching %s", self.config.queue_match)
            while True:
                self.serve_once(0.1)
                self.watch_roles()
                if self.handle_signals():
                    break
            return 0
        except FatalError as exc:
            if exc.code:
                log.error("%s", exc)
                print(f"runner-supervisor: {exc}", file=sys.stderr, flush=True)
            return exc.code
        finally:
            self.stop_roles()

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda number, frame: self.signals.append(number))

    def handle_signals(self) -> bool:
        """Act on recorded signals; True when the loop should end now."""
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                log.info("SIGHUP: nothing to reload in this version")
                continue
            if self.stopping_since is None:
                self.begin_stop(f"signal {signal.Signals(signum).name}")
            else:
                log.warning("second stop signal: stopping now; unfinished claims return to "
                            "their queues when a runner next starts")
                return True
        if self.stopping_since is None:
            return False
        if not self.jobs and not self.fetcher_taking:
            log.info("nothing in flight; stopping")
            return True
        if time.time() - self.stopping_since > self.config.shutdown_timeout:
            log.warning("--shutdown-timeout passed with %d jobs in flight; stopping anyway",
                        len(self.jobs))
            return True
        return False

    def begin_stop(self, why: str) -> None:
        """Drain: take no new work, end running attempts so they are handed back."""
        log.info("%s: taking no new work and handing running work back", why)
        self.stopping_since = time.time()
        self.state = "stopping"
        self.bus.send("fetcher", protocol.StopTaking())
        for name in ("cache_manager", "executor"):
            self.bus.send(name, protocol.StopRuns(reason=why))

    def serve_once(self, timeout: float) -> None:
        events = dict(self.poller.poll(int(timeout * 1000)))
        if self.bus.inbox in events:
            message = self.bus.recv_nowait()
            while message is not None:
                self.handle(message)
                message = self.bus.recv_nowait()
        if self.control in events:
            self.serve_control()

    def handle(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.Heartbeat):
            role = self.roles.get(message.role)
            if role is None or role.process is None or role.process.pid != message.pid:
                return
            role.last_heartbeat = time.monotonic()
            role.stats = message.stats
            if not role.ready:
                role.ready = True
                if role.needs_adopt:
                    role.needs_adopt = False
                    self.bus.send("fetcher", protocol.Adopt(
                        jobs=[protocol.to_map(e["job"]) for e in self.jobs.values()]))
        elif isinstance(message, protocol.JobPhase):
            self.track(message)
        elif isinstance(message, protocol.QueueStats):
            self.queues = message.queues
            self.fetcher_taking = message.taking

    def track(self, phase: protocol.JobPhase) -> None:
        job_id = phase.job.job_id
        if phase.phase == "finished":
            self.jobs.pop(job_id, None)
            fate = phase.detail.get("fate")
            status = phase.detail.get("status")
            key = {"ack": status, "requeue": "requeued", "dead": "dead",
                   "drop": "cancelled"}.get(fate)
            if key in self.finished:
                self.finished[key] += 1
            return
        entry = self.jobs.setdefault(job_id, {"job": phase.job, "detail": {}})
        entry.update(phase=phase.phase, since=phase.at)
        entry["detail"].update(phase.detail)

    # -- role health ----------------------------------------------------------------
    def watch_roles(self) -> None:
        for role in self.roles.values():
            code = role.process.poll()
            stale = (role.ready and time.monotonic() - role.last_heartbeat > HEARTBEAT_TIMEOUT)
            if code is None and not stale:
                continue
            if stale:
                log.error("role %s sent no heartbeat for %.0fs; killing it", role.name,
                          HEARTBEAT_TIMEOUT)
                role.process.kill()
                role.process.wait()
                code = role.process.returncode
            else:
                log.error("role %s (pid %d) exited with status %s", role.name, role.process.pid,
                          code)
            now = time.monotonic()
            role.crashes = [t for t in role.crashes if now - t < CRASH_WINDOW] + [now]
            if len(role.crashes) > CRASH_LIMIT:
                raise FatalError(EXIT_CRASH_LOOP, f"role {role.name} crashed {len(role.crashes)} "
                                                  f"times within {CRASH_WINDOW:.0f}s")
            self.recover_jobs_of(role.name)
            self.spawn(role)

    def recover_jobs_of(self, name: str) -> None:
        """Hand the jobs a dead role held to the next step, so none is lost."""
        if name == "fetcher":
            self.roles["fetcher"].needs_adopt = True
            return
        crashed = fates.outcome_for_exception(fates.RoleCrashed(f"role {name} crashed"))
        for entry in list(self.jobs.values()):
            if PHASE_OWNER.get(entry["phase"]) != name:
                continue
            job = entry["job"]
            log.warning("key=%s attempt=%s was held by %s; ending it as cancelled", job.key,
                        job.job_id, name)
            if name in ("cache_manager", "executor"):
                pid = entry["detail"].get("pid")
                if pid:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                self.bus.send("scraper", protocol.AttemptEnded(job=job, outcome=crashed))
                entry["phase"] = "ending"
            else:
                self.bus.send("fetcher", protocol.JobDone(job=job, outcome=crashed,
                                                          upload_error=""))
                entry["phase"] = "settling"

    def stop_roles(self) -> None:
        """Ask every role to stop, wait, then kill what is left."""
        started = [r for r in self.roles.values() if r.process and r.process.poll() is None]
        if not started:
            return
        for role in started:
            if hasattr(self, "bus"):
                self.bus.send(role.name, protocol.Shutdown(reason="supervisor stopping"))
        deadline = time.monotonic() + STOP_WAIT
        for role in started:
            try:
                role.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("role %s did not stop; killing it", role.name)
                role.process.kill()
                role.process.wait()
        log.info("stopped")

    # -- runner-ctl -----------------------------------------------------------------
    def serve_control(self) -> None:
        while True:
            try:
                identity, empty, frame = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            try:
                request = protocol.decode(frame)
                if not isinstance(request, protocol.CtlRequest):
                    raise ProtocolError(f"expected ctl_request, got {request.TYPE}")
                reply = self.control_command(request)
            except ProtocolError as exc:
                reply = protocol.CtlReply(ok=False, error=str(exc))
            self.control.send_multipart([identity, empty, protocol.encode(reply)])

    def control_command(self, request: protocol.CtlRequest) -> protocol.CtlReply:
        if request.command == "status":
            return protocol.CtlReply(ok=True, data=self.status())
        return protocol.CtlReply(ok=False, error=f"unknown command {request.command!r} "
                                                 "(known: status)")

    def status(self) -> dict:
        now_mono, now = time.monotonic(), time.time()
        roles = {}
        for role in self.roles.values():
            alive = role.process is not None and role.process.poll() is None
            roles[role.name] = {"pid": role.process.pid if role.process else None,
                                "alive": alive, "ready": role.ready,
                                "restarts": len(role.crashes),
                                "heartbeat_age": round(now_mono - role.last_heartbeat, 1),
                                "stats": role.stats}
        jobs = []
        for job_id, entry in sorted(self.jobs.items()):
            job = entry["job"]
            jobs.append({"attempt": job_id, "key": job.key, "project": job.project,
                         "queue": job.queue, "attempt_number": job.attempts + 1,
                         "phase": entry["phase"], "pid": entry["detail"].get("pid"),
                         "elapsed": round(now - job.taken_at, 1)})
        return {"supervisor": {"pid": os.getpid(), "instance": self.config.instance,
                               "state": self.state, "uptime": round(now - self.started, 1),
                               "version": __version__, "hot_path": _fast.IMPLEMENTATION,
                               "taking": self.fetcher_taking},
                "roles": roles, "jobs": jobs, "queues": self.queues, "finished": self.finished}


def main(argv: list[str] | None = None) -> int:
    parser = config_module.build_parser(
        "runner-supervisor", "Run StudioML experiments from queues (see README.md).")
    try:
        config = config_module.load(argv, parser=parser)
    except ConfigError as exc:
        print("runner-supervisor: invalid options:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config, role="supervisor")
    return Supervisor(config).run()


if __name__ == "__main__":
    sys.exit(main())
