"""Every ZeroMQ endpoint of the runner, and the one way roles talk over them.

Each role (and the supervisor) binds one PULL *inbox* at ``ipc://<runtime-dir>/<name>.in``;
anyone who needs to reach it connects a PUSH socket to that address.  ``runner-ctl``
talks to the supervisor over REQ → ROUTER at ``ipc://<runtime-dir>/control``.  Frames are
:mod:`runner.protocol` messages.  A :class:`Bus` belongs to one thread: ZeroMQ sockets
are never shared between threads.
"""
from __future__ import annotations

import logging
import os
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
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)  # plain ints: enum ops cost


class Endpoints:
    """Addresses of every socket, derived from the runtime directory."""

    def __init__(self, runtime_dir: str | os.PathLike):
        self.runtime_dir = Path(runtime_dir)

    def inbox(self, name: str) -> str:
        return f"ipc://{self.runtime_dir / (name + '.in')}"

    @property
    def control(self) -> str:
        return f"ipc://{self.runtime_dir / 'control'}"

    def inbox_path(self, name: str) -> Path:
        return self.runtime_dir / (name + ".in")


class Bus:
    """One participant's inbox plus lazily connected PUSH sockets to the others."""

    def __init__(self, endpoints: Endpoints, name: str, context: zmq.Context | None = None):
        self.endpoints = endpoints
        self.name = name
        self.context = context or zmq.Context.instance()
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        path = endpoints.inbox_path(name)
        if path.exists():
            path.unlink()
        self.inbox.bind(endpoints.inbox(name))
        self._outboxes: dict[str, zmq.Socket] = {}
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)

    def watch_fd(self, fd: int) -> None:
        """Also end :meth:`recv`'s wait when ``fd`` is readable (a role's wake-up pipe)."""
        self.poller.register(fd, zmq.POLLIN)

    def send(self, destination: str, message: protocol.Message) -> bool:
        """Queue ``message`` for ``destination``; False (and a log line) if it cannot be sent."""
        socket = self._outboxes.get(destination)
        if socket is None:
            socket = self.context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, LINGER_MS)
            socket.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
            socket.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
            socket.connect(self.endpoints.inbox(destination))
            self._outboxes[destination] = socket
        frame = protocol.encode(message)
        try:
            # Copying a small frame is cheaper than pinning it for zero-copy.
            socket.send(frame, copy=len(frame) < ZERO_COPY_FROM)
            return True
        except zmq.Again:
            log.error("%s: could not send %s to %s within %d ms", self.name, message.TYPE,
                      destination, SEND_TIMEOUT_MS)
            return False

    def recv(self, timeout: float, *, drained: bool = False) -> protocol.Message | None:
        """The next message, waiting at most ``timeout`` seconds; None when none came.

        ``drained``: the caller has just seen the inbox empty, so the check before waiting
        is skipped (each socket option query costs about a microsecond).
        """
        if not drained or timeout <= 0:
            message = self.recv_nowait()
            if message is not None or timeout <= 0:
                return message
        inbox = self.inbox
        for socket, _event in self.poller.poll(int(timeout * 1000)):  # made once
            if socket is inbox:
                return self._take()
        return None  # timed out, or woken by another watched descriptor

    def recv_nowait(self) -> protocol.Message | None:
        """The next waiting message or None; undecodable frames are logged and dropped."""
        inbox = self.inbox
        while inbox.getsockopt(_EVENTS) & _POLLIN:  # cheaper than a raised Again
            message = self._take()
            if message is not None:
                return message
        return None

    def _take(self) -> protocol.Message | None:
        """Receive and decode a frame that is known to be waiting (None if it was bad)."""
        try:
            frame = self.inbox.recv(_NOBLOCK)
        except zmq.Again:
            return None
        try:
            return protocol.decode(frame)
        except ProtocolError as exc:
            log.error("%s: dropped a frame: %s", self.name, exc)
            return None

    def close(self) -> None:
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
    path = endpoints.runtime_dir / "control"
    if path.exists():
        path.unlink()
    socket.bind(endpoints.control)
    return socket
