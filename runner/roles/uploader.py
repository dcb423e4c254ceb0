"""The uploader: mutable artifacts, metadata files and the metadata-store record.

For each ``UploadRequest`` (on a worker thread, one at a time per attempt) it uploads
every mutable artifact whose folder changed since its last upload (a tar compressed by
the key's extension), then each file of the ``_metadata`` folder on its own under the
``_metadata`` key without its archive extension.  The first request of an attempt also
writes the redacted request to the metadata store.  Transient storage errors are retried
with backoff.  A final request ends with ``JobDone`` to the fetcher (carrying the upload
error, if any) and removes the working directory unless ``--debug``.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import _fast, metadata, protocol
from ..archive import compression_for_key, pack
from ..errors import RunnerError, StorageError
from ..storage import artifact_url, open_store
from .base import Role

RETRY_DELAYS = (0.5, 2.0, 5.0)
FORGET_FINALIZED_AFTER = 3600.0


def tree_digest(folder: Path) -> str:
    """Content identity of a folder: paths, modes, sizes and content hashes of its files."""
    parts = []
    for path in sorted(p for p in folder.rglob("*")):
        stat = path.lstat()
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            parts.append(f"L {relative} {path.readlink()}")
        elif path.is_file():
            parts.append(f"F {relative} {stat.st_mode:o} {stat.st_size} "
                         f"{_fast.content_hash(path)}")
        else:
            parts.append(f"D {relative}")
    return _fast.hash_bytes("\n".join(parts).encode("utf-8", "surrogateescape"))


def with_retries(action, what: str, log) -> None:
    """Run ``action()``; retry StorageError with backoff, re-raising the last one."""
    for attempt, delay in enumerate((*RETRY_DELAYS, None), start=1):
        try:
            action()
            return
        except StorageError as exc:
            if delay is None:
                raise
            log(f"{what} failed (try {attempt}): {exc}; retrying in {delay}s")
            time.sleep(delay)


class Uploader(Role):
    name = "uploader"

    def initialize(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max(2, self.config.executors),
                                       thread_name_prefix="upload")
        self.job_locks: dict[str, threading.Lock] = {}
        self.uploaded: dict[tuple[str, str], str] = {}  # (attempt id, name) -> digest
        self.recorded: set[str] = set()
        self.finalized: dict[str, float] = {}  # attempt id -> when its final upload ran
        self.in_flight = 0
        self.lock = threading.Lock()

    def handle(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.UploadRequest):
            with self.lock:
                self.in_flight += 1
                job_lock = self.job_locks.setdefault(message.job.job_id, threading.Lock())
            self.pool.submit(self.upload, message, job_lock)

    def upload(self, request: protocol.UploadRequest, job_lock: threading.Lock) -> None:
        job = request.job
        log = lambda text: self.runner_log(job.job_id, text)  # noqa: E731
        error = ""
        try:
            with job_lock:
                with self.lock:
                    if job.job_id in self.finalized:
                        return  # a periodic request that lost the race to the final one
                    if request.final:
                        self.finalized[job.job_id] = time.monotonic()
                if job.job_id not in self.recorded:
                    with_retries(lambda: self.write_record(job), "metadata record", log)
                    self.recorded.add(job.job_id)
                self.upload_artifacts(job, log)
                self.upload_metadata_files(job, log)
            if request.final:
                self.log.info("key=%s attempt=%s final uploads done", job.key, job.job_id)
        except (RunnerError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            self.log.error("key=%s attempt=%s upload failed: %s", job.key, job.job_id, error)
        except Exception as exc:  # never lose the JobDone of a final request
            error = f"{type(exc).__name__}: {exc}"
            self.log.exception("key=%s attempt=%s upload crashed", job.key, job.job_id)
        finally:
            with self.lock:
                self.in_flight -= 1
        if request.final:
            self.forget(job)
            self.post("fetcher", protocol.JobDone(job=job, outcome=request.outcome,
                                                  upload_error=error))

    def write_record(self, job: protocol.Job) -> None:
        metadata.write_record(job.request, status="running", attempt_id=job.job_id,
                              attempts=job.attempts, final=False, hostname=self.config.hostname,
                              override=self.config.metadata_store)

    def upload_artifacts(self, job: protocol.Job, log) -> None:
        artifacts = job.request.get("experiment", {}).get("artifacts") or {}
        storage_config = job.request.get("config", {}).get("storage")
        for label, artifact in sorted(artifacts.items()):
            url = artifact_url(artifact)
            folder = Path(job.workdir) / label
            if label == "_metadata" or not artifact.get("mutable") or not url or not folder.is_dir():
                continue
            digest = tree_digest(folder)
            if self.uploaded.get((job.job_id, label)) == digest:
                continue
            store = open_store(url, credentials=artifact.get("credentials"),
                               storage_config=storage_config)
            with tempfile.TemporaryDirectory(dir=job.workdir, prefix=".upload-") as tmp:
                archive = Path(tmp) / "archive"
                size = pack(folder, archive, compression_for_key(artifact.get("key") or url))
                with_retries(lambda: store.put(url, archive), f"upload of {label}", log)
            self.uploaded[(job.job_id, label)] = digest
            log(f"{label}: uploaded {size} bytes to {url}")

    def upload_metadata_files(self, job: protocol.Job, log) -> None:
        prefix = metadata.metadata_prefix_url(job.request)
        folder = Path(job.workdir) / "_metadata"
        if prefix is None or not folder.is_dir():
            return
        artifact = job.request["experiment"]["artifacts"]["_metadata"]
        store = open_store(prefix, credentials=artifact.get("credentials"),
                           storage_config=job.request.get("config", {}).get("storage"))
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.name.endswith(".tmp"):
                continue
            digest = _fast.content_hash(path)
            if self.uploaded.get((job.job_id, path.name)) == digest:
                continue
            url = f"{prefix}/{path.name}"
            with_retries(lambda: store.put(url, path), f"upload of {path.name}", log)
            self.uploaded[(job.job_id, path.name)] = digest

    def forget(self, job: protocol.Job) -> None:
        """Drop what was kept for a finished attempt; remove its working directory."""
        with self.lock:
            self.job_locks.pop(job.job_id, None)
            self.recorded.discard(job.job_id)
            for key in [k for k in self.uploaded if k[0] == job.job_id]:
                del self.uploaded[key]
        if not self.config.debug:
            shutil.rmtree(job.workdir, ignore_errors=True)

    def tick(self) -> None:
        cutoff = time.monotonic() - FORGET_FINALIZED_AFTER
        with self.lock:
            for job_id in [j for j, t in self.finalized.items() if t < cutoff]:
                del self.finalized[job_id]

    def stats(self) -> dict:
        with self.lock:
            return {"in_flight": self.in_flight}

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
