"""A background receiving thread that hands messages over only when the fetcher asks.

Cloud queues (SQS, Pub/Sub) deliver fastest to a *long poll*: a request that waits at the
service until a message arrives.  A long poll cannot run inside the fetcher's 50 ms tick
(it would block the loop), so each served queue gets one :class:`Receiver` thread:

* the fetcher's :meth:`Receiver.want` (called from ``Queue.take`` while the ledger has a
  free slot) records *demand* for ``demand_ttl`` seconds and returns a message the thread
  already received, if any;
* the thread long-polls for **one** message only while there is demand, and keeps at most
  one received message waiting to be handed over;
* a received message that is not handed over while there is demand (the slot was filled
  from another queue meanwhile, the queue was backed off, the runner is stopping) is made
  visible again at once with ``release`` — nothing is held that the ledger has no room for.

``receive(wait)`` and ``release(message)`` are supplied by the back end; both run on the
receiving thread only (the SQS and Pub/Sub clients are thread-safe).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Any, Callable

from ..errors import DeliveryLost, QueueError

logger = logging.getLogger(__name__)

DEMAND_TTL = 0.5
"""Seconds a ``want()`` keeps the thread receiving (the fetcher asks every 50 ms)."""

ERROR_BACKOFF_FIRST = 0.5
ERROR_BACKOFF_MAX = 15.0


class Receiver:
    """One queue's receiving thread (see the module docstring)."""

    def __init__(self, name: str, receive: Callable[[], list], release: Callable[[Any], None],
                 *, demand_ttl: float = DEMAND_TTL, idle_pause: float = 0.0) -> None:
        """``receive()`` long-polls for at most one message and returns a list (empty when
        the poll ended without one); ``release(message)`` makes one visible again.
        ``idle_pause``: sleep after an empty answer that came back at once (services
        without a server-side wait)."""
        self.name = name
        self._receive = receive
        self._release = release
        self._demand_ttl = demand_ttl
        self._idle_pause = idle_pause
        self._cond = threading.Condition()
        self._ready: deque = deque()
        self._demand_until = 0.0
        self._stop = False
        self.error = ""
        self.received = 0
        self.released = 0
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"receive-{name}"[:60])
        self._thread.start()

    # -- the fetcher's side -------------------------------------------------------------
    def want(self) -> Any | None:
        """Record demand and return a received message, if one is waiting (never blocks)."""
        with self._cond:
            self._demand_until = time.monotonic() + self._demand_ttl
            if self._ready:
                return self._ready.popleft()
            self._cond.notify_all()
            return None

    def stop(self, wait: float = 0.0) -> None:
        """Stop receiving; a message still waiting is released (by the thread, or here
        when the thread is inside a long poll)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if wait:
            self._thread.join(wait)
        self._release_ready()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the thread ---------------------------------------------------------------------
    def _release_ready(self) -> None:
        while True:
            with self._cond:
                if not self._ready:
                    return
                message = self._ready.popleft()
            self._release_one(message)

    def _release_one(self, message: Any) -> None:
        try:
            self._release(message)
            self.released += 1
        except Exception as exc:  # noqa: BLE001 - it reappears after its timeout anyway
            logger.warning("%s: could not make a received message visible again (%r); it "
                           "reappears when its visibility / ack deadline runs out",
                           self.name, exc)

    def _loop(self) -> None:
        backoff = ERROR_BACKOFF_FIRST
        while True:
            with self._cond:
                while not self._stop and (self._ready or time.monotonic() > self._demand_until):
                    if self._ready and time.monotonic() > self._demand_until:
                        break  # nobody asked in time: release below
                    self._cond.wait(0.1)
                if self._stop:
                    break
                stale = bool(self._ready)
            if stale:
                self._release_ready()
                continue
            started = time.monotonic()
            try:
                messages = self._receive()
                self.error = ""
                backoff = ERROR_BACKOFF_FIRST
            except Exception as exc:  # noqa: BLE001 - reported and retried with backoff
                if self._stop:
                    break
                if self.error != repr(exc):
                    logger.warning("%s: receive failed: %r; retrying with backoff",
                                   self.name, exc)
                self.error = repr(exc)
                with self._cond:
                    self._cond.wait(backoff)
                backoff = min(ERROR_BACKOFF_MAX, backoff * 2)
                continue
            self.received += len(messages)
            keep = []
            with self._cond:
                wanted = not self._stop and time.monotonic() <= self._demand_until
                if wanted:
                    self._ready.extend(messages)
                else:
                    keep = list(messages)
            for message in keep:
                self._release_one(message)
            if not messages and self._idle_pause and time.monotonic() - started < self._idle_pause:
                with self._cond:
                    self._cond.wait(self._idle_pause)
        self._release_ready()


class BackgroundDiscovery:
    """What the cloud back ends (SQS, Pub/Sub) share: a :class:`Receiver` per served queue,
    the deliveries taken and not yet settled, and ``discover()`` answered from the latest
    listing, refreshed by a background thread.

    Their listings are network calls: the first ``discover()`` lists synchronously and
    starts a daemon thread that lists again every ``_discover_every`` seconds until
    ``close()``.  The back end calls :meth:`_start_background` from its constructor and
    provides ``_poll()`` (one listing, which sets ``_names`` and ``_error`` under ``_lock``)
    and ``_rescan()`` (re-read credentials; QueueError when it cannot).  Held deliveries
    are objects with a ``queue`` attribute, keyed by delivery token.
    """

    discovery_name = "queue"
    #: How the service shows a delivery this process does not hold (for DeliveryLost).
    lost_hint = "the service redelivers it"
    _poll: Callable[[], None]  # provided by the back end (class doc)
    _rescan: Callable[[], None]

    def _start_background(self, discover_every: float) -> None:
        self._discover_every = discover_every
        self._lock = threading.Lock()
        self._names: dict = {}
        self._error = ""
        self._receivers: dict[str, tuple[Receiver, str]] = {}
        self._held: dict[str, Any] = {}
        self._seq = itertools.count(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise QueueError(f"{self.discovery_name} queue back end is closed")

    def _held_of(self, d: Any) -> Any:
        """What is held for the delivery ``d``; DeliveryLost when this process took it not."""
        self._check_open()
        held = self._held.get(d.token)
        if held is None:
            raise DeliveryLost(f"{self.discovery_name} delivery {d.token!r} is not held here "
                               f"({self.lost_hint})")
        if held.queue != d.queue:
            raise QueueError(f"token {d.token!r} does not belong to queue {d.queue!r}")
        return held

    def close(self) -> None:
        """Stop discovery and the receiving threads (what they received and did not hand
        over is released); held deliveries come back when the service's hold runs out."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for receiver, _ in self._receivers.values():
            receiver.stop()
        for receiver, _ in self._receivers.values():
            receiver.stop(wait=0.2)
        self._receivers.clear()
        self._held.clear()

    def _discovery_loop(self) -> None:
        while not self._stop.wait(self._discover_every):
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - the thread must survive
                logger.exception("%s discovery pass failed", self.discovery_name)

    def discover(self) -> list[str]:
        """Queue names by the latest listing; raises QueueError when listing failed."""
        self._check_open()
        if self._thread is None:
            self._poll()
            self._thread = threading.Thread(target=self._discovery_loop, daemon=True,
                                            name=f"{self.discovery_name}-discovery")
            self._thread.start()
        with self._lock:
            if self._error:
                raise QueueError(self._error)
            return sorted(self._names)

    def _rescanned(self) -> bool:
        """Re-read the credentials directory (``_rescan()``); on failure record it and say no."""
        try:
            self._rescan()
        except QueueError as exc:
            with self._lock:
                self._error = str(exc)
            return False
        return True

    def _stop_receivers_not_in(self, names) -> None:
        """Stop the receiving threads of queues that are no longer listed."""
        for name in [n for n in list(self._receivers) if n not in names]:
            receiver, _ = self._receivers.pop(name)
            receiver.stop()
