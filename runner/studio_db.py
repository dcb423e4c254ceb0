"""The StudioML client's database record of an experiment (SPEC section 11).

The client (``studio run``, its CompletionService) keeps one JSON record per experiment
at ``experiments/<key>`` in the database its request names in ``config.database``, and
learns from it alone whether the experiment waits, runs or has finished.  The reference
worker updates it in place, read-modify-write, keeping every field it does not own:

============================  ======================================================
when                          fields written
============================  ======================================================
the attempt starts            ``status: "running"``, ``time_started`` (unix seconds)
every save period             ``time_last_checkpoint``
the request's fate is final   ``status: "finished"``, ``time_finished`` (whatever the
                              outcome: the reference worker marks failed, expired and
                              stopped runs ``finished`` too)
the attempt is requeued       ``status: "waiting"`` (``time_started`` is kept)
the request is stale on       ``status: "finished"``, ``time_finished`` (the fetcher acks
arrival                       it ``expired`` without running it)
============================  ======================================================

An ``output`` artifact the runner added to a CompletionService request
(:func:`add_output_artifact`) is added to the record's ``artifacts`` when the attempt
starts (an artifact the record has is never replaced), so that the client can read the
output of a task that failed.

A record the client marked ``status: "stopped"`` (``studio stop``) is never written
back as running: :class:`RecordUpdater` reports it so that the run is stopped.  A request
whose database has no record (one not made by the client) is left alone: the runner
never creates a record.

Database types (``config.database.type``): ``s3`` (``bucket``, ``endpoint``,
``credentials: {"aws": {...}}`` as in ``config.storage``), ``gs``/``gcloud``
(``bucket``; credentials as for ``gs://`` artifacts), and ``local`` (``endpoint`` a
folder, ``bucket`` a folder inside it: for a client and runner sharing a file system).
``bucket`` defaults to ``studioml-meta`` as in the client.  Type ``studioml-runner``
(:data:`NO_DATABASE`, what ``runner-submit`` writes) says there is no StudioML database:
the runner's own metadata store is the only record, so nothing is written and nothing is
reported.

:class:`RecordUpdater` does the writes on a thread of its own, so that a database that
cannot be reached never fails or blocks a run: updates for one experiment are merged
while they wait, retried with back-off (1 s doubling to 60 s) for ``retry_for`` seconds,
and each change of state (``ok``, ``retrying``, ``gave up``, ``no record``) is reported
to a callback, which shows it in the scrape document's ``runner.studio_record``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import BadRequest, RunnerError
from .storage import ObjectMissing, open_store, request_env

log = logging.getLogger(__name__)

DEFAULT_BUCKET = "studioml-meta"
RUNNING, FINISHED, WAITING, STOPPED = "running", "finished", "waiting", "stopped"
FIRST_DELAY = 1.0
MAX_DELAY = 60.0
DEFAULT_RETRY_FOR = 3600.0


NO_DATABASE = "studioml-runner"
"""``config.database.type`` of a request with no StudioML database record to keep (one
made by ``runner-submit``: the runner's metadata store is its record)."""


class NoDatabase(RunnerError):
    """``config.database`` names no database this runner can reach (a type it lacks)."""


@dataclass(frozen=True)
class RecordLocation:
    """Where one experiment's record lives: its URL and how to open the store."""

    url: str
    storage_config: dict | None
    credentials: dict | None
    env: dict

    def store(self):
        return open_store(self.url, credentials=self.credentials,
                          storage_config=self.storage_config, env=self.env)


def locate(request: dict) -> RecordLocation | None:
    """The record of ``request``'s experiment, or None when it names no database (none at
    all, or type :data:`NO_DATABASE`).

    Raises :class:`NoDatabase` for a database type this runner cannot write.
    """
    config = request.get("config") if isinstance(request, dict) else None
    database = (config or {}).get("database") if isinstance(config, dict) else None
    key = (request.get("experiment") or {}).get("key")
    if not isinstance(database, dict) or not database or not key:
        return None
    kind = str(database.get("type") or "").lower()
    if kind == NO_DATABASE:
        return None
    bucket = str(database.get("bucket") or DEFAULT_BUCKET).strip("/")
    credentials = database.get("credentials")
    credentials = credentials if isinstance(credentials, dict) else None
    name = f"experiments/{key}"
    if kind == "s3":
        return RecordLocation(f"s3://{bucket}/{name}", database, credentials,
                              request_env(request))
    if kind in ("gs", "gcloud", "gcs"):
        return RecordLocation(f"gs://{bucket}/{name}", None, credentials, request_env(request))
    if kind == "local":
        root = os.path.realpath(os.path.expanduser(str(database.get("endpoint") or "~")))
        return RecordLocation(Path(root, bucket, name).as_uri(), None, None, {})
    raise NoDatabase(f"config.database type {database.get('type')!r} is not supported "
                     "(s3, gs, gcloud, local)")


def add_output_artifact(request: dict) -> dict | None:
    """Give a request without an ``output`` artifact one beside its other mutable outputs.

    CompletionService requests carry only ``retval`` (with ``clientscript``, ``args`` and
    ``workspace``): without an ``output`` a failed task would leave the client nothing to
    read.  The new artifact copies a mutable artifact whose key ends in ``/<label>.tar``
    (its bucket and credentials), with ``output`` for the label.  Returns the artifact
    added (the request is changed in place), or None when the request has an ``output``
    or no such sibling.
    """
    experiment = request.get("experiment") if isinstance(request, dict) else None
    artifacts = experiment.get("artifacts") if isinstance(experiment, dict) else None
    if not isinstance(artifacts, dict) or "output" in artifacts:
        return None
    for label, artifact in sorted(artifacts.items()):
        if not (isinstance(artifact, dict) and artifact.get("mutable")):
            continue
        key = str(artifact.get("key") or "")
        suffix = f"/{label}.tar"
        if not key.endswith(suffix):
            continue
        added = {k: v for k, v in artifact.items() if k not in ("local", "hash", "url")}
        added["key"] = key[: -len(suffix)] + "/output.tar"
        qualified = artifact.get("qualified")
        if isinstance(qualified, str) and qualified.endswith(key):
            added["qualified"] = qualified[: -len(key)] + added["key"]
        else:
            added.pop("qualified", None)
        added.update(mutable=True, unpack=True)
        artifacts["output"] = added
        return added
    return None


def read_record(location: RecordLocation, store=None) -> dict | None:
    """The record as stored, or None when there is none (one GET; ``store``: an open store
    for ``location.url`` to use, else one is opened and closed here).

    Raises :class:`~runner.errors.StorageError` when the store cannot be read and
    :class:`ValueError` when the object is not a JSON object.
    """
    own = store is None
    store = location.store() if own else store
    try:
        with tempfile.TemporaryDirectory(prefix="studio-record-") as tmp:
            path = Path(tmp) / "record.json"
            try:
                store.get(location.url, path)
            except ObjectMissing:
                return None
            record = json.loads(path.read_bytes())
    finally:
        if own:
            store.close()
    if not isinstance(record, dict):
        raise ValueError(f"{location.url} is not a JSON object")
    return record


def update_record(location: RecordLocation, changes: dict) -> dict | None:
    """Apply ``changes`` to the stored record (read-modify-write, other fields kept).

    A ``status`` change is not applied over ``stopped`` unless it is ``finished`` (the
    client's stop stands until the run has ended).  Returns the record as written, or
    None when there is no record (nothing is written then).  Raises what
    :func:`read_record` raises, and :class:`~runner.errors.StorageError` on a failed write.
    """
    store = location.store()
    try:
        return _update(location, store, changes)
    finally:
        store.close()


def _update(location: RecordLocation, store, changes: dict) -> dict | None:
    record = read_record(location, store)
    if record is None:
        return None
    changes = dict(changes)
    if record.get("status") == STOPPED and changes.get("status") not in (None, FINISHED):
        changes.pop("status")
    added = changes.pop("artifacts", None) or {}
    if added:
        artifacts = record.setdefault("artifacts", {})
        if isinstance(artifacts, dict):
            for label, artifact in added.items():
                artifacts.setdefault(label, artifact)
    record.update(changes)
    store.put_bytes(location.url, json.dumps(record).encode())
    return record


def started(request: dict, now: float | None = None) -> dict:
    """The changes when an attempt starts; the request's ``output`` artifact is added to a
    record that has none (see :func:`add_output_artifact`)."""
    changes = {"status": RUNNING, "time_started": time.time() if now is None else now}
    output = ((request.get("experiment") or {}).get("artifacts") or {}).get("output")
    if isinstance(output, dict) and output.get("key"):
        changes["artifacts"] = {"output": output}
    return changes


def checkpointed(now: float | None = None) -> dict:
    return {"time_last_checkpoint": time.time() if now is None else now}


def ended(final: bool, now: float | None = None) -> dict:
    """The changes at the end of an attempt: ``finished`` when the request's fate is
    final, back to ``waiting`` when it is requeued."""
    now = time.time() if now is None else now
    if final:
        return {"status": FINISHED, "time_finished": now, "time_last_checkpoint": now}
    return {"status": WAITING, "time_last_checkpoint": now}


@dataclass
class _Pending:
    location: RecordLocation
    changes: dict
    due: float
    delay: float = FIRST_DELAY
    first_failure: float | None = None
    tries: int = 0
    state: str = ""
    last: float = field(default_factory=time.monotonic)


class RecordUpdater:
    """Writes record changes on its own thread (module doc).

    ``on_state(attempt_id, state)`` gets ``{"state", "url", "status", "error", "updated"}``
    whenever the state of an attempt's record changes; ``on_stopped(attempt_id)`` is called (once
    per attempt) when the record says the client stopped the experiment.  Both are called on
    the updater's thread.
    """

    def __init__(self, on_state: Callable[[str, dict], None],
                 on_stopped: Callable[[str], None], retry_for: float = DEFAULT_RETRY_FOR):
        self.on_state = on_state
        self.on_stopped = on_stopped
        self.retry_for = retry_for
        self.pending: dict[str, _Pending] = {}
        self.stopped_reported: set[str] = set()
        self.condition = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="studio-record", daemon=True)
        self.thread.start()

    def submit(self, attempt_id: str, request: dict, changes: dict) -> bool:
        """Queue ``changes`` for the record of ``request`` (merged with any waiting ones).

        False when the request names no database (or one this runner cannot write: that
        is reported through ``on_state``).
        """
        try:
            location = locate(request)
        except (NoDatabase, BadRequest) as exc:
            self._report(attempt_id, {"state": "unsupported", "error": str(exc)})
            return False
        if location is None:
            return False
        with self.condition:
            waiting = self.pending.get(attempt_id)
            if waiting is None:
                self.pending[attempt_id] = _Pending(location, dict(changes), time.monotonic())
            else:
                waiting.changes.update(changes)
            self.condition.notify()
        return True

    def forget(self, attempt_id: str) -> None:
        """Drop what is kept for ``attempt_id`` once nothing of it is waiting."""
        with self.condition:
            if attempt_id not in self.pending:
                self.stopped_reported.discard(attempt_id)

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every waiting update to be written or given
        up; True when none is left."""
        deadline = time.monotonic() + timeout
        with self.condition:
            while self.pending and time.monotonic() < deadline:
                self.condition.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            return not self.pending

    def close(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        with self.condition:
            self.closed = True
            self.condition.notify_all()
        self.thread.join(timeout)

    def _report(self, attempt_id: str, state: dict) -> None:
        try:
            self.on_state(attempt_id, dict(state, updated=time.time()))
        except Exception:  # a callback must never end the updater
            log.exception("studio record state callback failed")

    def _next(self) -> tuple[str, _Pending, dict] | None:
        with self.condition:
            while not self.closed:
                now = time.monotonic()
                due = [(p.due, attempt_id) for attempt_id, p in self.pending.items()]
                if due:
                    when, attempt_id = min(due)
                    if when <= now:
                        entry = self.pending[attempt_id]
                        changes, entry.changes = entry.changes, {}
                        return attempt_id, entry, changes
                    self.condition.wait(when - now)
                else:
                    self.condition.wait(1.0)
            return None

    def _run(self) -> None:
        while True:
            taken = self._next()
            if taken is None:
                return
            attempt_id, entry, changes = taken
            self._write(attempt_id, entry, changes)

    def _write(self, attempt_id: str, entry: _Pending, changes: dict) -> None:
        url = entry.location.url
        entry.tries += 1
        try:
            record = update_record(entry.location, changes)
        except Exception as exc:  # the thread must outlive any one record
            if not isinstance(exc, (RunnerError, ValueError, OSError)):
                log.exception("studio record %s: unexpected error", url)
            now = time.monotonic()
            entry.first_failure = entry.first_failure or now
            with self.condition:
                entry.changes = {**changes, **entry.changes}  # newer changes win
                if now - entry.first_failure >= self.retry_for:
                    del self.pending[attempt_id]
                    self.condition.notify_all()
                    state = "gave up"
                else:
                    entry.due = now + entry.delay
                    entry.delay = min(entry.delay * 2, MAX_DELAY)
                    state = "retrying"
            log.warning("studio record %s: %s (try %d, %s)", url, exc, entry.tries, state)
            self._report(attempt_id, {"state": state, "url": url, "error": str(exc),
                                  "tries": entry.tries})
            return
        with self.condition:
            if not entry.changes:
                del self.pending[attempt_id]
            else:
                entry.due = time.monotonic()
            entry.first_failure, entry.delay = None, FIRST_DELAY
            self.condition.notify_all()
        if record is None:
            log.info("studio record %s does not exist: left alone", url)
            self._report(attempt_id, {"state": "no record", "url": url})
            return
        self._report(attempt_id, {"state": "ok", "url": url, "status": record.get("status"),
                              "tries": entry.tries})
        if record.get("status") == STOPPED and attempt_id not in self.stopped_reported:
            self.stopped_reported.add(attempt_id)
            self.on_stopped(attempt_id)
