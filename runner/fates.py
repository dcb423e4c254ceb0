"""The fate of a request (SPEC section 7), decided in one place.

:func:`outcome_for_exception` turns whatever ended an attempt early into an
:class:`~runner.protocol.Outcome`; :func:`decide` turns an outcome into what the fetcher
does with the held delivery.  No other module decides between ack, requeue and
dead-letter.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import errors
from .protocol import Outcome

COMPLETED, FAILED, EXPIRED, CANCELLED = "completed", "failed", "expired", "cancelled"
ACK, REQUEUE, DEAD, DROP = "ack", "requeue", "dead", "drop"
"""``DROP``: nothing to settle, the request's queue is gone (the user deleted it)."""


class ShutdownRequested(errors.RunnerError):
    """The runner is stopping; the attempt is handed back, not counted."""


class RoleCrashed(errors.RunnerError):
    """A role process died while it held the attempt; handed back, not counted."""


class LimitReached(errors.RunnerError):
    """max_duration or experimentLifetime stopped the attempt."""


class ExperimentFailed(errors.RunnerError):
    """The experiment's process exited non-zero."""


class OutOfMemory(ExperimentFailed):
    """The kernel killed the run for exceeding its memory limit (its ``ram``).

    Counted like any failure of the experiment's own code: the same request would
    need the same memory on any runner.
    """


class QueueDeleted(errors.RunnerError):
    """The request's queue was deleted while the attempt ran: the user's way to abort.

    The run is stopped, its outputs are uploaded, and the request ends ``cancelled``
    (final); there is no delivery left to ack or requeue.
    """


class ClientStopped(errors.RunnerError):
    """The StudioML client marked the experiment's database record ``stopped``
    (``studio stop``): the run is stopped, its outputs are uploaded, and the request is
    acked ``cancelled`` (final)."""


STOP_CAUSES: dict[str, type[errors.RunnerError]] = {
    "shutdown": ShutdownRequested,
    "queue_deleted": QueueDeleted,
    "client_stopped": ClientStopped,
}
"""``StopRuns.cause`` → the exception that ends the stopped attempts."""


def stop_exception(cause: str, reason: str) -> errors.RunnerError:
    """What ends an attempt stopped by ``StopRuns(cause=…)``; unknown causes are shutdowns."""
    return STOP_CAUSES.get(cause, ShutdownRequested)(f"stopped: {reason}")


# Exception class name -> final studioml.status of the attempt.
_STATUS_BY_ERROR = {
    errors.BadRequest: FAILED,
    errors.EnvironmentBuildError: FAILED,
    ExperimentFailed: FAILED,
    LimitReached: EXPIRED,
    errors.StorageError: CANCELLED,
    errors.ArchiveError: FAILED,
    errors.ResourcesUnavailable: CANCELLED,
    ShutdownRequested: CANCELLED,
    RoleCrashed: CANCELLED,
    QueueDeleted: CANCELLED,
    ClientStopped: CANCELLED,
}
_DEAD_ERRORS = {"BadRequest"}
_UNCOUNTED_ERRORS = {"StorageError", "ObjectMissing", "ResourcesUnavailable",
                     "ShutdownRequested", "RoleCrashed"}


def outcome_for_exception(exc: BaseException, exit_code: int | None = None) -> Outcome:
    """The outcome of an attempt ended by ``exc``; unknown exceptions count as failures."""
    status = FAILED
    for cls in type(exc).__mro__:
        if cls in _STATUS_BY_ERROR:
            status = _STATUS_BY_ERROR[cls]
            break
    error = type(exc).__name__
    for cls in type(exc).__mro__:  # report the family name the rules are written in
        if cls.__name__ in _UNCOUNTED_ERRORS | _DEAD_ERRORS | {"QueueDeleted", "ClientStopped"}:
            error = cls.__name__
            break
    return Outcome(status=status, error=error, message=str(exc), exit_code=exit_code)


@dataclass(frozen=True)
class Decision:
    """What to do with the delivery, and the request's attempt count afterwards."""

    action: str        # ack, requeue or dead
    attempts: int      # attempts of the experiment's code made so far, this one included
    final_status: str  # completed/failed/expired when acked; the attempt's status otherwise
    reason: str


def decide(outcome: Outcome, attempts_before: int, max_attempts: int,
           upload_error: str = "", queue_deleted: bool = False) -> Decision:
    """The fate of a request whose attempt ended with ``outcome``.

    * the request's queue was deleted while it ran (``queue_deleted``, or the attempt was
      stopped with :class:`QueueDeleted`): a completed or expired attempt is still acked
      (a no-op on a deleted queue, but the record says what happened); anything else is
      dropped as ``cancelled``, final: there is no queue to requeue into;
    * an attempt the client stopped (its record marked ``stopped``) is acked
      ``cancelled`` once its uploads succeeded;
    * a bad request is dead-lettered;
    * an attempt stopped by the runner itself (shutdown, crash, storage trouble) is
      requeued without counting it;
    * completed and expired attempts are acked, but only once their uploads succeeded;
    * failures count; they are requeued until ``max_attempts``, then acked as failed.
    """
    if queue_deleted or outcome.error == "QueueDeleted":
        if outcome.status in (COMPLETED, EXPIRED) and not upload_error:
            return Decision(ACK, attempts_before, outcome.status, outcome.status)
        return Decision(DROP, attempts_before, CANCELLED,
                        "its queue was deleted: the run was aborted")
    if outcome.error == "ClientStopped" and not upload_error:
        return Decision(ACK, attempts_before, CANCELLED, "stopped by the client")
    if outcome.error in _DEAD_ERRORS:
        return Decision(DEAD, attempts_before, FAILED, f"bad request: {outcome.message}")
    counted = outcome.status == FAILED and outcome.error not in _UNCOUNTED_ERRORS
    attempts = attempts_before + (1 if counted else 0)
    if upload_error:
        return Decision(REQUEUE, attempts, outcome.status, f"uploads failed: {upload_error}")
    if outcome.status in (COMPLETED, EXPIRED):
        return Decision(ACK, attempts, outcome.status, outcome.status)
    if not counted:
        return Decision(REQUEUE, attempts, outcome.status,
                        f"handed back ({outcome.error or outcome.status}): {outcome.message}")
    if attempts >= max_attempts:
        return Decision(ACK, attempts, FAILED, f"failed {attempts} of {max_attempts} attempts")
    return Decision(REQUEUE, attempts, FAILED, f"attempt {attempts} of {max_attempts} failed")
