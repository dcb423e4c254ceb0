"""A queue back end held in this process's memory: the stub broker for tests.

Like dramatiq's ``StubBroker``: a :class:`MemoryBroker` keeps queues, held deliveries and
dead letters in plain Python structures, and :class:`MemoryQueue` (kind ``memory``,
queue names ``memory_…``) is the :class:`~runner.queues.base.Queue` a fetcher uses on it.
It is registered in :data:`runner.queues.QUEUE_KINDS` but serves nothing until a test
calls :func:`install`: only then does :meth:`MemoryQueue.from_config` build it, so a
runner whose options select ``memory_`` queues (``--queue-match '^memory_'``) and is hosted
in the same process (:func:`runner.rolehost.run_in_thread`) serves the installed broker.
Nothing survives the process; no runner in production uses it.

Semantics are those the fetcher relies on: FIFO per queue; ``requeue`` puts a message back
at its old place with the attempts recorded; ``dead_letter`` keeps the body and reason in
``<queue>_dead``; a token settled twice, or taken back by :meth:`MemoryBroker.redeliver`
(a broker that lost the connection), is :class:`~runner.errors.DeliveryLost`; a queue
removed with :meth:`MemoryBroker.delete_queue` while its message is held answers True to
``queue_deleted``.
"""
from __future__ import annotations

import bisect
import itertools
import threading
from dataclasses import dataclass
from typing import ClassVar

from ..errors import DeliveryLost, QueueError
from .base import Delivery, Queue, is_reserved

PREFIX = "memory_"


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered message: its body, why, and the attempts it had."""

    body: bytes
    reason: str
    attempts: int


@dataclass(order=True)
class _Message:
    seq: int  # publish order: a requeued message goes back to its place
    body: bytes
    attempts: int


class MemoryBroker:
    """Queues, held deliveries and dead letters in memory; safe to use from any thread.

    Methods for tests (beyond what :class:`MemoryQueue` uses): :meth:`declare`,
    :meth:`delete_queue`, :meth:`queues`, :meth:`messages`, :meth:`held`,
    :meth:`dead`, :meth:`redeliver`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, list[_Message]] = {}
        self._held: dict[str, tuple[str, _Message]] = {}  # token -> (queue, message)
        self._dead: dict[str, list[DeadLetter]] = {}  # queue -> its dead letters
        self._deleted: set[str] = set()  # queues deleted since the runner last held them
        self._seq = itertools.count()
        self._tokens = itertools.count(1)

    # -- for tests ------------------------------------------------------------------
    def declare(self, queue: str) -> None:
        """Make ``queue`` (empty) if it does not exist."""
        _check_name(queue)
        with self._lock:
            self._queues.setdefault(queue, [])
            self._deleted.discard(queue)

    def delete_queue(self, queue: str) -> None:
        """Remove ``queue`` and its waiting messages (a user's abort); held ones stay held
        and their ``queue_deleted`` answers True.  Raises QueueError for an unknown queue."""
        with self._lock:
            if self._queues.pop(queue, None) is None:
                raise QueueError(f"no queue {queue!r}")
            self._deleted.add(queue)

    def queues(self) -> list[str]:
        """Names of the queues, sorted (dead-letter queues are not queues here)."""
        with self._lock:
            return sorted(self._queues)

    def messages(self, queue: str) -> list[tuple[bytes, int]]:
        """(body, attempts) of each message waiting in ``queue``, oldest first."""
        with self._lock:
            return [(m.body, m.attempts) for m in self._queues.get(queue, [])]

    def held(self) -> list[str]:
        """Queues of the deliveries held now, one entry per delivery."""
        with self._lock:
            return sorted(queue for queue, _ in self._held.values())

    def dead(self, queue: str) -> list[DeadLetter]:
        """What was dead-lettered from ``queue``, in order."""
        with self._lock:
            return list(self._dead.get(queue, []))

    def redeliver(self, queue: str | None = None) -> int:
        """Take back every held delivery (of ``queue`` only, when given) as a broker does
        when a consumer's connection drops: each message waits again at its place, and its
        old token is lost.  Returns how many went back."""
        with self._lock:
            back = [t for t, (q, _) in self._held.items() if queue in (None, q)]
            for token in back:
                name, message = self._held.pop(token)
                if name in self._queues:
                    bisect.insort(self._queues[name], message)
            return len(back)

    # -- for MemoryQueue --------------------------------------------------------------
    def publish(self, queue: str, body: bytes, attempts: int = 0) -> str:
        _check_name(queue)
        with self._lock:
            seq = next(self._seq)
            self._queues.setdefault(queue, []).append(_Message(seq, bytes(body), attempts))
            self._deleted.discard(queue)
            return f"{queue}/{seq}"

    def take(self, queue: str) -> Delivery | None:
        with self._lock:
            waiting = self._queues.get(queue)
            if not waiting:
                return None
            message = waiting.pop(0)
            token = f"{queue}#{next(self._tokens)}"
            self._held[token] = (queue, message)
            return Delivery(queue=queue, token=token, body=message.body,
                            attempts=message.attempts)

    def settle(self, d: Delivery, *, requeue_attempts: int | None = None,
               dead_reason: str | None = None) -> None:
        """Settle a held delivery: ack (no keyword), requeue or dead-letter it."""
        with self._lock:
            entry = self._held.pop(d.token, None)
            if entry is None:
                raise DeliveryLost(f"delivery {d.token} is not held (settled, or redelivered)")
            queue, message = entry
            if requeue_attempts is not None:
                if queue in self._queues:  # a deleted queue takes nothing back
                    message.attempts = requeue_attempts
                    bisect.insort(self._queues[queue], message)
            elif dead_reason is not None:
                self._dead.setdefault(queue, []).append(
                    DeadLetter(message.body, dead_reason, message.attempts))

    def is_held(self, d: Delivery) -> bool:
        with self._lock:
            return d.token in self._held

    def was_deleted(self, queue: str) -> bool:
        with self._lock:
            return queue in self._deleted and queue not in self._queues

    def depth(self, queue: str) -> int:
        with self._lock:
            return len(self._queues.get(queue, []))

    def peek(self, queue: str, limit: int) -> list[bytes]:
        with self._lock:
            return [m.body for m in self._queues.get(queue, [])[:max(0, limit)]]


def _check_name(queue: str) -> None:
    if not queue.startswith(PREFIX) or is_reserved(queue):
        raise QueueError(f"not a memory queue name: {queue!r} (memory_…, not …_response "
                         f"or …_dead)")


_installed: MemoryBroker | None = None


def install(broker: MemoryBroker | None = None) -> MemoryBroker:
    """Make ``broker`` (a new one when None) the one runners in this process serve."""
    global _installed
    _installed = broker or MemoryBroker()
    return _installed


def uninstall() -> None:
    """Runners built from now on serve no memory queues."""
    global _installed
    _installed = None


class MemoryQueue(Queue):
    """A :class:`~runner.queues.base.Queue` on a :class:`MemoryBroker` (module doc)."""

    kind: ClassVar[str] = "memory"
    poll_every = 0.05

    def __init__(self, broker: MemoryBroker):
        self.broker = broker

    @classmethod
    def from_config(cls, config) -> MemoryQueue | None:
        """A queue on the installed broker; None when no test installed one."""
        return cls(_installed) if _installed is not None else None

    @classmethod
    def publisher(cls, options) -> MemoryQueue:
        """The installed broker's queue (:class:`QueueError` when no test installed one)."""
        queue = cls.from_config(options)
        if queue is None:
            raise QueueError(f"queue {options.queue!r}: memory_* queues exist only inside a "
                             "test that installed a MemoryBroker")
        return queue

    @classmethod
    def client_queue(cls, options) -> dict:
        return {"memory": options.queue}

    def discover(self) -> list[str]:
        return [name for name in self.broker.queues() if not is_reserved(name)]

    def take(self, queue: str) -> Delivery | None:
        return self.broker.take(queue)

    def ack(self, d: Delivery) -> None:
        self.broker.settle(d)

    def requeue(self, d: Delivery, *, attempts: int) -> None:
        self.broker.settle(d, requeue_attempts=attempts)

    def dead_letter(self, d: Delivery, reason: str) -> None:
        self.broker.settle(d, dead_reason=reason)

    def keep_alive(self, d: Delivery) -> None:
        if not self.broker.is_held(d):
            raise DeliveryLost(f"delivery {d.token} is not held any more")

    def queue_deleted(self, d: Delivery) -> bool:
        return self.broker.was_deleted(d.queue)

    def depth(self, queue: str) -> int:
        return self.broker.depth(queue)

    def peek(self, queue: str, limit: int) -> list[bytes]:
        return self.broker.peek(queue, limit)

    def publish(self, queue: str, body: bytes, *, attempts: int = 0) -> str:
        return self.broker.publish(queue, body, attempts)
