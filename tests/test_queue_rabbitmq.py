"""The RabbitMQ back end (runner.queues.rabbitmq) against a real broker.

Queue names are unique per test (``rmq_<hex>_…``) so that these tests share the broker on
127.0.0.1:5672 with anyone else; the connection-loss test runs its own private node.
"""
from __future__ import annotations

import time

import pytest

from runner import config as config_module
from runner.errors import DeliveryLost, QueueError
from runner.queues import QUEUE_KINDS, build_backends, matches
from runner.queues.rabbitmq import (ATTEMPTS_HEADER, DEAD_REASON_HEADER, RabbitMQQueue,
                                    attempts_of, default_mgt_url)

from .rabbitmq_support import PrivateBroker, pika, unique

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
def test_connection_loss_loses_held_deliveries_then_reconnects_and_gets_them_back():
    node = PrivateBroker().start()
    try:
        queue = "rmq_fault_q"
        node.publish(queue, b"durable request", durable=True)
        backend = RabbitMQQueue(node.url, node.mgt_url)
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
