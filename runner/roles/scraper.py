"""The stdout scraper: output log, runner log and the merged scrape document.

Per attempt it writes, under ``<workdir>/_metadata/``, the three files of SPEC section 6
(``output-host-<id>.log``, ``runner-host-<id>.log`` starting with the redacted request,
``scrape-host-<id>.json``), the ``output`` artifact (``<workdir>/output/output``) and, at
each save, a line of host figures in ``<workdir>/_metrics/_metrics`` (the reference
worker's format).  The state of the StudioML record (``RecordState`` from the uploader)
is kept in the document as ``runner.studio_record``.
Every byte is masked for secrets before it is written.  JSON object lines are merged into
the scrape document by the compiled hot path; JSON-patch lines are applied with the
add-only rule under ``/studioml``.  When an attempt opens it asks the uploader for the
metadata-store record only; every ``save_frequency`` seconds from then on, and once at the
end with the final ``studioml.status``, it saves the files and asks the uploader to upload
(an experiment shorter than one save period is uploaded once, at its end).  A mutable
artifact with its own ``saveFrequency`` (``Job.artifact_save_frequency``; ``_metadata``
for the metadata files) is uploaded on its own period instead: each periodic request names
the labels that are due.
Every JSON object line is also appended, with its time and attempt, to the metric history
``_metadata/metrics-host-<id>.jsonl`` (:mod:`runner.history`), uploaded with the other
metadata files.

A restarted scraper finds its attempts again in the attempt registry
(:mod:`runner.registry`): the first message about an attempt it does not hold reopens it
from its last save (the scrape document on disk, the logs cut back to their size at that
save).  Output chunks carry their offset in the run's output, so output that went down
with the old process shows as a gap: it is marked in the output log, counted in
``runner.output_lost``, and an attempt that lost output is never ``completed`` (it ends
``cancelled``, handed back uncounted).  An attempt already closed is not closed twice.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .. import _fast, fates, history, metadata, protocol, registry, strict_json
from ..jsonpatch import PatchRejected, apply_patch, parse_patch
from ..output import scrape_view
from ..redact import Masker, redact_request, secrets_of
from .base import Role
from .cache_manager import DOWNLOADED_DIGESTS


@dataclass
class Attempt:
    """What the scraper keeps for one attempt in progress."""

    job: protocol.Job
    document: dict
    masker: Masker
    output_log: BinaryIO
    output_artifact: BinaryIO | None  # opened at the first output, after inputs are placed
    runner_log: BinaryIO
    scrape_path: Path
    next_save: float  # monotonic time the artifacts without their own period are due
    history: BinaryIO | None = None  # metrics-host-<id>.jsonl, opened at the first JSON line
    next_saves: dict = field(default_factory=dict)  # label -> when its own period is due
    json_lines: int = 0
    output_bytes: int = 0
    last_metric: str = ""
    received: int = 0  # bytes of the run's output scraped so far (OutputChunk.offset)
    lost: int = 0  # bytes of the run's output that never reached this scraper


def disk_use(path: str) -> int:
    """Bytes of regular files under ``path``."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def last_json_line(data: bytes, look_back: int = 64, width: int = 200) -> str:
    """The last line of ``data`` that looks like a JSON object (for ``runner-ctl``), cut to
    ``width`` characters; "" when none of the last ``look_back`` lines is one."""
    end = len(data)
    for _ in range(look_back):
        if end <= 0:
            break
        start = data.rfind(b"\n", 0, end - 1) + 1
        line = data[start:end].strip()
        if line.startswith(b"{") and line.endswith(b"}"):
            return line[:width * 4].decode("utf-8", "replace")[:width]
        end = start
    return ""


TAIL_BYTES = 4096


def host_metrics_line(now: float | None = None) -> str:
    """``time: <unix s> CPU: <percent> mem: <bytes used>``, the reference worker's
    ``_metrics`` line (CPU from the 1-minute load average over the host's CPUs, memory
    from ``/proc/meminfo``: total less available)."""
    now = time.time() if now is None else now
    try:
        cpu = round(100.0 * os.getloadavg()[0] / (os.cpu_count() or 1), 1)
    except OSError:
        cpu = 0.0
    used = 0
    try:
        fields = {}
        with open("/proc/meminfo") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
        used = fields.get("MemTotal", 0) - fields.get("MemAvailable", 0)
    except (OSError, ValueError, IndexError):
        pass
    return f"time: {now} CPU: {cpu} mem: {used} "


def output_tail(path: str, size: int = TAIL_BYTES) -> str:
    """The last ``size`` bytes of an (already masked) output log, from a line start."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            length = handle.tell()
            handle.seek(max(0, length - size))
            data = handle.read(size)
    except OSError:
        return ""
    if length > size and b"\n" in data:
        data = data[data.index(b"\n") + 1:]
    return data.decode("utf-8", "replace")


def due_labels(attempt: Attempt, now: float) -> tuple | None:
    """The labels whose periodic upload is due at ``now`` (monotonic), their next times
    moved on; None when none is (and the common period is not due either: an empty tuple
    still asks for the metadata-store record)."""
    job = attempt.job
    own = job.artifact_save_frequency or {}
    due: set[str] = set()
    common = now >= attempt.next_save
    if common:
        attempt.next_save = now + job.save_frequency
        artifacts = job.request.get("experiment", {}).get("artifacts") or {}
        due.update(label for label, artifact in artifacts.items()
                   if isinstance(artifact, dict) and label not in own
                   and (artifact.get("mutable") or label == "_metadata"))
    for label, at in attempt.next_saves.items():
        if now >= at:
            attempt.next_saves[label] = now + own[label]
            due.add(label)
    return tuple(sorted(due)) if common or due else None


class Scraper(Role):
    name = "scraper"
    TICK = 0.25  # periodic saves only (every saveWorkspaceFrequency, at least 1 s apart)

    def tick_interval(self) -> float:
        return self.TICK if self.attempts else self.IDLE_TICK

    def initialize(self) -> None:
        self.attempts: dict[str, Attempt] = {}

    def handle(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.OutputChunk):
            attempt = self.attempt_of(message.job_id)
            if attempt is not None:
                self.scrape(attempt, message.data, message.scrape, message.offset)
        elif isinstance(message, protocol.RunnerLog):
            attempt = self.attempt_of(message.job_id)
            if attempt is not None:
                self.write_runner_log(attempt, message.text)
        elif isinstance(message, protocol.RecordState):
            attempt = self.attempts.get(message.job_id)
            if attempt is not None:
                attempt.document["runner"]["studio_record"] = message.state
        elif isinstance(message, protocol.AttemptOpened):
            self.open(message.job)
        elif isinstance(message, protocol.AttemptEnded):
            self.close(message)

    def attempt_of(self, job_id: str, job: protocol.Job | None = None) -> Attempt | None:
        """The attempt ``job_id``, reopened from the registry when this process does not
        hold it (a restarted scraper); None when it is unknown, already closed, or was
        opened before and its working directory is gone (uploaded and removed)."""
        attempt = self.attempts.get(job_id)
        if attempt is not None:
            return attempt
        runtime = self.config.runtime_dir
        if registry.read(runtime, job_id, "ended") is not None:
            return None
        job = job or registry.read_job(runtime, job_id)
        if job is None:
            return None
        if not Path(job.workdir).is_dir() and registry.read(runtime, job_id, "job"):
            return None
        return self.open(job)

    def open(self, job: protocol.Job) -> Attempt:
        if job.job_id in self.attempts:
            return self.attempts[job.job_id]
        folder = Path(job.workdir) / "_metadata"
        runtime = self.config.runtime_dir
        saved = registry.read(runtime, job.job_id, "scraped")
        scrape_path = folder / metadata.scrape_name(job.job_id)
        document = None
        if saved is not None or scrape_path.exists():
            document = self.restore(job.job_id, folder, scrape_path, saved or {})
        folder.mkdir(parents=True, exist_ok=True)
        (Path(job.workdir) / "output").mkdir(parents=True, exist_ok=True)
        attempt = Attempt(
            job=job,
            document=document or metadata.new_scrape_document(job, self.config.hostname),
            masker=Masker(secrets_of(job.request)),
            output_log=open(folder / metadata.output_name(job.job_id), "ab"),
            output_artifact=None,
            history=None,
            runner_log=open(folder / metadata.runner_log_name(job.job_id), "ab"),
            scrape_path=scrape_path,
            next_save=time.monotonic() + job.save_frequency,
            next_saves={label: time.monotonic() + seconds
                        for label, seconds in (job.artifact_save_frequency or {}).items()},
            received=int(saved.get("offset") or 0) if saved else 0,
            lost=int(saved.get("lost") or 0) if saved else 0,
            output_bytes=int(saved.get("output_bytes") or 0) if saved else 0,
        )
        if saved is not None and saved.get("artifact") is not None:
            attempt.output_artifact = open(Path(job.workdir) / "output" / "output", "ab")
        if saved is not None and saved.get("history") is not None:
            attempt.history = open(folder / metadata.metrics_name(job.job_id), "ab")
        self.attempts[job.job_id] = attempt
        self.wake(tick=True)  # from now on tick every TICK (periodic saves), not IDLE_TICK
        if document is not None:
            self.write_runner_log(attempt, "scraper restarted: attempt reopened from its "
                                           "last save")
            return attempt
        registry.write_job(runtime, job)
        request_text = strict_json.dumps(redact_request(job.request), indent=1, sort_keys=True)
        attempt.runner_log.write(b"request (credentials redacted):\n")
        attempt.runner_log.write(attempt.masker.mask(request_text.encode()) + b"\n")
        self.write_runner_log(attempt, f"attempt {job.job_id} ({job.attempts + 1}) on "
                                       f"{self.config.hostname} from queue {job.queue}")
        # The metadata files are first saved and uploaded one save period from now (or at
        # the end); only the metadata-store record is written at once.
        self.post("uploader", protocol.UploadRequest(job=job, final=False, record_only=True))
        return attempt

    def restore(self, job_id: str, folder: Path, scrape_path: Path, saved: dict
                ) -> dict | None:
        """The scrape document of an attempt a previous scraper process held, with its
        files cut back to their sizes at that process's last save (``saved``)."""
        sizes = {folder / metadata.output_name(job_id): saved.get("output_log"),
                 folder / metadata.runner_log_name(job_id): saved.get("runner_log"),
                 folder.parent / "output" / "output": saved.get("artifact"),
                 folder / metadata.metrics_name(job_id): saved.get("history")}
        for path, size in sizes.items():
            if isinstance(size, int):
                try:
                    os.truncate(path, size)
                except OSError:
                    pass
        try:
            document = json.loads(scrape_path.read_text())
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) and "runner" in document else None

    def write_runner_log(self, attempt: Attempt, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        line = f"{stamp}Z {text}\n".encode("utf-8", "replace")
        attempt.runner_log.write(attempt.masker.mask(line))

    def scrape(self, attempt: Attempt, data: bytes, scrape: bool = True,
               offset: int = protocol.RUNNER_NOTE) -> None:
        """Mask and log one chunk of whole output segments starting at ``offset`` in the
        run's output (:data:`~runner.protocol.RUNNER_NOTE`: a line of the runner's); unless
        it is a piece of an overlong line (``scrape`` False), merge its JSON lines (``\\r``
        ends a line too)."""
        if offset >= 0:
            if offset > attempt.received:
                self.output_lost(attempt, offset - attempt.received)
            elif offset < attempt.received:  # already scraped (sent again): skip that part
                data = data[attempt.received - offset:]
                offset = attempt.received
            attempt.received = offset + len(data)
            if not data:
                return
        if not attempt.output_bytes and data:
            # When the scraper saw the run's first output (publish-to-start benchmarks).
            attempt.document["runner"]["first_output"] = metadata.iso_utc(time.time())
        data = attempt.masker.mask(data)
        attempt.output_log.write(data)
        if attempt.output_artifact is None:
            # Opened only now: the cache manager may have unpacked an earlier attempt's
            # ``output`` artifact into the folder, and this attempt's output goes after it.
            attempt.output_artifact = open(Path(attempt.job.workdir) / "output" / "output", "ab")
        attempt.output_artifact.write(data)
        attempt.output_bytes += len(data)
        if not scrape:
            return
        data = scrape_view(data)
        metric = last_json_line(data)
        if metric:
            attempt.last_metric = metric
        self.record_history(attempt, data)
        for line in _fast.merge_lines(attempt.document, data):
            operations = parse_patch(line)
            if operations is None:
                continue
            try:
                apply_patch(attempt.document, operations)
            except PatchRejected as exc:
                self.write_runner_log(attempt, f"JSON patch refused: {exc}")

    def record_history(self, attempt: Attempt, data: bytes) -> None:
        """Append the JSON object lines of ``data`` (already masked) to the metric history."""
        objects = history.json_object_lines(data)
        if not objects:
            return
        if attempt.history is None:  # opened at the first line: no file without a line
            attempt.history = open(attempt.scrape_path.parent
                                   / metadata.metrics_name(attempt.job.job_id), "ab")
        attempt.history.write(history.history_lines(
            objects, time=time.time(), attempt=attempt.job.job_id,
            attempt_number=attempt.job.attempts + 1))

    def output_lost(self, attempt: Attempt, size: int) -> None:
        """``size`` bytes of the run's output never arrived (they went down with a
        previous scraper process): say so where they belonged."""
        attempt.lost += size
        attempt.document["runner"]["output_lost"] = attempt.lost
        note = (f"[runner: {size} bytes of output were lost here: the scraper restarted]\n"
                ).encode()
        attempt.output_log.write(note)
        self.write_runner_log(attempt, note.decode().strip())

    def save(self, attempt: Attempt) -> None:
        """Flush the logs, add a ``_metrics`` line, rewrite the scrape document
        (atomically), and note in the registry how far this save got (for a restarted
        scraper)."""
        for handle in (attempt.output_log, attempt.output_artifact, attempt.history,
                       attempt.runner_log):
            if handle is not None:
                handle.flush()
        self.add_metrics_line(attempt)
        temporary = attempt.scrape_path.with_suffix(".json.tmp")
        temporary.write_text(strict_json.dumps(attempt.document, indent=1, sort_keys=True))
        os.replace(temporary, attempt.scrape_path)
        artifact = attempt.output_artifact
        registry.write(self.config.runtime_dir, attempt.job.job_id, "scraped", {
            "offset": attempt.received, "lost": attempt.lost,
            "output_bytes": attempt.output_bytes,
            "output_log": attempt.output_log.tell(), "runner_log": attempt.runner_log.tell(),
            "artifact": artifact.tell() if artifact is not None else None,
            "history": attempt.history.tell() if attempt.history is not None else None})

    def add_metrics_line(self, attempt: Attempt) -> None:
        """Append one line in the reference worker's format to ``_metrics/_metrics``, once
        the cache manager has placed the inputs (an earlier attempt's file is kept)."""
        workdir = Path(attempt.job.workdir)
        if not (workdir / DOWNLOADED_DIGESTS).exists() or not (workdir / "_metrics").is_dir():
            return
        try:
            with open(workdir / "_metrics" / "_metrics", "a") as handle:
                handle.write(host_metrics_line() + "\n")
        except OSError as exc:
            self.write_runner_log(attempt, f"_metrics not written: {exc}")

    def tick(self) -> None:
        now = time.monotonic()
        for attempt in self.attempts.values():
            due = due_labels(attempt, now)
            if due is not None:
                self.save(attempt)
                self.post("uploader", protocol.UploadRequest(job=attempt.job, final=False,
                                                             labels=due))

    def close(self, ended: protocol.AttemptEnded) -> None:
        """Finish the attempt's metadata and ask for its final uploads.

        The final ``UploadRequest`` is always sent, also when writing the files fails (the
        attempt must reach the fetcher to free its slot).  An attempt handed back for the
        host's fault before its run started adds no metadata files to storage
        (``metadata=False``): retries of a request that cannot start leave no trail of
        empty attempts.  An attempt already closed (``<id>.ended`` in the registry) is not
        closed twice; one whose working directory the uploader already removed is reported
        without files; one that lost output is not ``completed`` (module doc)."""
        outcome = ended.outcome
        runtime = self.config.runtime_dir
        attempt = None
        try:
            attempt = self.attempt_of(ended.job.job_id, ended.job)
            if attempt is None:
                if registry.read(runtime, ended.job.job_id, "ended") is not None:
                    self.log.warning("key=%s attempt=%s already closed; %s ignored",
                                     ended.job.key, ended.job.job_id, outcome.status)
                    return
                # Its working directory is gone: the uploader finished it (the runner died
                # before the request was settled).  Nothing is left to write; the uploader
                # uploads nothing and reports, so that the attempt is settled.
                self.log.warning("key=%s attempt=%s has no working directory any more; "
                                 "ending it %s without files", ended.job.key,
                                 ended.job.job_id, outcome.status)
                registry.write_ended(runtime, ended.job.job_id, outcome)
                self.post("uploader", protocol.UploadRequest(job=ended.job, final=True,
                                                             outcome=outcome, metadata=False))
                return
            sent = ended.facts.get("output_sent")
            if isinstance(sent, int) and sent > attempt.received:
                self.output_lost(attempt, sent - attempt.received)
            if attempt.lost and outcome.status == fates.COMPLETED:
                outcome = fates.outcome_for_exception(fates.RoleCrashed(
                    f"{attempt.lost} bytes of the run's output were lost when the scraper "
                    f"restarted; not called completed"), outcome.exit_code)
            runner = attempt.document["runner"]
            facts = dict(ended.facts)
            if facts.get("build_log_tail"):
                # The run never started: the installer's last lines are its output.
                tail = attempt.masker.mask_text(str(facts["build_log_tail"]))
                facts["build_log_tail"] = tail
                self.scrape(attempt, b"environment build failed; the installer's last "
                            b"lines:\n" + tail.encode() + b"\n", scrape=False)
            runner.update(facts)
            runner.update({"stop": metadata.iso_utc(time.time()),
                           "exit_code": outcome.exit_code,
                           "error": outcome.error, "message": outcome.message,
                           "output_bytes": attempt.output_bytes,
                           "disk_use": disk_use(attempt.job.workdir)})
            attempt.document["studioml"]["status"] = outcome.status
            self.write_runner_log(attempt, f"attempt ended {outcome.status}"
                                           + (f" ({outcome.error}: {outcome.message})"
                                              if outcome.error else ""))
            self.save(attempt)
        except Exception:  # noqa: BLE001 - the attempt still ends
            self.log.exception("key=%s attempt=%s metadata not finished", ended.job.key,
                               ended.job.job_id)
        if attempt is None and registry.read(runtime, ended.job.job_id, "ended") is not None:
            return  # closed before, or reported without files just above
        for handle in ((attempt.output_log, attempt.output_artifact, attempt.history,
                        attempt.runner_log)
                       if attempt is not None else ()):
            if handle is not None:
                handle.close()
        self.attempts.pop(ended.job.job_id, None)
        try:
            registry.write_ended(runtime, ended.job.job_id, outcome)
        except OSError as exc:
            self.log.error("key=%s attempt=%s not marked closed in the registry: %s",
                           ended.job.key, ended.job.job_id, exc)
        self.post("uploader", protocol.UploadRequest(
            job=ended.job, final=True, outcome=outcome,
            metadata=not fates.leaves_no_trail(outcome, started="pid" in ended.facts)))
        self.phase(ended.job, "uploading", status=outcome.status,
                   tail=output_tail(attempt.output_log.name) if attempt else "")

    def stats(self) -> dict:
        return {"attempts": len(self.attempts),
                "last_metric": {job_id: a.last_metric for job_id, a in self.attempts.items()
                                if a.last_metric}}

    def shutdown(self) -> None:
        for attempt in self.attempts.values():
            self.save(attempt)

    def abandon(self) -> None:
        """Save every attempt (the next runner's recovery reopens them from here)."""
        for attempt in list(self.attempts.values()):
            try:
                self.save(attempt)
            except (OSError, ValueError):
                pass
