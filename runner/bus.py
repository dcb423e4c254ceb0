"""Every ZeroMQ endpoint of the runner, and the one way roles talk over them.

(:mod:`runner.bus_memory` carries the same frames in memory, for tests that host a role
in a thread: both are a :class:`BatchingBus`.)

Each role (and the supervisor) binds one PULL *inbox* at ``ipc://<runtime-dir>/<name>.in``;
anyone who needs to reach it connects a PUSH socket to that address.  ``runner-ctl``
talks to the supervisor over REQ → ROUTER at ``ipc://<runtime-dir>/control``.  Frames are
:mod:`runner.protocol` messages.  A :class:`Bus` belongs to one thread: ZeroMQ sockets
are never shared between threads.

Two ways to send.  :meth:`Bus.send` sends one frame now.  :meth:`Bus.post` (what role loops
use) encodes the message and keeps it in a per-destination list; :meth:`Bus.flush` sends each
destination's list as one frame (a batch frame when it holds several messages, see
:mod:`runner.protocol`).  Posted messages never wait for long: a destination's list is sent
when it reaches ``BATCH_MESSAGES`` messages or ``BATCH_BYTES`` bytes, everything is sent
before :meth:`Bus.recv` waits for the inbox and on :meth:`Bus.close`, and a message posted
more than ``BATCH_DELAY`` seconds ago is sent at the next ``post``/``recv`` call even while
the inbox keeps the loop busy.  ``send`` first sends what is pending for its destination,
so messages to one destination always arrive in the order they were given to the bus.

Receiving: a batch frame is decoded with one msgpack call into messages kept in order and
handed out by :meth:`Bus.recv` / :meth:`Bus.recv_nowait` one at a time before the next
frame is read; ``recv_nowait`` returns None only when none is left, so draining it until
None (as the supervisor does after its own poll) delivers every message.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from pathlib import Path

import zmq

from . import protocol
from .errors import ProtocolError

log = logging.getLogger(__name__)

SUPERVISOR = "supervisor"
ROLES = ("fetcher", "cache_manager", "executor", "scraper", "uploader")
SEND_TIMEOUT_MS = 30_000
LINGER_MS = 2_000
HIGH_WATER_MARK = 100_000
ZERO_COPY_FROM = 64 * 1024
BATCH_MESSAGES = 64  # a destination's posted messages are sent once this many wait ...
BATCH_BYTES = 64 * 1024  # ... or once their frames add up to this many bytes
BATCH_DELAY = 0.002  # seconds a posted message may wait while the loop is busy
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)  # plain ints: enum ops cost


def poll_ms(timeout: float) -> int:
    """``timeout`` seconds as the milliseconds a ZeroMQ poll takes, rounded *up*: truncated,
    a deadline less than a millisecond away becomes a poll of 0 ms, and a loop waiting for it
    spins until it passes (about a millisecond of CPU per wake-up)."""
    return max(0, math.ceil(timeout * 1000))


class Endpoints:
    """Addresses of every socket, derived from the runtime directory."""

    def __init__(self, runtime_dir: str | os.PathLike):
        self.runtime_dir = Path(runtime_dir)

    def inbox(self, name: str) -> str:
        return f"ipc://{self.runtime_dir / (name + '.in')}"

    @property
    def control(self) -> str:
        return f"ipc://{self.control_path}"

    @property
    def control_path(self) -> Path:
        """The control socket's file: it exists while a supervisor listens."""
        return self.runtime_dir / "control"

    def inbox_path(self, name: str) -> Path:
        return self.runtime_dir / (name + ".in")


class BatchingBus:
    """What every bus shares: posting, batching into frames, and decoding frames in order.

    A subclass carries frames: it implements ``_send_frame(destination, frame, messages)``
    (True when sent), :meth:`recv`, :meth:`recv_nowait`, :meth:`watch_fd` and
    :meth:`close`, and hands each frame it receives to :meth:`_decode`.  :class:`Bus`
    carries them over ZeroMQ; :class:`runner.bus_memory.MemoryBus` in memory (tests).
    """

    def __init__(self, name: str):
        self.name = name
        self._pending: dict[str, list] = {}  # destination -> [bytes, frame, frame...]
        self._oldest = 0.0  # monotonic time of the oldest pending message (about)
        self._ready: deque[protocol.Message] = deque()  # the rest of a batch received

    def _send_frame(self, destination: str, frame: bytes, messages: int) -> bool:
        """Carry one encoded frame (``messages`` messages) to ``destination``; False (and a
        log line) when it cannot be sent."""
        raise NotImplementedError

    def watch_fd(self, fd: int) -> None:
        """Also end :meth:`recv`'s wait when ``fd`` is readable (a role's wake-up pipe)."""
        raise NotImplementedError

    def recv(self, timeout: float, *, drained: bool = False) -> protocol.Message | None:
        """The next message, waiting at most ``timeout`` seconds (sending what is posted
        first); None when none came or a watched descriptor ended the wait."""
        raise NotImplementedError

    def recv_nowait(self) -> protocol.Message | None:
        """The next waiting message, or None when none is left (then what is posted goes)."""
        raise NotImplementedError

    def close(self) -> None:
        """Send what is posted and release the inbox."""
        raise NotImplementedError

    def send(self, destination: str, message: protocol.Message) -> bool:
        """Send ``message`` to ``destination`` now (after anything posted to it before).

        False (and a log line) if it cannot be sent.
        """
        if destination in self._pending:
            self._flush_to(destination)
        return self._send_frame(destination, protocol.encode(message), 1)

    def post(self, destination: str, message: protocol.Message) -> None:
        """Queue ``message`` for ``destination``, to go with others in one frame (see above)."""
        frame = protocol.encode(message)
        pending = self._pending.get(destination)
        if pending is None:
            if not self._pending:  # the first one waiting: nothing can be late yet
                self._oldest = time.monotonic()
                self._pending[destination] = [len(frame), frame]
                if len(frame) >= BATCH_BYTES:
                    self._flush_to(destination)
                return
            pending = self._pending[destination] = [0]
        elif len(frame) >= BATCH_BYTES:
            self._flush_to(destination)  # a big frame goes alone: batches stay bounded
            pending = self._pending[destination] = [0]
        pending.append(frame)
        pending[0] += len(frame)
        if len(pending) > BATCH_MESSAGES or pending[0] >= BATCH_BYTES:
            self._flush_to(destination)
        elif time.monotonic() - self._oldest >= BATCH_DELAY:
            self.flush()

    @property
    def pending(self) -> int:
        """How many posted messages have not been sent yet."""
        return sum(len(frames) - 1 for frames in self._pending.values())

    def flush(self) -> bool:
        """Send every posted message now; False if some could not be sent (logged)."""
        if not self._pending:
            return True
        pending, self._pending = self._pending, {}
        ok = True
        for destination, frames in pending.items():
            ok = self._send_frames(destination, frames) and ok
        return ok

    def _flush_to(self, destination: str) -> bool:
        # _oldest stays as it is while others wait: at worst they go a little early
        return self._send_frames(destination, self._pending.pop(destination))

    def _send_frames(self, destination: str, pending: list) -> bool:
        """Send ``pending`` (``[bytes, frame, frame...]``) as one frame."""
        if len(pending) == 2:
            return self._send_frame(destination, pending[1], 1)
        return self._send_frame(destination, protocol.batch(pending[1:]), len(pending) - 1)

    def _decode(self, frame: bytes) -> protocol.Message | None:
        """The first message of ``frame``; the others wait in order for the next calls."""
        try:
            messages, problems = protocol.decode_many(frame)
        except ProtocolError as exc:
            log.error("%s: dropped a frame: %s", self.name, exc)
            return None
        for problem in problems:
            log.error("%s: dropped a message: %s", self.name, problem)
        if len(messages) == 1:
            return messages[0]
        if not messages:
            return None
        self._ready.extend(messages)
        return self._ready.popleft()


class Bus(BatchingBus):
    """One participant's inbox plus lazily connected PUSH sockets to the others."""

    def __init__(self, endpoints: Endpoints, name: str, context: zmq.Context | None = None):
        super().__init__(name)
        self.endpoints = endpoints
        self.context = context or zmq.Context.instance()
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        path = endpoints.inbox_path(name)
        if path.exists():
            path.unlink()
        self.inbox.bind(endpoints.inbox(name))
        self._outboxes: dict[str, zmq.Socket] = {}
        self._streak = False  # the last recv_nowait found a frame
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)

    def watch_fd(self, fd: int) -> None:
        """Also end :meth:`recv`'s wait when ``fd`` is readable (a role's wake-up pipe)."""
        self.poller.register(fd, zmq.POLLIN)

    def _outbox(self, destination: str) -> zmq.Socket:
        socket = self.context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, LINGER_MS)
        socket.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        socket.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        socket.connect(self.endpoints.inbox(destination))
        self._outboxes[destination] = socket
        return socket

    def _send_frame(self, destination: str, frame: bytes, messages: int) -> bool:
        socket = self._outboxes.get(destination) or self._outbox(destination)
        try:
            # Copying a small frame is cheaper than pinning it for zero-copy.
            socket.send(frame, 0, copy=len(frame) < ZERO_COPY_FROM)
            return True
        except zmq.Again:
            log.error("%s: could not send %d message(s) to %s within %d ms", self.name,
                      messages, destination, SEND_TIMEOUT_MS)
            return False

    def recv(self, timeout: float, *, drained: bool = False) -> protocol.Message | None:
        """The next message, waiting at most ``timeout`` seconds; None when none came (or
        the frame that came was dropped, or a watched descriptor ended the wait).

        Everything posted is sent before waiting.  ``drained``: the caller has just seen
        the inbox empty, so the check before waiting is skipped (each socket option query
        costs about a microsecond).
        """
        if self._ready:
            return self._ready.popleft()
        if not drained or timeout <= 0:
            message = self.recv_nowait()
            if message is not None or timeout <= 0:
                return message
        if self._pending:
            self.flush()
        inbox = self.inbox
        for socket, _event in self.poller.poll(poll_ms(timeout)):  # made once
            if socket is inbox:
                return self._take()
        return None  # timed out, or woken by another watched descriptor

    def recv_nowait(self) -> protocol.Message | None:
        """The next waiting message or None; undecodable frames are logged and dropped.

        None means nothing is left: neither a message of a batch already read nor a frame.
        """
        if self._pending and time.monotonic() - self._oldest >= BATCH_DELAY:
            self.flush()
        if self._ready:
            return self._ready.popleft()
        inbox = self.inbox
        while True:
            if self._streak:  # the last call found a frame: more are likely, skip the query
                try:
                    frame = inbox.recv(_NOBLOCK)
                except zmq.Again:
                    self._streak = False
                    frame = None
            elif inbox.getsockopt(_EVENTS) & _POLLIN:  # cheaper than a raised Again
                try:
                    frame = inbox.recv(_NOBLOCK)
                    self._streak = True
                except zmq.Again:
                    frame = None
            else:
                frame = None
            if frame is None:  # the inbox is empty: what was posted in reply goes now
                if self._pending:
                    self.flush()
                return None
            message = self._decode(frame)
            if message is not None:
                return message

    def _take(self) -> protocol.Message | None:
        """Receive and decode a frame that is known to be waiting (None if it was bad)."""
        try:
            frame = self.inbox.recv(_NOBLOCK)
        except zmq.Again:
            return None
        return self._decode(frame)

    def close(self) -> None:
        """Send what is posted (each socket then lingers up to ``LINGER_MS``) and close."""
        self.flush()
        for socket in self._outboxes.values():
            socket.close()
        self._outboxes.clear()
        self.inbox.close()


def control_client(endpoints: Endpoints, context: zmq.Context | None = None) -> zmq.Socket:
    """A REQ socket connected to the supervisor's control endpoint."""
    context = context or zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoints.control)
    return socket


def control_server(endpoints: Endpoints, context: zmq.Context | None = None) -> zmq.Socket:
    """The supervisor's ROUTER socket for ``runner-ctl``."""
    context = context or zmq.Context.instance()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    path = endpoints.control_path
    if path.exists():
        path.unlink()
    socket.bind(endpoints.control)
    return socket
