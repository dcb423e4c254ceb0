"""The fate of a request (SPEC section 7): runner.fates."""
from __future__ import annotations

import pytest

from runner import errors, fates
from runner.fates import (ACK, CANCELLED, COMPLETED, DEAD, EXPIRED, FAILED, REQUEUE,
                          ExperimentFailed, LimitReached, RoleCrashed, ShutdownRequested, decide,
                          outcome_for_exception)
from runner.protocol import Outcome
from runner.storage import ObjectMissing


def out(status: str, kind: str = "", message: str = "", exit_code=None) -> Outcome:
    """An outcome of ``kind``; its ``error`` (for people) is deliberately left empty."""
    return Outcome(status=status, message=message, exit_code=exit_code, kind=kind)


@pytest.mark.parametrize("outcome, before, action, attempts, final", [
    # completed / expired are acked; they do not add failed attempts
    (out(COMPLETED, exit_code=0), 0, ACK, 0, COMPLETED),
    (out(COMPLETED, exit_code=0), 2, ACK, 2, COMPLETED),
    (out(EXPIRED, fates.LIMIT), 0, ACK, 0, EXPIRED),
    (out(EXPIRED), 1, ACK, 1, EXPIRED),
    # failures count and requeue until max_attempts (3), then ack failed
    (out(FAILED, fates.FAILURE, exit_code=1), 0, REQUEUE, 1, FAILED),
    (out(FAILED, fates.FAILURE, exit_code=1), 1, REQUEUE, 2, FAILED),
    (out(FAILED, fates.FAILURE, exit_code=1), 2, ACK, 3, FAILED),
    (out(FAILED, fates.FAILURE), 2, ACK, 3, FAILED),
    (out(FAILED, fates.FAILURE), 0, REQUEUE, 1, FAILED),
    (out(FAILED, fates.FAILURE), 1, REQUEUE, 2, FAILED),
    (out(FAILED, fates.NONE), 5, ACK, 6, FAILED),
    # bad requests are dead-lettered, never counted
    (out(FAILED, fates.BAD_REQUEST, "no workspace"), 0, DEAD, 0, FAILED),
    (out(FAILED, fates.BAD_REQUEST), 2, DEAD, 2, FAILED),
    # the runner's own trouble: requeued, not counted, whatever the count
    (out(CANCELLED, fates.SHUTDOWN), 0, REQUEUE, 0, CANCELLED),
    (out(CANCELLED, fates.SHUTDOWN), 2, REQUEUE, 2, CANCELLED),
    (out(CANCELLED, fates.ROLE_CRASHED), 2, REQUEUE, 2, CANCELLED),
    (out(CANCELLED, fates.STORAGE), 2, REQUEUE, 2, CANCELLED),
    (out(CANCELLED, fates.STORAGE), 1, REQUEUE, 1, CANCELLED),
    (out(CANCELLED, fates.RESOURCES), 0, REQUEUE, 0, CANCELLED),
    # even if a producer labels them failed, these errors are not counted
    (out(FAILED, fates.STORAGE), 2, REQUEUE, 2, FAILED),
    (out(FAILED, fates.ROLE_CRASHED), 2, REQUEUE, 2, FAILED),
    (out(FAILED, fates.SHUTDOWN), 2, REQUEUE, 2, FAILED),
])
def test_decide_table(outcome, before, action, attempts, final) -> None:
    decision = decide(outcome, before, max_attempts=3)
    assert (decision.action, decision.attempts, decision.final_status) == \
        (action, attempts, final), decision
    assert decision.reason


def test_failing_run_is_requeued_until_max_then_acked() -> None:
    failure = outcome_for_exception(ExperimentFailed("exit 1"), exit_code=1)
    attempts, actions = 0, []
    for _ in range(10):
        decision = decide(failure, attempts, max_attempts=4)
        actions.append(decision.action)
        attempts = decision.attempts
        if decision.action == ACK:
            break
    assert actions == [REQUEUE, REQUEUE, REQUEUE, ACK]
    assert attempts == 4
    assert decision.final_status == FAILED
    assert "4" in decision.reason


def test_max_attempts_one_acks_the_first_failure() -> None:
    decision = decide(out(FAILED, fates.FAILURE), 0, max_attempts=1)
    assert (decision.action, decision.attempts) == (ACK, 1)


@pytest.mark.parametrize("outcome", [
    out(COMPLETED, exit_code=0), out(EXPIRED), out(FAILED, fates.FAILURE),
    out(CANCELLED, fates.SHUTDOWN),
])
@pytest.mark.parametrize("before", [0, 2, 10])
def test_upload_error_requeues_and_never_acks(outcome, before) -> None:
    decision = decide(outcome, before, max_attempts=3, upload_error="connection refused")
    assert decision.action == REQUEUE
    assert "connection refused" in decision.reason


def test_upload_error_still_counts_a_failed_attempt() -> None:
    decision = decide(out(FAILED, fates.FAILURE), 1, 3, upload_error="boom")
    assert (decision.action, decision.attempts) == (REQUEUE, 2)
    completed = decide(out(COMPLETED), 1, 3, upload_error="boom")
    assert (completed.action, completed.attempts, completed.final_status) == \
        (REQUEUE, 1, COMPLETED)


def test_bad_request_is_dead_even_with_upload_error() -> None:
    decision = decide(out(FAILED, fates.BAD_REQUEST, "not JSON"), 0, 3, upload_error="boom")
    assert decision.action == DEAD
    assert "not JSON" in decision.reason


class MyBadRequest(errors.BadRequest):
    pass


class FlakyStorage(errors.StorageError):
    pass


@pytest.mark.parametrize("exc, status, kind", [
    (errors.BadRequest("missing key"), FAILED, fates.BAD_REQUEST),
    (MyBadRequest("subclass"), FAILED, fates.BAD_REQUEST),
    (errors.EnvironmentBuildError("pip failed"), FAILED, fates.FAILURE),
    (errors.RequirementsUnsatisfiable("no such package"), FAILED, fates.NOT_RETRIED),
    (fates.ScriptMissing("nope.py"), FAILED, fates.NOT_RETRIED),
    (errors.InterpreterNotFound("python3.7"), FAILED, fates.FAILURE),
    (ExperimentFailed("exit 2"), FAILED, fates.FAILURE),
    (fates.OutOfMemory("ram"), FAILED, fates.FAILURE),
    (fates.DiskFull("disk full"), FAILED, fates.NOT_RETRIED),
    (LimitReached("max_duration"), EXPIRED, fates.LIMIT),
    (errors.StorageError("503"), CANCELLED, fates.STORAGE),
    (FlakyStorage("flaky"), CANCELLED, fates.STORAGE),
    (errors.PermanentStorageError("403"), FAILED, fates.PERMANENT),
    (errors.ArchiveError("../evil"), FAILED, fates.NOT_RETRIED),
    (errors.DiskBudgetExceeded("hdd"), FAILED, fates.NOT_RETRIED),
    (fates.DiskLimitExceeded("hdd"), FAILED, fates.NOT_RETRIED),
    (fates.StartRefused("E2BIG"), FAILED, fates.NOT_RETRIED),
    (errors.ResourcesUnavailable("no gpu"), CANCELLED, fates.RESOURCES),
    (ShutdownRequested("SIGTERM"), CANCELLED, fates.SHUTDOWN),
    (RoleCrashed("executor died"), CANCELLED, fates.ROLE_CRASHED),
    (fates.QueueDeleted("gone"), CANCELLED, fates.QUEUE_DELETED),
    (fates.ClientStopped("stop"), CANCELLED, fates.CLIENT_STOPPED),
    (fates.Cancelled("ctl"), CANCELLED, fates.CANCEL),
    (RuntimeError("bug"), FAILED, fates.FAILURE),
    (KeyError("x"), FAILED, fates.FAILURE),
])
def test_outcome_for_exception(exc, status, kind) -> None:
    outcome = outcome_for_exception(exc, exit_code=7)
    assert (outcome.status, outcome.kind, outcome.error) == (status, kind, type(exc).__name__)
    assert outcome.message == str(exc)
    assert outcome.exit_code == 7


def test_object_missing_is_storage_trouble_not_counted() -> None:
    outcome = outcome_for_exception(ObjectMissing("file:///nope/workspace.tar"))
    assert outcome.status == CANCELLED
    assert (outcome.error, outcome.kind) == ("ObjectMissing", fates.STORAGE)
    assert "file:///nope/workspace.tar" in outcome.message
    decision = decide(outcome, 2, max_attempts=3)
    assert (decision.action, decision.attempts) == (REQUEUE, 2)


@pytest.mark.parametrize("exc, action, counted", [
    (errors.BadRequest("x"), DEAD, False),
    (MyBadRequest("x"), DEAD, False),
    (FlakyStorage("x"), REQUEUE, False),
    (ShutdownRequested("x"), REQUEUE, False),
    (RoleCrashed("x"), REQUEUE, False),
    (errors.ResourcesUnavailable("x"), REQUEUE, False),
    (errors.DiskBudgetExceeded("x"), ACK, True),
    (errors.ArchiveError("x"), ACK, True),
    (fates.DiskLimitExceeded("x"), ACK, True),
    (fates.StartRefused("x"), ACK, True),
    (errors.EnvironmentBuildError("x"), REQUEUE, True),
    (ExperimentFailed("x"), REQUEUE, True),
    (ValueError("x"), REQUEUE, True),
    (LimitReached("x"), ACK, False),
])
def test_exception_to_decision(exc, action, counted) -> None:
    decision = decide(outcome_for_exception(exc), 0, max_attempts=3)
    assert decision.action == action
    assert decision.attempts == (1 if counted else 0)


def test_constants_are_the_spec_words() -> None:
    assert (fates.COMPLETED, fates.FAILED, fates.EXPIRED, fates.CANCELLED) == \
        ("completed", "failed", "expired", "cancelled")
    assert (fates.ACK, fates.REQUEUE, fates.DEAD) == ("ack", "requeue", "dead")


def test_a_deleted_queue_drops_the_request_as_cancelled_unless_it_already_finished():
    stopped = outcome_for_exception(fates.stop_exception("queue_deleted", "queue rmq_x was deleted"))
    assert stopped.status == CANCELLED and stopped.error == "QueueDeleted"
    decision = decide(stopped, 1, 3)
    assert (decision.action, decision.final_status, decision.attempts) == (fates.DROP, CANCELLED, 1)
    # The run failed or was cancelled otherwise, but its queue is gone: nothing to requeue into.
    failed = outcome_for_exception(ExperimentFailed("exit 1"), 1)
    assert decide(failed, 0, 3, queue_deleted=True).action == fates.DROP
    # A run that had already completed keeps its status (the ack is a no-op on a deleted queue).
    done = decide(out(COMPLETED, exit_code=0), 0, 3, queue_deleted=True)
    assert (done.action, done.final_status) == (ACK, COMPLETED)


def test_stop_causes_map_to_their_exceptions():
    assert isinstance(fates.stop_exception("shutdown", "drain"), ShutdownRequested)
    assert isinstance(fates.stop_exception("queue_deleted", "x"), fates.QueueDeleted)
    assert isinstance(fates.stop_exception("unknown-cause", "x"), ShutdownRequested)
    assert decide(outcome_for_exception(fates.stop_exception("shutdown", "x")), 2, 3).action \
        == REQUEUE


def test_a_client_stop_is_acked_cancelled_once_its_uploads_are_done():
    stopped = outcome_for_exception(fates.stop_exception("client_stopped", "x"), -15)
    assert (stopped.status, stopped.error) == (CANCELLED, "ClientStopped")
    done = decide(stopped, 1, 3)
    assert (done.action, done.final_status, done.attempts) == (ACK, CANCELLED, 1)
    assert decide(stopped, 1, 3, upload_error="StorageError: down").action == REQUEUE


# -- faults that retrying cannot fix, and back-off for those it can -----------------------

def test_permanent_storage_errors_end_the_request_failed_not_retried() -> None:
    outcome = outcome_for_exception(errors.PermanentStorageError("NoSuchBucket: nope"))
    assert (outcome.status, outcome.error) == (FAILED, "PermanentStorageError")
    decision = decide(outcome, 0, 3, requeues_before=0, max_requeues=10)
    assert (decision.action, decision.final_status, decision.backoff) == (ACK, FAILED, False)
    assert "NoSuchBucket" in decision.reason and "cannot fix" in decision.reason


def test_a_permanent_upload_error_ends_the_request_failed() -> None:
    decision = decide(out(COMPLETED, exit_code=0), 0, 3,
                      upload_error="PermanentStorageError: cannot write s3://x/y: 403",
                      upload_error_kind=fates.PERMANENT)
    assert (decision.action, decision.final_status) == (ACK, FAILED)
    transient = decide(out(COMPLETED, exit_code=0), 0, 3,
                       upload_error="StorageError: connection refused",
                       upload_error_kind=fates.STORAGE)
    assert (transient.action, transient.backoff) == (REQUEUE, True)


def test_file_system_errors_are_classified_by_errno() -> None:
    import errno

    for code in (errno.ENAMETOOLONG, errno.EACCES, errno.ENOTDIR):
        error = errors.storage_error_for(OSError(code, "x"), "cannot write")
        assert isinstance(error, errors.PermanentStorageError), code
    for code in (errno.ENOSPC, errno.EIO):
        error = errors.storage_error_for(OSError(code, "x"), "cannot write")
        assert type(error) is errors.StorageError, code


@pytest.mark.parametrize("kind", [fates.STORAGE, fates.ROLE_CRASHED, fates.RESOURCES])
def test_hand_backs_back_off_and_are_bounded_by_max_requeues(kind: str) -> None:
    outcome = out(CANCELLED, kind, "store unreachable")
    for before in range(4):
        decision = decide(outcome, 1, 3, requeues_before=before, max_requeues=4)
        assert (decision.action, decision.attempts, decision.backoff) == (REQUEUE, 1, True)
    last = decide(outcome, 1, 3, requeues_before=4, max_requeues=4)
    assert (last.action, last.final_status, last.attempts) == (ACK, FAILED, 1)
    assert "--max-requeues 4" in last.reason and "store unreachable" in last.reason


def test_a_shutdown_hands_back_at_once_and_counts_no_requeue_bound() -> None:
    decision = decide(out(CANCELLED, fates.SHUTDOWN), 0, 3, requeues_before=0,
                      max_requeues=5)
    assert (decision.action, decision.backoff) == (REQUEUE, False)


def test_backoff_grows_exponentially_is_jittered_and_capped() -> None:
    import random

    rng = random.Random(1)
    for requeues in range(1, 40):
        ceiling = min(fates.MAX_BACKOFF, fates.FIRST_BACKOFF * 2 ** (requeues - 1))
        delays = [fates.backoff_delay(requeues, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered: runners do not retry in step
    assert fates.backoff_delay(1, rng) <= fates.FIRST_BACKOFF
    assert fates.backoff_delay(100, rng) <= fates.MAX_BACKOFF


# -- the fate follows the outcome kind, never an exception's class name ---------------------

def test_the_kind_decides_and_the_error_name_is_only_for_people() -> None:
    misleading = Outcome(status=FAILED, error="StorageError", message="exit 1",
                         kind=fates.FAILURE)
    assert decide(misleading, 0, 3).attempts == 1  # counted: the name says storage, the kind not
    handed_back = Outcome(status=CANCELLED, error="SomethingRenamed", kind=fates.STORAGE)
    assert (decide(handed_back, 0, 3).action, decide(handed_back, 0, 3).attempts) == (REQUEUE, 0)
    dead = Outcome(status=FAILED, error="NotCalledBadRequest", kind=fates.BAD_REQUEST)
    assert decide(dead, 0, 3).action == DEAD


def test_a_permanent_upload_error_is_known_by_its_kind_not_its_text() -> None:
    named_only = decide(out(COMPLETED, exit_code=0), 0, 3,
                        upload_error="PermanentStorageError: 403")
    assert named_only.action == REQUEUE  # the text alone decides nothing
    by_kind = decide(out(COMPLETED, exit_code=0), 0, 3, upload_error="Renamed: 403",
                     upload_error_kind=fates.PERMANENT)
    assert (by_kind.action, by_kind.final_status) == (ACK, FAILED)


def test_every_kind_has_a_status_and_travels_on_the_wire() -> None:
    from runner import protocol

    for kind, status in fates.STATUS_BY_KIND.items():
        assert status in (COMPLETED, FAILED, EXPIRED, CANCELLED)
        outcome = Outcome(status=status, kind=kind)
        attempt = protocol.Attempt(attempt_id="h-1", queue="q", token="t", attempts=0, key="k",
                                   project="p", request={}, workdir="/w", resources={},
                                   taken_at=0.0)
        done = protocol.AttemptDone(attempt=attempt, outcome=outcome, upload_error="x",
                                    upload_error_kind=kind)
        back = protocol.decode(protocol.encode(done))
        assert (back.outcome.kind, back.upload_error_kind) == (kind, kind)
