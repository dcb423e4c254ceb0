"""The small interface every queue back end implements, and the queue-name filter.

A back end is chosen by the prefix of a queue name (``local_…`` → ``local``, see
:mod:`runner.queues`).  A taken message is a :class:`Delivery`; it stays held by the
back end until exactly one of :meth:`Queue.ack`, :meth:`Queue.requeue` or
:meth:`Queue.dead_letter` settles it (SPEC section 7 decides which).
"""
from __future__ import annotations

import abc
import logging
import re
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

logger = logging.getLogger(__name__)
_Q = TypeVar("_Q", bound="Queue")

DEFAULT_QUEUE_MATCH = r"^(rmq|sqs|local)_.*$"
"""The default of ``--queue-match`` (SPEC section 3)."""

RESERVED_SUFFIXES: tuple[str, ...] = ("_response", "_dead")
"""Queue names ending in one of these are never served (responses, dead letters)."""


@dataclass(frozen=True)
class Delivery:
    """One taken (held) message.

    ``token`` is a plain string naming the held message inside its back end; it survives
    being sent to another process.  ``attempts`` is how many attempts of the experiment's
    own code were already made before this delivery (0 for a fresh request).
    """

    queue: str
    token: str
    body: bytes
    attempts: int


def is_reserved(name: str) -> bool:
    """True when ``name`` ends in a suffix that is never served (``_response``, ``_dead``)."""
    return name.endswith(RESERVED_SUFFIXES)


def _compile(pattern: str | re.Pattern[str] | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    if isinstance(pattern, re.Pattern):
        return pattern
    if pattern == "":
        return None
    return re.compile(pattern)


def matches(name: str,
            match_re: str | re.Pattern[str] | None = DEFAULT_QUEUE_MATCH,
            mismatch_re: str | re.Pattern[str] | None = None) -> bool:
    """Whether queue ``name`` is to be served (SPEC section 3).

    True when ``match_re`` finds a match in ``name`` (``re.search``; ``None`` or ``""``
    means the default ``^(rmq|sqs|local)_.*$``), ``mismatch_re`` (optional; ``None`` or
    ``""`` means none) does not, and the name does not end in ``_response`` or ``_dead``.
    """
    if is_reserved(name):
        return False
    m = _compile(match_re) or re.compile(DEFAULT_QUEUE_MATCH)
    if m.search(name) is None:
        return False
    mm = _compile(mismatch_re)
    return mm is None or mm.search(name) is None


class Queue(abc.ABC):
    """A queue back end.  Instances are not shared between processes; tokens are.

    Every method raises :class:`runner.errors.QueueError` when the back end fails or a
    token is unknown (already settled, or never issued).
    """

    kind: ClassVar[str]
    """The queue-name prefix this back end serves, e.g. ``"local"``."""

    keep_alive_every: float = 30.0
    """Seconds between the fetcher's :meth:`keep_alive` calls for this back end's held
    deliveries (a back end whose hold times out sets it well inside that timeout)."""

    poll_every: float | None = 0.05
    """Seconds between the fetcher's ticks while this back end is configured: how often it
    is asked for work and :meth:`service` runs.  ``None`` for a back end that says when work
    arrives through :meth:`wait_fd` (the fetcher then only ticks slowly, for safety)."""

    def wait_fd(self) -> int | None:
        """A descriptor that becomes readable when messages may have arrived, or ``None``.

        The fetcher polls it beside its inbox and then calls :meth:`changes`."""
        return None

    def changes(self) -> bool:
        """Consume what made :meth:`wait_fd` readable; True when the set of queues may
        have changed (rediscover now)."""
        return False

    @abc.abstractmethod
    def discover(self) -> list[str]:
        """Names of the queues this back end serves, unfiltered by the match regexes.

        Names ending in ``_response`` or ``_dead`` are never returned.
        """

    @abc.abstractmethod
    def take(self, queue: str) -> Delivery | None:
        """Claim the oldest waiting message of ``queue`` without blocking; ``None`` if none."""

    def offer(self, queues: list[str], slots: int) -> None:
        """The fetcher has room for ``slots`` more requests from ``queues`` (0: none now).

        Called on every fetcher tick and whenever taking stops.  A back end the broker
        pushes to (RabbitMQ's ``basic.consume``) may hold at most ``slots`` pushed messages
        for :meth:`take` and must announce them through :meth:`wait_fd`; back ends that
        are asked (the default) ignore it."""

    @abc.abstractmethod
    def ack(self, d: Delivery) -> None:
        """Settle ``d`` as done: the message is gone for good."""

    @abc.abstractmethod
    def requeue(self, d: Delivery, *, attempts: int) -> None:
        """Put ``d`` back at once for any runner, recording ``attempts`` durably with it."""

    @abc.abstractmethod
    def dead_letter(self, d: Delivery, reason: str) -> None:
        """Move ``d`` to the back end's dead-letter place, keeping ``reason`` beside it."""

    @classmethod
    def from_config(cls, config: Any) -> Queue | None:
        """The back end as ``config`` (a :class:`runner.config.Config`) asks for it, or
        ``None`` when this kind is not configured (e.g. no ``--amqp-url``)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from the runner's options")

    def service(self) -> None:
        """Called on every fetcher tick (every :attr:`poll_every`) from the thread that uses the
        back end: heartbeats, reconnects, noticing deliveries the broker took back.
        Must return quickly; a no-op where nothing needs doing."""

    def keep_alive(self, d: Delivery) -> None:
        """Extend the hold on ``d`` (visibility, ack deadline); a no-op where not needed.

        Raises :class:`runner.errors.DeliveryLost` when the back end no longer holds ``d``.
        """

    def queue_deleted(self, d: Delivery) -> bool:
        """True when the queue ``d`` came from was deleted while ``d`` was held (the user's
        way to abort the run); only asked when discovery no longer lists that queue.
        Back ends that cannot tell answer False."""
        return False

    @abc.abstractmethod
    def depth(self, queue: str) -> int:
        """How many messages wait in ``queue`` (not counting held ones)."""

    @abc.abstractmethod
    def peek(self, queue: str, limit: int) -> list[bytes]:
        """Bodies of up to ``limit`` oldest waiting messages, oldest first (for displays)."""

    def recover(self, *, include_own: bool = False) -> int:
        """On start: return the claims of runners no longer alive to their queues.

        Returns how many messages went back.  Back ends whose broker does this on its
        own return 0.
        """
        return 0

    @abc.abstractmethod
    def publish(self, queue: str, body: bytes, *, attempts: int = 0) -> str:
        """Add ``body`` to ``queue`` atomically; returns an id of the new message."""

    @classmethod
    @abc.abstractmethod
    def publisher(cls, options: Any) -> Queue:
        """A connection for ``runner-submit`` to publish with, made from its options (an
        object with ``queue``, ``amqp_url``, ``durable``, ``sqs_certs``, ``aws_region``,
        ``sqs_endpoint``, ``google_certs`` and ``queue_root``).

        Raises :class:`~runner.errors.RunnerError` naming the option this back end needs
        when ``options`` lacks it."""

    @classmethod
    @abc.abstractmethod
    def client_queue(cls, options: Any) -> dict:
        """The request's ``config.cloud.queue`` for a request published with ``options``,
        as the StudioML client writes it (credentials masked)."""

    def close(self) -> None:
        """Release connections and locks; the instance is unusable afterwards."""

    def __enter__(self: _Q) -> _Q:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
