"""Queue back ends, one module per kind, chosen by the prefix of a queue name.

Adding a back end: write ``runner/queues/<kind>.py`` with a :class:`Queue` subclass whose
``kind`` is the prefix, and add one line to :data:`QUEUE_KINDS`.

``memory`` (:mod:`runner.queues.memory`) is the stub back end for tests: it builds nothing
until a test installs a broker in its process.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from .base import DEFAULT_QUEUE_MATCH, Delivery, Queue, is_reserved, matches

logger = logging.getLogger(__name__)

_MODULES = {"local": ("local", "LocalQueue"), "rmq": ("rabbitmq", "RabbitMQQueue"),
            "sqs": ("sqs", "SQSQueue"), "pubsub": ("pubsub", "PubSubQueue"),
            "memory": ("memory", "MemoryQueue")}
"""Queue-name prefix → (module, class); a module is imported when its class is first asked
for, so a command that uses one back end does not pay for the others' client libraries."""


class _LazyKinds(Mapping):
    def __getitem__(self, kind: str) -> type[Queue]:
        module, name = _MODULES[kind]
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)


QUEUE_KINDS: Mapping[str, type[Queue]] = _LazyKinds()
"""Queue-name prefix → back-end class (imported on first use)."""


def __getattr__(name: str):
    for kind, (_, cls_name) in _MODULES.items():
        if cls_name == name:
            return QUEUE_KINDS[kind]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def owners(discovered: dict[str, list[str]], log: logging.Logger = logger) -> dict[str, str]:
    """Queue name → the kind of the back end that serves it, from each kind's listing
    (``discovered``: kind → names, in :data:`QUEUE_KINDS` order): the first kind to list a
    name serves it; a name listed by two kinds is logged and served by the first."""
    owner: dict[str, str] = {}
    for kind, names in discovered.items():
        for name in names:
            if name in owner and owner[name] != kind:
                log.warning("queue %s is listed by both %s and %s; serving it from %s",
                            name, owner[name], kind, owner[name])
                continue
            owner[name] = kind
    return owner


def publishing_class(queue_name: str) -> type[Queue]:
    """The back end ``runner-submit`` publishes ``queue_name`` with: by its prefix, or
    Pub/Sub for a topic named in full (``projects/P/topics/T``).

    Raises :class:`~runner.errors.QueueError` for any other name."""
    from ..errors import QueueError

    kind = kind_of(queue_name)
    if kind in _MODULES and kind != "pubsub":
        return QUEUE_KINDS[kind]
    pubsub: Any = QUEUE_KINDS["pubsub"]  # PubSubQueue, imported on first use
    if pubsub.is_topic(queue_name):
        return pubsub
    raise QueueError(f"queue {queue_name!r}: runner-submit publishes to local_*, rmq_* and "
                     "sqs_* queues and Pub/Sub topics (projects/P/topics/T) only")


__all__ = ["DEFAULT_QUEUE_MATCH", "Delivery", "LocalQueue", "MemoryQueue", "PubSubQueue", "QUEUE_KINDS",
           "Queue", "RabbitMQQueue", "SQSQueue", "build_backends", "is_reserved", "kind_of", "matches",
           "owners", "publishing_class"]
