"""RabbitMQ queues (``rmq_…``), the way StudioML clients use them.

The client publishes to the topic exchange ``StudioML.topic`` with routing key
``StudioML.<queue>`` onto a queue it declared and bound itself; bodies are JSON with
``content_type application/json`` and ``app_id studioml``.  This back end:

* **discovers** queues from the management API's bindings whose source is
  ``StudioML.topic`` (``GET /api/exchanges/<vhost>/StudioML.topic/bindings/source``), on a
  small thread that only speaks HTTP and hands its latest list over under a lock (with each
  queue's type, asked once per new queue: only ``classic`` queues are consumed);
* **takes** by ``basic.consume`` while the fetcher has a free slot (:meth:`offer`): one
  *slot channel* per free slot, each with a channel-wide prefetch of 1 (``basic.qos
  prefetch_count=1 global=true``) and one consumer on every served queue, so that the
  broker never pushes more messages than there are free slots, whatever the number of
  queues.  A slot channel that got its message stops consuming and holds it; slot channels
  beyond the free slots are closed (what the broker had pushed on them goes back at once).
  Queues that refuse such a consumer (quorum queues: no channel-wide prefetch) and users of
  :meth:`take` that never call :meth:`offer` get ``basic.get`` instead;
* **holds** each taken message on a channel of its own until its fate is known: a channel
  closed by the broker (the delivery-acknowledgement timeout, ``consumer_timeout``) then
  loses only that one delivery;
* **settles** with ``basic.ack``, ``basic.reject(requeue)`` (put back untouched, keeps
  its place), republish-then-ack (requeue with a new attempt count, carried in the
  ``x-studioml-attempts`` header so that it survives on any runner), and
  publish-to-``<queue>_dead``-then-ack (dead letter, reason in ``x-studioml-dead-reason``);
* **survives** the broker going away: every call on the connection catches connection
  errors, marks every held delivery lost (the broker requeues them by itself) and
  reconnects with exponential backoff from :meth:`service`, which the fetcher calls on
  every tick and which also keeps the AMQP heartbeats flowing.

pika's ``BlockingConnection`` is not thread-safe: it is only ever used from the thread
that calls the :class:`~runner.queues.base.Queue` methods (the fetcher's loop); there is no
consumer thread.  Instead :meth:`wait_fd` gives the fetcher an epoll descriptor that is
readable when the connection's socket is (a push, a heartbeat) or when a pushed message
waits to be taken; the fetcher then calls :meth:`changes`, which runs
``process_data_events(time_limit=0)`` and so hands the pushed messages to the consumer
callbacks in the fetcher's own thread.  Nothing is polled on a timer between a publish and
the fetcher seeing it (``docs/rabbitmq.md``).
"""
from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import random
import select
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlsplit

import pika
import pika.exceptions

from ..errors import DeliveryLost, QueueError
from ..redact import safe_url
from .base import Delivery, Queue, is_reserved

logger = logging.getLogger(__name__)

EXCHANGE = "StudioML.topic"
ROUTING_PREFIX = "StudioML."
ATTEMPTS_HEADER = "x-studioml-attempts"
DEAD_REASON_HEADER = "x-studioml-dead-reason"
DEAD_QUEUE_HEADER = "x-studioml-dead-queue"
DEAD_AT_HEADER = "x-studioml-dead-at"
DEAD_HOST_HEADER = "x-studioml-dead-host"
DEAD_SUFFIX = "_dead"

GET_POLL_EVERY = 0.15  # the fetcher's tick while some queue is served by ``basic.get``
CONSUME_ERROR_BACKOFF = 1.0  # a queue that refused a consumer (gone) is left out this long
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
DISCOVER_EVERY = 1.0
HTTP_TIMEOUT = 5.0

_CONNECTION_ERRORS = (pika.exceptions.AMQPConnectionError,
                      pika.exceptions.ConnectionWrongStateError,
                      pika.exceptions.StreamLostError, ConnectionError, OSError)


def default_mgt_url(amqp_url: str) -> str:
    """The management API of ``amqp_url``'s broker: http, same host, AMQP port + 10000."""
    parts = urlsplit(amqp_url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port + 10000}"


def routing_key(queue: str) -> str:
    """The routing key StudioML clients publish ``queue``'s requests with."""
    return ROUTING_PREFIX + queue


def attempts_of(properties: Any) -> int:
    """The attempt count carried in ``properties``' headers (0 when absent or garbled)."""
    headers = getattr(properties, "headers", None) or {}
    value = headers.get(ATTEMPTS_HEADER, 0)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


@dataclass
class _Held:
    """One taken message: the channel it is held on, and what a republish needs."""

    queue: str
    channel: Any
    delivery_tag: int
    properties: Any
    body: bytes
    generation: int
    lost: str = ""
    consumers: list[str] = field(default_factory=list)  # its slot channel's tags to cancel


@dataclass
class _Pushed:
    """A message the broker pushed to a slot channel, not taken by the fetcher yet."""

    queue: str
    delivery_tag: int
    properties: Any
    body: bytes


@dataclass
class _Slot:
    """One slot channel: channel-wide prefetch 1, a consumer per served queue (``tags``:
    consumer tag -> queue); ``pushed`` once the broker handed it its one message."""

    channel: Any
    queues: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    pushed: _Pushed | None = None


@dataclass
class _Discovery:
    """The discovery thread's latest answer (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    names: list[str] | None = None
    types: dict[str, str] = field(default_factory=dict)  # queue -> "classic", "quorum", …
    error: str = ""
    at: float = 0.0


class ManagementAPI:
    """The few calls of the RabbitMQ management HTTP API the runner needs."""

    def __init__(self, url: str, user: str, password: str, vhost: str,
                 timeout: float = HTTP_TIMEOUT) -> None:
        parts = urlsplit(url)
        self.base = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        if parts.username:  # credentials in the management URL win over the AMQP URL's
            user, password = unquote(parts.username), unquote(parts.password or "")
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.vhost = vhost
        self.timeout = timeout

    def get(self, path: str) -> Any:
        """GET ``/api/<path>``; ``None`` on 404; raises QueueError on anything else."""
        request = urllib.request.Request(f"{self.base}/api/{path}",
                                         headers={"Authorization": self.auth})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise QueueError(f"management API {self.base}: HTTP {exc.code} for /api/{path}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise QueueError(f"management API {self.base} unreachable: {exc}") from exc

    def bound_queues(self, exchange: str = EXCHANGE) -> list[str]:
        """Queues bound to ``exchange`` (none when the exchange does not exist)."""
        path = f"exchanges/{quote(self.vhost, safe='')}/{quote(exchange, safe='')}/bindings/source"
        bindings = self.get(path)
        if not bindings:
            return []
        return sorted({b["destination"] for b in bindings
                       if b.get("destination_type") == "queue" and b.get("destination")})

    def queue_info(self, queue: str) -> dict | None:
        """The management API's view of ``queue`` (message counts lag by its stats interval)."""
        return self.get(f"queues/{quote(self.vhost, safe='')}/{quote(queue, safe='')}")


class RabbitMQQueue(Queue):
    """``rmq_…`` queues of one broker (one vhost).

    ``amqp_url`` carries the credentials and vhost (``amqp://user:pass@host:5672/%2F``) and
    may carry pika's connection options as a query (``?heartbeat=30``).  ``mgt_url`` is the
    management API (default :func:`default_mgt_url`).  The constructor does not connect:
    :meth:`service` (or the first call that needs the broker) does, and reconnects with
    backoff after any connection loss.
    """

    kind: ClassVar[str] = "rmq"

    def __init__(self, amqp_url: str, mgt_url: str = "", *, name: str = "studioml-runner",
                 hostname: str = "", discover_every: float = DISCOVER_EVERY) -> None:
        try:
            self.params = pika.URLParameters(amqp_url)
        except (ValueError, TypeError) as exc:
            raise QueueError(f"bad AMQP URL {safe_url(amqp_url)}: {exc}") from exc
        query = urlsplit(amqp_url).query
        if "socket_timeout" not in query:
            self.params.socket_timeout = 5.0
        if "blocked_connection_timeout" not in query:
            self.params.blocked_connection_timeout = 60.0
        self.params.connection_attempts = 1
        self.params.retry_delay = 0
        self.params.client_properties = {"connection_name": name}
        self.safe_url = safe_url(amqp_url)
        self.hostname = hostname or socket.gethostname()
        creds = self.params.credentials
        self.mgt = ManagementAPI(mgt_url or default_mgt_url(amqp_url),
                                 getattr(creds, "username", "guest"),
                                 getattr(creds, "password", "guest"),
                                 self.params.virtual_host)
        self._conn: pika.BlockingConnection | None = None
        self._generation = 0
        self._poll_ch: Any = None
        self._info_ch: Any = None
        self._pub_ch: Any = None
        self._held: dict[str, _Held] = {}
        self._seq = itertools.count(1)
        self._next_connect = 0.0
        self._backoff = BACKOFF_FIRST
        self._down_since: float | None = None
        self._discovery = _Discovery()
        self._discover_every = discover_every
        self._discover_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        # consuming (offer): slot channels, queues that only basic.get serves, the wake-up
        self._consuming = False
        self._slots: list[_Slot] = []
        self._get_only: set[str] = set()
        self._consume_refused = False  # the broker refuses channel-wide prefetch: basic.get
        self._avoid: dict[str, float] = {}    # queue -> monotonic time it may be consumed
        self._rotation = 0
        self._epoll: Any = None
        self._sock_fd: int | None = None
        self._socket_watched = False  # wait_fd announces pushes (epoll, pika's socket found)
        self._wake_r = self._wake_w = -1
        self._signalled = False
        self.poll_every: float | None = GET_POLL_EVERY
        """150 ms while something is only found by asking (no epoll, a ``basic.get``
        queue); ``None`` once :meth:`wait_fd` announces pushes."""

    @classmethod
    def from_config(cls, config: Any) -> RabbitMQQueue | None:
        if not getattr(config, "amqp_url", ""):
            return None
        return cls(config.amqp_url, config.amqp_mgt_url,
                   name=f"studioml-runner {config.instance or config.hostname}",
                   hostname=config.hostname)

    @classmethod
    def publisher(cls, options) -> RabbitMQQueue:
        """See :meth:`Queue.publisher`; ``options.durable`` makes :meth:`publish` declare a
        missing queue durable and send persistent messages."""
        from ..config import expand_vars

        url, missing = expand_vars(options.amqp_url or "", os.environ)
        if missing:
            raise QueueError(f"--amqp-url: ${{{'}, ${'.join(missing)}}} not set in the "
                             "environment")
        if not url:
            raise QueueError(f"queue {options.queue!r}: rmq_* queues need --amqp-url "
                             "(or AMQP_URL)")
        queue = cls(url, name=f"runner-submit {os.getpid()}")
        queue.publish_durable = bool(options.durable)
        return queue

    @classmethod
    def client_queue(cls, options) -> dict:
        return {"rmq": safe_url(options.amqp_url or "")}

    # ------------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.is_open

    def _connect_now(self) -> pika.BlockingConnection:
        conn = pika.BlockingConnection(self.params)
        self._conn = conn
        self._generation += 1
        self._watch_socket(conn)
        self._backoff = BACKOFF_FIRST
        if self._down_since is not None:
            logger.warning("reconnected to RabbitMQ %s after %.1fs", self.safe_url,
                           time.monotonic() - self._down_since)
        else:
            logger.info("connected to RabbitMQ %s", self.safe_url)
        self._down_since = None
        return conn

    def _ensure(self, wait: bool = False) -> pika.BlockingConnection | None:
        """The open connection; ``None`` while waiting for the next reconnect attempt.

        With ``wait`` a closed connection is retried at once (for one-shot tools).
        """
        self._check_open()
        if self._conn is not None and self._conn.is_open:
            return self._conn
        if self._conn is not None:
            self._lost("the connection closed")
        if not wait and time.monotonic() < self._next_connect:
            return None
        try:
            return self._connect_now()
        except _CONNECTION_ERRORS as exc:
            self._schedule_reconnect(exc)
            if wait:
                raise QueueError(f"cannot connect to RabbitMQ {self.safe_url}: {exc!r}") from exc
            return None

    def _schedule_reconnect(self, exc: BaseException) -> None:
        delay = self._backoff * random.uniform(0.8, 1.2)
        self._next_connect = time.monotonic() + delay
        if self._down_since is None:
            self._down_since = time.monotonic()
        log = logger.warning if self._backoff <= BACKOFF_FIRST or self._backoff >= BACKOFF_MAX \
            else logger.info
        log("RabbitMQ %s unreachable (%r); retrying in %.1fs", self.safe_url, exc, delay)
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)

    def _lost(self, why: str | BaseException) -> None:
        """The connection is gone: every held delivery is lost (the broker requeues them)."""
        conn, self._conn = self._conn, None
        self._poll_ch = self._info_ch = self._pub_ch = None
        self._slots = []  # their pushed messages go back to their queues with the connection
        self._unwatch_socket()
        for held in self._held.values():
            if not held.lost:
                held.lost = f"connection lost: {why!r}"
        if self._held:
            logger.warning("RabbitMQ connection lost (%r): %d held deliveries go back to their "
                           "queues; running experiments continue", why, len(self._held))
        else:
            logger.warning("RabbitMQ connection lost (%r)", why)
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._next_connect = time.monotonic()  # first retry at once, then back off
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is already broken
                pass

    def _call(self, fn, *args, **kwargs):
        """Run one pika call; connection errors mark the connection lost and raise QueueError."""
        try:
            return fn(*args, **kwargs)
        except _CONNECTION_ERRORS as exc:
            self._lost(exc)
            raise QueueError(f"RabbitMQ {self.safe_url}: connection lost: {exc!r}") from exc

    def _channel(self, attr: str, confirm: bool = False) -> Any:
        ch = getattr(self, attr)
        if ch is not None and ch.is_open:
            return ch
        conn = self._ensure()
        if conn is None:
            raise QueueError(f"RabbitMQ {self.safe_url} is not connected")
        ch = self._call(conn.channel)
        if confirm:
            self._call(ch.confirm_delivery)
        setattr(self, attr, ch)
        return ch

    def service(self) -> None:
        """Heartbeats, broker-closed channels, reconnects: call often from the owning thread."""
        if self._closed:
            return
        conn = self._ensure()
        if conn is None:
            return
        try:
            conn.process_data_events(time_limit=0)
        except _CONNECTION_ERRORS as exc:
            self._lost(exc)
            return
        except pika.exceptions.AMQPChannelError as exc:  # reported per channel below
            logger.debug("channel event while serving the connection: %r", exc)
        for token, held in self._held.items():
            if not held.lost and not held.channel.is_open:
                reason = getattr(held.channel, "_closing_reason", None)
                held.lost = f"its channel was closed by the broker: {reason!r}"
                logger.error("delivery %s from %s lost: %s (see docs/rabbitmq.md, "
                             "consumer_timeout); the run goes on and the redelivered copy "
                             "will be settled when it comes back", token, held.queue,
                             held.lost)

    # ------------------------------------------------------------------ discovery

    def _poll_discovery(self) -> None:
        try:
            names = [n for n in self.mgt.bound_queues() if not is_reserved(n)]
            with self._discovery.lock:
                known = dict(self._discovery.types)
            types = {}
            for name in names:  # a queue's type is asked once, when it first shows
                if name not in known:
                    info = self.mgt.queue_info(name)
                    if info is None:
                        continue  # deleted meanwhile
                    known[name] = str(info.get("type") or "classic")
                types[name] = known[name]
            with self._discovery.lock:
                self._discovery.names, self._discovery.error = names, ""
                self._discovery.types = types
                self._discovery.at = time.monotonic()
        except QueueError as exc:
            with self._discovery.lock:
                self._discovery.error = str(exc)

    def _discover_loop(self) -> None:
        while not self._stop.wait(self._discover_every):
            self._poll_discovery()

    def discover(self) -> list[str]:
        """Queues bound to ``StudioML.topic`` (by the latest management API answer)."""
        self._check_open()
        if self._discover_thread is None:
            self._poll_discovery()  # first answer in line, then in the background
            self._discover_thread = threading.Thread(target=self._discover_loop, daemon=True,
                                                     name="rmq-discovery")
            self._discover_thread.start()
        with self._discovery.lock:
            if self._discovery.error:
                raise QueueError(self._discovery.error)
            return list(self._discovery.names or [])

    # ------------------------------------------------------------------ taking

    def take(self, queue: str) -> Delivery | None:
        """The message the broker pushed for ``queue`` (after :meth:`offer`), else (never
        offered, or a queue that refuses consumers) ``basic.get`` one without auto-ack; it
        stays held on its own channel until settled."""
        self._check_open()
        if self._ensure() is None:
            return None
        if self._consuming and not self._consume_refused and queue not in self._get_only:
            return self._take_pushed(queue)
        ch = self._channel("_poll_ch")
        try:
            method, properties, body = self._call(ch.basic_get, queue, auto_ack=False)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._poll_ch = None
            raise QueueError(f"cannot take from {queue}: {exc}") from exc
        if method is None:
            return None
        self._poll_ch = None  # the channel now holds this delivery
        token = f"{self._generation}.{next(self._seq)}"
        self._held[token] = _Held(queue=queue, channel=ch, delivery_tag=method.delivery_tag,
                                  properties=properties, body=body,
                                  generation=self._generation)
        return Delivery(queue=queue, token=token, body=body, attempts=attempts_of(properties))

    def _take_pushed(self, queue: str) -> Delivery | None:
        slot = self._pushed_for(queue)
        if slot is None or slot.pushed is None:
            return None  # a push comes through wait_fd/changes (or service), never by asking
        self._slots.remove(slot)
        pushed = slot.pushed
        token = f"{self._generation}.{next(self._seq)}"
        self._held[token] = _Held(queue=queue, channel=slot.channel,
                                  delivery_tag=pushed.delivery_tag,
                                  properties=pushed.properties, body=pushed.body,
                                  generation=self._generation, consumers=list(slot.tags))
        return Delivery(queue=queue, token=token, body=pushed.body,
                        attempts=attempts_of(pushed.properties))

    def _pushed_for(self, queue: str) -> _Slot | None:
        for slot in self._slots:
            if slot.pushed is not None and slot.pushed.queue == queue:
                return slot
        return None

    # ------------------------------------------------------------------ consuming

    def offer(self, queues: list[str], slots: int) -> None:
        """Have the broker push up to ``slots`` messages from ``queues``, no more.

        Keeps exactly ``slots`` slot channels (waiting, or holding a pushed message not
        taken yet) consuming ``queues`` (in a rotating order, for fairness); ``slots`` 0
        stops consuming.  Pushed messages are taken with :meth:`take`.  Extra slot channels
        are closed, newest first (a message the broker had pushed on one goes back to its
        queue); one that got a message of a queue no longer offered is closed too.  A
        queue that refuses a consumer is left out for a second when it is gone, and
        served by ``basic.get`` (:attr:`poll_every` 150 ms) when it cannot have a
        channel-wide prefetch (quorum queues).  Never raises for the broker's troubles
        (logged; :meth:`service` reconnects); raises QueueError on a negative ``slots``.
        """
        self._check_open()
        if slots < 0:
            raise QueueError(f"slots must be >= 0, got {slots}")
        self._consuming = True
        now = time.monotonic()
        with self._discovery.lock:
            types = self._discovery.types
        for queue in queues:
            if types.get(queue, "classic") != "classic" and queue not in self._get_only:
                self._serve_by_get(queue, f"a {types[queue]} queue")
        asked = self._consume_refused or not self._socket_watched or \
            any(q in self._get_only for q in queues)
        self.poll_every = GET_POLL_EVERY if asked else None
        if self._consume_refused:
            return
        wanted = tuple(q for q in queues if q not in self._get_only
                       and self._avoid.get(q, 0.0) <= now)
        if not slots and not self._slots and not self._quiet_pending():
            return  # nothing to consume and nothing to stop: no broker needed
        conn = self._ensure()
        if conn is None:
            return
        try:
            for slot in list(self._slots):
                stale = slot.queues != wanted if slot.pushed is None \
                    else slot.pushed.queue not in wanted
                if stale or not slot.channel.is_open:
                    self._drop(slot)
            while len(self._slots) > slots:
                waiting = [s for s in self._slots if s.pushed is None]
                self._drop((waiting or self._slots)[-1])
            while len(self._slots) < slots and wanted and self._conn is conn:
                if not self._open_slot(conn, wanted):
                    break
            for held in self._held.values():
                if held.consumers:
                    self._quiet(held)
        except _CONNECTION_ERRORS as exc:
            self._lost(exc)
            return
        except pika.exceptions.AMQPChannelError as exc:  # that slot channel is gone; next offer
            logger.warning("RabbitMQ channel trouble while offering slots: %r", exc)
        self._pump()

    def _quiet_pending(self) -> bool:
        return any(held.consumers for held in self._held.values())

    def _open_slot(self, conn: Any, queues: tuple[str, ...]) -> bool:
        """Open one slot channel consuming ``queues``; False when it could not be opened
        (a queue refused, see :meth:`offer`: the next offer tries again without it)."""
        ch = conn.channel()
        try:
            ch.basic_qos(prefetch_count=1, global_qos=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._consume_refused = True
            self.poll_every = GET_POLL_EVERY
            logger.warning("RabbitMQ %s refuses a channel-wide prefetch (%s); every queue is "
                           "served by basic.get every %.2fs", self.safe_url, exc,
                           GET_POLL_EVERY)
            for slot in list(self._slots):
                self._drop(slot)
            return False
        slot = _Slot(channel=ch, queues=queues)
        self._slots.append(slot)
        start = self._rotation % len(queues)
        self._rotation += 1
        for queue in queues[start:] + queues[:start]:
            try:
                tag = ch.basic_consume(queue, lambda c, m, p, b, slot=slot:
                                       self._on_push(slot, c, m, p, b))
            except pika.exceptions.ChannelClosedByBroker as exc:
                self._slots.remove(slot)
                if exc.reply_code == 404:
                    self._avoid[queue] = time.monotonic() + CONSUME_ERROR_BACKOFF
                    logger.info("cannot consume %s (gone?): %s", queue, exc)
                else:
                    self._serve_by_get(queue, str(exc))
                return False
            except pika.exceptions.ConnectionClosedByBroker as exc:
                if exc.reply_code == 540:  # a quorum queue discovery had not typed yet
                    self._serve_by_get(queue, str(exc))
                raise
            slot.tags[tag] = queue
        return True

    def _serve_by_get(self, queue: str, why: str) -> None:
        """``queue`` cannot be consumed with a channel-wide prefetch: ``basic.get`` it."""
        self._get_only.add(queue)
        self.poll_every = GET_POLL_EVERY
        logger.warning("queue %s cannot be consumed with a channel-wide prefetch (%s); it is "
                       "served by basic.get every %.2fs", queue, why, GET_POLL_EVERY)

    def _on_push(self, slot: _Slot, ch: Any, method: Any, properties: Any, body: bytes) -> None:
        """pika's consumer callback (in the fetcher's thread, inside :meth:`_pump`)."""
        queue = slot.tags.get(method.consumer_tag)
        if slot.pushed is not None or queue is None or slot not in self._slots:
            # cannot happen with a channel-wide prefetch of 1; never keep what has no slot
            logger.warning("unexpected push on a slot channel; put back")
            ch.basic_reject(method.delivery_tag, requeue=True)
            return
        slot.pushed = _Pushed(queue=queue, delivery_tag=method.delivery_tag,
                              properties=properties, body=bytes(body))
        self._signal()

    def _quiet(self, held: _Held) -> None:
        """Cancel the consumers left on ``held``'s slot channel (before it is settled: an
        ack would otherwise let the broker push it another message)."""
        tags, held.consumers = held.consumers, []
        if not held.channel.is_open:
            return
        live = set(held.channel.consumer_tags)
        for tag in tags:
            if tag in live:
                held.channel.basic_cancel(tag)

    def _drop(self, slot: _Slot) -> None:
        """Close a slot channel: its consumers end, a message pushed on it goes back."""
        self._slots.remove(slot)
        try:
            if slot.channel.is_open:
                slot.channel.close()
        except pika.exceptions.AMQPChannelError:
            pass

    def _pump(self) -> None:
        """Read what the broker sent and run pika's callbacks (pushes) now, never waiting."""
        conn = self._conn
        if conn is None or not conn.is_open:
            return
        try:
            conn.process_data_events(time_limit=0)
        except _CONNECTION_ERRORS as exc:
            self._lost(exc)
        except pika.exceptions.AMQPChannelError as exc:
            logger.debug("channel event while serving the connection: %r", exc)

    # -- the fetcher's wake-up: epoll over the socket and a self-pipe -------------------

    def wait_fd(self) -> int | None:
        """An epoll descriptor, readable when the broker sent something or a pushed message
        waits; the connection's socket is (re)registered on every connect.  ``None`` (and
        :attr:`poll_every` stays 150 ms) where epoll is missing."""
        if self._epoll is None and hasattr(select, "epoll"):
            self._epoll = select.epoll()
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._epoll.register(self._wake_r, select.EPOLLIN)
            self._socket_watched = True
            if self._conn is not None and self._conn.is_open:
                self._watch_socket(self._conn)
            if not self._get_only and self._socket_watched:
                self.poll_every = None
        return self._epoll.fileno() if self._epoll is not None else None

    def changes(self) -> bool:
        """Take in what the broker sent (pushes land in slot channels); always False:
        discovery is the management API's."""
        if self._signalled:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
            self._signalled = False
        if not self._closed:
            self._pump()
        return False

    def _signal(self) -> None:
        if self._wake_w >= 0 and not self._signalled:
            self._signalled = True
            try:
                os.write(self._wake_w, b"p")
            except OSError:
                pass

    def _watch_socket(self, conn: Any) -> None:
        self._unwatch_socket()
        if self._epoll is None:
            return
        sock: Any = getattr(getattr(getattr(conn, "_impl", None), "_transport", None), "_sock",
                            None)
        try:
            fd = sock.fileno()
            self._epoll.register(fd, select.EPOLLIN)
        except (AttributeError, OSError, ValueError) as exc:  # pika's internals changed
            logger.warning("cannot watch the AMQP socket (%r); polling every %.2fs", exc,
                           GET_POLL_EVERY)
            self._socket_watched = False
            self.poll_every = GET_POLL_EVERY
            return
        self._sock_fd = fd

    def _unwatch_socket(self) -> None:
        fd, self._sock_fd = self._sock_fd, None
        if fd is not None and self._epoll is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # closed already (epoll forgot it by itself)

    # ------------------------------------------------------------------ settling

    def _held_of(self, d: Delivery) -> _Held:
        self._check_open()
        held = self._held.get(d.token)
        if held is None:
            raise DeliveryLost(f"delivery {d.token!r} is not held by this connection (taken "
                               "before a reconnect or a restart); the broker redelivers it")
        if held.queue != d.queue:
            raise QueueError(f"token {d.token!r} does not belong to queue {d.queue!r}")
        if not held.lost and (held.generation != self._generation or not held.channel.is_open):
            held.lost = "its channel or connection closed"
        if held.lost:
            del self._held[d.token]
            raise DeliveryLost(f"delivery {d.token!r} from {d.queue} was lost ({held.lost}); "
                               "the broker redelivers it")
        return held

    def _release(self, token: str, held: _Held) -> None:
        self._held.pop(token, None)
        try:
            if held.channel.is_open:
                held.channel.close()
        except _CONNECTION_ERRORS as exc:
            self._lost(exc)
        except pika.exceptions.AMQPError:
            pass

    def _settle(self, d: Delivery, what: str, fn) -> None:
        held = self._held_of(d)
        try:
            if held.consumers:
                self._quiet(held)
            fn(held)
        except (pika.exceptions.ChannelClosedByBroker,
                pika.exceptions.ChannelWrongStateError) as exc:
            self._held.pop(d.token, None)
            raise DeliveryLost(f"could not {what} {d.token!r}: channel closed: {exc!r}") from exc
        except _CONNECTION_ERRORS as exc:
            self._lost(exc)
            self._held.pop(d.token, None)
            raise DeliveryLost(f"could not {what} {d.token!r}: connection lost: {exc!r}") from exc
        self._release(d.token, held)

    def ack(self, d: Delivery) -> None:
        self._settle(d, "ack", lambda h: h.channel.basic_ack(h.delivery_tag))

    def requeue(self, d: Delivery, *, attempts: int) -> None:
        """Untouched (same count): ``basic.reject(requeue)``; new count: republish, then ack."""
        if attempts < 0:
            raise QueueError(f"attempts must be >= 0, got {attempts}")
        if attempts == d.attempts:
            self._settle(d, "requeue", lambda h: h.channel.basic_reject(h.delivery_tag,
                                                                        requeue=True))
            return
        held = self._held_of(d)
        headers = dict(getattr(held.properties, "headers", None) or {})
        headers[ATTEMPTS_HEADER] = attempts
        try:
            self._publish_copy(d.queue, held, headers)
        except QueueError as exc:
            # Better to retry with the old count than to keep a message nobody can take.
            try:
                self._settle(d, "requeue", lambda h: h.channel.basic_reject(h.delivery_tag,
                                                                            requeue=True))
            except QueueError:
                pass
            raise QueueError(f"could not republish {d.token!r} with {ATTEMPTS_HEADER}="
                             f"{attempts}; put back with its old count: {exc}") from exc
        self._settle(d, "ack the republished", lambda h: h.channel.basic_ack(h.delivery_tag))

    def dead_letter(self, d: Delivery, reason: str) -> None:
        """Publish a copy to ``<queue>_dead`` (declared if missing) with the reason, then ack."""
        held = self._held_of(d)
        dead = d.queue + DEAD_SUFFIX
        info = self._channel("_info_ch")
        try:
            self._call(info.queue_declare, dead, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self._info_ch = None
            self._call(self._channel("_info_ch").queue_declare, dead, durable=True)
        headers = dict(getattr(held.properties, "headers", None) or {})
        headers.update({DEAD_REASON_HEADER: reason[:4000], DEAD_QUEUE_HEADER: d.queue,
                        DEAD_AT_HEADER: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        DEAD_HOST_HEADER: self.hostname})
        self._publish_copy(dead, held, headers)
        self._settle(d, "ack the dead-lettered", lambda h: h.channel.basic_ack(h.delivery_tag))
        logger.warning("dead-lettered a message of %s to %s: %s", d.queue, dead, reason)

    def _publish_copy(self, queue: str, held: _Held, headers: dict) -> None:
        """Publish ``held``'s body and properties straight into ``queue`` (confirmed)."""
        p = held.properties
        properties = pika.BasicProperties(
            content_type=getattr(p, "content_type", None) or "application/json",
            content_encoding=getattr(p, "content_encoding", None),
            app_id=getattr(p, "app_id", None), message_id=getattr(p, "message_id", None),
            correlation_id=getattr(p, "correlation_id", None),
            timestamp=getattr(p, "timestamp", None), type=getattr(p, "type", None),
            priority=getattr(p, "priority", None),
            delivery_mode=getattr(p, "delivery_mode", None) or 2, headers=headers)
        ch = self._channel("_pub_ch", confirm=True)
        try:
            self._call(ch.basic_publish, exchange="", routing_key=queue, body=held.body,
                       properties=properties, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            raise QueueError(f"broker refused the copy for {queue}: {exc!r}") from exc
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._pub_ch = None
            raise QueueError(f"broker refused the copy for {queue}: {exc}") from exc

    def keep_alive(self, d: Delivery) -> None:
        """Nothing to extend in AMQP; raises ``DeliveryLost`` when the hold is gone."""
        self._held_of(d)

    def queue_deleted(self, d: Delivery) -> bool:
        """True when ``d``'s queue no longer exists although our connection never dropped.

        A delivery taken before a reconnect tells nothing (a non-durable queue vanishes
        with a broker restart, which is no user's abort), so it answers False.
        """
        held = self._held.get(d.token)
        if held is None or held.generation != self._generation or not self.connected:
            return False
        return self._exists(d.queue) is False

    def _exists(self, queue: str) -> bool | None:
        try:
            ch = self._channel("_info_ch")
            self._call(ch.queue_declare, queue, passive=True)
            return True
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._info_ch = None
            return False if exc.reply_code == 404 else None
        except QueueError:
            return None

    def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (a passive declare); 0 when it does not exist."""
        self._check_open()
        if self._ensure() is None:
            raise QueueError(f"RabbitMQ {self.safe_url} is not connected")
        ch = self._channel("_info_ch")
        try:
            return int(self._call(ch.queue_declare, queue, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker:
            self._info_ch = None
            return 0

    def peek(self, queue: str, limit: int) -> list[bytes]:
        """Always ``[]``: AMQP cannot look at a message without taking it."""
        return []

    # ------------------------------------------------------------------ publishing

    publish_durable = False  # the default of publish()'s ``durable`` (see publisher())

    def publish(self, queue: str, body: bytes, *, attempts: int = 0,
                durable: bool | None = None) -> str:
        """Publish as the StudioML client does; returns the message id.

        Declares the topic exchange ``StudioML.topic`` (durable, auto-delete, like the
        client) and ``queue`` (non-durable like the client unless ``durable``) when they do
        not exist yet, binds it with ``StudioML.<queue>``, and publishes with publisher
        confirms, ``mandatory``, ``app_id studioml`` and ``content_type
        application/json``.
        """
        if attempts < 0:
            raise QueueError(f"attempts must be >= 0, got {attempts}")
        durable = self.publish_durable if durable is None else durable
        self._ensure(wait=True)
        info = self._channel("_info_ch")
        try:
            self._call(info.exchange_declare, EXCHANGE, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self._info_ch = None
            self._call(self._channel("_info_ch").exchange_declare, EXCHANGE,
                       exchange_type="topic", durable=True, auto_delete=True)
        info = self._channel("_info_ch")
        try:
            self._call(info.queue_declare, queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self._info_ch = None
            info = self._channel("_info_ch")
            self._call(info.queue_declare, queue, durable=durable)
        self._call(info.queue_bind, queue, EXCHANGE, routing_key=routing_key(queue))
        message_id = uuid.uuid4().hex
        properties = pika.BasicProperties(
            app_id="studioml", content_type="application/json", message_id=message_id,
            delivery_mode=2 if durable else None,
            headers={ATTEMPTS_HEADER: attempts} if attempts else None)
        ch = self._channel("_pub_ch", confirm=True)
        try:
            self._call(ch.basic_publish, exchange=EXCHANGE, routing_key=routing_key(queue),
                       body=bytes(body), properties=properties, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            raise QueueError(f"broker refused the message for {queue}: {exc!r}") from exc
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._pub_ch = None
            raise QueueError(f"broker refused the message for {queue}: {exc}") from exc
        return message_id

    # ------------------------------------------------------------------ lifetime

    def _check_open(self) -> None:
        if self._closed:
            raise QueueError("RabbitMQ queue back end is closed")

    def close(self) -> None:
        """Stop discovery and close the connection (held deliveries go back to the broker)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        conn, self._conn = self._conn, None
        self._held.clear()
        self._slots = []
        self._unwatch_socket()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
        if self._epoll is not None:
            self._epoll.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
