"""Queue back ends, one module per kind, chosen by the prefix of a queue name.

Adding a back end: write ``runner/queues/<kind>.py`` with a :class:`Queue` subclass whose
``kind`` is the prefix, and add one line to :data:`QUEUE_KINDS`.

``memory`` (:mod:`runner.queues.memory`) is the stub back end for tests: it builds nothing
until a test installs a broker in its process.
"""
from __future__ import annotations

import logging

from .base import DEFAULT_QUEUE_MATCH, Delivery, Queue, is_reserved, matches
from .local import LocalQueue
from .memory import MemoryQueue
from .pubsub import PubSubQueue
from .rabbitmq import RabbitMQQueue
from .sqs import SQSQueue

logger = logging.getLogger(__name__)

QUEUE_KINDS: dict[str, type[Queue]] = {
    "local": LocalQueue,
    "rmq": RabbitMQQueue,
    "sqs": SQSQueue,
    "pubsub": PubSubQueue,
    "memory": MemoryQueue,
}
"""Queue-name prefix → back-end class."""


def build_backends(config) -> dict[str, Queue]:
    """Every back end ``config`` asks for, by kind (``Queue.from_config`` of each class in
    :data:`QUEUE_KINDS`; a class answering ``None`` is not configured)."""
    backends: dict[str, Queue] = {}
    try:
        for kind, cls in QUEUE_KINDS.items():
            backend = cls.from_config(config)
            if backend is not None:
                backends[kind] = backend
    except BaseException:
        for backend in backends.values():
            backend.close()
        raise
    return backends


def kind_of(queue_name: str) -> str:
    """The kind prefix of ``queue_name``: the text before its first ``_`` ("" if it has none).

    The result need not be a key of :data:`QUEUE_KINDS` (Pub/Sub names carry no prefix:
    the fetcher knows a queue's back end from discovery, and attempts carry ``queue_type``).
    """
    head, sep, _ = queue_name.partition("_")
    return head if sep else ""


__all__ = ["DEFAULT_QUEUE_MATCH", "Delivery", "LocalQueue", "MemoryQueue", "PubSubQueue", "QUEUE_KINDS",
           "Queue", "RabbitMQQueue", "SQSQueue", "build_backends", "is_reserved", "kind_of", "matches"]
