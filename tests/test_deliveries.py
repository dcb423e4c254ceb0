"""The delivery book alone (runner/deliveries.py): the cases the end-to-end tests prove
against real brokers, checked here as plain state.

Each test names the end-to-end test whose broker behaviour it stands for.  The book never
calls its back end; :class:`Backend` is only the opaque handle it keeps (with the ``kind``
it reads), so no broker is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from runner import fates, protocol
from runner.deliveries import (CANCEL_TTL, REQUEUES_KEPT, TOMBSTONE_TTL, TOMBSTONES_MAX,
                               DeliveryBook, Held, Settle, request_identity)
from runner.queues.base import Delivery

NOW = 1000.0


@dataclass(frozen=True)
class Backend:
    """The handle of a back end as the book keeps it: only ``kind`` is ever read."""

    kind: str = "rmq"


RMQ = Backend("rmq")


def request(key: str = "exp-1", time_added: float = 1700000000.0) -> dict:
    return {"experiment": {"key": key, "project": "proj", "time_added": time_added}}


def attempt(attempt_id: str = "host-a1", key: str = "exp-1", queue: str = "rmq_q",
            token: str = "tag-1", attempts: int = 0, project: str = "proj",
            time_added: float = 1700000000.0) -> protocol.Attempt:
    return protocol.Attempt(attempt_id=attempt_id, queue=queue, token=token, attempts=attempts,
                            key=key, project=project, request=request(key, time_added),
                            workdir="/nowhere", resources={"cpus": 1}, taken_at=NOW,
                            queue_type="rmq")


def delivery(token: str = "tag-1", queue: str = "rmq_q", attempts: int = 0) -> Delivery:
    return Delivery(queue=queue, token=token, body=b"{}", attempts=attempts)


def identity(key: str = "exp-1", queue: str = "rmq_q", time_added: float = 1700000000.0):
    return request_identity(queue, "proj", key, request(key, time_added))


def held_one(book: DeliveryBook, **fields) -> Held:
    a = attempt(**fields)
    return book.hold(RMQ, delivery(a.token, a.queue, a.attempts), a)


def outcome(exc: BaseException) -> protocol.Outcome:
    return fates.outcome_for_exception(exc)


COMPLETED = protocol.Outcome(status=fates.COMPLETED)
ACK_COMPLETED = fates.decide(COMPLETED, 0, 3)


def test_identity_is_queue_project_key_and_time_added():
    assert identity() == identity()
    assert identity(time_added=1.0) != identity()  # the same key published again: new
    assert identity(queue="rmq_other") != identity()
    assert request_identity("q", None, "k", {}) == request_identity("q", "", "k", {"x": 1})


def test_a_redelivery_while_the_attempt_runs_is_attached_and_settled_with_it():
    """test_broker_restart_during_a_run_completes_the_experiment_once: the broker hands the
    running request out again after a reconnect; no second copy is started."""
    book = DeliveryBook()
    held = held_one(book)
    again = delivery("tag-2")
    assert book.redelivered(RMQ, again, identity(), NOW) is held
    assert held.deliveries == [held.delivery, again]
    ended = book.end("host-a1")
    assert ended is held
    assert ended.settlement(ACK_COMPLETED) == [
        Settle(RMQ, held.delivery, fates.ACK, "completed", 0),
        Settle(RMQ, again, fates.ACK, "completed", 0)]


def test_every_redelivery_is_kept_when_the_channel_closes_again_and_again():
    """test_delivery_ack_timeout_closing_the_channel_loses_no_result_and_runs_once: the
    broker takes the delivery back several times while the run goes on."""
    book = DeliveryBook()
    held = held_one(book)
    copies = [delivery(f"tag-{n}") for n in range(2, 5)]
    for copy in copies:
        assert book.redelivered(RMQ, copy, identity(), NOW) is held
    assert held.deliveries == [held.delivery] + copies
    assert len(book) == 1


def test_a_lost_delivery_leaves_a_tombstone_that_settles_the_redelivered_copy_once():
    """test_broker_restart_while_the_runner_is_full_settles_the_redelivered_copy: the
    attempt ends while its delivery is lost; the copy taken later is acked as decided."""
    book = DeliveryBook()
    held = held_one(book)
    decision = fates.decide(COMPLETED, 0, 3)
    assert book.end("host-a1") is held
    book.lost(held, decision, NOW)
    copy = delivery("tag-9")
    assert book.redelivered(RMQ, copy, identity(), NOW + 5) == \
        Settle(RMQ, copy, fates.ACK, "completed", 0)
    assert book.redelivered(RMQ, delivery("tag-10"), identity(), NOW + 6) is None  # used up


def test_a_tombstone_keeps_a_requeue_with_its_attempt_count():
    book = DeliveryBook()
    held = held_one(book, attempts=1)
    decision = fates.decide(outcome(fates.ExperimentFailed("exit 4")), 1, 3)
    assert decision.action == fates.REQUEUE
    book.end("host-a1")
    book.lost(held, decision, NOW)
    settle = book.redelivered(RMQ, delivery("tag-9", attempts=1), identity(), NOW)
    assert (settle.action, settle.attempts) == (fates.REQUEUE, 2)


def test_a_tombstone_lapses_after_its_ttl_and_old_ones_are_dropped():
    book = DeliveryBook()
    held = held_one(book)
    book.end("host-a1")
    book.lost(held, ACK_COMPLETED, NOW)
    assert book.redelivered(RMQ, delivery("t"), identity(), NOW + TOMBSTONE_TTL + 1) is None
    # Expired tombstones are dropped when a new one is kept.
    book.lost(held, ACK_COMPLETED, NOW)
    other = Held(RMQ, delivery(), attempt(key="exp-2"), identity("exp-2"))
    book.lost(other, ACK_COMPLETED, NOW + TOMBSTONE_TTL + 1)
    assert list(book.tombstones) == [identity("exp-2")]


def test_tombstones_are_bounded_oldest_first():
    book = DeliveryBook()
    for n in range(TOMBSTONES_MAX + 1):
        key = f"exp-{n}"
        book.lost(Held(RMQ, delivery(), attempt(key=key), identity(key)), ACK_COMPLETED, NOW)
    assert len(book.tombstones) == TOMBSTONES_MAX
    assert identity("exp-0") not in book.tombstones
    assert identity(f"exp-{TOMBSTONES_MAX}") in book.tombstones


def test_a_delivery_of_another_request_or_after_a_settled_end_is_new():
    """A request of the same key published again (another time_added) runs; so does a
    redelivery of one whose attempt ended and whose deliveries were settled."""
    book = DeliveryBook()
    held_one(book)
    assert book.redelivered(RMQ, delivery("t2"), identity(time_added=5.0), NOW) is None
    book.end("host-a1")
    assert book.redelivered(RMQ, delivery("t3"), identity(), NOW) is None
    assert book.end("host-a1") is None  # ended once


def test_a_later_attempt_of_the_same_request_keeps_its_redeliveries():
    """A request handed back and tried again: the end of the first attempt does not
    detach the second from its request."""
    book = DeliveryBook()
    held_one(book, attempt_id="host-a1")
    second = held_one(book, attempt_id="host-a2", token="tag-2")
    book.end("host-a1")
    assert book.redelivered(RMQ, delivery("tag-3"), identity(), NOW) is second


def test_adoption_after_a_fetcher_restart_rebuilds_the_delivery_and_attaches_redeliveries():
    """A restarted fetcher process is sent the attempts in flight (Adopt): it holds them
    again, settles them when they end, and a redelivery of one is attached to it."""
    book = DeliveryBook()
    a = attempt(token="tag-7", attempts=2)
    held = book.adopt(RMQ, a)
    assert held.delivery == Delivery(queue="rmq_q", token="tag-7", body=b"", attempts=2)
    assert book.adopt(RMQ, a) is None  # adopted (or held) already
    assert book.redelivered(RMQ, delivery("tag-8"), identity(), NOW) is held
    assert [s.delivery.token for s in book.end(a.attempt_id).settlement(ACK_COMPLETED)] == \
        ["tag-7", "tag-8"]


def test_a_deleted_queue_is_asked_about_once_and_its_attempt_is_dropped():
    """test_deleting_the_queue_during_a_run_stops_the_run (and the SQS, Pub/Sub and local
    twins): only an attempt whose queue a successful listing no longer names is a suspect;
    once deleted, its fate is drop, with nothing to settle."""
    book = DeliveryBook()
    held = held_one(book)
    sqs = Held(Backend("sqs"), delivery(queue="sqs_q"), attempt("host-s1", queue="sqs_q"),
               identity(queue="sqs_q"))
    book.held["host-s1"] = sqs
    assert book.deletion_suspects(["rmq_q", "sqs_q"], {"rmq", "sqs"}) == []
    assert book.deletion_suspects([], {"sqs"}) == [sqs]  # rmq could not list: no suspect
    assert book.deletion_suspects([], {"rmq", "sqs"}) == [held, sqs]
    book.queue_deleted(held)
    assert book.deletion_suspects([], {"rmq"}) == []  # already stopping
    ended = book.end("host-a1")
    decision = fates.decide(outcome(fates.QueueDeleted("gone")), 0, 3,
                            queue_deleted=ended.queue_deleted)
    assert (decision.action, decision.final_status) == (fates.DROP, fates.CANCELLED)
    assert ended.settlement(decision) == []


def test_cancel_of_a_held_attempt_marks_it_and_its_fate_is_an_ack_cancelled():
    """test_cancel_stops_a_running_experiment_which_ends_cancelled_and_acked."""
    book = DeliveryBook()
    held = held_one(book)
    other = held_one(book, attempt_id="host-b1", key="exp-2", token="tag-2")
    assert book.cancel("exp-1", "", NOW) == [held]  # no project: any project
    assert held.cancelled and not other.cancelled
    assert book.cancel("exp-2", "another-project", NOW) == []
    decision = fates.decide(outcome(fates.Cancelled("stop")), 0, 3, cancelled=held.cancelled)
    assert held.settlement(decision) == [Settle(RMQ, held.delivery, fates.ACK,
                                                "cancelled by runner-ctl cancel", 0)]
    assert not book.cancelled_on_take("proj", "exp-1", NOW)  # it ran here: no promise left


def test_cancel_of_a_request_not_held_acks_it_when_taken_once_within_its_ttl():
    """test_cancel_of_a_queued_experiment_acks_it_without_running and the RabbitMQ twin:
    a request waiting in its queue (or held aside) is cancelled when this runner takes it."""
    book = DeliveryBook()
    assert book.cancel("queued", "", NOW) == []
    assert book.cancelled_on_take("any-project", "queued", NOW + 1)
    assert not book.cancelled_on_take("any-project", "queued", NOW + 2)  # used up
    book.cancel("queued", "proj", NOW)
    assert not book.cancelled_on_take("other", "queued", NOW)
    assert book.cancelled_on_take("proj", "queued", NOW)
    book.cancel("late", "", NOW)
    assert not book.cancelled_on_take("", "late", NOW + CANCEL_TTL + 1)


def test_hand_backs_are_counted_per_request_until_max_requeues_ends_it_failed():
    """test_host_faults_back_off_are_bounded_and_leave_no_metadata_files: with
    --max-requeues 2 a request whose inputs never appear ends failed after two hand-backs."""
    book = DeliveryBook()
    crashed = outcome(fates.RoleCrashed("the executor died"))
    counts = []
    for _ in range(3):
        decision = fates.decide(crashed, 0, 3, requeues_before=book.requeues_of(identity()),
                                max_requeues=2)
        counts.append((decision.action, book.counted(identity(), decision)))
    assert counts == [(fates.REQUEUE, 1), (fates.REQUEUE, 2), (fates.ACK, 0)]
    assert decision.final_status == fates.FAILED
    assert "handed back 2 times (--max-requeues 2)" in decision.reason
    assert book.requeues_of(identity()) == 0  # final: forgotten


def test_counted_failures_and_shutdowns_do_not_add_hand_backs():
    book = DeliveryBook()
    back_off = fates.decide(outcome(fates.RoleCrashed("x")), 0, 3)
    assert book.counted(identity(), back_off) == 1
    failed = fates.decide(outcome(fates.ExperimentFailed("exit 1")), 0, 3)
    assert failed.action == fates.REQUEUE and not failed.backoff
    assert book.counted(identity(), failed) == 1
    shutdown = fates.decide(outcome(fates.ShutdownRequested("stop")), 0, 3)
    assert shutdown.action == fates.REQUEUE and not shutdown.backoff
    assert book.counted(identity(), shutdown) == 1
    book.forget_request(identity())  # stale on a later take: settled for good
    assert book.requeues_of(identity()) == 0


def test_hand_back_counts_are_bounded_oldest_first():
    book = DeliveryBook()
    back_off = fates.decide(outcome(fates.RoleCrashed("x")), 0, 3)
    for n in range(REQUEUES_KEPT + 1):
        book.counted(identity(f"exp-{n}"), back_off)
    assert len(book.requeues) == REQUEUES_KEPT
    assert book.requeues_of(identity("exp-0")) == 0
    assert book.requeues_of(identity(f"exp-{REQUEUES_KEPT}")) == 1


@pytest.mark.parametrize("action", [fates.ACK, fates.DEAD, fates.REQUEUE])
def test_settlement_applies_the_decision_to_every_delivery(action):
    book = DeliveryBook()
    held = held_one(book)
    book.redelivered(RMQ, delivery("tag-2"), identity(), NOW)
    decision = fates.Decision(action, 2, fates.FAILED, "why")
    assert [(s.action, s.reason, s.attempts) for s in held.settlement(decision)] == \
        [(action, "why", 2)] * 2
