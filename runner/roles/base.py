"""The lifecycle every role shares: ``initialize()``, ``loop()``, ``shutdown()``.

A role only *does* its work; how it is hosted (a process under the supervisor, see
:mod:`runner.rolehost`, or a thread in a test) is decided elsewhere.  The loop waits on
the role's inbox, hands each message to ``handle()``, calls ``tick()`` about every
``TICK`` seconds, sends a heartbeat to the supervisor every ``HEARTBEAT`` seconds, and
returns on a :class:`~runner.protocol.Shutdown` message or :meth:`request_stop`.

Worker threads inside a role never touch the bus: they call :meth:`post`, and the loop
sends what they posted.  A post from another thread wakes the loop at once (a byte on a
pipe the loop polls next to its inbox), so ``TICK`` only paces periodic work and never adds
latency to a hand-over; :meth:`wake` with ``tick=True`` also runs ``tick()`` right away
(an executor whose run just ended, a fetcher with a slot just freed).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import ClassVar

from .. import protocol
from ..bus import SUPERVISOR, Bus
from ..config import Config
from ..logs import set_level


class Role:
    """Base of the five roles."""

    name: ClassVar[str] = ""
    TICK: ClassVar[float] = 0.05
    HEARTBEAT: ClassVar[float] = 1.0

    def __init__(self, config: Config, bus: Bus):
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

    # -- for subclasses -------------------------------------------------------------
    def initialize(self) -> None:
        """Open what the role needs; raising here means the role failed to boot."""

    def handle(self, message: protocol.Message) -> None:
        """React to one message from the inbox."""

    def tick(self) -> None:
        """Periodic work (deadlines, polling); must return quickly."""

    def stats(self) -> dict:
        """Numbers for the heartbeat (shown by ``runner-ctl status``)."""
        return {}

    def shutdown(self) -> None:
        """Release what ``initialize()`` opened."""

    def reload(self, options: dict) -> None:
        """Take the supervisor's new live options (SIGHUP); subclasses extend, calling this."""
        self.config = self.config.with_reloaded(options)
        set_level(self.config.log_level)
        self.log.debug("reloaded options: %s", ", ".join(sorted(options)))

    # -- shared machinery -----------------------------------------------------------
    def post(self, destination: str, message: protocol.Message) -> None:
        """Thread-safe: have the loop send ``message`` to ``destination`` (at once)."""
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
        self._wake_pending = False  # before reading: a later post writes again
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def phase(self, job: protocol.Job, phase: str, **detail) -> None:
        """Tell the supervisor where ``job`` is now (thread-safe)."""
        self.post(SUPERVISOR, protocol.JobPhase(job=job, phase=phase, role=self.name,
                                                at=time.time(), detail=detail))

    def runner_log(self, job_id: str, text: str) -> None:
        """Add a line to the attempt's runner log (thread-safe)."""
        self.post("scraper", protocol.RunnerLog(job_id=job_id, text=text))

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def flush_outbox(self) -> None:
        if self._outbox.empty():
            return
        while True:
            try:
                destination, message = self._outbox.get_nowait()
            except queue.Empty:
                return
            self.bus.send(destination, message)

    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_heartbeat >= self.HEARTBEAT:
            self._last_heartbeat = now
            self.bus.send(SUPERVISOR, protocol.Heartbeat(role=self.name, pid=os.getpid(),
                                                         stats=self.stats()))

    def loop(self) -> None:
        """Serve the inbox until told to stop."""
        self._loop_thread = threading.get_ident()
        self.bus.watch_fd(self._wake_r)
        next_tick = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            wait = min(next_tick - now, self._last_heartbeat + self.HEARTBEAT - now)
            message = self.bus.recv(max(0.0, wait) if not self._tick_now else 0.0)
            if self._wake_pending:
                self._drain_wake()
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
                message = self.bus.recv_nowait()
            now = time.monotonic()
            if now >= next_tick or self._tick_now:
                self._tick_now = False
                next_tick = now + self.TICK
                self.tick()
            self.flush_outbox()
            self.heartbeat()
        self.flush_outbox()
        self._loop_thread = None
