"""The fate of a request (SPEC section 7), decided in one place.

:func:`outcome_for_exception` turns whatever ended an attempt early into an
:class:`~runner.protocol.Outcome`; :func:`decide` turns an outcome into what the fetcher
does with the held delivery.  No other module decides between ack, requeue and
dead-letter.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from . import errors
from .protocol import Outcome
from .units import describe_size

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


class ScriptMissing(ExperimentFailed):
    """The request's ``filename`` is not in its workspace: no attempt could ever start it,
    so the request ends ``failed`` at once (not retried)."""


class OutOfMemory(ExperimentFailed):
    """The kernel killed the run for exceeding its memory limit (its ``ram``).

    Counted like any failure of the experiment's own code: the same request would
    need the same memory on any runner.
    """


class DiskLimitExceeded(ExperimentFailed):
    """The run's working directory grew past the request's ``hdd`` while it ran.

    Counted once and not retried: the same code with the same ``hdd`` outgrows it again,
    and a retry would start by downloading the outputs this attempt uploaded, which
    already exceed the budget (:class:`~runner.errors.DiskBudgetExceeded`).
    """


class DiskFull(ExperimentFailed):
    """The file system of the attempt's working directory filled up (the runner could not
    write the attempt's files) while the run's working directory held more than the
    request's ``hdd``, or the request declared none: the experiment filled it.

    Counted once and not retried, like :class:`DiskLimitExceeded`: the same code would fill
    the disk again (see :func:`files_fault`).
    """


class AttemptFilesUnwritable(errors.RunnerError):
    """The runner could not write an attempt's files for a fault of the host: a disk that
    filled up while the run stayed within its ``hdd``, an I/O error, a file system gone
    read-only.  Handed back uncounted, with back-off (see :func:`files_fault`)."""


#: ``StopRuns.cause`` of a run whose files the scraper could no longer write → whether
#: it was for want of space; the executor ends such a run with :func:`files_fault`,
#: measuring the run's working directory when it stops it.
FILES_FAULT_CAUSES = {"disk_full": True, "files_unwritable": False}
#: Errors that mean "no space left" (a full file system, a quota).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def files_fault(detail: str, no_space: bool, used: int, budget: int) -> errors.RunnerError:
    """What ends an attempt whose files could not be written (``detail``: the error, for
    people): :class:`DiskFull` when there was no space left (``no_space``) and the run's
    working directory held ``used`` bytes, more than its ``hdd`` of ``budget`` bytes (or no
    ``hdd`` was declared, ``budget`` 0); else :class:`AttemptFilesUnwritable`, the host's
    fault."""
    if no_space and (budget <= 0 or used > budget):
        within = (f"over the request's hdd of {describe_size(budget)}" if budget > 0
                  else "and the request declares no hdd")
        return DiskFull(f"disk full: {detail}; the run's working directory holds "
                        f"{describe_size(used)}, {within}")
    what = "disk full" if no_space else "cannot write the attempt's files"
    return AttemptFilesUnwritable(
        f"{what}: {detail}; the run's working directory holds {describe_size(used)}, "
        f"within its hdd of {describe_size(budget)}: the host's fault" if budget > 0 else
        f"{what}: {detail}: the host's fault")


class StartRefused(ExperimentFailed):
    """The kernel refused to start the run for a reason the request brings every time
    (``E2BIG``: its arguments and environment are too large): counted once, not retried."""


class QueueDeleted(errors.RunnerError):
    """The request's queue was deleted while the attempt ran: the user's way to abort.

    The run is stopped, its outputs are uploaded, and the request ends ``cancelled``
    (final); there is no delivery left to ack or requeue.
    """


class ClientStopped(errors.RunnerError):
    """The StudioML client marked the experiment's database record ``stopped``
    (``studio stop``): the run is stopped, its outputs are uploaded, and the request is
    acked ``cancelled`` (final)."""


class Cancelled(errors.RunnerError):
    """``runner-ctl cancel`` stopped the attempt (or the request was taken after it): the
    request ends ``cancelled``, is acked and is not retried."""


STOP_CAUSES: dict[str, type[errors.RunnerError]] = {
    "shutdown": ShutdownRequested,
    "queue_deleted": QueueDeleted,
    "client_stopped": ClientStopped,
    "cancelled": Cancelled,
}
"""``StopRuns.cause`` → the exception that ends the stopped attempts."""


def stop_exception(cause: str, reason: str) -> errors.RunnerError:
    """What ends an attempt stopped by ``StopRuns(cause=…)``; unknown causes are shutdowns."""
    return STOP_CAUSES.get(cause, ShutdownRequested)(f"stopped: {reason}")


# Outcome kinds: what ended an attempt, as :attr:`Outcome.kind` carries it on the wire.  The
# fate is decided by kind only, never by an exception's class name (``Outcome.error`` is for
# people), so renaming an exception class cannot change whether a failure is counted.
NONE = ""                         # the run ended by itself (completed, or exit code only)
FAILURE = "failure"               # the experiment's own failure: counted, retried
NOT_RETRIED = "not_retried"       # its own failure that no retry can fix: counted, acked failed
BAD_REQUEST = "bad_request"       # the request can never run: dead-lettered
PERMANENT = "permanent"           # a fault of the request retrying cannot fix: acked failed
STORAGE = "storage"               # storage trouble (transient): handed back uncounted
RESOURCES = "resources"           # did not fit after all: handed back uncounted
SHUTDOWN = "shutdown"             # the runner is stopping: handed back at once
ROLE_CRASHED = "role_crashed"     # a role died holding it: handed back uncounted
LIMIT = "limit"                   # max_duration / experimentLifetime: expired
QUEUE_DELETED = "queue_deleted"   # the user deleted its queue: cancelled, final
CLIENT_STOPPED = "client_stopped"  # the client marked the record stopped: cancelled, final
CANCEL = "cancel"                 # runner-ctl cancel: cancelled, final

_KIND_BY_ERROR: dict[type, str] = {
    errors.BadRequest: BAD_REQUEST,
    errors.PermanentStorageError: PERMANENT,
    errors.StorageError: STORAGE,
    errors.ResourcesUnavailable: RESOURCES,
    errors.RequirementsUnsatisfiable: NOT_RETRIED,
    errors.ArchiveError: NOT_RETRIED,  # hostile or broken archives, inputs over hdd
    ScriptMissing: NOT_RETRIED,
    DiskLimitExceeded: NOT_RETRIED,
    DiskFull: NOT_RETRIED,
    StartRefused: NOT_RETRIED,
    LimitReached: LIMIT,
    ShutdownRequested: SHUTDOWN,
    RoleCrashed: ROLE_CRASHED,
    AttemptFilesUnwritable: STORAGE,
    QueueDeleted: QUEUE_DELETED,
    ClientStopped: CLIENT_STOPPED,
    Cancelled: CANCEL,
}
"""Exception class (or its nearest listed base) → outcome kind; any other is :data:`FAILURE`."""

STATUS_BY_KIND = {
    NONE: FAILED, FAILURE: FAILED, NOT_RETRIED: FAILED, BAD_REQUEST: FAILED, PERMANENT: FAILED,
    STORAGE: CANCELLED, RESOURCES: CANCELLED, SHUTDOWN: CANCELLED, ROLE_CRASHED: CANCELLED,
    LIMIT: EXPIRED, QUEUE_DELETED: CANCELLED, CLIENT_STOPPED: CANCELLED, CANCEL: CANCELLED,
}
"""Outcome kind → the attempt's final ``studioml.status`` when an exception ended it."""

_UNCOUNTED = {STORAGE, RESOURCES, SHUTDOWN, ROLE_CRASHED}
"""The runner's own trouble: never counted against ``--max-attempts``."""
_PREPARATION = {STORAGE, RESOURCES}
"""Faults met while preparing: an attempt that never started leaves no metadata files."""


def kind_of(exc: BaseException) -> str:
    """The outcome kind of an attempt (or an upload) ended by ``exc``."""
    for cls in type(exc).__mro__:
        if cls in _KIND_BY_ERROR:
            return _KIND_BY_ERROR[cls]
    return FAILURE


FIRST_BACKOFF = 2.0
MAX_BACKOFF = 300.0


def backoff_delay(requeues: int, rng=None) -> float:
    """Seconds to hold a request before its ``requeues``-th hand-back is retried (>= 1).

    Exponential from :data:`FIRST_BACKOFF`, doubling up to :data:`MAX_BACKOFF`, jittered
    down to half (``rng``: a :class:`random.Random`, for tests)."""
    import random

    ceiling = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** min(max(requeues, 1) - 1, 30))
    return ceiling * (0.5 + 0.5 * (rng or random).random())


def leaves_no_trail(outcome: Outcome, started: bool) -> bool:
    """True when an attempt ended by ``outcome`` adds no metadata files to storage: it was
    handed back for a storage or resource fault met while preparing, before any run
    (``started`` False).  Retries of a request that cannot start leave nothing behind."""
    return not started and outcome.kind in _PREPARATION


def outcome_for_exception(exc: BaseException, exit_code: int | None = None) -> Outcome:
    """The outcome of an attempt ended by ``exc``: its kind (:func:`kind_of`), the status
    that kind gives, and the class name and message for people."""
    kind = kind_of(exc)
    return Outcome(status=STATUS_BY_KIND[kind], error=type(exc).__name__, message=str(exc),
                   exit_code=exit_code, kind=kind)


@dataclass(frozen=True)
class Decision:
    """What to do with the delivery, and the request's attempt count afterwards.

    ``backoff``: a requeue for the host's fault, which the fetcher holds for
    :func:`backoff_delay` before the request is tried again.
    """

    action: str        # ack, requeue, dead or drop
    attempts: int      # attempts of the experiment's code made so far, this one included
    final_status: str  # completed/failed/expired when acked; the attempt's status otherwise
    reason: str
    backoff: bool = False


def decide(outcome: Outcome, attempts_before: int, max_attempts: int,
           upload_error: str = "", upload_error_kind: str = "", queue_deleted: bool = False,
           requeues_before: int = 0, max_requeues: int = 0,
           cancelled: bool = False) -> Decision:
    """The fate of a request whose attempt ended with ``outcome`` (decided by its ``kind``
    and ``status``; ``upload_error`` is the uploads' failure for people, ``upload_error_kind``
    its outcome kind).

    * ``runner-ctl cancel`` reached the attempt (``cancelled``, or it was stopped with
      :class:`Cancelled`): acked, never retried; ``cancelled`` unless it had already
      completed or expired (then that status stays);
    * the request's queue was deleted while it ran (``queue_deleted``, or the attempt was
      stopped with :class:`QueueDeleted`): a completed or expired attempt is still acked
      (a no-op on a deleted queue, but the record says what happened); anything else is
      dropped as ``cancelled``, final: there is no queue to requeue into;
    * an attempt the client stopped (its record marked ``stopped``) is acked
      ``cancelled`` once its uploads succeeded;
    * a bad request is dead-lettered;
    * a fault of the request that retrying cannot fix (``PermanentStorageError``: a bucket
      that does not exist, access denied, a key the store refuses, a name too long), in
      the attempt or in its uploads, acks it as failed with the reason, not retried;
    * an attempt stopped by the runner itself (shutdown, crash, storage trouble) is
      requeued without counting it, with a back-off (``backoff``) except for a shutdown;
      after ``max_requeues`` such hand-backs (``requeues_before`` made; 0: no bound) the
      request ends failed;
    * completed and expired attempts are acked, but only once their uploads succeeded;
    * failures count; they are requeued until ``max_attempts``, then acked as failed;
      a failure no retry can fix (requirements that cannot be met, a script missing from
      the workspace, a hostile or broken archive, inputs or a run larger than its
      ``hdd``, a run the kernel refuses to start) is acked as failed at once.
    """
    if cancelled or outcome.kind == CANCEL:
        if outcome.status in (COMPLETED, EXPIRED) and not upload_error:
            return Decision(ACK, attempts_before, outcome.status, outcome.status)
        return Decision(ACK, attempts_before, CANCELLED, "cancelled by runner-ctl cancel")
    if queue_deleted or outcome.kind == QUEUE_DELETED:
        if outcome.status in (COMPLETED, EXPIRED) and not upload_error:
            return Decision(ACK, attempts_before, outcome.status, outcome.status)
        return Decision(DROP, attempts_before, CANCELLED,
                        "its queue was deleted: the run was aborted")
    if outcome.kind == CLIENT_STOPPED and not upload_error:
        return Decision(ACK, attempts_before, CANCELLED, "stopped by the client")
    if outcome.kind == BAD_REQUEST:
        return Decision(DEAD, attempts_before, FAILED, f"bad request: {outcome.message}")
    if outcome.kind == PERMANENT:
        return Decision(ACK, attempts_before, FAILED,
                        f"failed, retrying cannot fix it: {outcome.message}")
    if upload_error and upload_error_kind == PERMANENT:
        return Decision(ACK, attempts_before, FAILED,
                        f"uploads failed, retrying cannot fix it: {upload_error}")
    counted = outcome.status == FAILED and outcome.kind not in _UNCOUNTED
    attempts = attempts_before + (1 if counted else 0)
    handed_back = bool(upload_error) or (outcome.status not in (COMPLETED, EXPIRED)
                                         and not counted)
    if handed_back and max_requeues and requeues_before + 1 > max_requeues:
        why = f"uploads failed: {upload_error}" if upload_error else \
            f"{outcome.error or outcome.status}: {outcome.message}"
        return Decision(ACK, attempts, FAILED,
                        f"handed back {requeues_before} times (--max-requeues "
                        f"{max_requeues}); last: {why}")
    backoff = outcome.kind != SHUTDOWN
    if upload_error:
        return Decision(REQUEUE, attempts, outcome.status, f"uploads failed: {upload_error}",
                        backoff=backoff)
    if outcome.status in (COMPLETED, EXPIRED):
        return Decision(ACK, attempts, outcome.status, outcome.status)
    if not counted:
        return Decision(REQUEUE, attempts, outcome.status,
                        f"handed back ({outcome.error or outcome.status}): {outcome.message}",
                        backoff=backoff)
    if outcome.kind == NOT_RETRIED:
        return Decision(ACK, attempts, FAILED, f"failed, not retried ({outcome.error}: "
                                               f"no retry can fix it)")
    if attempts >= max_attempts:
        return Decision(ACK, attempts, FAILED, f"failed {attempts} of {max_attempts} attempts")
    return Decision(REQUEUE, attempts, FAILED, f"attempt {attempts} of {max_attempts} failed")
