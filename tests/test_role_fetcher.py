"""The fetcher alone: hosted in a thread on the in-memory bus, serving the stub broker
(runner.queues.memory).  Each test publishes requests, sends the fetcher what the other
roles would, and checks what it sends them and what it did to the deliveries."""
from __future__ import annotations

import json
import logging
import time

import pytest

from runner import metadata, protocol
from runner.errors import DeliveryLost

from .roles_support import RoleRig, eventually

COMPLETED = protocol.Outcome(status="completed", exit_code=0)
FAILED = protocol.Outcome(status="failed", error="ExperimentFailed", message="exit 1",
                          exit_code=1)


@pytest.fixture()
def rig():
    rig = RoleRig("--max-attempts", "3", "--executors", "2")  # room for a redelivered copy
    rig.broker.declare("memory_q")  # found by the first discovery
    rig.host("fetcher")
    yield rig
    rig.close()


def assigned(rig: RoleRig, key: str) -> protocol.Attempt:
    message = rig.probe("cache_manager").expect(
        protocol.AttemptAssigned, lambda m: m.attempt.key == key)
    return message.attempt


def finished(rig: RoleRig, attempt_id: str) -> dict:
    """The detail of the ``finished`` phase the fetcher reported for ``attempt_id``."""
    phase = rig.probe("supervisor").expect(
        protocol.AttemptPhase, lambda m: m.attempt.attempt_id == attempt_id
        and m.phase == protocol.PHASE_FINISHED)
    return phase.detail


def record(rig: RoleRig, request: dict) -> dict:
    return json.loads(rig.objects.read(metadata.record_url(request)))


def test_a_request_is_taken_handed_on_and_acked_when_done(rig) -> None:
    request = rig.request()
    rig.publish(request)
    attempt = assigned(rig, request["experiment"]["key"])
    assert attempt.queue == "memory_q" and attempt.queue_type == "memory"
    assert attempt.request["experiment"]["key"] == request["experiment"]["key"]
    assert rig.broker.held() == ["memory_q"] and rig.broker.messages("memory_q") == []

    rig.probe("uploader").send("fetcher", protocol.AttemptDone(attempt=attempt,
                                                                outcome=COMPLETED))
    assert finished(rig, attempt.attempt_id)["fate"] == "ack"
    assert rig.broker.held() == [] and rig.broker.messages("memory_q") == []
    assert record(rig, request)["status"] == "completed"


def test_a_failed_attempt_is_requeued_with_its_attempt_counted(rig) -> None:
    request = rig.request()
    rig.publish(request, attempts=1)
    attempt = assigned(rig, request["experiment"]["key"])
    assert attempt.attempts == 1
    rig.probe("executor").send("fetcher", protocol.RunEnded(attempt_id=attempt.attempt_id))
    rig.probe("uploader").send("fetcher", protocol.AttemptDone(attempt=attempt, outcome=FAILED))
    assert finished(rig, attempt.attempt_id)["fate"] == "requeue"
    again = assigned(rig, request["experiment"]["key"])  # the slot is free: taken again
    assert again.attempts == 2 and again.attempt_id != attempt.attempt_id


def test_a_bad_request_is_dead_lettered_and_never_handed_on(rig) -> None:
    rig.broker.publish("memory_q", b'{"experiment": "not an object"}')
    good = rig.request()
    rig.publish(good)
    assigned(rig, good["experiment"]["key"])  # the one behind it is taken
    dead = rig.broker.dead("memory_q")
    assert len(dead) == 1 and dead[0].body == b'{"experiment": "not an object"}'
    assert dead[0].reason
    assert rig.probe("cache_manager").quiet(protocol.AttemptAssigned, 0.3) == []


def test_a_stale_request_is_acked_as_expired_without_running(rig) -> None:
    request = rig.request()
    request["config"]["experimentLifetime"] = "1m"
    request["experiment"]["time_added"] = time.time() - 3600
    rig.publish(request)
    assert eventually(lambda: rig.broker.messages("memory_q") == [] and not rig.broker.held()
                      and metadata.record_url(request) in rig.objects.urls())
    assert record(rig, request)["status"] == "expired"
    assert rig.broker.dead("memory_q") == []
    assert rig.probe("cache_manager").quiet(protocol.AttemptAssigned, 0.3) == []


def test_a_request_cancelled_before_it_is_taken_is_acked_without_running(rig, caplog) -> None:
    request = rig.request()
    with caplog.at_level(logging.INFO, logger="runner.fetcher"):
        rig.probe("supervisor").send("fetcher", protocol.Cancel(
            key=request["experiment"]["key"], project="p"))
        # Published once the Cancel was handled: a tick running meanwhile would take it first.
        assert eventually(lambda: "is not running here: cancelled when taken" in caplog.text)
    rig.publish(request)
    assert eventually(lambda: metadata.record_url(request) in rig.objects.urls())
    assert record(rig, request)["status"] == "cancelled" and record(rig, request)["attempt"] == ""
    assert rig.broker.messages("memory_q") == [] and rig.broker.held() == []
    assert rig.probe("cache_manager").quiet(protocol.AttemptAssigned, 0.3) == []


def test_a_request_that_never_fits_is_held_aside_and_the_one_behind_it_taken(rig) -> None:
    gpu = rig.request(key="needs-a-gpu")
    gpu["experiment"]["resources_needed"]["gpus"] = 1
    good = rig.request()
    rig.publish(gpu)
    rig.publish(good)
    assigned(rig, good["experiment"]["key"])
    stats = rig.probe("supervisor").expect(protocol.QueueStats, lambda m: any(
        entry.get("held") == "never" for entry in m.queues.get("memory_q", {}).get("waiting", [])))
    held = [e for e in stats.queues["memory_q"]["waiting"] if e.get("held")]
    assert held[0]["key"] == "needs-a-gpu" and "needs 1 GPU" in held[0]["reason"]
    assert record(rig, gpu)["status"] == "waiting" and "needs 1 GPU" in record(rig, gpu)["reason"]
    assert rig.broker.held() == ["memory_q", "memory_q"]  # held aside, not put back yet


def test_a_redelivery_joins_the_running_attempt_and_is_settled_with_it(rig) -> None:
    request = rig.request()
    rig.publish(request)
    attempt = assigned(rig, request["experiment"]["key"])
    assert rig.broker.redeliver("memory_q") == 1  # the broker lost the delivery
    assert eventually(lambda: rig.broker.held() == ["memory_q"])  # taken again ...
    assert rig.probe("cache_manager").quiet(protocol.AttemptAssigned, 0.5) == []
    rig.probe("uploader").send("fetcher", protocol.AttemptDone(attempt=attempt,
                                                                outcome=COMPLETED))
    assert finished(rig, attempt.attempt_id)["fate"] == "ack"
    assert rig.broker.held() == [] and rig.broker.messages("memory_q") == []


def test_a_decision_whose_delivery_was_lost_settles_the_redelivered_copy(rig) -> None:
    request = rig.request()
    rig.publish(request)
    attempt = assigned(rig, request["experiment"]["key"])
    supervisor = rig.probe("supervisor")
    supervisor.send("fetcher", protocol.StopTaking())
    supervisor.expect(protocol.QueueStats, lambda m: not m.taking)
    rig.broker.redeliver("memory_q")
    rig.probe("uploader").send("fetcher", protocol.AttemptDone(attempt=attempt,
                                                                outcome=COMPLETED))
    assert finished(rig, attempt.attempt_id)["fate"] == "ack"
    assert len(rig.broker.messages("memory_q")) == 1  # the copy waits: not taking

    supervisor.send("fetcher", protocol.StartTaking())
    assert eventually(lambda: rig.broker.messages("memory_q") == [] and rig.broker.held() == [])
    assert rig.probe("cache_manager").quiet(protocol.AttemptAssigned, 0.3) == []


def test_deleting_the_queue_of_a_running_request_stops_its_run(rig) -> None:
    request = rig.request()
    rig.publish(request)
    attempt = assigned(rig, request["experiment"]["key"])
    rig.broker.delete_queue("memory_q")
    stop = rig.probe("executor").expect(protocol.StopRuns)
    assert stop.attempt_ids == [attempt.attempt_id] and stop.cause == "queue_deleted"
    rig.probe("uploader").send("fetcher", protocol.AttemptDone(attempt=attempt, outcome=FAILED))
    assert finished(rig, attempt.attempt_id)["fate"] == "drop"


def test_cancel_stops_the_held_attempt_of_its_key(rig) -> None:
    request = rig.request()
    rig.publish(request)
    attempt = assigned(rig, request["experiment"]["key"])
    rig.probe("supervisor").send("fetcher", protocol.Cancel(key=attempt.key, project=""))
    for role in ("cache_manager", "executor"):
        stop = rig.probe(role).expect(protocol.StopRuns)
        assert stop.attempt_ids == [attempt.attempt_id] and stop.cause == "cancelled"


def test_the_stub_broker_loses_a_redelivered_token() -> None:
    """The property the redelivery tests rest on: a token taken back is DeliveryLost."""
    from runner.queues.memory import MemoryBroker, MemoryQueue

    queue = MemoryQueue(MemoryBroker())
    queue.publish("memory_q", b"x")
    first = queue.take("memory_q")
    queue.broker.redeliver()
    with pytest.raises(DeliveryLost):
        queue.ack(first)
    again = queue.take("memory_q")
    assert again.body == b"x" and again.token != first.token
