"""Google Pub/Sub subscriptions with google-cloud-pubsub.  See ``docs/sqs-pubsub.md``.

* **Projects**: the service-account file in ``GOOGLE_APPLICATION_CREDENTIALS`` and every
  ``*.json`` file of ``--google-certs`` name a project (``project_id``); the directory is
  rescanned with every discovery pass like ``--sqs-certs``.  ``PUBSUB_EMULATOR_HOST`` is
  honoured (the files then only name projects; no key is loaded).
* **Queues** are subscriptions (``ListSubscriptions`` of each project; names carry no
  prefix, so a host serving Pub/Sub sets ``--queue-match`` to admit them).
* **Taking**: one :class:`~runner.queues.receiver.Receiver` thread per served subscription
  pulls one message while the fetcher has a free slot, and sets its ack deadline to
  ``--pubsub-ack-deadline`` at once; a message nobody wants any more is nacked
  (deadline 0) at once.
* **Holding**: :meth:`PubSubQueue.keep_alive` extends the ack deadline every third of it.
* **Settling**: ack = ``Acknowledge``; requeue = nack (``ModifyAckDeadline`` 0); dead letter =
  publish a copy (reason in attributes) to the subscription's dead-letter topic when it
  has a dead-letter policy, else to topic ``<subscription>_dead`` (created with a
  subscription of the same name so that the copy is kept), then ack.
* **Attempts**: with a dead-letter policy, Pub/Sub counts deliveries
  (``delivery_attempt``); the runner takes ``delivery_attempt - 1`` less the put-backs
  it made itself for reasons that are no attempt (resources, storage, shutdown).  Without
  one, the runner counts: ``requeue`` with a new count writes it to a small JSON book
  under the working directory, keyed by project, subscription and message id, and
  ``take`` reads it back.  The book is per host (docs/sqs-pubsub.md).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import DeliveryLost, QueueError
from .base import Delivery, Queue, is_reserved
from .receiver import BackgroundDiscovery, Receiver

logger = logging.getLogger(__name__)

DEAD_SUFFIX = "_dead"
DEFAULT_ACK_DEADLINE = 60.0
PULL_WAIT = 10.0
DISCOVER_EVERY = 2.0
RPC_TIMEOUT = 30.0
BOOK_TTL = 8 * 24 * 3600.0
"""Entries of the attempt book outlive Pub/Sub's longest retention (7 days)."""


def _exceptions():
    from google.api_core import exceptions
    return exceptions


def project_of(path: str) -> str:
    """The ``project_id`` a service-account (or other credentials) JSON file names."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise QueueError(f"{path}: not a readable JSON credentials file: {exc}") from exc
    project = data.get("project_id") or data.get("quota_project_id")
    if not project:
        raise QueueError(f"{path}: names no project_id")
    return str(project)


@dataclass
class Project:
    """One Google project: its clients and the subscriptions last listed."""

    name: str
    source: str
    subscriber: Any
    publisher: Any
    signature: tuple = ()
    subscriptions: dict[str, Any] = field(default_factory=dict)  # short name -> Subscription
    error: str = ""

    def sub_path(self, name: str) -> str:
        return f"projects/{self.name}/subscriptions/{name}"

    def topic_path(self, name: str) -> str:
        return f"projects/{self.name}/topics/{name}"


@dataclass
class _Held:
    queue: str
    project: Project
    ack_id: str
    message_id: str
    data: bytes
    attributes: dict
    book_key: str


class AttemptBook:
    """Attempt counts and uncounted put-backs by message, in one small JSON file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        try:
            with open(path, encoding="utf-8") as handle:
                self.entries = json.load(handle)
        except (OSError, ValueError):
            self.entries = {}

    def get(self, key: str) -> dict:
        return self.entries.get(key) or {}

    def set(self, key: str, **values: int) -> None:
        entry = dict(self.entries.get(key) or {})
        entry.update(values, t=time.time())
        self.entries[key] = entry
        self._save()

    def drop(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
        now = time.time()
        self.entries = {k: v for k, v in self.entries.items() if now - v.get("t", now) < BOOK_TTL}
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(self.entries, handle)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("cannot write the Pub/Sub attempt book %s: %s", self.path, exc)


class PubSubQueue(BackgroundDiscovery, Queue):
    """Subscriptions of one or more Google projects."""

    discovery_name = "Pub/Sub"
    lost_hint = "taken before a restart; Pub/Sub redelivers it"

    kind: ClassVar[str] = "pubsub"

    def __init__(self, credential_files: list[str] | None = None, certs_dir: str = "", *,
                 ack_deadline: float = DEFAULT_ACK_DEADLINE, book_path: str = "",
                 hostname: str = "", discover_every: float = DISCOVER_EVERY,
                 pull_wait: float = PULL_WAIT) -> None:
        try:
            from google.cloud import pubsub_v1  # noqa: F401
        except ImportError as exc:
            raise QueueError("Pub/Sub needs google-cloud-pubsub") from exc
        if not 10 <= ack_deadline <= 600:
            raise QueueError(f"ack deadline must be 10s..600s, got {ack_deadline}s")
        self.files = list(credential_files or [])
        self.certs_dir = certs_dir
        self.ack_deadline = int(ack_deadline)
        self.keep_alive_every = max(3.0, self.ack_deadline / 3.0)
        self.hostname = hostname or socket.gethostname()
        self.emulator = os.environ.get("PUBSUB_EMULATOR_HOST", "")
        self.book = AttemptBook(book_path) if book_path else AttemptBook(os.devnull)
        if not book_path:
            self.book._save = lambda: None  # type: ignore[method-assign]
        self._start_background(discover_every)
        self._pull_wait = pull_wait
        self._projects: dict[str, Project] = {}   # source file -> project
        self._names: dict[str, tuple[Project, Any]] = {}
        self._held: dict[str, _Held] = {}
        self._rescan()

    @classmethod
    def from_config(cls, config: Any) -> PubSubQueue | None:
        certs = getattr(config, "google_certs", "")
        adc = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS", "")
        if not certs and not adc:
            return None
        return cls([adc] if adc else [], certs,
                   ack_deadline=getattr(config, "pubsub_ack_deadline", DEFAULT_ACK_DEADLINE),
                   book_path=os.path.join(config.working_dir, ".pubsub-attempts.json"),
                   hostname=config.hostname)

    @staticmethod
    def is_topic(name: str) -> bool:
        """A Pub/Sub topic named in full: ``projects/<project>/topics/<topic>``."""
        parts = name.split("/")
        return len(parts) == 4 and parts[0] == "projects" and parts[2] == "topics"

    @classmethod
    def publisher(cls, options) -> PubSubQueue:
        adc = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS", "")
        if not (options.google_certs or adc):
            raise QueueError(f"topic {options.queue!r}: Pub/Sub needs --google-certs or "
                             "GOOGLE_APPLICATION_CREDENTIALS")
        return cls([adc] if adc else [], options.google_certs)

    @classmethod
    def client_queue(cls, options) -> dict:
        return {"pubsub": options.queue}

    # ------------------------------------------------------------------ projects
    def _sources(self) -> list[str]:
        sources = [f for f in self.files if f]
        if self.certs_dir:
            try:
                sources += [os.path.join(self.certs_dir, e)
                            for e in sorted(os.listdir(self.certs_dir))
                            if e.endswith(".json") and not e.startswith(".")]
            except OSError as exc:
                raise QueueError(f"--google-certs {self.certs_dir}: {exc}") from exc
        return sources

    def _make(self, source: str, signature: tuple) -> Project:
        from google.cloud import pubsub_v1

        name = project_of(source)
        credentials = None
        if not self.emulator and source not in self.files:
            from google.oauth2 import service_account
            try:
                credentials = service_account.Credentials.from_service_account_file(
                    source, scopes=["https://www.googleapis.com/auth/pubsub"])
            except (ValueError, OSError) as exc:
                raise QueueError(f"{source}: not a usable service-account file: {exc}") from exc
        return Project(name, source, pubsub_v1.SubscriberClient(credentials=credentials),
                       pubsub_v1.PublisherClient(credentials=credentials), signature)

    def _rescan(self) -> None:
        seen = set()
        for source in self._sources():
            try:
                st = os.stat(source)
            except OSError as exc:
                logger.warning("Pub/Sub credentials %s: %s", source, exc)
                continue
            signature = (st.st_mtime_ns, st.st_size)
            seen.add(source)
            current = self._projects.get(source)
            if current is not None and current.signature == signature:
                continue
            try:
                project = self._make(source, signature)
            except QueueError as exc:
                logger.warning("Pub/Sub project of %s not served: %s", source, exc)
                continue
            with self._lock:
                self._projects[source] = project
            logger.info("Pub/Sub project %s (%s) %s", project.name, source,
                        "reloaded" if current is not None else "added")
        for gone in [s for s in self._projects if s not in seen]:
            with self._lock:
                project = self._projects.pop(gone)
            logger.warning("Pub/Sub project %s removed (%s gone): taking no new work from its "
                           "subscriptions; running work finishes", project.name, gone)

    def _poll(self) -> None:
        if not self._rescanned():
            return
        names: dict[str, tuple[Project, Any]] = {}
        errors = []
        with self._lock:
            projects = list(self._projects.values())
        for project in projects:
            try:
                subs = {}
                for sub in project.subscriber.list_subscriptions(
                        request={"project": f"projects/{project.name}"}, timeout=RPC_TIMEOUT):
                    short = sub.name.rsplit("/", 1)[-1]
                    if not is_reserved(short):
                        subs[short] = sub
                project.subscriptions = subs
                project.error = ""
            except Exception as exc:  # noqa: BLE001 - gRPC errors of many kinds
                if project.error != repr(exc):
                    logger.warning("cannot list Pub/Sub subscriptions of %s: %r",
                                   project.name, exc)
                project.error = repr(exc)
                errors.append(f"{project.name}: {exc!r}")
            for short, sub in project.subscriptions.items():
                if short in names and names[short][0].name != project.name:
                    logger.warning("Pub/Sub subscription %s exists in projects %s and %s; "
                                   "serving the first", short, names[short][0].name,
                                   project.name)
                    continue
                names[short] = (project, sub)
        with self._lock:
            self._names = names
            self._error = "; ".join(errors) if errors and not names else ""
        self._stop_receivers_not_in(names)

    def _where(self, queue: str) -> tuple[Project, Any]:
        with self._lock:
            found = self._names.get(queue)
        if found is None:
            raise QueueError(f"Pub/Sub subscription {queue} is not served")
        return found

    # ------------------------------------------------------------------ taking
    def _receiver(self, queue: str, project: Project) -> Receiver:
        path = project.sub_path(queue)
        current = self._receivers.get(queue)
        if current is not None and current[1] == path and current[0].alive:
            return current[0]
        if current is not None:
            current[0].stop()
        subscriber, deadline, wait = project.subscriber, self.ack_deadline, self._pull_wait
        exceptions = _exceptions()

        def receive() -> list:
            try:
                answer = subscriber.pull(request={"subscription": path, "max_messages": 1},
                                         timeout=wait, retry=None)
            except exceptions.DeadlineExceeded:
                return []
            received = list(answer.received_messages)
            if received:  # hold it for our deadline at once, not the subscription's
                subscriber.modify_ack_deadline(request={
                    "subscription": path, "ack_ids": [m.ack_id for m in received],
                    "ack_deadline_seconds": deadline}, timeout=RPC_TIMEOUT)
            return received

        def release(message) -> None:
            subscriber.modify_ack_deadline(request={
                "subscription": path, "ack_ids": [message.ack_id], "ack_deadline_seconds": 0},
                timeout=RPC_TIMEOUT)

        receiver = Receiver(f"pubsub {project.name}/{queue}", receive, release,
                            idle_pause=0.2)
        self._receivers[queue] = (receiver, path)
        return receiver

    def take(self, queue: str) -> Delivery | None:
        """A message the subscription's receiving thread already pulled; never blocks."""
        self._check_open()
        project, sub = self._where(queue)
        received = self._receiver(queue, project).want()
        if received is None:
            return None
        message = received.message
        key = f"{project.name}/{queue}/{message.message_id}"
        entry = self.book.get(key)
        policy = getattr(sub, "dead_letter_policy", None)
        if policy is not None and getattr(policy, "dead_letter_topic", None) and \
                received.delivery_attempt:
            attempts = max(0, int(received.delivery_attempt) - 1 - int(entry.get("u", 0)))
        else:
            attempts = int(entry.get("a", 0))
        token = f"{project.name}.{next(self._seq)}"
        self._held[token] = _Held(queue, project, received.ack_id, message.message_id,
                                  bytes(message.data), dict(message.attributes), key)
        return Delivery(queue=queue, token=token, body=bytes(message.data), attempts=attempts)

    # ------------------------------------------------------------------ settling
    def _rpc(self, d: Delivery, what: str, fn, request: dict) -> Any:
        exceptions = _exceptions()
        try:
            return fn(request=request, timeout=RPC_TIMEOUT)
        except (exceptions.NotFound, exceptions.InvalidArgument) as exc:
            self._held.pop(d.token, None)
            raise DeliveryLost(f"could not {what} {d.token!r} of {d.queue}: {exc}") from exc
        except exceptions.GoogleAPIError as exc:
            raise QueueError(f"could not {what} {d.token!r} of {d.queue}: {exc!r}") from exc

    def _deadline(self, d: Delivery, held: _Held, seconds: int, what: str) -> None:
        self._rpc(d, what, held.project.subscriber.modify_ack_deadline,
                  {"subscription": held.project.sub_path(held.queue), "ack_ids": [held.ack_id],
                   "ack_deadline_seconds": seconds})

    def ack(self, d: Delivery) -> None:
        held = self._held_of(d)
        self._rpc(d, "ack", held.project.subscriber.acknowledge,
                  {"subscription": held.project.sub_path(held.queue), "ack_ids": [held.ack_id]})
        self._held.pop(d.token, None)
        self.book.drop(held.book_key)

    def requeue(self, d: Delivery, *, attempts: int) -> None:
        """Nack; the count is kept in the attempt book (uncounted put-backs too)."""
        if attempts < 0:
            raise QueueError(f"attempts must be >= 0, got {attempts}")
        held = self._held_of(d)
        entry = self.book.get(held.book_key)
        if attempts == d.attempts:
            self.book.set(held.book_key, a=attempts, u=int(entry.get("u", 0)) + 1)
        else:
            self.book.set(held.book_key, a=attempts, u=int(entry.get("u", 0)))
        self._deadline(d, held, 0, "nack")
        self._held.pop(d.token, None)

    def _dead_topic(self, held: _Held) -> str:
        exceptions = _exceptions()
        project = held.project
        with self._lock:
            sub = (self._names.get(held.queue) or (None, None))[1]
        policy = getattr(sub, "dead_letter_policy", None)
        if policy is not None and getattr(policy, "dead_letter_topic", None):
            return policy.dead_letter_topic
        name = held.queue + DEAD_SUFFIX
        topic = project.topic_path(name)
        try:
            project.publisher.create_topic(request={"name": topic}, timeout=RPC_TIMEOUT)
        except exceptions.AlreadyExists:
            pass
        except exceptions.GoogleAPIError as exc:
            raise QueueError(f"cannot create topic {name}: {exc!r}") from exc
        try:  # a topic keeps nothing without a subscription
            project.subscriber.create_subscription(
                request={"name": project.sub_path(name), "topic": topic}, timeout=RPC_TIMEOUT)
        except exceptions.AlreadyExists:
            pass
        except exceptions.GoogleAPIError as exc:
            raise QueueError(f"cannot create subscription {name}: {exc!r}") from exc
        return topic

    def dead_letter(self, d: Delivery, reason: str) -> None:
        held = self._held_of(d)
        topic = self._dead_topic(held)
        attributes = dict(held.attributes)
        attributes.update({"studioml-dead-reason": reason[:4000] or "-",
                           "studioml-dead-queue": d.queue,
                           "studioml-dead-host": self.hostname,
                           "studioml-dead-at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                             time.gmtime())})
        try:
            held.project.publisher.publish(topic, held.data, **attributes).result(RPC_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - publish futures raise many kinds
            raise QueueError(f"cannot publish the dead letter to {topic}: {exc!r}") from exc
        self.ack(d)
        logger.warning("dead-lettered a message of %s to %s: %s", d.queue, topic, reason)

    def keep_alive(self, d: Delivery) -> None:
        """Extend the ack deadline by ``--pubsub-ack-deadline`` again."""
        held = self._held_of(d)
        self._deadline(d, held, self.ack_deadline, "extend the ack deadline of")

    def queue_deleted(self, d: Delivery) -> bool:
        """True when ``GetSubscription`` says the subscription is gone (and its project is
        still served)."""
        held = self._held.get(d.token)
        if held is None:
            return False
        with self._lock:
            if held.project.source not in self._projects:
                return False
        exceptions = _exceptions()
        try:
            held.project.subscriber.get_subscription(
                request={"subscription": held.project.sub_path(d.queue)}, timeout=RPC_TIMEOUT)
            return False
        except exceptions.NotFound:
            return True
        except exceptions.GoogleAPIError:
            return False

    def depth(self, queue: str) -> int:
        """-1: Pub/Sub tells backlog sizes only through Cloud Monitoring."""
        return -1

    def peek(self, queue: str, limit: int) -> list[bytes]:
        return []

    # ------------------------------------------------------------------ publishing
    def publish(self, queue: str, body: bytes, *, attempts: int = 0) -> str:
        """Publish to topic ``queue`` (``projects/P/topics/T`` or a topic of the first
        project); the topic must exist.  ``attempts`` cannot travel (see the module doc)."""
        self._check_open()
        if queue.startswith("projects/"):
            topic = queue
            with self._lock:
                projects = list(self._projects.values())
            project = next((p for p in projects if topic.startswith(f"projects/{p.name}/")),
                           projects[0] if projects else None)
        else:
            with self._lock:
                projects = [self._projects[k] for k in sorted(self._projects)]
            project = projects[0] if projects else None
            topic = project.topic_path(queue) if project else ""
        if project is None:
            raise QueueError("no Google project configured")
        try:
            return project.publisher.publish(topic, bytes(body)).result(RPC_TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            raise QueueError(f"cannot publish to {topic}: {exc!r}") from exc
