"""The RabbitMQ back end (runner.queues.rabbitmq) against a real broker.

Queue names are unique per test (``rmq_<hex>_…``) so that these tests share the broker on
127.0.0.1:5672 with anyone else; the connection-loss test runs its own private node.
"""
from __future__ import annotations

import select
import time

import pytest

from runner import config as config_module
from runner.errors import DeliveryLost, QueueError
from runner.queues import QUEUE_KINDS, build_backends, matches
from runner.queues.rabbitmq import (ATTEMPTS_HEADER, DEAD_REASON_HEADER, RabbitMQQueue,
                                    attempts_of, default_mgt_url)

from .rabbitmq_support import PrivateBroker, pika, unique
from .support import take_soon

pytestmark = pytest.mark.integration


@pytest.fixture()
def stem(broker):
    stem = unique()
    yield stem
    with broker.connection() as conn:
        ch = conn.channel()
        for name in [q["name"] for q in broker.api("queues/%2F?columns=name") or []
                     if q["name"].startswith(stem)]:
            ch.queue_delete(name)


@pytest.fixture()
def backend(broker):
    queue = RabbitMQQueue(broker.url, broker.mgt_url, discover_every=0.2)
    yield queue
    queue.close()


# -- pure helpers -------------------------------------------------------------------------

def test_default_management_url_is_amqp_port_plus_10000_over_http():
    assert default_mgt_url("amqp://u:p@rabbit.example:5672/%2F") == "http://rabbit.example:15672"
    assert default_mgt_url("amqp://u:p@h:5999/v") == "http://h:15999"
    assert default_mgt_url("amqp://h") == "http://h:15672"
    assert default_mgt_url("amqps://h") == "http://h:15671"


def test_attempt_count_header_is_read_defensively():
    props = pika.BasicProperties
    assert attempts_of(props()) == 0
    assert attempts_of(props(headers={ATTEMPTS_HEADER: 2})) == 2
    assert attempts_of(props(headers={ATTEMPTS_HEADER: b"3"})) == 3
    assert attempts_of(props(headers={ATTEMPTS_HEADER: "junk"})) == 0
    assert attempts_of(props(headers={ATTEMPTS_HEADER: -4})) == 0


def test_amqp_options_expand_variables_and_are_validated_together():
    cfg = config_module.from_values(
        {"amqp_url": "amqp://runner:${RMQ_PASSWORD}@rabbit:5672/%2F"}, {"RMQ_PASSWORD": "s3cr3t"})
    assert cfg.amqp_url == "amqp://runner:s3cr3t@rabbit:5672/%2F" and cfg.amqp_mgt_url == ""
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.from_values({"amqp_url": "amqp://runner:${NOPE}@rabbit/%2F",
                                   "amqp_mgt_url": "ftp://x"}, {})
    problems = caught.value.problems
    assert any("${NOPE} not set" in p for p in problems)
    assert any("--amqp-mgt-url" in p for p in problems)
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.from_values({}, {"AMQP_URL": "http://u:hidden@h/"})
    assert "hidden" not in str(caught.value) and "AMQP_URL" in str(caught.value)


def test_back_ends_come_from_the_registry_and_rmq_only_when_configured(tmp_path):
    assert QUEUE_KINDS["rmq"] is RabbitMQQueue
    cfg = config_module.from_values({"queue_root": str(tmp_path / "q")}, {})
    backends = build_backends(cfg.with_instance("t-1"))
    try:
        assert set(backends) == {"local"}
    finally:
        for b in backends.values():
            b.close()
    cfg = config_module.from_values({"queue_root": str(tmp_path / "q"),
                                     "amqp_url": "amqp://guest:guest@127.0.0.1:1/%2F"}, {})
    backends = build_backends(cfg.with_instance("t-2"))
    try:
        assert set(backends) == {"local", "rmq"}  # built without connecting
        backends["rmq"].service()  # the broker is unreachable: no exception, a retry later
        assert backends["rmq"].take("rmq_x") is None
    finally:
        for b in backends.values():
            b.close()


# -- against the broker ----------------------------------------------------------------

def test_discovery_lists_queues_bound_to_studioml_topic_and_follows_changes(broker, backend,
                                                                            stem):
    for name in ("a", "skip_b", "c_response"):
        broker.declare(stem + name)
    with broker.connection() as conn:
        conn.channel().queue_declare(stem + "unbound")
    names = [n for n in backend.discover() if n.startswith(stem)]
    assert names == [stem + "a", stem + "skip_b"]
    served = [n for n in names if matches(n, f"^{stem}", "skip")]
    assert served == [stem + "a"]

    broker.declare(stem + "late")
    deadline = time.monotonic() + 10
    while stem + "late" not in backend.discover() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stem + "late" in backend.discover(), "a new queue is picked up while running"
    broker.delete(stem + "a")
    deadline = time.monotonic() + 10
    while stem + "a" in backend.discover() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stem + "a" not in backend.discover(), "a deleted queue is dropped"


def test_publish_follows_the_studioml_client_conventions(broker, backend, stem):
    queue = stem + "pub"
    backend.publish(queue, b'{"experiment": {}}')
    with broker.connection() as conn:
        ch = conn.channel()
        method, props, body = ch.basic_get(queue, auto_ack=True)
    assert body == b'{"experiment": {}}'
    assert method.exchange == "StudioML.topic" and method.routing_key == f"StudioML.{queue}"
    assert props.app_id == "studioml" and props.content_type == "application/json"
    bindings = broker.api("exchanges/%2F/StudioML.topic/bindings/source")
    assert {"destination": queue, "routing_key": f"StudioML.{queue}"} in [
        {"destination": b["destination"], "routing_key": b["routing_key"]} for b in bindings]
    exchange = broker.api("exchanges/%2F/StudioML.topic")
    assert exchange["type"] == "topic" and exchange["durable"] and exchange["auto_delete"]
    assert broker.api(f"queues/%2F/{queue}")["durable"] is False  # as the client declares it


def test_taken_message_is_held_and_attempts_survive_requeue_on_another_runner(broker, backend,
                                                                            stem):
    queue = stem + "held"
    broker.publish(queue, b"request-1")
    delivery = backend.take(queue)
    assert delivery.body == b"request-1" and delivery.attempts == 0
    assert backend.take(queue) is None, "held, not handed out twice"
    assert broker.ready(queue) == 0

    backend.requeue(delivery, attempts=2)          # counted failure: republished with header
    other = RabbitMQQueue(broker.url, broker.mgt_url)  # another runner
    try:
        again = other.take(queue)
        assert again.body == b"request-1" and again.attempts == 2
        other.requeue(again, attempts=2)           # uncounted: put back untouched
        with pytest.raises(DeliveryLost):
            other.ack(again)                       # settled once only
    finally:
        other.close()
    third = backend.take(queue)
    assert third.attempts == 2
    backend.ack(third)
    assert backend.take(queue) is None and broker.ready(queue) == 0


def test_dead_letter_goes_to_queue_dead_with_the_reason_in_headers(broker, backend, stem):
    queue = stem + "bad"
    broker.publish(queue, b"not json")
    delivery = backend.take(queue)
    backend.dead_letter(delivery, "bad request: not JSON")
    assert broker.ready(queue) == 0
    props, body = broker.get(queue + "_dead")
    assert body == b"not json"
    assert props.headers[DEAD_REASON_HEADER] == "bad request: not JSON"
    assert props.headers["x-studioml-dead-queue"] == queue
    assert queue + "_dead" not in backend.discover(), "dead-letter queues are never served"


def test_deleted_queue_is_reported_for_a_held_delivery(broker, backend, stem):
    queue = stem + "gone"
    broker.publish(queue, b"x")
    delivery = backend.take(queue)
    assert backend.queue_deleted(delivery) is False
    broker.delete(queue)
    assert backend.queue_deleted(delivery) is True
    backend.ack(delivery)  # acking a delivery of a deleted queue is harmless


@pytest.mark.slow
@pytest.mark.parametrize("consumed", [False, True], ids=["basic_get", "consumed"])
def test_connection_loss_loses_held_deliveries_then_reconnects_and_gets_them_back(consumed):
    node = PrivateBroker().start()
    try:
        queue = "rmq_fault_q"
        node.publish(queue, b"durable request", durable=True)
        backend = RabbitMQQueue(node.url, node.mgt_url)
        if consumed:
            backend.wait_fd()
            backend.offer([queue], 1)
            delivery = take_pushed(backend, queue)
            backend.offer([queue], 1)  # a second slot channel waits (an empty queue)
        else:
            delivery = backend.take(queue)
        assert delivery is not None and backend.connected
        node.restart()
        backend.service()
        with pytest.raises(DeliveryLost):
            backend.keep_alive(delivery)
        deadline = time.monotonic() + 30
        again = None
        while again is None and time.monotonic() < deadline:
            backend.service()
            if consumed:
                backend.offer([queue], 1)
                backend.changes()
            try:
                again = backend.take(queue)
            except QueueError:
                pass
            time.sleep(0.05)
        assert again is not None and again.body == b"durable request", "redelivered"
        backend.ack(again)
        assert node.ready(queue) == 0
        backend.close()
    finally:
        node.stop()


# -- consumed dispatch (offer): prefetch = free slots ---------------------------------------

def consumers(broker, queue: str) -> int:
    """Consumers on ``queue`` right now (a passive declare, no statistics lag)."""
    with broker.connection() as conn:
        return conn.channel().queue_declare(queue, passive=True).method.consumer_count


def take_pushed(backend, queue: str, timeout: float = 10.0):
    """Take ``queue``'s pushed message, reading the connection until one came."""
    delivery = take_soon(backend, queue, timeout, read_pushes=True)
    if delivery is None:
        raise AssertionError(f"nothing pushed from {queue} within {timeout}s")
    return delivery


def test_prefetch_never_exceeds_the_free_slots_and_stops_when_full(broker, backend, stem):
    queue = stem + "prefetch"
    for n in range(5):
        broker.publish(queue, f"request-{n}".encode())
    backend.offer([queue], 1)
    broker.wait_counts(queue, ready=4, unacked=1)  # management API: one pushed, four wait
    first = take_pushed(backend, queue)
    assert first.body == b"request-0"
    backend.offer([queue], 0)  # the slot is used: no consumer is left
    assert consumers(broker, queue) == 0
    backend.ack(first)         # and acking pushes nothing more
    broker.wait_counts(queue, ready=4, unacked=0)
    assert backend.take(queue) is None

    backend.offer([queue], 2)
    broker.wait_counts(queue, ready=2, unacked=2)
    assert consumers(broker, queue) == 2  # one slot channel per free slot
    backend.offer([queue], 1)  # a slot went elsewhere: the extra push goes back
    broker.wait_counts(queue, ready=3, unacked=1)
    held = take_pushed(backend, queue)
    backend.requeue(held, attempts=held.attempts)
    backend.offer([queue], 0)
    broker.wait_counts(queue, ready=4, unacked=0)
    assert consumers(broker, queue) == 0


def test_prefetch_is_shared_by_all_queues_and_queues_take_turns(broker, backend, stem):
    queues = [stem + name for name in ("a", "b", "c")]
    for queue in queues:
        for n in range(2):
            broker.publish(queue, f"{queue}-{n}".encode())
    seen = []
    for _ in range(3):
        backend.offer(queues, 1)
        deadline = time.monotonic() + 10
        delivery = None
        while delivery is None and time.monotonic() < deadline:
            backend.changes()
            delivery = next(filter(None, (backend.take(q) for q in queues)), None)
        assert delivery is not None
        unacked = sum(broker.counts(q)[1] for q in queues)
        assert unacked <= 1, "one free slot: at most one message pushed across all queues"
        seen.append(delivery.queue)
        backend.offer(queues, 0)
        backend.ack(delivery)
    assert sorted(seen) == sorted(queues), f"each queue in turn, got {seen}"
    assert sum(broker.ready(q) for q in queues) == 3


def test_a_message_published_while_idle_wakes_the_descriptor_at_once(broker, backend, stem):
    queue = stem + "wake"
    broker.declare(queue)
    fd = backend.wait_fd()
    assert fd is not None and backend.poll_every is None, "pushed, never polled on a timer"
    backend.offer([queue], 1)
    backend.changes()
    assert select.select([fd], [], [], 0.2)[0] == [], "nothing to read while idle"
    broker.publish(queue, b"wake up")
    assert select.select([fd], [], [], 10)[0] == [fd], "the push makes the descriptor readable"
    backend.changes()
    delivery = backend.take(queue)
    assert delivery is not None and delivery.body == b"wake up"
    backend.ack(delivery)
    backend.offer([queue], 0)


def test_offering_a_missing_queue_leaves_it_out_and_serves_the_others(broker, backend, stem):
    queue, missing = stem + "here", stem + "missing"
    broker.publish(queue, b"still served")
    backend.offer([missing, queue], 1)  # consuming the missing one fails: left out a while
    backend.offer([missing, queue], 1)
    delivery = take_pushed(backend, queue)
    assert delivery.body == b"still served"
    backend.ack(delivery)
    with pytest.raises(QueueError):
        backend.offer([queue], -1)


def declare_quorum(broker, queue: str) -> None:
    with broker.connection() as conn:
        ch = conn.channel()
        ch.exchange_declare("StudioML.topic", exchange_type="topic", durable=True,
                            auto_delete=True)
        ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(queue, "StudioML.topic", routing_key=f"StudioML.{queue}")


def test_a_quorum_queue_is_served_by_basic_get(broker, backend, stem):
    queue = stem + "quorum"
    declare_quorum(broker, queue)
    broker.publish(queue, b"quorum request", declare=False)
    backend.wait_fd()
    assert queue in backend.discover()  # discovery learns each queue's type
    backend.offer([queue], 1)  # no channel-wide prefetch on quorum queues: never consumed
    assert backend.poll_every == 0.15, "a queue that must be asked brings the poll back"
    delivery = backend.take(queue)
    assert delivery is not None and delivery.body == b"quorum request"
    backend.ack(delivery)
    assert broker.ready(queue) == 0


def test_a_quorum_queue_not_yet_discovered_falls_back_after_one_refusal(broker, backend, stem):
    queue = stem + "quorum_new"
    declare_quorum(broker, queue)
    broker.publish(queue, b"quorum request", declare=False)
    backend.offer([queue], 1)  # the broker closes the connection (540: no global qos here)
    backend.service()          # reconnects
    backend.offer([queue], 1)
    delivery = backend.take(queue)
    assert delivery is not None and delivery.body == b"quorum request"
    backend.ack(delivery)
