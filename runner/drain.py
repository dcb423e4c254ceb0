"""How the runner stops taking work and ends: the drain, as a state machine.

:class:`Drain` is fed the clock (``now``: unix seconds, passed in by the caller) and the
registry's counts (attempts in flight, attempts taken, whether the fetcher still takes
work), and returns the actions the supervisor carries out, in order: :class:`StopTaking`,
:class:`StartTaking`, :class:`StopRuns`, :class:`Stopping` (systemd ``STOPPING``) and
:class:`Exit`.  It never sends, sleeps or reads the clock itself.

* A drain (SIGTERM/SIGINT, ``runner-ctl drain``, ``--limit-tasks``,
  ``--limit-idle-duration``): take no new work; running attempts may finish for
  ``--drain-timeout``, then ``StopRuns`` naming the attempts still in flight is sent every
  :data:`STOP_RUNS_EVERY` seconds (for attempts that were between two roles) so that they
  end ``cancelled`` and are handed back uncounted.  Once nothing is in flight and the
  fetcher confirmed it stopped taking, the runner exits (``exit``) or stays up drained; an
  exiting drain also ends ``--shutdown-timeout`` after the hand-back began.
* Stop-now (a second signal, ``runner-ctl stop``): ``StopRuns`` for every run at once; a
  third signal exits at once.
* Resume (``runner-ctl resume``) undoes a drain started by ``runner-ctl drain`` only.
* ``--limit-tasks``: once that many attempts were taken the fetcher is told to stop taking;
  the drain starts when they are done.  A reload that raises the limit takes work again.

``Drain.state`` is what ``runner-ctl status`` shows: ``starting``, ``running``,
``draining``, ``handing back``, ``stopping`` or ``drained``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("runner.drain")

STOP_RUNS_EVERY = 1.0  # seconds between two StopRuns naming the attempts left
SIGNAL, CTL, LIMIT = "signal", "ctl", "limit"  # where a drain came from


@dataclass(frozen=True)
class StopTaking:
    """Tell the fetcher to take no new work."""


@dataclass(frozen=True)
class StartTaking:
    """Tell the fetcher to take work again."""


@dataclass(frozen=True)
class StopRuns:
    """Tell the cache manager and the executor to end runs: those of ``attempt_ids``, or
    every run (and every one still to come) when it is empty."""

    reason: str
    attempt_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stopping:
    """Tell systemd the runner is stopping (sent at most once per drain)."""

    text: str


@dataclass(frozen=True)
class Exit:
    """End the supervisor's loop now."""

    why: str


@dataclass(frozen=True)
class Settings:
    """The options the drain follows (seconds; 0 for a limit: none)."""

    drain_timeout: float
    shutdown_timeout: float
    limit_tasks: int = 0
    limit_idle_duration: float = 0.0

    @classmethod
    def of(cls, config) -> Settings:
        """The settings of a :class:`runner.config.Config`."""
        return cls(drain_timeout=config.drain_timeout, shutdown_timeout=config.shutdown_timeout,
                   limit_tasks=config.limit_tasks or 0,
                   limit_idle_duration=config.limit_idle_duration or 0.0)


@dataclass
class Draining:
    """A drain in progress: no new work; running work finishes or is handed back."""

    why: str
    origin: str          # SIGNAL, CTL or LIMIT
    since: float         # unix seconds
    exit: bool           # exit once nothing is in flight (else stay up, drained)
    stop_now: bool = False
    handing_back_since: float | None = None
    last_stop_runs: float = 0.0
    stopping_sent: bool = False

    @property
    def resumable(self) -> bool:
        return self.origin == CTL and not self.stop_now


class Drain:
    """The runner's stop state; every method returns the actions to carry out, in order."""

    def __init__(self, settings: Settings, now: float):
        self.settings = settings
        self.state = "starting"
        self.current: Draining | None = None
        self.limit_stopped = False  # --limit-tasks reached: the fetcher takes no more
        self.idle_since = now
        self.term_signals = 0

    def started(self, now: float) -> None:
        """Every role is up: the runner serves its queues."""
        self.state, self.idle_since = "running", now

    def idle_for(self, now: float, in_flight: int) -> float:
        """Seconds without an attempt in flight (0 while one is)."""
        return 0.0 if in_flight else now - self.idle_since

    # -- requests (signals, runner-ctl, limits) ---------------------------------------
    def request(self, why: str, origin: str, now: float, in_flight: int,
                exit: bool = True) -> tuple[str, list]:
        """Start a drain (or make the current one exit / take a stronger origin)."""
        actions: list = []
        drain = self.current
        if drain is None:
            drain = self.current = Draining(why=why, origin=origin, since=now, exit=exit)
            log.info("%s: draining: taking no new work; %d attempts in flight may finish "
                     "within %.0fs (--drain-timeout), then are handed back", why, in_flight,
                     self.settings.drain_timeout)
            self.state = "draining"
            actions.append(StopTaking())
        else:
            if exit and not drain.exit:
                log.info("%s: the runner will exit once drained", why)
                drain.exit = True
            if origin != CTL and drain.origin == CTL:
                drain.origin, drain.why = origin, why
        if drain.exit and drain.origin != CTL:
            actions += self._stopping(f"draining ({why}): {in_flight} in flight")
        return f"draining: {in_flight} attempts in flight", actions

    def stop_now(self, why: str, now: float, in_flight: int) -> tuple[str, list]:
        """End every attempt now (cancelled, handed back uncounted), then exit."""
        actions: list = []
        if self.current is None:
            actions += self.request(why, SIGNAL, now, in_flight)[1]
        drain = self.current
        assert drain is not None  # started just above
        drain.exit = True
        actions += self._stopping(f"stopping now ({why})")
        if not drain.stop_now:
            log.warning("%s: stopping now; handing %d attempts back to their queues", why,
                        in_flight)
            drain.stop_now, drain.handing_back_since = True, now
            self.state = "stopping"
            actions.append(StopRuns(reason=why))
        return f"stopping now: handing {in_flight} attempts back", actions

    def resume(self, why: str, now: float) -> tuple[bool, str, list]:
        """Undo a drain started by ``runner-ctl drain``; take work again."""
        drain = self.current
        if drain is None:
            return False, "not draining", []
        if not drain.resumable:
            return False, (f"the drain was started by {drain.why} and cannot be resumed; "
                           "start the runner again instead"), []
        log.info("%s: resuming; taking work again", why)
        self.current = None
        self.state, self.idle_since = "running", now
        return True, "resumed: taking work", [StartTaking()]

    def terminate(self, name: str, now: float, in_flight: int) -> list:
        """SIGTERM/SIGINT ``name``: the first drains, the second stops now, a third exits."""
        self.term_signals += 1
        if self.term_signals == 1:
            return self.request(f"signal {name}", SIGNAL, now, in_flight)[1]
        if self.term_signals == 2:
            return self.stop_now(f"second signal {name}", now, in_flight)[1]
        log.warning("signal %s again: exiting now; unfinished claims return to their queues "
                    "when a runner next starts", name)
        return [Exit(f"signal {name} again")]

    # -- what the registry tells --------------------------------------------------------
    def taken(self, taken: int) -> list:
        """``taken`` attempts were taken so far: at ``--limit-tasks``, take no more."""
        limit = self.settings.limit_tasks
        if limit and taken >= limit and not self.limit_stopped:
            self.limit_stopped = True
            log.info("--limit-tasks %d: taken %d; taking no more, exiting once they are done",
                     limit, taken)
            return [StopTaking()]
        return []

    def fetcher_ready(self) -> list:
        """A (re)started fetcher is up: it takes work unless told otherwise."""
        return [StopTaking()] if self.current is not None or self.limit_stopped else []

    def reconfigure(self, settings: Settings, taken: int) -> list:
        """New options (a reload): a raised or removed task limit takes work again."""
        self.settings = settings
        limit = settings.limit_tasks
        if self.limit_stopped and (not limit or taken < limit) and self.current is None:
            self.limit_stopped = False
            return [StartTaking()]
        return []

    def step(self, now: float, in_flight: list[str], fetcher_taking: bool, taken: int) -> list:
        """One turn of the loop: move a drain along, or start one at a limit."""
        if self.current is None:
            return self._check_limits(now, in_flight, taken)
        return self._progress(self.current, now, in_flight, fetcher_taking)

    def _progress(self, drain: Draining, now: float, in_flight: list[str],
                  fetcher_taking: bool) -> list:
        if not in_flight and not fetcher_taking:
            if not drain.exit:
                self.state = "drained"
                return []
            log.info("drained (%s): nothing in flight; stopping", drain.why)
            return self._stopping(f"drained ({drain.why}); stopping") + [
                Exit(f"drained ({drain.why})")]
        if drain.handing_back_since is None:
            if now - drain.since < self.settings.drain_timeout:
                return []
            log.warning("--drain-timeout (%.0fs) passed with %d attempts in flight; handing "
                        "them back to their queues", self.settings.drain_timeout, len(in_flight))
            drain.handing_back_since = now
            self.state = "handing back"
        actions: list = []
        if not drain.stop_now and in_flight and now - drain.last_stop_runs >= STOP_RUNS_EVERY:
            # Named attempts only (so a resume leaves the roles able to run new ones); sent
            # again while any is left, for attempts that were between two roles.
            drain.last_stop_runs = now
            actions.append(StopRuns(reason=f"drain: {drain.why}",
                                    attempt_ids=tuple(sorted(in_flight))))
        if drain.exit and now - drain.handing_back_since > self.settings.shutdown_timeout:
            log.warning("--shutdown-timeout passed with %d attempts in flight; stopping anyway",
                        len(in_flight))
            actions.append(Exit("--shutdown-timeout passed"))
        return actions

    def _check_limits(self, now: float, in_flight: list[str], taken: int) -> list:
        """--limit-tasks and --limit-idle-duration end the runner through a drain."""
        if in_flight:
            self.idle_since = now
            return []
        limit, idle = self.settings.limit_tasks, self.settings.limit_idle_duration
        if limit and taken >= limit:
            return self.request(f"--limit-tasks {limit} reached", LIMIT, now, 0)[1]
        if idle and now - self.idle_since >= idle:
            return self.request(f"idle for {now - self.idle_since:.0f}s "
                                "(--limit-idle-duration)", LIMIT, now, 0)[1]
        return []

    def _stopping(self, text: str) -> list:
        """systemd STOPPING, once per drain."""
        if self.current is None or self.current.stopping_sent:
            return []
        self.current.stopping_sent = True
        return [Stopping(text)]

    def stopping_sent(self) -> bool:
        return self.current is not None and self.current.stopping_sent
