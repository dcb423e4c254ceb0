"""The uploader: mutable artifacts, metadata files and the metadata-store record.

For each ``UploadRequest`` (on a worker thread, one at a time per attempt) it uploads
every mutable artifact whose folder changed since its last upload (a tar compressed by
the key's extension, streamed into the store as it is packed: a multipart upload on S3, a
resumable one on GCS, no temporary copy of the archive; ``output``, ``retval`` and
``_metrics`` holding one file are packed as that file, ``./<name>``, the way the StudioML
client reads them), then each file of the
``_metadata`` folder on its own under the ``_metadata`` key without its archive
extension.  The scraper's first request of an attempt (``record_only``, sent when the
attempt opens) writes the redacted request with the status ``running`` to the metadata
store and uploads nothing.  It is held :data:`RECORD_AFTER` seconds first, and dropped when
the attempt's final request comes within that time: a final request never writes this
"running" record, since the fetcher writes the settled one as soon as the final upload is
done (an attempt shorter than a second costs one record write, not two).  A periodic
request writes the record if it was not written yet.

A metadata file is uploaded again only when it changed since its last upload in this
attempt.  Its ``stat`` (size, mtime, ctime, inode) is compared first: an equal one means
unchanged, without reading the file, unless the file was modified within
:data:`RACY_NS` of that last look (a write in the same timestamp tick could keep the same
``stat``).  A different ``stat`` has the file hashed, and a file whose content hash is the
one uploaded (the scrape document rewritten with the same content) is not uploaded again.
A file seen for the first time in a final request is uploaded without being hashed: there
is no later request to compare it with.

A folder is "unchanged" when its content digest equals the one of its last upload in
this attempt, or the one the cache manager recorded when it unpacked the artifact
(``.runner/downloaded.json``, :func:`runner.metadata.read_downloaded_digests`): an output downloaded from a previous attempt and left
alone is not uploaded again.  A folder that is empty and has no object from before (the
cache manager placed nothing there, nothing was uploaded in this attempt) is not uploaded
either: there is nothing to save, and an empty archive would only cost a pack and a put
per artifact per experiment (no object is made for it).

In a final upload, storage errors are retried with exponential backoff (0.5 s doubling,
at most 15 s apart) for ``--storage-retry`` (default 5 minutes); errors that retrying
cannot fix (access denied) are not retried.  A periodic upload tries once (beyond the
back end's own retries): the next period tries again.  A final request ends with ``AttemptDone`` to the fetcher
(carrying the upload error, if any; the fetcher acks only when there is none) and
removes the working directory unless ``--debug``.

The StudioML client's own database record (:mod:`runner.studio_db`) is updated beside
this, on the record updater's thread so that it never delays an upload or a ``AttemptDone``:
``running`` when the attempt opens, ``time_last_checkpoint`` after each periodic upload,
``finished`` (or ``waiting`` when the request is requeued) after the final one.  A record
the client marked ``stopped`` stops the run (``StopRuns`` to the executor, cause
``client_stopped``).

The metadata files are read from the runner's private folder beside the attempt's working
directory (:func:`runner.metadata.metadata_folder`), and only the attempt's own names
(:func:`runner.metadata.attempt_file_names`) are uploaded: a run cannot add or replace a
metadata file.  A final request that carries the scrape document in memory
(``UploadRequest.scrape_document``: the scraper could not write it, a full disk) has that
text uploaded in place of the file.

An attempt that no longer holds its request (left by a runner that died, marked released
in the attempt files: :func:`runner.attempt_files.is_released`) uploads its own metadata
files only: its request went back to its queue when that runner died, and a newer attempt
may already have written the mutable artifacts, the metadata-store record and the StudioML
record, which this one must never overwrite.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import _fast, attempt_files, fates, metadata, protocol, studio_db
from ..archive import compression_for_key, pack_to_stream, tree_digest
from ..errors import RunnerError, StorageError
from ..requests import SINGLE_FILE_LABELS
from ..storage import PermanentStorageError, artifact_url, open_for_request
from .base import Role

_log = logging.getLogger("runner.uploader")
FIRST_DELAY = 0.5
MAX_DELAY = 15.0
DEFAULT_RETRY_FOR = 300.0
FORGET_FINALIZED_AFTER = 3600.0
#: How long the "running" record of a newly opened attempt waits (see the module doc).
RECORD_AFTER = 1.0
#: A metadata file modified this close to the moment its ``stat`` was taken is "racy":
#: its next request hashes it even when the ``stat`` is unchanged.
RACY_NS = 1_000_000_000


@dataclass
class Sent:
    """What was uploaded of one metadata file of an attempt."""

    signature: tuple  # (size, mtime_ns, ctime_ns, inode) when it was uploaded or last checked
    looked_ns: int  # time.time_ns() when ``signature`` was taken
    digest: str | None  # content hash; None when it was never needed (a final request)

    def stat_is_proof(self, signature: tuple) -> bool:
        """True when ``signature`` alone shows the file unchanged since this upload."""
        return signature == self.signature and signature[1] < self.looked_ns - RACY_NS


def signature_of(st: os.stat_result) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def with_retries(action, what: str, log, retry_for: float = DEFAULT_RETRY_FOR,
                 stopping=lambda: False) -> None:
    """Run ``action()``; retry StorageError with backoff for ``retry_for`` seconds.

    Delays start at 0.5 s and double up to 15 s.  :class:`PermanentStorageError` is
    raised at once; the last error is raised when the time is up or ``stopping()``.
    """
    deadline = time.monotonic() + retry_for
    delay = FIRST_DELAY
    tries = 0
    while True:
        tries += 1
        try:
            action()
            return
        except PermanentStorageError:
            raise
        except StorageError as exc:
            left = deadline - time.monotonic()
            if left <= 0 or stopping():
                raise
            wait = min(delay, left)
            text = f"{what} failed (try {tries}): {exc}; retrying in {wait:.1f}s"
            log(text)
            _log.warning("%s", text)
            time.sleep(wait)
            delay = min(delay * 2, MAX_DELAY)


def is_empty(folder: Path) -> bool:
    """True when ``folder`` has no entries at all."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:
        return False


class Uploader(Role):
    name = "uploader"
    TICK = 2.0  # only forgets old finalized ids; upload threads wake the loop when they post

    def initialize(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max(2, self.config.executors),
                                       thread_name_prefix="upload")
        self.attempt_locks: dict[str, threading.Lock] = {}
        self.uploaded: dict[tuple[str, str], str] = {}  # (attempt id, label) -> digest
        self.sent: dict[tuple[str, str], Sent] = {}  # (attempt id, metadata file name) -> ...
        self.recorded: set[str] = set()
        self.finalized: dict[str, float] = {}  # attempt id -> when its final upload ran
        self.held_records: dict[str, tuple[float, protocol.UploadRequest]] = {}  # -> (due, ...)
        self.in_flight = 0
        self.lock = threading.Lock()
        self.records = studio_db.RecordUpdater(self.record_state, self.client_stopped)

    def record_state(self, attempt_id: str, state: dict) -> None:
        """The StudioML record of ``attempt_id`` changed state: into its scrape document."""
        state = dict(state, updated=metadata.iso_utc(state.get("updated") or time.time()))
        self.post("scraper", protocol.RecordState(attempt_id=attempt_id, state=state))
        if state.get("state") in ("retrying", "gave up"):
            self.runner_log(attempt_id, f"StudioML record {state.get('url')}: {state.get('state')} "
                                    f"({state.get('error')})")

    def client_stopped(self, attempt_id: str) -> None:
        """The client marked the record ``stopped``: stop the run (``ClientStopped``)."""
        self.log.info("attempt=%s: the client stopped the experiment", attempt_id)
        self.runner_log(attempt_id, "the StudioML record says stopped: stopping the run")
        self.post("executor", protocol.StopRuns(reason="the client stopped the experiment",
                                                attempt_ids=[attempt_id], cause="client_stopped"))

    def handle(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.UploadRequest):
            if message.record_only:
                self.records.submit(message.attempt.attempt_id, message.attempt.request,
                                    studio_db.started(message.attempt.request))
                self.held_records[message.attempt.attempt_id] = (time.monotonic() + RECORD_AFTER,
                                                         message)
                self.wake(tick=True)  # the next tick comes when it is due
                return
            self.held_records.pop(message.attempt.attempt_id, None)
            self.submit(message)

    def submit(self, message: protocol.UploadRequest) -> None:
        """Have a worker thread serve ``message`` (in order with the attempt's others)."""
        with self.lock:
            self.in_flight += 1
            attempt_lock = self.attempt_locks.setdefault(message.attempt.attempt_id, threading.Lock())
        self.pool.submit(self.upload, message, attempt_lock)

    def upload(self, request: protocol.UploadRequest, attempt_lock: threading.Lock) -> None:
        attempt = request.attempt
        log = lambda text: self.runner_log(attempt.attempt_id, text)  # noqa: E731
        error, error_kind = "", ""
        released = self.released(attempt)
        try:
            with attempt_lock:
                with self.lock:
                    if attempt.attempt_id in self.finalized:
                        return  # a periodic request that lost the race to the final one
                    if request.final:
                        self.finalized[attempt.attempt_id] = time.monotonic()
                retry_for = self.config.storage_retry if request.final else 0.0
                if attempt.attempt_id not in self.recorded and not request.final and not released:
                    with_retries(lambda: self.write_record(attempt), "metadata record", log, retry_for)
                    self.recorded.add(attempt.attempt_id)
                if not request.record_only:
                    labels = None if request.final else request.labels
                    artifacts_failed: Exception | None = None
                    if released:
                        log("this attempt no longer holds its request (its runner died): "
                            "only its own metadata files are uploaded, never the request's "
                            "mutable artifacts")
                    else:
                        try:
                            self.upload_artifacts(attempt, log, retry_for, request.final, labels)
                        except (RunnerError, OSError) as exc:  # the logs still go up, then
                            artifacts_failed = exc
                    if (labels is None or "_metadata" in labels) and request.metadata:
                        self.upload_metadata_files(attempt, log, retry_for, request.final,
                                                   request.scrape_document)
                    if artifacts_failed is not None:
                        raise artifacts_failed
                    if not request.final and not released:
                        self.records.submit(attempt.attempt_id, attempt.request, studio_db.checkpointed())
            if request.final:
                self.log.info("key=%s attempt=%s final uploads done", attempt.key, attempt.attempt_id)
        except (RunnerError, OSError) as exc:
            error, error_kind = f"{type(exc).__name__}: {exc}", fates.kind_of(exc)
            self.log.error("key=%s attempt=%s upload failed: %s", attempt.key, attempt.attempt_id, error)
        except Exception as exc:  # never lose the AttemptDone of a final request
            error, error_kind = f"{type(exc).__name__}: {exc}", fates.kind_of(exc)
            self.log.exception("key=%s attempt=%s upload crashed", attempt.key, attempt.attempt_id)
        finally:
            with self.lock:
                self.in_flight -= 1
        if request.final:
            outcome = request.outcome or protocol.Outcome(status=fates.FAILED)
            decision = fates.decide(outcome, attempt.attempts, self.config.max_attempts, error,
                                    error_kind)
            if not released:
                self.records.submit(attempt.attempt_id, attempt.request, studio_db.ended(
                    decision.action in (fates.ACK, fates.DEAD, fates.DROP)))
            self.records.forget(attempt.attempt_id)
            self.post("fetcher", protocol.AttemptDone(attempt=attempt, outcome=outcome,
                                                  upload_error=error,
                                                  upload_error_kind=error_kind))
            self.forget(attempt)  # after the AttemptDone: the fetcher need not wait for the removal

    def released(self, attempt: protocol.Attempt) -> bool:
        """True when ``attempt`` no longer holds its request (module doc)."""
        try:
            return attempt_files.is_released(self.config.runtime_dir, attempt.attempt_id)
        except (OSError, ValueError):
            return False

    def write_record(self, attempt: protocol.Attempt) -> None:
        metadata.write_record(attempt.request, status="running", attempt_id=attempt.attempt_id,
                              attempts=attempt.attempts, final=False, hostname=self.config.hostname,
                              override=self.config.metadata_store)

    def seed_digests(self, attempt: protocol.Attempt) -> bool:
        """Take the digests of what the cache manager downloaded as already uploaded.

        False while the cache manager has not finished placing the inputs (then no
        mutable folder may be uploaded: it could overwrite its own source half-read).
        """
        seeds = metadata.read_downloaded_digests(attempt.workdir)
        if seeds is None:
            return False
        with self.lock:
            for label, digest in seeds.items():
                self.uploaded.setdefault((attempt.attempt_id, label), digest)
        return True

    def upload_artifacts(self, attempt: protocol.Attempt, log, retry_for: float = 0.0,
                         final: bool = False, labels=None) -> None:
        """Each mutable artifact that changed (of ``labels`` only, when given).  One that
        cannot be uploaded does not keep the others from their store: the first failure
        is raised once every one was tried."""
        failed: Exception | None = None
        artifacts = attempt.request.get("experiment", {}).get("artifacts") or {}
        if not self.seed_digests(attempt):
            if final:
                log("inputs were never all in place: mutable artifacts left as they are in storage")
            return
        for label, artifact in sorted(artifacts.items()):
            url = artifact_url(artifact)
            folder = Path(attempt.workdir) / label
            if label == "_metadata" or not artifact.get("mutable") or not url or not folder.is_dir():
                continue
            if labels is not None and label not in labels:
                continue  # its own saveFrequency is not due yet
            if (attempt.attempt_id, label) not in self.uploaded and is_empty(folder):
                continue  # nothing to save, and nothing stored before to replace
            digest = tree_digest(folder)
            if self.uploaded.get((attempt.attempt_id, label)) == digest:
                continue
            store = open_for_request(url, attempt.request, artifact)
            compression = compression_for_key(artifact.get("key") or url)
            sizes: list[int] = []

            def upload(store=store, url=url, folder=folder, compression=compression,
                       single_file=label in SINGLE_FILE_LABELS, sizes=sizes) -> None:
                info = store.put_stream(url, lambda out: pack_to_stream(
                    folder, out, compression, single_file=single_file))
                sizes.append(info.size)
            try:
                with_retries(upload, f"upload of {label}", log, retry_for)
            except (RunnerError, OSError) as exc:
                log(f"{label}: upload failed: {type(exc).__name__}: {exc}")
                failed = failed or exc
                continue
            with self.lock:  # forget() may be iterating over it for another attempt
                self.uploaded[(attempt.attempt_id, label)] = digest
            log(f"{label}: uploaded {sizes[-1]} bytes to {url}")
        if failed is not None:
            raise failed

    def upload_metadata_files(self, attempt: protocol.Attempt, log, retry_for: float = 0.0,
                              final: bool = False, scrape_document: str = "") -> None:
        """Each of the attempt's own metadata files that changed since its last upload
        (module doc); ``scrape_document``, when given, in place of the scrape file."""
        prefix = metadata.metadata_prefix_url(attempt.request)
        folder = metadata.metadata_folder(attempt.workdir)
        if prefix is None:
            return
        own = set(metadata.attempt_file_names(attempt.attempt_id))
        scrape_name = metadata.scrape_name(attempt.attempt_id)
        store = None
        if scrape_document:
            artifact = attempt.request["experiment"]["artifacts"]["_metadata"]
            store = open_for_request(prefix, attempt.request, artifact)
            url = f"{prefix}/{scrape_name}"
            data = scrape_document.encode()
            with_retries(lambda: store.put_bytes(url, data), f"upload of {scrape_name}", log,
                         retry_for)
            own.discard(scrape_name)
        try:
            with os.scandir(folder) as scan:
                entries = sorted((e for e in scan if e.name in own), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                looked = time.time_ns()
                signature = signature_of(entry.stat(follow_symlinks=False))
            except OSError:
                continue  # gone since the scan
            key = (attempt.attempt_id, entry.name)
            path = Path(entry.path)
            with self.lock:
                known = self.sent.get(key)
            if known is not None and known.stat_is_proof(signature):
                continue
            digest = None
            if known is not None or not final:
                digest = _fast.content_hash(path)
                if known is not None and digest == known.digest:
                    with self.lock:
                        self.sent[key] = Sent(signature, looked, digest)
                    continue
            if store is None:
                artifact = attempt.request["experiment"]["artifacts"]["_metadata"]
                store = open_for_request(prefix, attempt.request, artifact)
            url = f"{prefix}/{entry.name}"
            with_retries(functools.partial(store.put, url, path), f"upload of {entry.name}", log,
                         retry_for)
            with self.lock:
                self.sent[key] = Sent(signature, looked, digest)

    def forget(self, attempt: protocol.Attempt) -> None:
        """Drop what was kept for a finished attempt; remove its working directory."""
        with self.lock:
            self.attempt_locks.pop(attempt.attempt_id, None)
            self.recorded.discard(attempt.attempt_id)
            for key in [k for k in self.uploaded if k[0] == attempt.attempt_id]:
                del self.uploaded[key]
            for key in [k for k in self.sent if k[0] == attempt.attempt_id]:
                del self.sent[key]
        if not self.config.debug:
            shutil.rmtree(attempt.workdir, ignore_errors=True)
            shutil.rmtree(metadata.runner_folder(attempt.workdir), ignore_errors=True)

    def tick_interval(self) -> float:
        if not self.held_records:
            return self.TICK
        due = min(due for due, _ in self.held_records.values())
        return min(self.TICK, max(0.0, due - time.monotonic()))

    def tick(self) -> None:
        now = time.monotonic()
        for attempt_id, (due, request) in list(self.held_records.items()):
            if due <= now:
                del self.held_records[attempt_id]
                self.submit(request)
        cutoff = now - FORGET_FINALIZED_AFTER
        with self.lock:
            for attempt_id in [j for j, t in self.finalized.items() if t < cutoff]:
                del self.finalized[attempt_id]

    def stats(self) -> dict:
        with self.lock:
            return {"in_flight": self.in_flight,
                    "studio_records_waiting": len(self.records.pending)}

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
        self.records.close(timeout=5.0)
