"""The package's one exception root and its data-carrying subclasses.

The fate of a request (SPEC section 7) is decided from these types in one place,
:mod:`runner.fates`.  Every subclass names the category of trouble, not the module
that raised it, so a storage problem is a ``StorageError`` whether it came from a
download or an upload.
"""
from __future__ import annotations

import errno

_PERMANENT_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS,
                               errno.ENOTDIR, errno.EISDIR, errno.EINVAL})


class RunnerError(Exception):
    """Root of every exception the runner raises on purpose."""


class ConfigError(RunnerError):
    """One or more options are invalid; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class BadRequest(RunnerError):
    """The request can never run: not JSON, missing fields, unknown mode, bad artifacts."""


class StorageError(RunnerError):
    """Storage could not be read or written (transient or not); the attempt is not counted."""


class PermanentStorageError(StorageError):
    """A storage failure that trying again will not fix: the request's fault (a bucket that
    does not exist, access denied, a key the store refuses, a name too long).  The request
    ends failed with the reason (see :mod:`runner.fates`)."""


def storage_error_for(exc: OSError, message: str) -> StorageError:
    """The StorageError for a file-system error ``exc``: permanent when retrying cannot fix
    it (a name too long, access denied, a path that is not a folder), else transient (a
    full disk, an I/O error)."""
    permanent = exc.errno in _PERMANENT_ERRNOS
    return (PermanentStorageError if permanent else StorageError)(message)


class ArchiveError(RunnerError):
    """An archive is hostile or broken (absolute paths, ``..``, outside links, devices)."""


class DiskBudgetExceeded(ArchiveError):
    """Unpacking would write more than the experiment's ``hdd`` budget."""


class EnvironmentBuildError(RunnerError):
    """The interpreter or virtualenv for an experiment could not be prepared.

    Counted as an attempt of the experiment (its requirements are the experiment's own).
    ``log_tail`` holds the last lines of the installer's output ("" when none ran).
    """

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail


class RequirementsUnsatisfiable(EnvironmentBuildError):
    """The installer said the requirements cannot be met: a requirement that does not exist
    (no such package or version, a missing ``file://`` path) or pins that conflict.

    Retrying cannot help: the request ends ``failed`` after this attempt, whatever
    ``--max-attempts`` says (:func:`runner.fates.decide`).
    """


class InterpreterNotFound(EnvironmentBuildError):
    """No local interpreter of the requested ``pythonver`` exists."""


class ResourcesUnavailable(RunnerError):
    """The ledger cannot fit the request now; it goes back to its queue untouched."""


class QueueError(RunnerError):
    """A queue back end failed (broker down, directory unreadable)."""


class DeliveryLost(QueueError):
    """The back end no longer holds this delivery: its connection or channel closed.

    The broker has put the message back (or will); the fetcher keeps the attempt's
    result and settles the redelivered copy when it comes back (see ``runner.fates``).
    """


class ProtocolError(RunnerError):
    """A frame on the internal bus could not be decoded (wrong version, unknown type)."""
