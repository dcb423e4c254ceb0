"""An in-memory bus for tests: roles hosted in threads talk through it as over ZeroMQ.

A :class:`MemoryHub` stands in for a runtime directory: it holds one inbox per
participant name.  :meth:`MemoryHub.bus` gives a :class:`MemoryBus` reading one of them;
what it sends goes into the destination's inbox, which is made on first use and keeps
frames until someone reads them (as a ZeroMQ PUSH socket keeps them until the inbox
binds).  A test reads what a role sent to ``"cache_manager"`` with its own
``hub.bus("cache_manager")`` and injects messages by sending from any bus.

Batching is :class:`runner.bus.BatchingBus`'s, the same as the real bus: messages are
encoded with :mod:`runner.protocol` (so a message that cannot cross the real bus cannot
cross this one either), posted messages go in batch frames by the same rules, and
receiving decodes batches in order.  Every inbox has a pipe that is readable while
frames wait, so :meth:`MemoryBus.recv` waits on it beside the role's watched descriptors
(its wake-up pipe) like the ZeroMQ poller does.  Unlike :class:`runner.bus.Bus`, a
:class:`MemoryBus` may be used from any thread (tests read from their own).
"""
from __future__ import annotations

import os
import select
import threading
import time
from collections import deque

from . import protocol
from .bus import BATCH_DELAY, BatchingBus


class MemoryInbox:
    """Frames waiting for one participant, and a pipe readable while any wait."""

    def __init__(self) -> None:
        self._frames: deque[bytes] = deque()
        self._lock = threading.Lock()
        self.fd, self._signal = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def put(self, frame: bytes) -> None:
        with self._lock:
            self._frames.append(frame)
            try:
                os.write(self._signal, b"f")
            except BlockingIOError:
                pass  # the pipe is full of signals: it is readable anyway

    def get(self) -> bytes | None:
        """The oldest frame, or None; the pipe is emptied with the last frame."""
        with self._lock:
            if not self._frames:
                return None
            frame = self._frames.popleft()
            if not self._frames:
                try:
                    while os.read(self.fd, 4096):
                        pass
                except BlockingIOError:
                    pass
            return frame

    def __len__(self) -> int:
        return len(self._frames)

    def close(self) -> None:
        for fd in (self.fd, self._signal):
            try:
                os.close(fd)
            except OSError:
                pass


class MemoryHub:
    """Inboxes by participant name: the runtime directory of an in-memory runner."""

    def __init__(self) -> None:
        self._inboxes: dict[str, MemoryInbox] = {}
        self._lock = threading.Lock()

    def inbox(self, name: str) -> MemoryInbox:
        """The inbox of ``name``, made on first use."""
        with self._lock:
            inbox = self._inboxes.get(name)
            if inbox is None:
                inbox = self._inboxes[name] = MemoryInbox()
            return inbox

    def bus(self, name: str) -> MemoryBus:
        """A bus reading ``name``'s inbox (frames sent to it before are kept)."""
        return MemoryBus(self, name)

    def waiting(self, name: str) -> int:
        """How many frames wait in ``name``'s inbox (a batch frame counts once)."""
        return len(self.inbox(name))

    def close(self) -> None:
        """Release every inbox's pipe; buses of this hub are unusable afterwards."""
        with self._lock:
            inboxes, self._inboxes = list(self._inboxes.values()), {}
        for inbox in inboxes:
            inbox.close()


class MemoryBus(BatchingBus):
    """One participant of a :class:`MemoryHub`: its inbox, and sends to the others."""

    def __init__(self, hub: MemoryHub, name: str):
        super().__init__(name)
        self.hub = hub
        self._inbox = hub.inbox(name)
        self._watched = [self._inbox.fd]

    def watch_fd(self, fd: int) -> None:
        self._watched.append(fd)

    def _send_frame(self, destination: str, frame: bytes, messages: int) -> bool:
        self.hub.inbox(destination).put(frame)
        return True

    def recv(self, timeout: float, *, drained: bool = False) -> protocol.Message | None:
        """As :meth:`runner.bus.Bus.recv` (``drained`` is accepted and ignored: looking at
        a memory inbox costs nothing)."""
        message = self.recv_nowait()
        if message is not None or timeout <= 0:
            return message
        if self._pending:
            self.flush()
        try:
            ready, _, _ = select.select(self._watched, [], [], timeout)
        except InterruptedError:  # pragma: no cover - retried by the caller's loop
            return None
        if self._inbox.fd in ready:
            return self.recv_nowait()
        return None  # timed out, or woken by another watched descriptor

    def recv_nowait(self) -> protocol.Message | None:
        if self._pending and time.monotonic() - self._oldest >= BATCH_DELAY:
            self.flush()
        if self._ready:
            return self._ready.popleft()
        while True:
            frame = self._inbox.get()
            if frame is None:  # the inbox is empty: what was posted in reply goes now
                if self._pending:
                    self.flush()
                return None
            message = self._decode(frame)
            if message is not None:
                return message

    def close(self) -> None:
        """Send what is posted; the inbox stays in the hub (a role restarted on this name
        finds what was sent to it meanwhile)."""
        self.flush()
