"""``runner-supervisor``: starts the five roles, watches them, and owns every lifetime.

* Options are validated all at once before anything starts (exit 2 with every problem).
* One supervisor per ``--runtime-dir`` (a lock file; exit 5 when another one holds it).
* Each role runs as ``python -m runner.rolehost <role>``; a role that exits before its first
  heartbeat stops the runner with exit 3 and the role's reason.  A role that crashes later
  is restarted (exit 4 if it keeps crashing), and the attempts it held are recovered: the
  fetcher gets them back with ``Adopt``; attempts held by another role end as cancelled
  (``RoleCrashed``) so that their request goes back to its queue, not counted.
* Roles start with ``python -P`` in the runtime directory, each in a session of its
  own: they import the installed package only, and a signal sent to the supervisor's
  process group reaches the supervisor alone.  ``runner-ctl status`` shows the hot path
  every role reports from its own process.
* Attempts a dead runner left in the attempt files (:mod:`runner.attempt_files`) are found
  at start-up: what is left of their runs is killed and each ends ``cancelled`` through the
  scraper and the uploader, so that its scrape document gets a final status.
* Signals only record; the loop acts, through the same methods as ``runner-ctl``:

  - SIGTERM/SIGINT (and ``runner-ctl drain``): :meth:`Supervisor.request_drain` — take no
    new requests, let running attempts finish for up to ``--drain-timeout``, then end the
    rest as cancelled so that their requests go back to their queues uncounted, and exit
    once nothing is in flight (or ``--shutdown-timeout`` after the hand-back began);
  - a second SIGTERM/SIGINT (and ``runner-ctl stop``): :meth:`Supervisor.request_stop_now`
    — hand everything back now; a third exits at once (local claims left behind return to
    their queue when a runner next starts);
  - ``runner-ctl resume``: :meth:`Supervisor.request_resume` undoes a drain started by
    ``runner-ctl drain`` (not one started by a signal or a limit);
  - SIGHUP (and ``runner-ctl reload``): :meth:`Supervisor.request_reload` — read the
    options again (flags, ``--options-file``, environment) and apply the live ones (queue
    match/mismatch, limits, drain timeout, log level, Slack) here and, with a ``Reload``
    message, in every role.

* ``--limit-tasks`` and ``--limit-idle-duration`` end the runner through the same drain.
* systemd: READY once every role is up and the queues were listed, STATUS lines, WATCHDOG
  only while healthy, STOPPING when an exiting drain begins (:mod:`runner.systemd`).
* ``--prom-address``: ``/metrics`` and ``/healthz`` (:mod:`runner.metrics`); Slack notices
  on a background thread (:mod:`runner.slack`).
* ``runner-ctl`` talks to it over the control socket (:mod:`runner.ctl`).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from . import (__version__, _fast, cgroups, config as config_module, fates, metadata,
               proctree, protocol, attempt_files, slack as slack_module)
from .bus import ROLES, Bus, Endpoints, control_server, poll_ms
from .errors import ConfigError, ProtocolError
from .logs import set_level, setup_logging
from .systemd import NOTIFY_VARIABLES, Notifier

log = logging.getLogger("runner.supervisor")

EXIT_CONFIG, EXIT_BOOT, EXIT_CRASH_LOOP, EXIT_LOCKED = 2, 3, 4, 5
BOOT_TIMEOUT = 60.0
HEARTBEAT_TIMEOUT = 30.0
CRASH_WINDOW, CRASH_LIMIT = 60.0, 5
STOP_WAIT = 10.0
HEALTHY_HEARTBEAT_AGE = 10.0
LOOP_WAIT = 1.0  # idle wait of the loop; messages, ctl requests and signals (SIGCHLD: a
# role exited) end it at once
STOP_RUNS_EVERY = 1.0
ROLES_FILE = "roles.json"  # in the runtime directory: the roles' pids, for the next supervisor
STATUS_EVERY = 2.0
# Roles never import from their working directory (``-P``, Python 3.11+; before that their
# working directory, the runtime directory, holds no package).
SAFE_PATH = ("-P",) if sys.version_info >= (3, 11) else ()
# Never passed to roles (and so never to experiments): systemd's and Slack's.
PRIVATE_VARIABLES = NOTIFY_VARIABLES + ("SLACK_HOOK", "RUNNER_SLACK_HOOK")

# Which role holds an attempt in each phase (for recovery when that role dies).
PHASE_OWNER = {"taken": "cache_manager", "preparing": "cache_manager", "running": "executor",
               "ending": "scraper", "uploading": "uploader"}
PHASE_RANK = {name: rank for rank, name in enumerate(
    ("taken", "preparing", "running", "ending", "uploading", "settling"))}


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


@dataclass
class Drain:
    """A drain in progress: no new work; running work finishes or is handed back."""

    why: str
    origin: str          # "signal", "ctl" or "limit"
    since: float         # time.time()
    exit: bool           # exit once nothing is in flight (else stay up, drained)
    stop_now: bool = False
    handing_back_since: float | None = None
    last_stop_runs: float = 0.0
    stopping_sent: bool = False


class Supervisor:
    """The supervisor's state and loop; ``run()`` returns the process exit status."""

    def __init__(self, config: config_module.Config, flags: dict | None = None):
        self.started = time.time()
        self.flags = dict(flags or {})  # the command line's values, for reloads
        self.config = config.with_instance(
            f"{config.hostname}-{os.getpid()}-{_fast.b62encode(int(self.started))}")
        self.endpoints = Endpoints(self.config.runtime_dir)
        self.roles = {name: RoleProcess(name) for name in ROLES}
        self.attempts: dict[str, dict] = {}
        self.queues: dict = {}
        self.queues_listed = False
        self.fetcher_taking = True
        self.signals: list[int] = []
        self.term_signals = 0
        self.drain: Drain | None = None
        self.state = "starting"
        self.finished = {"completed": 0, "failed": 0, "expired": 0, "cancelled": 0,
                         "requeued": 0, "dead": 0}
        self.tasks_taken = 0
        self.limit_stopped = False
        self.idle_since = time.time()
        self.health: tuple[bool, str] = (False, "starting")
        self.notifier = Notifier()
        self.ready_sent = False
        self._last_status = ("", 0.0)
        self.metrics = None
        self.metrics_server = None
        self.slack: slack_module.Slack | None = None
        self.reloads = 0

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
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_VARIABLES}
        env["RUNNER_ROLE_CONFIG"] = self.config.to_json()
        env["RUNNER_SUPERVISOR_PID"] = str(os.getpid())
        role.process = subprocess.Popen(
            [sys.executable, *SAFE_PATH, "-m", "runner.rolehost", role.name], env=env,
            stdin=subprocess.DEVNULL, cwd=self.config.runtime_dir, start_new_session=True)
        role.ready = False
        role.started = role.last_heartbeat = time.monotonic()
        log.debug("started %s (pid %d)", role.name, role.process.pid)
        self.save_role_pids()

    def save_role_pids(self) -> None:
        """Write the roles' pids (and start times) to ``<runtime-dir>/roles.json``."""
        roles = {r.name: {"pid": r.process.pid, "ticks": proctree.start_ticks(r.process.pid)}
                 for r in self.roles.values() if r.process is not None}
        path = Path(self.config.runtime_dir) / ROLES_FILE
        temporary = path.with_name(f".{ROLES_FILE}.tmp")
        temporary.write_text(json.dumps(roles, sort_keys=True))
        os.replace(temporary, path)

    def kill_previous_roles(self) -> None:
        """Kill the role processes of a previous supervisor still alive (a role busy when
        its supervisor was SIGKILLed may still hold the caches' locks), with what they
        started (environment builds, runs)."""
        try:
            previous = json.loads((Path(self.config.runtime_dir) / ROLES_FILE).read_text())
        except (OSError, ValueError):
            return
        for name, entry in sorted(previous.items() if isinstance(previous, dict) else ()):
            pid, ticks = (entry or {}).get("pid"), (entry or {}).get("ticks")
            if isinstance(pid, int) and pid > 1 and proctree.is_running(pid, ticks):
                proctree.kill_tree(pid, ticks)
                log.warning("role %s (pid %d) of the previous runner was still running; "
                            "killed it and what it had started", name, pid)

    def boot(self) -> None:
        """Start every role and wait until each has sent its first heartbeat.

        A SIGTERM/SIGINT while the roles boot stops the runner (exit 0, "stopped while
        booting"), also when the same signal reached the roles first (a process group's
        stop); SIGHUP waits until the roles are up.  A role that exits by itself stops
        the runner with :data:`EXIT_BOOT` and its exit status or signal named.
        """
        for role in self.roles.values():
            self.spawn(role)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not all(r.ready for r in self.roles.values()):
            self.stop_if_told_while_booting()
            for role in self.roles.values():
                code = role.process.poll()
                if code is None:
                    continue
                if code < 0:
                    # Killed by a signal: when it was the runner's stop (the group got it),
                    # the supervisor's own handler has recorded it by now; give it a moment.
                    self.serve_once(0.2)
                    self.stop_if_told_while_booting()
                    raise FatalError(EXIT_BOOT, f"role {role.name} was killed by "
                                                f"{signal_name(-code)} while booting")
                raise FatalError(EXIT_BOOT, f"role {role.name} failed to boot "
                                            f"(exit status {code}); see its message above")
            if time.monotonic() > deadline:
                late = ", ".join(r.name for r in self.roles.values() if not r.ready)
                raise FatalError(EXIT_BOOT, f"roles did not boot within {BOOT_TIMEOUT:.0f}s: {late}")
            self.serve_once(0.1)

    def stop_if_told_while_booting(self) -> None:
        """Raise the clean stop when a SIGTERM/SIGINT was recorded during boot."""
        stops = [s for s in self.signals if s in (signal.SIGTERM, signal.SIGINT)]
        if stops:
            log.info("stopped by %s while the roles were booting; no work was taken",
                     signal_name(stops[0]))
            raise FatalError(0, "stopped while booting")

    def find_leftovers(self) -> list[attempt_files.Leftover]:
        """Kill the runs a dead runner left (before any role starts)."""
        leftovers = attempt_files.recover(self.config.runtime_dir)
        for leftover in leftovers:
            log.warning("attempt %s was in flight when the previous runner stopped; %d of its "
                        "processes were still alive and were killed; ending it as cancelled",
                        leftover.attempt_id, leftover.killed)
        return [leftover for leftover in leftovers if leftover.attempt is not None]

    def end_leftovers(self, leftovers: list[attempt_files.Leftover]) -> None:
        """End each attempt a dead runner left as cancelled (its request is back in its
        queue or with another runner), through the scraper and the uploader."""
        for leftover in leftovers:
            attempt = leftover.attempt
            # A copy the dead runner closed (maybe ``completed``) is closed again as
            # cancelled: its request will run again, and only that run's result stands.
            attempt_files.forget_kind(self.config.runtime_dir, attempt.attempt_id, "ended")
            outcome = fates.outcome_for_exception(fates.RoleCrashed(
                "the runner stopped while this attempt was in flight; its request went back "
                "to its queue"))
            self.attempts[attempt.attempt_id] = {"attempt": attempt, "phase": "ending", "since": time.time(),
                                     "detail": {"recovered": True}, "times": {}}
            self.bus.send("scraper", protocol.AttemptEnded(
                attempt=attempt, outcome=outcome,
                facts={"recovered": True, "processes_killed": leftover.killed}))

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
            self.start_observability()
            log.info("runner-supervisor %s starting: instance %s, queues under %s, %d executors, "
                     "hot path %s", __version__, self.config.instance, self.config.queue_root,
                     self.config.executors, _fast.IMPLEMENTATION)
            self.notifier.status("starting roles")
            if self.config.cgroups != "off":
                done = cgroups.delegate_v2()
                if done:
                    log.info("cgroups: %s", done)
            self.kill_previous_roles()
            leftovers = self.find_leftovers()
            self.boot()
            self.end_leftovers(leftovers)
            self.state = "running"
            self.idle_since = time.time()
            log.info("all roles up; serving queues matching %s", self.config.queue_match)
            while True:
                self.serve_once(LOOP_WAIT)
                self.watch_roles()
                if self.handle_signals() or self.drain_progress():
                    break
                self.check_limits()
                self.report()
            return 0
        except FatalError as exc:
            if exc.code:
                log.error("%s", exc)
                print(f"runner-supervisor: {exc}", file=sys.stderr, flush=True)
            return exc.code
        finally:
            self.health = (False, "stopping")
            if not (self.drain and self.drain.stopping_sent):
                self.notifier.stopping("stopping")
            self.stop_roles()
            self.stop_observability()

    def start_observability(self) -> None:
        """The metrics/health HTTP server and the Slack poster, when configured."""
        if self.config.prom_address:
            from .metrics import Metrics, MetricsServer  # prometheus-client only when asked
            self.metrics = Metrics(self.config.hostname,
                                   lambda: {n: r.stats for n, r in self.roles.items()},
                                   lambda: self.queues)
            try:
                self.metrics_server = MetricsServer(self.config.prom_address, self.metrics,
                                                    lambda: self.health).start()
            except OSError as exc:
                raise FatalError(EXIT_CONFIG, f"--prom-address "
                                 f"{self.config.prom_address}: {exc}") from None
            log.info("metrics on http://%s/metrics, health on /healthz",
                     self.metrics_server.address)
        self.configure_slack()

    def configure_slack(self) -> None:
        config = self.config
        hook, room, timeout = config.slack_hook, config.slack_room, config.slack_timeout
        if self.slack is not None and (self.slack.hook, self.slack.room,
                                       self.slack.timeout) == (hook, room, timeout):
            return
        if self.slack is not None:
            self.slack.close(wait=0)
            self.slack = None
        if hook:
            self.slack = slack_module.Slack(hook, room, timeout=timeout)

    def stop_observability(self) -> None:
        if self.slack is not None:
            self.slack.close(wait=2.0)  # bounded: a dead Slack never holds the exit up
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.notifier.close()

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda number, frame: self.signals.append(number))
        # Only to wake the loop (the wake-up fd below) when a role exits: watch_roles acts.
        signal.signal(signal.SIGCHLD, lambda number, frame: None)
        # A signal also ends the loop's wait at once, so the loop may wait long when idle.
        self._signal_r, signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(signal_w, warn_on_full_buffer=False)
        self.poller.register(self._signal_r, zmq.POLLIN)

    def handle_signals(self) -> bool:
        """Act on recorded signals; True when the loop should end now."""
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                self.request_reload(f"signal {name}")
                continue
            self.term_signals += 1
            if self.term_signals == 1:
                self.request_drain(f"signal {name}", origin="signal")
            elif self.term_signals == 2:
                self.request_stop_now(f"second signal {name}")
            else:
                log.warning("signal %s again: exiting now; unfinished claims return to their "
                            "queues when a runner next starts", name)
                return True
        return False

    # -- drain, stop, resume, reload: one code path each for signals, ctl and limits -----
    def request_drain(self, why: str, origin: str, exit: bool = True) -> str:
        """Take no new work; let running attempts finish for ``--drain-timeout``, then hand
        the rest back; exit once nothing is in flight (``exit``) or stay up drained."""
        drain = self.drain
        if drain is None:
            drain = self.drain = Drain(why=why, origin=origin, since=time.time(), exit=exit)
            log.info("%s: draining: taking no new work; %d attempts in flight may finish "
                     "within %.0fs (--drain-timeout), then are handed back", why,
                     len(self.attempts), self.config.drain_timeout)
            self.state = "draining"
            self.bus.send("fetcher", protocol.StopTaking())
        else:
            if exit and not drain.exit:
                log.info("%s: the runner will exit once drained", why)
                drain.exit = True
            if origin != "ctl" and drain.origin == "ctl":
                drain.origin, drain.why = origin, why
        if drain.exit and drain.origin != "ctl" and not drain.stopping_sent:
            drain.stopping_sent = True
            self.notifier.stopping(f"draining ({why}): {len(self.attempts)} in flight")
        if self.metrics is not None:
            self.metrics.draining.set(1)
        return f"draining: {len(self.attempts)} attempts in flight"

    def request_stop_now(self, why: str) -> str:
        """End every attempt now (cancelled, handed back uncounted), then exit."""
        if self.drain is None:
            self.request_drain(why, origin="signal")
        drain = self.drain
        drain.exit = True
        if not drain.stopping_sent:
            drain.stopping_sent = True
            self.notifier.stopping(f"stopping now ({why})")
        if not drain.stop_now:
            log.warning("%s: stopping now; handing %d attempts back to their queues", why,
                        len(self.attempts))
            drain.stop_now = True
            drain.handing_back_since = time.time()
            self.state = "stopping"
            for name in ("cache_manager", "executor"):
                self.bus.send(name, protocol.StopRuns(reason=why))
        return f"stopping now: handing {len(self.attempts)} attempts back"

    def request_resume(self, why: str) -> tuple[bool, str]:
        """Undo a drain started by ``runner-ctl drain``; take work again."""
        drain = self.drain
        if drain is None:
            return False, "not draining"
        if drain.stop_now or drain.origin != "ctl":
            return False, (f"the drain was started by {drain.why} and cannot be resumed; "
                           "start the runner again instead")
        log.info("%s: resuming; taking work again", why)
        self.drain = None
        self.state = "running"
        self.idle_since = time.time()
        self.bus.send("fetcher", protocol.StartTaking())
        self.fetcher_taking = True
        if self.metrics is not None:
            self.metrics.draining.set(0)
        self.notifier.status(self.summary())
        return True, "resumed: taking work"

    def request_reload(self, why: str) -> tuple[bool, str]:
        """Read the options again and apply the live ones here and in every role."""
        try:
            fresh = config_module.from_values(self.flags, os.environ)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("%s: reload refused: %s", why, problem)
            return False, "reload refused: " + "; ".join(exc.problems)
        changed = {name: value for name, value in fresh.reloadable().items()
                   if getattr(self.config, name) != value}
        fixed = sorted(name for name in config_module.Config.__dataclass_fields__
                       if name not in config_module.RELOADABLE and name != "instance"
                       and getattr(fresh, name) != getattr(self.config, name))
        if fixed:
            log.warning("%s: %s changed but only takes effect after a restart", why,
                        ", ".join(fixed))
        self.reloads += 1
        if not changed:
            log.info("%s: options reloaded, nothing live changed", why)
            return True, "reloaded: nothing changed" + (
                f" (restart needed for {', '.join(fixed)})" if fixed else "")
        self.config = self.config.with_reloaded(changed)
        set_level(self.config.log_level)
        shown = {k: ("***" if k == "slack_hook" and v else v) for k, v in changed.items()}
        log.info("%s: reloaded %s", why, ", ".join(f"{k}={v!r}" for k, v in sorted(shown.items())))
        for name in ROLES:
            self.bus.send(name, protocol.Reload(options=changed))
        self.configure_slack()
        limit = self.config.limit_tasks
        if self.limit_stopped and (not limit or self.tasks_taken < limit) and self.drain is None:
            self.limit_stopped = False
            self.bus.send("fetcher", protocol.StartTaking())
        return True, "reloaded: " + ", ".join(sorted(changed)) + (
            f" (restart needed for {', '.join(fixed)})" if fixed else "")

    def drain_progress(self) -> bool:
        """Move a drain along; True when the loop should end (exit)."""
        drain = self.drain
        if drain is None:
            return False
        now = time.time()
        if not self.attempts and not self.fetcher_taking:
            if drain.exit:
                log.info("drained (%s): nothing in flight; stopping", drain.why)
                if not drain.stopping_sent:
                    drain.stopping_sent = True
                    self.notifier.stopping(f"drained ({drain.why}); stopping")
                return True
            self.state = "drained"
            return False
        if drain.handing_back_since is None and now - drain.since >= self.config.drain_timeout:
            log.warning("--drain-timeout (%.0fs) passed with %d attempts in flight; handing "
                        "them back to their queues", self.config.drain_timeout, len(self.attempts))
            drain.handing_back_since = now
            self.state = "handing back"
        if drain.handing_back_since is None:
            return False
        if not drain.stop_now and self.attempts and now - drain.last_stop_runs >= STOP_RUNS_EVERY:
            # Named attempts only (so a resume leaves the roles able to run new ones); sent
            # again while any is left, for attempts that were between two roles.
            drain.last_stop_runs = now
            ids = sorted(self.attempts)
            for name in ("cache_manager", "executor"):
                self.bus.send(name, protocol.StopRuns(reason=f"drain: {drain.why}", attempt_ids=ids))
        if drain.exit and now - drain.handing_back_since > self.config.shutdown_timeout:
            log.warning("--shutdown-timeout passed with %d attempts in flight; stopping anyway",
                        len(self.attempts))
            return True
        return False

    def check_limits(self) -> None:
        """--limit-tasks and --limit-idle-duration end the runner through a drain."""
        if self.drain is not None:
            return
        now = time.time()
        if self.attempts:
            self.idle_since = now
        limit = self.config.limit_tasks
        if limit and self.tasks_taken >= limit and not self.attempts:
            self.request_drain(f"--limit-tasks {limit} reached", origin="limit")
        elif (self.config.limit_idle_duration and not self.attempts
              and now - self.idle_since >= self.config.limit_idle_duration):
            self.request_drain(f"idle for {now - self.idle_since:.0f}s "
                               "(--limit-idle-duration)", origin="limit")

    # -- health, systemd, metrics ---------------------------------------------------
    def evaluate_health(self) -> tuple[bool, str]:
        now = time.monotonic()
        problems = []
        for role in self.roles.values():
            alive = role.process is not None and role.process.poll() is None
            if not alive:
                problems.append(f"{role.name} down")
            elif not role.ready:
                problems.append(f"{role.name} not ready")
            elif now - role.last_heartbeat > HEALTHY_HEARTBEAT_AGE:
                problems.append(f"{role.name} silent for {now - role.last_heartbeat:.0f}s")
            if self.metrics is not None:
                self.metrics.role_up.labels(role.name).set(
                    1 if alive and role.ready and now - role.last_heartbeat <= HEALTHY_HEARTBEAT_AGE
                    else 0)
        return (not problems, "; ".join(problems) or "ok")

    def summary(self) -> str:
        running = len(self.attempts)
        finished = sum(self.finished.values())
        served = len(self.queues)
        head = {"running": "serving", "starting": "starting"}.get(self.state, self.state)
        if self.limit_stopped and self.drain is None:
            head = "task limit reached"
        return (f"{head}: {running} in flight, {finished} finished, {served} queues"
                + ("" if self.health[0] else f"; unhealthy: {self.health[1]}"))

    def report(self) -> None:
        """Health, systemd READY/STATUS/WATCHDOG, and the start notice."""
        self.health = self.evaluate_health()
        if self.metrics is not None:
            self.metrics.healthy.set(1 if self.health[0] else 0)
        if not self.ready_sent and self.queues_listed:
            self.ready_sent = True
            self.notifier.ready(self.summary())
            log.info("ready: %d queues listed", len(self.queues))
            if self.slack is not None:
                self.slack.post(slack_module.started_notice(
                    self.config.hostname, self.config.instance, __version__, sorted(self.queues)))
        self.notifier.watchdog(self.health[0] and self.ready_sent)
        text, at = self._last_status
        now = time.monotonic()
        current = self.summary()
        if self.ready_sent and current != text and now - at >= STATUS_EVERY:
            self._last_status = (current, now)
            self.notifier.status(current)

    def serve_once(self, timeout: float) -> None:
        events = dict(self.poller.poll(poll_ms(timeout)))
        if getattr(self, "_signal_r", None) in events:
            try:
                while os.read(self._signal_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
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
                if role.name == "fetcher" and (self.drain is not None or self.limit_stopped):
                    self.bus.send("fetcher", protocol.StopTaking())  # a restarted fetcher
                if role.needs_adopt:
                    role.needs_adopt = False
                    self.bus.send("fetcher", protocol.Adopt(
                        attempts=[protocol.to_map(e["attempt"]) for e in self.attempts.values()]))
        elif isinstance(message, protocol.AttemptPhase):
            self.track(message)
        elif isinstance(message, protocol.QueueStats):
            self.queues = message.queues
            self.fetcher_taking = message.taking
            self.queues_listed = True

    def track(self, phase: protocol.AttemptPhase) -> None:
        attempt_id = phase.attempt.attempt_id
        if phase.phase == "finished":
            started = attempt_id in self.attempts  # counted in runner_project_running
            entry = self.attempts.pop(attempt_id, None) or {"attempt": phase.attempt, "detail": {}, "times": {}}
            fate = phase.detail.get("fate")
            status = phase.detail.get("status")
            key = {"ack": status, "requeue": "requeued", "dead": "dead",
                   "drop": "cancelled"}.get(fate)
            if key in self.finished:
                self.finished[key] += 1
            self.observe(entry, "finished", phase.at)
            if self.metrics is not None:
                self.metrics.attempt_finished(phase.attempt, key or "unknown", started=started)
            self.notify_finished(entry, phase)
            return
        new = attempt_id not in self.attempts
        entry = self.attempts.setdefault(attempt_id, {"attempt": phase.attempt, "detail": {}, "times": {}})
        # Phases come from several roles over separate sockets: the executor's "ending" may
        # arrive after the scraper's "uploading".  A phase never goes back.
        if PHASE_RANK.get(phase.phase, 0) >= PHASE_RANK.get(entry.get("phase"), -1):
            entry.update(phase=phase.phase, since=phase.at)
        entry["detail"].update(phase.detail)
        if new and phase.phase == "taken":
            self.tasks_taken += 1
            limit = self.config.limit_tasks
            if limit and self.tasks_taken >= limit and not self.limit_stopped:
                self.limit_stopped = True
                log.info("--limit-tasks %d: taken %d; taking no more, exiting once they are "
                         "done", limit, self.tasks_taken)
                self.bus.send("fetcher", protocol.StopTaking())
            if self.metrics is not None:
                self.metrics.attempt_started(phase.attempt)
        step = phase.detail.get("step")
        self.observe(entry, f"{phase.phase}:{step}" if step else phase.phase, phase.at)

    # Which phase boundary ends which histogram phase: boundary -> (histogram, started by).
    PHASE_SPANS = {"taken": ("queue_wait", None),
                   "preparing:environment": ("download", "preparing:download"),
                   "running": ("environment", "preparing:environment"),
                   "ending": ("run", "running"),
                   "finished": ("upload", "uploading")}

    def observe(self, entry: dict, boundary: str, at: float) -> None:
        """Record when ``boundary`` was crossed and observe the phase it ends."""
        times = entry.setdefault("times", {})
        times.setdefault(boundary, at)
        span = self.PHASE_SPANS.get(boundary)
        if span is None or self.metrics is None:
            return
        name, start_boundary = span
        if start_boundary is None:  # queue wait: from the request's time_added
            added = entry["attempt"].request.get("experiment", {}).get("time_added")
            start = float(added) if isinstance(added, (int, float)) and added > 0 else None
        else:
            start = times.get(start_boundary)
        if start is not None:
            self.metrics.observe(name, at - start)

    def notify_finished(self, entry: dict, phase: protocol.AttemptPhase) -> None:
        """Slack: final failures and expiries (with the output tail), completions if asked."""
        if self.slack is None:
            return
        fate, status = phase.detail.get("fate"), phase.detail.get("status")
        final = fate in (fates.ACK, fates.DEAD)
        if fate == fates.DEAD:
            status = "dead-lettered"
        wanted = (final and status in (fates.FAILED, fates.EXPIRED, "dead-lettered")) or (
            status == fates.COMPLETED and self.config.slack_completed)
        if wanted:
            self.slack.post(slack_module.experiment_notice(
                self.config.hostname, phase.attempt, status, phase.detail.get("reason", ""),
                entry["detail"].get("tail", "") if status != fates.COMPLETED else "",
                final=final))

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
            self.recover_attempts_of(role.name)
            self.spawn(role)

    def recover_attempts_of(self, name: str) -> None:
        """Hand the attempts a dead role held to the next step, so none is lost."""
        if name == "fetcher":
            self.roles["fetcher"].needs_adopt = True
            return
        crashed = fates.outcome_for_exception(fates.RoleCrashed(f"role {name} crashed"))
        for entry in list(self.attempts.values()):
            if PHASE_OWNER.get(entry["phase"]) != name:
                continue
            attempt = entry["attempt"]
            if name == "uploader":  # its final upload again, with the outcome the scraper kept
                outcome = attempt_files.read_ended(self.config.runtime_dir, attempt.attempt_id)
                if outcome is not None:
                    log.warning("key=%s attempt=%s was being uploaded by the uploader; "
                                "uploading it again", attempt.key, attempt.attempt_id)
                    self.bus.send("uploader", protocol.UploadRequest(attempt=attempt, final=True,
                                                                     outcome=outcome))
                    continue
            if name == "scraper":
                if attempt_files.read(self.config.runtime_dir, attempt.attempt_id, "ended") is not None:
                    entry["phase"] = "uploading"  # closed: the uploader has its final request
                    continue
                log.warning("key=%s attempt=%s was being closed by the scraper; ending it as "
                            "cancelled", attempt.key, attempt.attempt_id)
                self.bus.send("scraper", protocol.AttemptEnded(attempt=attempt, outcome=crashed))
                continue
            log.warning("key=%s attempt=%s was held by %s; ending it as cancelled", attempt.key,
                        attempt.attempt_id, name)
            if name in ("cache_manager", "executor"):
                attempt_files.kill_run(self.config.runtime_dir, attempt.attempt_id)
                self.bus.send("scraper", protocol.AttemptEnded(attempt=attempt, outcome=crashed))
                entry["phase"] = "ending"
            else:
                self.bus.send("fetcher", protocol.AttemptDone(attempt=attempt, outcome=crashed,
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

    CONTROL_COMMANDS = ("status", "drain", "resume", "stop", "reload", "cancel")

    def control_command(self, request: protocol.CtlRequest) -> protocol.CtlReply:
        command = request.command
        if command == "status":
            return protocol.CtlReply(ok=True, data=self.status())
        if command == "drain":
            stay = bool(request.args.get("stay"))
            message = self.request_drain("runner-ctl drain", origin="ctl", exit=not stay)
            return protocol.CtlReply(ok=True, data={"message": message})
        if command == "stop":
            return protocol.CtlReply(ok=True, data={
                "message": self.request_stop_now("runner-ctl stop")})
        if command == "resume":
            ok, message = self.request_resume("runner-ctl resume")
            return protocol.CtlReply(ok=ok, data={"message": message},
                                     error="" if ok else message)
        if command == "cancel":
            return self.request_cancel(str(request.args.get("key") or ""),
                                       str(request.args.get("project") or ""))
        if command == "reload":
            ok, message = self.request_reload("runner-ctl reload")
            return protocol.CtlReply(ok=ok, data={"message": message},
                                     error="" if ok else message)
        return protocol.CtlReply(ok=False, error=f"unknown command {command!r} "
                                                 f"(known: {', '.join(self.CONTROL_COMMANDS)})")

    def request_cancel(self, key: str, project: str) -> protocol.CtlReply:
        """``runner-ctl cancel KEY``: the fetcher stops its attempts (or acks the request as
        cancelled when it takes it); the reply names the attempts being stopped."""
        if not key:
            return protocol.CtlReply(ok=False, error="cancel needs the experiment's key")
        self.bus.send("fetcher", protocol.Cancel(key=key, project=project))
        attempts = sorted(attempt_id for attempt_id, entry in self.attempts.items()
                          if entry["attempt"].key == key
                          and (not project or entry["attempt"].project == project))
        if attempts:
            message = f"stopping {key}: attempt {', '.join(attempts)} ends cancelled"
        else:
            message = (f"{key} is not running here: it is acked as cancelled when this runner "
                       "takes it from its queue")
        log.warning("runner-ctl cancel %s%s: %s", f"{project}/" if project else "", key, message)
        return protocol.CtlReply(ok=True, data={"message": message, "attempts": attempts})

    def hot_path(self) -> str:
        """The hot path the roles report running (each from its own process): one name
        when they agree, ``mixed: role=name, …`` when not; the supervisor's own before any
        role has reported."""
        found = {name: role.stats.get("hot_path") for name, role in self.roles.items()
                 if role.stats.get("hot_path")}
        kinds = set(found.values())
        if not kinds:
            return _fast.IMPLEMENTATION
        if len(kinds) == 1:
            return kinds.pop()
        return "mixed: " + ", ".join(f"{n}={k}" for n, k in sorted(found.items()))

    def status(self) -> dict:
        now_mono, now = time.monotonic(), time.time()
        roles = {}
        for role in self.roles.values():
            alive = role.process is not None and role.process.poll() is None
            roles[role.name] = {"pid": role.process.pid if role.process else None,
                                "alive": alive, "ready": role.ready,
                                "restarts": len(role.crashes),
                                "heartbeat_age": round(now_mono - role.last_heartbeat, 1),
                                "hot_path": role.stats.get("hot_path", ""),
                                "stats": role.stats}
        attempts = []
        last_metric = self.roles["scraper"].stats.get("last_metric") or {}
        for attempt_id, entry in sorted(self.attempts.items()):
            attempt = entry["attempt"]
            attempts.append({"attempt": attempt_id, "key": attempt.key, "project": attempt.project,
                         "queue": attempt.queue, "attempt_number": attempt.attempts + 1,
                         "phase": entry["phase"], "pid": entry["detail"].get("pid"),
                         "devices": (attempt.resources or {}).get("devices") or "-1",
                         "started": metadata.iso_utc(attempt.taken_at),
                         "elapsed": round(now - attempt.taken_at, 1),
                         "last_metric": last_metric.get(attempt_id, "")})
        drain = None
        if self.drain is not None:
            drain = {"why": self.drain.why, "origin": self.drain.origin,
                     "elapsed": round(now - self.drain.since, 1),
                     "timeout": self.config.drain_timeout, "exit": self.drain.exit,
                     "stop_now": self.drain.stop_now,
                     "handing_back": self.drain.handing_back_since is not None,
                     "resumable": self.drain.origin == "ctl" and not self.drain.stop_now}
        fetcher = self.roles["fetcher"].stats
        healthy, reason = self.health
        return {"supervisor": {"pid": os.getpid(), "instance": self.config.instance,
                               "host": self.config.hostname,
                               "state": self.state, "started": metadata.iso_utc(self.started),
                               "uptime": round(now - self.started, 1),
                               "version": __version__, "hot_path": self.hot_path(),
                               "taking": self.fetcher_taking, "healthy": healthy,
                               "health": reason, "drain": drain,
                               "limits": {"tasks": self.config.limit_tasks,
                                          "tasks_taken": self.tasks_taken,
                                          "idle_duration": self.config.limit_idle_duration,
                                          "idle_for": 0.0 if self.attempts
                                          else round(now - self.idle_since, 1)},
                               "queue_match": self.config.queue_match,
                               "queue_mismatch": self.config.queue_mismatch,
                               "log_level": self.config.log_level, "reloads": self.reloads,
                               "prom_address": (self.metrics_server.address
                                                if self.metrics_server else ""),
                               "systemd": self.notifier.enabled,
                               "slack": self.slack.stats() if self.slack else None},
                "roles": roles, "attempts": attempts, "queues": self.queues,
                "free": fetcher.get("free") or {}, "finished": self.finished}


def signal_name(number: int) -> str:
    """``SIGTERM`` for 15; ``signal 99`` for a number with no name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def main(argv: list[str] | None = None) -> int:
    parser = config_module.build_parser(
        "runner-supervisor", "Run StudioML experiments from queues (see README.md).")
    flags = {name: value for name, value in vars(parser.parse_args(argv)).items()
             if value is not None}
    try:
        resolved = config_module.resolve(flags, os.environ)
    except ConfigError as exc:
        print("runner-supervisor: invalid options:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(resolved.config, role="supervisor")
    from_environment = resolved.from_environment()
    log.info("options from the environment: %s",
             "; ".join(from_environment) if from_environment else "none")
    for note in resolved.notes:
        log.warning("%s", note)
    return Supervisor(resolved.config, flags=flags).run()


if __name__ == "__main__":
    sys.exit(main())
