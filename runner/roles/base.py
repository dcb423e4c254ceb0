"""The lifecycle every role shares: ``initialize()``, ``loop()``, ``shutdown()``.

A role only *does* its work; how it is hosted (a process under the supervisor, see
:mod:`runner.rolehost`, or a thread in a test) is decided elsewhere.  The loop waits on
the role's inbox, hands each message to ``handle()``, calls ``tick()`` about every
``TICK`` seconds, sends a heartbeat to the supervisor every ``HEARTBEAT`` seconds, and
returns on a :class:`~runner.protocol.Shutdown` message or :meth:`request_stop`.  A heartbeat
that falls due while the inbox is still full is sent between two messages, so a role kept
busy by a stream of messages (a scraper fed by a fast run) is never taken for dead.
``tick_interval()`` may lengthen ``TICK`` while a role has nothing to watch, and a role that
has been idle since its last heartbeat sends the next one after ``IDLE_HEARTBEAT`` only
(an idle runner must cost close to nothing); a tick and a heartbeat due soon after it share
one wake-up.  :meth:`watch` adds a descriptor (an inotify descriptor, say) to what the loop
waits on, with a callback run in the loop when it is readable.

Worker threads inside a role never touch the bus: they call :meth:`post`, and the loop
hands what they posted to :meth:`runner.bus.Bus.post`, which sends the messages for one
destination together in one frame (heartbeats go the same way).  The bus sends everything
before the loop waits, before each ``tick()`` (which may be slow) and when the loop ends, and
bounds how long a message waits while the loop is busy; the loop's own sends should use
:meth:`post` too, so that they keep their order with the rest.  A post from another thread
wakes the loop at once (a byte on a pipe the loop polls next to its inbox), so ``TICK`` only
paces periodic work and never adds latency to a hand-over; :meth:`wake` with ``tick=True``
also runs ``tick()`` right away (an executor whose run just ended, a fetcher with a slot just
freed).

A role hosted in a process of its own dies with its parent: :meth:`die_with` names the
parent's pid, and the loop checks before each ``tick()`` that it is still this process's
parent, calling the host's ``orphaned`` callback when it is not.  A role hosted in a thread
(:func:`runner.rolehost.run_in_thread`) has no such check.
"""
from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
from typing import Callable, ClassVar

from .. import _fast, protocol
from ..bus import SUPERVISOR, BatchingBus
from ..config import Config
from ..logs import set_level


class Role:
    """Base of the five roles."""

    name: ClassVar[str] = ""
    TICK: ClassVar[float] = 0.05
    HEARTBEAT: ClassVar[float] = 1.0
    IDLE_HEARTBEAT: ClassVar[float] = 1.0  # stats in runner-ctl status stay fresh (tests)
    IDLE_TICK: ClassVar[float] = 2.0  # a role with nothing in hand (see tick_interval)
    #: True when the role has a process of its own (set by :mod:`runner.rolehost` before
    #: ``initialize()``): only then may it change process-wide state (the executor becomes
    #: the child subreaper of its runs).  A role hosted in a thread of a test leaves it.
    own_process: bool = False

    def __init__(self, config: Config, bus: BatchingBus):
        self.config = config
        self.bus = bus
        self.log = logging.getLogger(f"runner.{self.name}")
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._last_heartbeat = 0.0
        self._loop_thread: int | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_pending = False
        self._tick_now = False
        self._active = True  # handled or posted something since the last heartbeat
        self._idle_beat = False  # the last heartbeat followed an idle period
        self._watched: dict[int, Callable[[], object]] = {}  # extra descriptors -> callback
        self._parent: int | None = None  # the pid this role dies with (die_with)
        self._orphaned: Callable[[], None] | None = None

    # -- for subclasses -------------------------------------------------------------
    def initialize(self) -> None:
        """Open what the role needs; raising here means the role failed to boot."""

    def handle(self, message: protocol.Message) -> None:
        """React to one message from the inbox."""

    def tick(self) -> None:
        """Periodic work (deadlines, polling); must return quickly."""

    def tick_interval(self) -> float:
        """Seconds until the next ``tick()`` (asked after each); ``TICK`` unless overridden."""
        return self.TICK

    def stats(self) -> dict:
        """Numbers for the heartbeat (shown by ``runner-ctl status``)."""
        return {}

    def shutdown(self) -> None:
        """Release what ``initialize()`` opened."""

    def abandon(self) -> None:
        """The supervisor is gone and the process exits now: keep what a next runner can
        use (local files only; no message, no upload, nothing that waits)."""

    def reload(self, options: dict) -> None:
        """Take the supervisor's new live options (SIGHUP); subclasses extend, calling this."""
        self.config = self.config.with_reloaded(options)
        set_level(self.config.log_level)
        self.log.debug("reloaded options: %s", ", ".join(sorted(options)))

    # -- shared machinery -----------------------------------------------------------
    def watch(self, fd: int, callback) -> None:
        """Wait on ``fd`` too; ``callback()`` runs in the loop whenever it is readable (it
        must consume what made it readable)."""
        self._watched[fd] = callback
        self.bus.watch_fd(fd)

    def post(self, destination: str, message: protocol.Message) -> None:
        """Thread-safe: have the loop send ``message`` to ``destination`` (at once)."""
        self._active = True
        self._outbox.put((destination, message))
        if threading.get_ident() != self._loop_thread:
            self.wake()

    def wake(self, tick: bool = False) -> None:
        """Thread-safe: end the loop's wait now; with ``tick``, run ``tick()`` too."""
        if tick:
            self._tick_now = True
        if threading.get_ident() == self._loop_thread or self._wake_pending:
            return  # the loop is awake, or a wake-up byte is already waiting
        self._wake_pending = True
        try:
            os.write(self._wake_w, b"w")
        except (BlockingIOError, OSError):
            pass  # the pipe is full of wake-ups already (or closed at exit)

    def _drain_wake(self) -> None:
        """Empty the wake-up pipe, then let the next post write to it again.

        In that order: ``_wake_pending`` must never stay True with the pipe empty, or later
        posts would not wake the loop.  A post that comes between the read and the reset
        writes nothing, and its message is sent by this iteration's ``flush_outbox``."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._wake_pending = False

    def phase(self, attempt: protocol.Attempt, phase: str, **detail) -> None:
        """Tell the supervisor where ``attempt`` is now (thread-safe)."""
        self.post(SUPERVISOR, protocol.AttemptPhase(attempt=attempt, phase=phase, role=self.name,
                                                at=time.time(), detail=detail))

    def runner_log(self, attempt_id: str, text: str) -> None:
        """Add a line to the attempt's runner log (thread-safe)."""
        self.post("scraper", protocol.RunnerLog(attempt_id=attempt_id, text=text))

    def request_stop(self) -> None:
        """Thread-safe: end the loop (after the message or tick in hand)."""
        self._stop.set()
        self.wake()

    def die_with(self, parent: int, orphaned: Callable[[], None]) -> None:
        """Check before each ``tick()`` that ``parent`` is still this process's parent; when
        it is not, call ``orphaned()`` (the process host's way out: it normally does not
        return; if it does, the tick runs as usual)."""
        self._parent = parent
        self._orphaned = orphaned

    def parent_gone(self) -> bool:
        """True when :meth:`die_with` named a parent and this process has another one now."""
        return self._parent is not None and os.getppid() != self._parent

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _serve_watched(self) -> None:
        try:
            ready, _, _ = select.select(list(self._watched), [], [], 0)
        except (OSError, ValueError):
            return
        for fd in ready:
            try:
                self._watched[fd]()
            except Exception:  # a failing watcher must not kill the role
                self.log.exception("failed to serve descriptor %d", fd)

    def flush_outbox(self) -> None:
        """Hand what was posted to the bus (which batches it; see :meth:`Bus.post`)."""
        outbox = self._outbox
        post = self.bus.post
        while not outbox.empty():  # the loop is the only reader: get cannot find it empty
            destination, message = outbox.get_nowait()
            try:
                post(destination, message)
            except Exception:  # a message the bus cannot carry must not kill the role
                self.log.exception("cannot send %s to %s; it is dropped", message.TYPE,
                                   destination)

    def _heartbeat_due(self) -> float:
        if not self._active:
            return self._last_heartbeat + self.IDLE_HEARTBEAT
        # the first activity after an idle beat is told at once (fresh stats), then each second
        return self._last_heartbeat + (0.0 if self._idle_beat else self.HEARTBEAT)

    def heartbeat(self, force: bool = False, early: float = 0.0) -> None:
        """Send a heartbeat when one is due (or due within ``early`` seconds)."""
        now = time.monotonic()
        if force or now + early >= self._heartbeat_due():
            self._last_heartbeat = now
            self._idle_beat = not self._active
            self._active = False
            stats = self.stats()
            stats["hot_path"] = _fast.IMPLEMENTATION  # what this process really runs
            self.bus.post(SUPERVISOR, protocol.Heartbeat(role=self.name, pid=os.getpid(),
                                                         stats=stats))

    def loop(self) -> None:
        """Serve the inbox until told to stop."""
        self._loop_thread = threading.get_ident()
        self.bus.watch_fd(self._wake_r)
        next_tick = 0.0
        drained = False
        while not self._stop.is_set():
            now = time.monotonic()
            wait = min(next_tick - now, self._heartbeat_due() - now)
            message = self.bus.recv(max(0.0, wait) if not self._tick_now else 0.0,
                                    drained=drained)
            if self._wake_pending:
                self._drain_wake()
            if self._watched:
                self._serve_watched()
            if message is not None:
                self._active = True
            while message is not None:
                if isinstance(message, protocol.Shutdown):
                    self.log.debug("shutdown requested: %s", message.reason)
                    self._stop.set()
                    break
                try:
                    if isinstance(message, protocol.Reload):
                        self.reload(message.options)
                    else:
                        self.handle(message)
                except Exception:  # a bad message must not kill the role
                    self.log.exception("failed to handle %s", message.TYPE)
                self.flush_outbox()
                self.heartbeat()  # a full inbox (a run printing fast) never starves it
                message = self.bus.recv_nowait()
            drained = True  # the inbox was just seen empty (or the loop is stopping)
            now = time.monotonic()
            early = 0.0
            if now >= next_tick or self._tick_now:
                self._tick_now = False
                self.flush_outbox()
                self.bus.flush()  # a tick may take a while: nothing waits behind it
                if self._orphaned is not None and self.parent_gone():
                    self._orphaned()
                try:
                    self.tick()
                except Exception:  # periodic work that fails must not kill the role
                    self.log.exception("periodic work failed")
                interval = self.tick_interval()
                next_tick = now + interval
                early = min(interval, self.HEARTBEAT) / 2  # beat now rather than wake again
            self.flush_outbox()
            self.heartbeat(early=early)
        self.flush_outbox()
        self.bus.flush()
        self._loop_thread = None
