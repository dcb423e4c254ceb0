"""``runner-supervisor``: starts the five roles, watches them, and owns every lifetime.

* Options are validated all at once before anything starts (exit 2 with every problem).
* One supervisor per ``--runtime-dir`` (a lock file; exit 5 when another one holds it).
* The roles' processes (:mod:`runner.role_processes`): a role that exits before its first
  heartbeat stops the runner with exit 3 and the role's reason.  A role that crashes later
  is restarted (exit 4 if it keeps crashing), and the attempts it held are handed on by
  phase (:meth:`runner.registry.Registry.hand_over`): the fetcher gets them back with
  ``Adopt``; attempts held by another role end as cancelled (``RoleCrashed``) so that their
  request goes back to its queue, not counted.
* What is in flight: :class:`runner.registry.Registry`, fed by the roles' ``AttemptPhase``.
  Attempts a dead runner left in the attempt files (:mod:`runner.attempt_files`) are found
  at start-up: what is left of their runs is killed and each ends ``cancelled`` through the
  scraper and the uploader, so that its scrape document gets a final status.
* Signals only record; the loop acts, through the same methods as ``runner-ctl``
  (:mod:`runner.control`), and the drain (:mod:`runner.drain`) decides:

  - SIGTERM/SIGINT (and ``runner-ctl drain``): :meth:`Supervisor.request_drain`;
  - a second SIGTERM/SIGINT (and ``runner-ctl stop``): :meth:`Supervisor.request_stop_now`;
    a third exits at once (local claims left behind return to their queue when a runner
    next starts);
  - ``runner-ctl resume``: :meth:`Supervisor.request_resume` undoes a drain started by
    ``runner-ctl drain`` (not one started by a signal or a limit);
  - SIGHUP (and ``runner-ctl reload``): :meth:`Supervisor.request_reload` — read the
    options again (flags, ``--options-file``, environment) and apply the live ones (queue
    match/mismatch, limits, drain timeout, log level, Slack) here and, with a ``Reload``
    message, in every role.

* ``--limit-tasks`` and ``--limit-idle-duration`` end the runner through the same drain.
* Health, systemd, ``--prom-address`` metrics, Slack and ``runner-ctl status``:
  :mod:`runner.observability`.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from pathlib import Path

import zmq

from . import (__version__, _fast, attempt_files, cgroups, config as config_module, control,
               drain as drain_module, fates, protocol)
from .bus import ROLES, Bus, Endpoints, control_server, poll_ms
from .errors import ConfigError
from .logs import set_level, setup_logging
from .observability import Observability
from .registry import CLOSE, END, SETTLE, UPLOAD, Registry
from .role_processes import CrashLoop, RoleProcesses

log = logging.getLogger("runner.supervisor")

EXIT_CONFIG, EXIT_BOOT, EXIT_CRASH_LOOP, EXIT_LOCKED = 2, 3, 4, 5
BOOT_TIMEOUT = 60.0
LOOP_WAIT = 1.0  # idle wait of the loop; messages, ctl requests and signals (SIGCHLD: a
# role exited) end it at once
HAND_OVER_NOTES = {END: "was held by {role}; ending it as cancelled",
                   CLOSE: "was being closed by the scraper; ending it as cancelled",
                   UPLOAD: "was being uploaded by the uploader; uploading it again",
                   SETTLE: "was held by {role}; ending it as cancelled"}


class FatalError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class Supervisor:
    """The supervisor's state and loop; ``run()`` returns the process exit status."""

    def __init__(self, config: config_module.Config, flags: dict | None = None):
        self.started = time.time()
        self.flags = dict(flags or {})  # the command line's values, for reloads
        self.config = config.supervisor_instance(os.getpid(), self.started)
        self.endpoints = Endpoints(self.config.runtime_dir)
        self.roles = RoleProcesses(self.config.runtime_dir)
        self.registry = Registry()
        self.drain = drain_module.Drain(drain_module.Settings.of(self.config), self.started)
        self.watch = Observability()
        self.queues: dict = {}
        self.queues_listed = False
        self.fetcher_taking = True
        self.signals: list[int] = []
        self.reloads = 0
        self.commands = control.commands(self)

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

    def boot(self) -> None:
        """Start every role and wait until each has sent its first heartbeat.

        A SIGTERM/SIGINT while the roles boot stops the runner (exit 0, "stopped while
        booting"), also when the same signal reached the roles first (a process group's
        stop); SIGHUP waits until the roles are up.  A role that exits by itself stops
        the runner with :data:`EXIT_BOOT` and its exit status or signal named.
        """
        for role in self.roles:
            self.roles.spawn(role, self.config.to_json())
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not all(r.ready for r in self.roles):
            self.stop_if_told_while_booting()
            for role in self.roles:
                code = role.process.poll() if role.process is not None else None  # spawned above
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
                late = ", ".join(r.name for r in self.roles if not r.ready)
                raise FatalError(EXIT_BOOT, f"roles did not boot within {BOOT_TIMEOUT:.0f}s: {late}")
            self.serve_once(0.1)

    def stop_if_told_while_booting(self) -> None:
        """Raise the clean stop when a SIGTERM/SIGINT was recorded during boot."""
        stops = [s for s in self.signals if s in (signal.SIGTERM, signal.SIGINT)]
        if stops:
            log.info("stopped by %s while the roles were booting; no work was taken",
                     signal_name(stops[0]))
            raise FatalError(0, "stopped while booting")

    def end_leftovers(self, leftovers: list[attempt_files.Leftover]) -> None:
        """End each attempt a dead runner left as cancelled (its request is back in its
        queue or with another runner), through the scraper and the uploader."""
        for leftover in leftovers:
            attempt = leftover.attempt
            if attempt is None:
                continue
            # A copy the dead runner closed (maybe ``completed``) is closed again as
            # cancelled: its request will run again, and only that run's result stands.
            attempt_files.forget_kind(self.config.runtime_dir, attempt.attempt_id, "ended")
            outcome = fates.outcome_for_exception(fates.RoleCrashed(
                "the runner stopped while this attempt was in flight; its request went back "
                "to its queue"))
            self.registry.add(attempt, protocol.PHASE_ENDING, time.time(), recovered=True)
            self.bus.send("scraper", protocol.AttemptEnded(
                attempt=attempt, outcome=outcome,
                facts={"recovered": True, "processes_killed": leftover.killed}))

    def start(self) -> None:
        """Everything before the loop: lock, sockets, signals, observability, the previous
        runner's leftovers, the roles."""
        self.lock_runtime_dir()
        self.bus = Bus(self.endpoints, "supervisor")
        self.control = control_server(self.endpoints)
        self.poller = zmq.Poller()
        self.poller.register(self.bus.inbox, zmq.POLLIN)
        self.poller.register(self.control, zmq.POLLIN)
        self.install_signal_handlers()
        try:
            self.watch.start(self.config, lambda: {r.name: r.stats for r in self.roles},
                             lambda: self.queues)
        except OSError as exc:
            raise FatalError(EXIT_CONFIG, f"--prom-address {self.config.prom_address}: "
                                          f"{exc}") from None
        log.info("runner-supervisor %s starting: instance %s, queues under %s, %d executors, "
                 "hot path %s", __version__, self.config.instance, self.config.queue_root,
                 self.config.executors, _fast.IMPLEMENTATION)
        self.watch.notifier.status("starting roles")
        if self.config.cgroups != "off":
            done = cgroups.delegate_v2()
            if done:
                log.info("cgroups: %s", done)
        self.roles.kill_previous()
        leftovers = attempt_files.recover(self.config.runtime_dir)  # before any role starts
        self.boot()
        self.end_leftovers(leftovers)

    # -- the loop -------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.start()
            self.drain.started(time.time())
            log.info("all roles up; serving queues matching %s", self.config.queue_match)
            while True:
                self.serve_once(LOOP_WAIT)
                self.watch_roles()
                actions = self.signal_actions() + self.drain.step(
                    time.time(), self.registry.ids(), self.fetcher_taking, self.registry.taken)
                if self.carry_out(actions):
                    break
                self.watch.report(self.roles, self.summary, self.queues, self.queues_listed,
                                  self.config)
            return 0
        except FatalError as exc:
            if exc.code:
                log.error("%s", exc)
                print(f"runner-supervisor: {exc}", file=sys.stderr, flush=True)
            return exc.code
        finally:
            self.watch.health = (False, "stopping")
            if not self.drain.stopping_sent():
                self.watch.notifier.stopping("stopping")
            self.roles.stop(self.ask_to_stop)
            self.watch.stop()
            self.remove_control_socket()

    def remove_control_socket(self) -> None:
        """A supervisor that ends leaves no control socket behind (``runner-ctl`` then says
        that none runs, not that one was killed)."""
        if hasattr(self, "control"):
            self.control.close(linger=0)
            with contextlib.suppress(OSError):
                self.endpoints.control_path.unlink()

    def ask_to_stop(self, name: str) -> None:
        if hasattr(self, "bus"):  # the roles were started
            self.bus.send(name, protocol.Shutdown(reason="supervisor stopping"))

    def carry_out(self, actions: list) -> bool:
        """Carry out the drain's actions, in order; True when one says to exit now."""
        for action in actions:
            if isinstance(action, drain_module.Exit):
                return True
            if isinstance(action, drain_module.StopTaking):
                self.bus.send("fetcher", protocol.StopTaking())
            elif isinstance(action, drain_module.StartTaking):
                self.bus.send("fetcher", protocol.StartTaking())
                self.fetcher_taking = True
            elif isinstance(action, drain_module.StopRuns):
                for name in ("cache_manager", "executor"):
                    self.bus.send(name, protocol.StopRuns(reason=action.reason,
                                                          attempt_ids=list(action.attempt_ids)))
            elif isinstance(action, drain_module.Stopping):
                self.watch.notifier.stopping(action.text)
        self.watch.draining(self.drain.current is not None)
        return False

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda number, frame: self.signals.append(number))
        # Only to wake the loop (the wake-up fd below) when a role exits: watch_roles acts.
        signal.signal(signal.SIGCHLD, lambda number, frame: None)
        # A signal also ends the loop's wait at once, so the loop may wait long when idle.
        self._signal_r, signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(signal_w, warn_on_full_buffer=False)
        self.poller.register(self._signal_r, zmq.POLLIN)

    def signal_actions(self) -> list:
        """The actions of the signals recorded since the last turn (SIGHUP reloads here)."""
        actions: list = []
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                self.request_reload(f"signal {name}")
            else:
                actions += self.drain.terminate(name, time.time(), len(self.registry))
        return actions

    # -- drain, stop, resume, reload: one code path each for signals, ctl and limits -----
    def request_drain(self, why: str, origin: str, exit: bool = True) -> str:
        """Take no new work; let running attempts finish for ``--drain-timeout``, then hand
        the rest back; exit once nothing is in flight (``exit``) or stay up drained."""
        message, actions = self.drain.request(why, origin, time.time(), len(self.registry),
                                              exit=exit)
        self.carry_out(actions)
        return message

    def request_stop_now(self, why: str) -> str:
        """End every attempt now (cancelled, handed back uncounted), then exit."""
        message, actions = self.drain.stop_now(why, time.time(), len(self.registry))
        self.carry_out(actions)
        return message

    def request_resume(self, why: str) -> tuple[bool, str]:
        """Undo a drain started by ``runner-ctl drain``; take work again."""
        ok, message, actions = self.drain.resume(why, time.time())
        self.carry_out(actions)
        if ok:
            self.watch.notifier.status(self.summary())
        return ok, message

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
        restart = f" (restart needed for {', '.join(fixed)})" if fixed else ""
        if fixed:
            log.warning("%s: %s changed but only takes effect after a restart", why,
                        ", ".join(fixed))
        self.reloads += 1
        if not changed:
            log.info("%s: options reloaded, nothing live changed", why)
            return True, "reloaded: nothing changed" + restart
        self.config = self.config.with_reloaded(changed)
        set_level(self.config.log_level)
        shown = {k: ("***" if k == "slack_hook" and v else v) for k, v in changed.items()}
        log.info("%s: reloaded %s", why, ", ".join(f"{k}={v!r}" for k, v in sorted(shown.items())))
        for name in ROLES:
            self.bus.send(name, protocol.Reload(options=changed))
        self.watch.configure_slack(self.config)
        self.carry_out(self.drain.reconfigure(drain_module.Settings.of(self.config),
                                              self.registry.taken))
        return True, "reloaded: " + ", ".join(sorted(changed)) + restart

    # -- runner-ctl (:func:`runner.control.commands`) ------------------------------------
    def status(self) -> dict:
        """The document ``runner-ctl status`` shows."""
        return self.watch.status(config=self.config, started=self.started, roles=self.roles,
                                 registry=self.registry, drain=self.drain, queues=self.queues,
                                 taking=self.fetcher_taking, reloads=self.reloads)

    def summary(self) -> str:
        return self.watch.summary(self.drain, self.registry, self.queues)

    # -- messages -------------------------------------------------------------------
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
            control.serve(self.control, self.commands)

    def handle(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.Heartbeat):
            role = self.roles.heartbeat(message.role, message.pid, message.stats)
            if role is not None and role.name == "fetcher":  # up (again)
                self.carry_out(self.drain.fetcher_ready())
            if role is not None and role.needs_adopt:
                role.needs_adopt = False
                self.bus.send("fetcher", protocol.Adopt(
                    attempts=[protocol.to_map(entry.attempt) for entry in self.registry]))
        elif isinstance(message, protocol.AttemptPhase):
            self.track(message)
        elif isinstance(message, protocol.QueueStats):
            self.queues = message.queues
            self.fetcher_taking = message.taking
            self.queues_listed = True

    def track(self, phase: protocol.AttemptPhase) -> None:
        tracked = self.registry.track(phase)
        if tracked.taken:
            self.carry_out(self.drain.taken(self.registry.taken))
        self.watch.tracked(tracked, phase, self.config)

    # -- role health ----------------------------------------------------------------
    def watch_roles(self) -> None:
        """Restart the roles that died, handing on the attempts they held."""
        try:
            failed = self.roles.failed()
        except CrashLoop as exc:
            raise FatalError(EXIT_CRASH_LOOP, str(exc)) from None
        for role in failed:
            self.recover_attempts_of(role.name)
            self.roles.spawn(role, self.config.to_json())

    def recover_attempts_of(self, name: str) -> None:
        """Hand the attempts a dead role held to the next step, so none is lost."""
        if name == "fetcher":
            self.roles["fetcher"].needs_adopt = True
            return
        runtime = self.config.runtime_dir
        crashed = fates.outcome_for_exception(fates.RoleCrashed(f"role {name} crashed"))
        for step in self.registry.hand_over(
                name, lambda attempt_id: attempt_files.read_ended(runtime, attempt_id)):
            attempt = step.attempt
            log.warning("key=%s attempt=%s %s", attempt.key, attempt.attempt_id,
                        HAND_OVER_NOTES[step.action].format(role=name))
            if step.action == END:
                attempt_files.kill_run(runtime, attempt.attempt_id)
            if step.action in (END, CLOSE):
                self.bus.send("scraper", protocol.AttemptEnded(attempt=attempt, outcome=crashed))
            elif step.action == UPLOAD:  # its final upload again, with the outcome kept
                self.bus.send("uploader", protocol.UploadRequest(
                    attempt=attempt, final=True, outcome=step.outcome))
            else:
                self.bus.send("fetcher", protocol.AttemptDone(attempt=attempt, outcome=crashed,
                                                              upload_error=""))


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
