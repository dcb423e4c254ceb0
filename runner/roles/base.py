"""The lifecycle every role shares: ``initialize()``, ``loop()``, ``shutdown()``.

A role only *does* its work; how it is hosted (a process under the supervisor, see
:mod:`runner.rolehost`, or a thread in a test) is decided elsewhere.  The loop waits on
the role's inbox, hands each message to ``handle()``, calls ``tick()`` about every
``TICK`` seconds, sends a heartbeat to the supervisor every ``HEARTBEAT`` seconds, and
returns on a :class:`~runner.protocol.Shutdown` message or :meth:`request_stop`.

Worker threads inside a role never touch the bus: they call :meth:`post`, and the loop
sends what they posted.
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
        """Thread-safe: have the loop send ``message`` to ``destination``."""
        self._outbox.put((destination, message))

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
        next_tick = 0.0
        while not self._stop.is_set():
            message = self.bus.recv(self.TICK)
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
            if now >= next_tick:
                next_tick = now + self.TICK
                self.tick()
            self.flush_outbox()
            self.heartbeat()
        self.flush_outbox()
