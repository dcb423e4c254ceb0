"""AWS SQS queues (``sqs_…``) with boto3.  ``docs/sqs-pubsub.md`` explains the choices.

* **Accounts**: with ``--sqs-certs DIR``, one sub-directory per AWS account holding an AWS
  shared-credentials file (``aws_access_key_id``…) and a config file with ``region=`` —
  the shape of a mounted Kubernetes secret.  The directory is rescanned with every
  discovery pass: a new sub-directory starts serving its queues, a removed one stops
  taking new work from them (held deliveries keep their client and are settled as usual),
  a changed one gets a new client.  Without ``--sqs-certs``: boto3's default credential
  chain and ``--aws-region``.  ``--sqs-endpoint`` points every client elsewhere (private
  clouds, ``moto_server`` in the tests).
* **Discovery** (``ListQueues``) and queue depths run on a small background thread; the
  fetcher reads their latest answer without waiting.
* **Taking**: one :class:`~runner.queues.receiver.Receiver` thread per served queue
  long-polls (``WaitTimeSeconds``) for one message only while the fetcher has a free slot
  and hands it over on the next ``take``; a message received when nobody wants it any
  more is made visible again at once.
* **Holding**: the message's visibility (``--sqs-visibility``) is extended by
  :meth:`SQSQueue.keep_alive` every third of it, up to SQS's 12-hour cap counted from the
  receive; at the cap the delivery is reported lost (the message becomes visible again
  and the fetcher's redelivery rules apply).
* **Settling**: ack = ``DeleteMessage``; requeue untouched = visibility 0; requeue with a
  new attempt count = send a copy carrying the ``studioml-attempts`` message attribute,
  then delete; dead letter = send a copy (reason in attributes) to the queue's redrive
  target when it has a redrive policy, else to ``<queue>_dead`` (created when missing),
  then delete.
* **Attempts** come from the ``studioml-attempts`` attribute, not ``ApproximateReceiveCount``,
  which also counts put-backs for resources, crashes and shutdowns (SPEC section 7 says
  those are not attempts); the receive count is logged beside it.
"""
from __future__ import annotations

import configparser
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import DeliveryLost, QueueError
from .base import Delivery, Queue, is_reserved
from .receiver import BackgroundDiscovery, Receiver

logger = logging.getLogger(__name__)

ATTEMPTS_ATTR = "studioml-attempts"
DEAD_REASON_ATTR = "studioml-dead-reason"
DEAD_QUEUE_ATTR = "studioml-dead-queue"
DEAD_HOST_ATTR = "studioml-dead-host"
DEAD_AT_ATTR = "studioml-dead-at"
DEAD_SUFFIX = "_dead"
MAX_ATTRIBUTES = 10
VISIBILITY_CAP = 12 * 3600.0
"""SQS's limit on a message's visibility, counted from the receive that returned it."""
CAP_MARGIN = 60.0
DEFAULT_VISIBILITY = 300.0
LONG_POLL = 20
DISCOVER_EVERY = 2.0
DEPTH_INTEREST = 30.0


def _base_name(queue: str) -> str:
    return queue[:-5] if queue.endswith(".fifo") else queue


def dead_name(queue: str) -> str:
    """``<queue>_dead`` (``<stem>_dead.fifo`` for a FIFO queue)."""
    if queue.endswith(".fifo"):
        return _base_name(queue) + DEAD_SUFFIX + ".fifo"
    return queue + DEAD_SUFFIX


def reserved(queue: str) -> bool:
    return is_reserved(_base_name(queue))


def _read_ini(path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        parser.read_string(text)
    except configparser.MissingSectionHeaderError:
        parser.read_string("[default]\n" + text)
    return parser


def _section(parser: configparser.ConfigParser, key: str) -> dict | None:
    """The first of ``default``, ``profile default`` or any section holding ``key``."""
    names = ["default", "profile default"] + parser.sections()
    for name in names:
        if parser.has_section(name) and parser.has_option(name, key):
            return dict(parser.items(name))
    return None


def read_account_dir(path: str) -> dict:
    """Credentials and region of one ``--sqs-certs`` sub-directory.

    Every regular file is read as an INI file (a bare ``region=`` line is accepted); the
    one holding ``aws_access_key_id`` gives the credentials, the one holding ``region``
    the region.  Raises :class:`QueueError` naming what is missing.
    """
    creds = region = None
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if entry.startswith(".") or not os.path.isfile(full):
            continue
        try:
            parser = _read_ini(full)
        except (OSError, configparser.Error, UnicodeDecodeError):
            continue
        creds = creds or _section(parser, "aws_access_key_id")
        found = _section(parser, "region")
        region = region or (found or {}).get("region")
    if not creds or not creds.get("aws_secret_access_key"):
        raise QueueError(f"{path}: no credentials file with aws_access_key_id and "
                         "aws_secret_access_key")
    if not region:
        raise QueueError(f"{path}: no config file with region=")
    return {"aws_access_key_id": creds["aws_access_key_id"],
            "aws_secret_access_key": creds["aws_secret_access_key"],
            "aws_session_token": creds.get("aws_session_token") or None,
            "region": region.strip()}


def _signature(path: str) -> tuple:
    items = []
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        try:
            st = os.stat(full)
        except OSError:
            continue
        items.append((entry, st.st_mtime_ns, st.st_size))
    return tuple(items)


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Code", ""))


_NO_QUEUE = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist",
             "NonExistentQueue")
_LOST = ("ReceiptHandleIsInvalid", "InvalidParameterValue", "MessageNotInflight",
         "AWS.SimpleQueueService.MessageNotInflight")


@dataclass
class Account:
    """One AWS account (one ``--sqs-certs`` sub-directory, or the default chain)."""

    name: str
    region: str
    client: Any
    signature: tuple = ()
    queues: dict[str, str] = field(default_factory=dict)  # name -> URL
    error: str = ""


@dataclass
class _Held:
    queue: str
    account: Account
    url: str
    receipt: str
    message: dict
    received_at: float  # monotonic
    warned_cap: bool = False


def _client(region: str, endpoint: str, creds: dict | None, long_poll: int) -> Any:
    import boto3
    import botocore.config

    session = boto3.session.Session(
        aws_access_key_id=(creds or {}).get("aws_access_key_id"),
        aws_secret_access_key=(creds or {}).get("aws_secret_access_key"),
        aws_session_token=(creds or {}).get("aws_session_token"),
        region_name=region or None)
    config = botocore.config.Config(connect_timeout=5, read_timeout=long_poll + 10,
                                    retries={"max_attempts": 3, "mode": "standard"},
                                    max_pool_connections=64)
    try:
        return session.client("sqs", endpoint_url=endpoint or None, config=config)
    except Exception as exc:  # noqa: BLE001 - botocore's NoRegionError and friends
        raise QueueError(f"cannot make an SQS client: {exc}") from exc


class SQSQueue(BackgroundDiscovery, Queue):
    """``sqs_…`` queues of one or more AWS accounts."""

    discovery_name = "SQS"
    lost_hint = "taken before a restart, or its visibility ran out; SQS shows it again"

    kind: ClassVar[str] = "sqs"

    def __init__(self, certs_dir: str = "", *, region: str = "", endpoint: str = "",
                 visibility: float = DEFAULT_VISIBILITY, hostname: str = "",
                 long_poll: int = LONG_POLL, discover_every: float = DISCOVER_EVERY) -> None:
        if not 1 <= visibility <= VISIBILITY_CAP:
            raise QueueError(f"SQS visibility must be 1s..12h, got {visibility}s")
        self.certs_dir = certs_dir
        self.region = region
        self.endpoint = endpoint
        self.visibility = float(visibility)
        self.keep_alive_every = max(1.0, self.visibility / 3.0)
        self.hostname = hostname or socket.gethostname()
        self.long_poll = int(long_poll)
        self._start_background(discover_every)
        self._accounts: dict[str, Account] = {}
        self._names: dict[str, tuple[Account, str]] = {}  # served name -> (account, URL)
        self._depths: dict[str, int] = {}
        self._depth_wanted: dict[str, float] = {}
        self._listed = False
        self._held: dict[str, _Held] = {}
        if not certs_dir:
            self._accounts["default"] = Account("default", region,
                                                _client(region, endpoint, None, self.long_poll))

    @classmethod
    def from_config(cls, config: Any) -> SQSQueue | None:
        certs = getattr(config, "sqs_certs", "")
        region = getattr(config, "aws_region", "")
        endpoint = getattr(config, "sqs_endpoint", "")
        if not (certs or region or endpoint):
            return None
        return cls(certs, region=region, endpoint=endpoint,
                   visibility=getattr(config, "sqs_visibility", DEFAULT_VISIBILITY),
                   hostname=config.hostname)

    @classmethod
    def publisher(cls, options) -> SQSQueue:
        if not (options.sqs_certs or options.aws_region or options.sqs_endpoint):
            raise QueueError(f"queue {options.queue!r}: sqs_* queues need --sqs-certs, "
                             "--aws-region or --sqs-endpoint")
        return cls(options.sqs_certs, region=options.aws_region, endpoint=options.sqs_endpoint)

    @classmethod
    def client_queue(cls, options) -> dict:
        return {"sqs": {"region": options.aws_region, "endpoint": options.sqs_endpoint}}

    # ------------------------------------------------------------------ accounts
    def _rescan(self) -> None:
        """Add, replace or drop accounts after the ``--sqs-certs`` directory."""
        if not self.certs_dir:
            return
        try:
            entries = sorted(e for e in os.listdir(self.certs_dir)
                             if not e.startswith(".")
                             and os.path.isdir(os.path.join(self.certs_dir, e)))
        except OSError as exc:
            raise QueueError(f"--sqs-certs {self.certs_dir}: {exc}") from exc
        seen = set()
        for entry in entries:
            path = os.path.join(self.certs_dir, entry)
            try:
                signature = _signature(path)
            except OSError:
                continue
            seen.add(entry)
            current = self._accounts.get(entry)
            if current is not None and current.signature == signature:
                continue
            try:
                creds = read_account_dir(path)
                client = _client(creds["region"], self.endpoint, creds, self.long_poll)
            except (QueueError, OSError) as exc:
                if current is None or current.error != str(exc):
                    logger.warning("SQS account %s not served: %s", entry, exc)
                if current is not None:
                    current.error = str(exc)
                continue
            account = Account(entry, creds["region"], client, signature)
            with self._lock:
                self._accounts[entry] = account
            logger.info("SQS account %s (%s) %s", entry, creds["region"],
                        "reloaded" if current is not None else "added")
        for gone in [name for name in self._accounts if name not in seen]:
            with self._lock:
                self._accounts.pop(gone, None)
            logger.warning("SQS account %s removed from %s: taking no new work from its "
                           "queues; running work finishes", gone, self.certs_dir)

    def _list(self, account: Account) -> dict[str, str]:
        queues: dict[str, str] = {}
        kwargs: dict = {"MaxResults": 1000}
        while True:
            answer = account.client.list_queues(**kwargs)
            for url in answer.get("QueueUrls", []) or []:
                name = url.rstrip("/").rsplit("/", 1)[-1]
                if not reserved(name):
                    queues[name] = url
            token = answer.get("NextToken")
            if not token:
                return queues
            kwargs["NextToken"] = token

    def _poll(self) -> None:
        """One discovery pass: rescan accounts, list their queues, refresh wanted depths."""
        if not self._rescanned():
            return
        names: dict[str, tuple[Account, str]] = {}
        errors = []
        with self._lock:
            accounts = list(self._accounts.values())
        for account in accounts:
            try:
                account.queues = self._list(account)
                account.error = ""
            except Exception as exc:  # noqa: BLE001 - botocore raises many kinds
                if account.error != repr(exc):
                    logger.warning("cannot list SQS queues of account %s: %r", account.name, exc)
                account.error = repr(exc)
                errors.append(f"{account.name}: {exc!r}")
            for name, url in account.queues.items():
                if name in names and names[name][1] != url:
                    logger.warning("SQS queue %s exists in accounts %s and %s; serving the "
                                   "first", name, names[name][0].name, account.name)
                    continue
                names[name] = (account, url)
        now = time.monotonic()
        depths = {}
        for name, wanted in list(self._depth_wanted.items()):
            if now - wanted > DEPTH_INTEREST or name not in names:
                continue
            account, url = names[name]
            try:
                attrs = account.client.get_queue_attributes(
                    QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
                depths[name] = int(attrs.get("ApproximateNumberOfMessages", 0))
            except Exception:  # noqa: BLE001 - shown as unknown
                depths[name] = -1
        with self._lock:
            self._names = names
            self._depths.update(depths)
            self._listed = True
            self._error = "; ".join(errors) if errors and not names and accounts else ""
        self._stop_receivers_not_in(names)

    def accounts(self) -> list[str]:
        with self._lock:
            return sorted(self._accounts)

    def _where(self, queue: str) -> tuple[Account, str]:
        with self._lock:
            found = self._names.get(queue)
        if found is None:
            raise QueueError(f"SQS queue {queue} is not served (no account lists it)")
        return found

    # ------------------------------------------------------------------ taking
    def _receiver(self, queue: str, account: Account, url: str) -> Receiver:
        current = self._receivers.get(queue)
        if current is not None and current[1] == url and current[0].alive:
            return current[0]
        if current is not None:
            current[0].stop()
        client = account.client

        def receive() -> list:
            answer = client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=self.long_poll,
                VisibilityTimeout=int(self.visibility), AttributeNames=["All"],
                MessageAttributeNames=["All"])
            now = time.monotonic()
            return [(m, now) for m in answer.get("Messages", []) or []]

        def release(item) -> None:
            client.change_message_visibility(QueueUrl=url, ReceiptHandle=item[0]["ReceiptHandle"],
                                             VisibilityTimeout=0)

        receiver = Receiver(f"sqs {account.name}/{queue}", receive, release)
        self._receivers[queue] = (receiver, url)
        return receiver

    def take(self, queue: str) -> Delivery | None:
        """A message the queue's receiving thread already has; never blocks."""
        self._check_open()
        account, url = self._where(queue)
        item = self._receiver(queue, account, url).want()
        if item is None:
            return None
        message, received_at = item
        token = f"{account.name}.{next(self._seq)}"
        self._held[token] = _Held(queue, account, url, message["ReceiptHandle"], message,
                                  received_at)
        attempts = attempts_of(message)
        logger.debug("took %s from %s (receive count %s, attempts %d)",
                     message.get("MessageId"), queue,
                     (message.get("Attributes") or {}).get("ApproximateReceiveCount"), attempts)
        return Delivery(queue=queue, token=token, body=message["Body"].encode("utf-8"),
                        attempts=attempts)

    # ------------------------------------------------------------------ settling
    def _client_of(self, held: _Held) -> Any:
        with self._lock:
            current = self._accounts.get(held.account.name)
        return (current or held.account).client

    def _call(self, d: Delivery, held: _Held, what: str, fn, **kwargs) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:  # noqa: BLE001 - botocore ClientError and transport errors
            code = _error_code(exc)
            if code in _LOST or code in _NO_QUEUE:
                self._held.pop(d.token, None)
                raise DeliveryLost(f"could not {what} {d.token!r} of {d.queue}: {code}: "
                                   f"{exc}") from exc
            raise QueueError(f"could not {what} {d.token!r} of {d.queue}: {exc!r}") from exc

    def ack(self, d: Delivery) -> None:
        held = self._held_of(d)
        self._call(d, held, "delete", self._client_of(held).delete_message,
                   QueueUrl=held.url, ReceiptHandle=held.receipt)
        self._held.pop(d.token, None)

    def requeue(self, d: Delivery, *, attempts: int) -> None:
        """Same count: visibility 0 (keeps the message); new count: send a copy, delete."""
        if attempts < 0:
            raise QueueError(f"attempts must be >= 0, got {attempts}")
        held = self._held_of(d)
        client = self._client_of(held)
        if attempts == d.attempts:
            self._call(d, held, "put back", client.change_message_visibility,
                       QueueUrl=held.url, ReceiptHandle=held.receipt, VisibilityTimeout=0)
            self._held.pop(d.token, None)
            return
        attributes = dict(held.message.get("MessageAttributes") or {})
        attributes[ATTEMPTS_ATTR] = {"DataType": "Number", "StringValue": str(attempts)}
        try:
            self._send_copy(client, held.url, held, attributes)
        except QueueError as exc:
            try:
                self._call(d, held, "put back", client.change_message_visibility,
                           QueueUrl=held.url, ReceiptHandle=held.receipt, VisibilityTimeout=0)
                self._held.pop(d.token, None)
            except QueueError:
                pass
            raise QueueError(f"could not send {d.queue} a copy with {ATTEMPTS_ATTR}="
                             f"{attempts}; put back with its old count: {exc}") from exc
        self._call(d, held, "delete the requeued", client.delete_message,
                   QueueUrl=held.url, ReceiptHandle=held.receipt)
        self._held.pop(d.token, None)

    def _send_copy(self, client: Any, url: str, held: _Held, attributes: dict) -> str:
        kwargs: dict = {"QueueUrl": url, "MessageBody": held.message["Body"]}
        ours = {k: v for k, v in attributes.items() if k.startswith("studioml-")}
        others = [(k, v) for k, v in attributes.items() if not k.startswith("studioml-")]
        kwargs["MessageAttributes"] = dict(others[:max(0, MAX_ATTRIBUTES - len(ours))], **ours)
        if url.endswith(".fifo"):
            group = (held.message.get("Attributes") or {}).get("MessageGroupId") or "studioml"
            kwargs["MessageGroupId"] = group
            kwargs["MessageDeduplicationId"] = uuid.uuid4().hex
        try:
            return client.send_message(**kwargs)["MessageId"]
        except Exception as exc:  # noqa: BLE001
            raise QueueError(f"SendMessage to {url} failed: {exc!r}") from exc

    def _dead_url(self, client: Any, held: _Held) -> str:
        """The redrive policy's target, else ``<queue>_dead`` (created when missing)."""
        try:
            attrs = client.get_queue_attributes(QueueUrl=held.url,
                                                AttributeNames=["RedrivePolicy"])
            policy = (attrs.get("Attributes") or {}).get("RedrivePolicy")
            if policy:
                arn = json.loads(policy)["deadLetterTargetArn"]
                parts = arn.split(":")
                return client.get_queue_url(QueueName=parts[5],
                                            QueueOwnerAWSAccountId=parts[4])["QueueUrl"]
        except Exception as exc:  # noqa: BLE001 - fall back to <queue>_dead
            logger.warning("cannot use the redrive policy of %s (%r); dead-lettering to %s",
                           held.queue, exc, dead_name(held.queue))
        name = dead_name(held.queue)
        try:
            return client.get_queue_url(QueueName=name)["QueueUrl"]
        except Exception as exc:  # noqa: BLE001
            if _error_code(exc) not in _NO_QUEUE:
                raise QueueError(f"cannot find {name}: {exc!r}") from exc
        attributes = {"FifoQueue": "true"} if name.endswith(".fifo") else {}
        try:
            return client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        except Exception as exc:  # noqa: BLE001
            raise QueueError(f"cannot create {name}: {exc!r}") from exc

    def dead_letter(self, d: Delivery, reason: str) -> None:
        held = self._held_of(d)
        client = self._client_of(held)
        url = self._dead_url(client, held)
        attributes = dict(held.message.get("MessageAttributes") or {})
        text = lambda v: {"DataType": "String", "StringValue": v}  # noqa: E731
        attributes.update({
            DEAD_REASON_ATTR: text(reason[:4000] or "-"), DEAD_QUEUE_ATTR: text(d.queue),
            DEAD_HOST_ATTR: text(self.hostname),
            DEAD_AT_ATTR: text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))})
        self._send_copy(client, url, held, attributes)
        self._call(d, held, "delete the dead-lettered", client.delete_message,
                   QueueUrl=held.url, ReceiptHandle=held.receipt)
        self._held.pop(d.token, None)
        logger.warning("dead-lettered a message of %s to %s: %s", d.queue,
                       url.rsplit("/", 1)[-1], reason)

    def keep_alive(self, d: Delivery) -> None:
        """Extend the visibility by ``--sqs-visibility``, within the 12-hour cap."""
        held = self._held_of(d)
        left = VISIBILITY_CAP - CAP_MARGIN - (time.monotonic() - held.received_at)
        if left <= 1:
            self._held.pop(d.token, None)
            raise DeliveryLost(f"SQS delivery {d.token!r} of {d.queue} reached the 12-hour "
                               "visibility cap: the message becomes visible again (see "
                               "docs/sqs-pubsub.md)")
        timeout = int(min(self.visibility, left))
        if timeout < self.visibility and not held.warned_cap:
            held.warned_cap = True
            logger.warning("SQS delivery %s of %s nears the 12-hour visibility cap: visible "
                           "again in %ds", d.token, d.queue, timeout)
        self._call(d, held, "extend the visibility of",
                   self._client_of(held).change_message_visibility,
                   QueueUrl=held.url, ReceiptHandle=held.receipt, VisibilityTimeout=timeout)

    def queue_deleted(self, d: Delivery) -> bool:
        """True when ``GetQueueUrl`` says the queue is gone (and its account is still served;
        a removed account is no user's abort)."""
        held = self._held.get(d.token)
        if held is None:
            return False
        with self._lock:
            if held.account.name not in self._accounts:
                return False
        try:
            self._client_of(held).get_queue_url(QueueName=d.queue)
            return False
        except Exception as exc:  # noqa: BLE001
            return _error_code(exc) in _NO_QUEUE

    def depth(self, queue: str) -> int:
        """``ApproximateNumberOfMessages`` by the discovery thread's latest answer."""
        self._check_open()
        self._depth_wanted[queue] = time.monotonic()
        with self._lock:
            return self._depths.get(queue, 0)

    def peek(self, queue: str, limit: int) -> list[bytes]:
        """Always ``[]``: SQS cannot show a message without receiving it."""
        return []

    # ------------------------------------------------------------------ publishing
    def publish(self, queue: str, body: bytes, *, attempts: int = 0) -> str:
        """SendMessage to ``queue`` (created in the first account when no account has it)."""
        self._check_open()
        if attempts < 0:
            raise QueueError(f"attempts must be >= 0, got {attempts}")
        with self._lock:
            found = self._names.get(queue)
            accounts = [self._accounts[k] for k in sorted(self._accounts)]
        if found is None:
            if not accounts:
                self._rescan()
                accounts = [self._accounts[k] for k in sorted(self._accounts)]
            if not accounts:
                raise QueueError("no SQS account configured")
            account = accounts[0]
            try:
                url = account.client.get_queue_url(QueueName=queue)["QueueUrl"]
            except Exception as exc:  # noqa: BLE001
                if _error_code(exc) not in _NO_QUEUE:
                    raise QueueError(f"SQS {queue}: {exc!r}") from exc
                attributes = {"FifoQueue": "true"} if queue.endswith(".fifo") else {}
                url = account.client.create_queue(QueueName=queue,
                                                  Attributes=attributes)["QueueUrl"]
        else:
            account, url = found
        kwargs: dict = {"QueueUrl": url, "MessageBody": bytes(body).decode("utf-8")}
        if attempts:
            kwargs["MessageAttributes"] = {ATTEMPTS_ATTR: {"DataType": "Number",
                                                           "StringValue": str(attempts)}}
        if url.endswith(".fifo"):
            kwargs["MessageGroupId"] = "studioml"
            kwargs["MessageDeduplicationId"] = uuid.uuid4().hex
        try:
            return account.client.send_message(**kwargs)["MessageId"]
        except Exception as exc:  # noqa: BLE001
            raise QueueError(f"SendMessage to {queue} failed: {exc!r}") from exc


def attempts_of(message: dict) -> int:
    """The ``studioml-attempts`` attribute of a received message (0 when absent/garbled)."""
    value = ((message.get("MessageAttributes") or {}).get(ATTEMPTS_ATTR) or {}).get("StringValue")
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0
