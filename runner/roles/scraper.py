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
artifact with its own ``saveFrequency`` (``Attempt.artifact_save_frequency``; ``_metadata``
for the metadata files) is uploaded on its own period instead: each periodic request names
the labels that are due.
Every JSON object line is also appended, with its time and attempt, to the metric history
``_metadata/metrics-host-<id>.jsonl`` (:mod:`runner.history`), uploaded with the other
metadata files, up to ``--max-history`` bytes per attempt.

A restarted scraper finds its attempts again in the attempt files
(:mod:`runner.attempt_files`): the first message about an attempt it does not hold reopens it
from its last save (the scrape document on disk, the logs cut back to their size at that
save).  Output chunks carry their offset in the run's output, so output that went down
with the old process shows as a gap: it is marked in the output log, counted in
``runner.output_lost``, and an attempt that lost output is never ``completed`` (it ends
``cancelled``, handed back uncounted).  An attempt already closed is not closed twice.

The metadata files live in the runner's private folder beside the attempt's working
directory (:func:`runner.metadata.metadata_folder`), never in the folder the run is given.
A write to an attempt's files that fails (a full disk, an I/O error) is never retried in a
loop: the scraper notes the error, stops writing that attempt's files, asks the executor to
stop the run (``StopRuns``, cause ``disk_full`` or ``files_unwritable``) and, when the
attempt ends, closes it as usual with the fate :func:`runner.fates.files_fault` gives; its
final scrape document then travels in memory with the final ``UploadRequest``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .. import _fast, attempt_files, fates, history, metadata, protocol, strict_json
from ..jsonpatch import PatchRejected, apply_patch, parse_patch
from ..output import scrape_view
from ..redact import Masker, redact_request, secrets_of
from .base import Role


@dataclass
class AttemptState:
    """What the scraper keeps for one attempt in progress."""

    attempt: protocol.Attempt
    document: dict
    masker: Masker
    output_log: BinaryIO | None  # None when it could not be opened (write_error says why)
    output_artifact: BinaryIO | None  # opened at the first output, after inputs are placed
    runner_log: BinaryIO | None
    scrape_path: Path
    next_save: float  # monotonic time the artifacts without their own period are due
    history: BinaryIO | None = None  # metrics-host-<id>.jsonl, opened at the first JSON line
    history_full: bool = False  # the history reached --max-history (a truncated line)
    next_saves: dict = field(default_factory=dict)  # label -> when its own period is due
    json_lines: int = 0
    output_bytes: int = 0
    last_metric: str = ""
    received: int = 0  # bytes of the run's output scraped so far (OutputChunk.offset)
    lost: int = 0  # bytes of the run's output that never reached this scraper
    write_error: str = ""  # why the attempt's files could not be written; "" while they can
    no_space: bool = False  # write_error was for want of space
    ended_status: str = ""  # the status the runner log last said the attempt ended with
    closing: bool = False  # its run has ended (AttemptEnded): nothing left to stop


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
NO_HISTORY_CAP = 1 << 62  # --max-history 0: the history is never cut


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


def due_labels(state: AttemptState, now: float) -> tuple | None:
    """The labels whose periodic upload is due at ``now`` (monotonic), their next times
    moved on; None when none is (and the common period is not due either: an empty tuple
    still asks for the metadata-store record)."""
    attempt = state.attempt
    own = attempt.artifact_save_frequency or {}
    due: set[str] = set()
    common = now >= state.next_save
    if common:
        state.next_save = now + attempt.save_frequency
        artifacts = attempt.request.get("experiment", {}).get("artifacts") or {}
        due.update(label for label, artifact in artifacts.items()
                   if isinstance(artifact, dict) and label not in own
                   and (artifact.get("mutable") or label == "_metadata"))
    for label, at in state.next_saves.items():
        if now >= at:
            state.next_saves[label] = now + own[label]
            due.add(label)
    return tuple(sorted(due)) if common or due else None


class Scraper(Role):
    name = "scraper"
    TICK = 0.25  # periodic saves only (every saveWorkspaceFrequency, at least 1 s apart)

    def tick_interval(self) -> float:
        return self.TICK if self.attempts else self.IDLE_TICK

    def initialize(self) -> None:
        self.attempts: dict[str, AttemptState] = {}

    def handle(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.OutputChunk):
            state = self.state_of(message.attempt_id)
            if state is not None:
                self.scrape(state, message.data, message.scrape, message.offset)
        elif isinstance(message, protocol.RunnerLog):
            state = self.state_of(message.attempt_id)
            if state is not None:
                self.write_runner_log(state, message.text)
        elif isinstance(message, protocol.RecordState):
            state = self.attempts.get(message.attempt_id)
            if state is not None:
                state.document["runner"]["studio_record"] = message.state
        elif isinstance(message, protocol.AttemptOpened):
            self.open(message.attempt)
        elif isinstance(message, protocol.AttemptEnded):
            self.close(message)

    def state_of(self, attempt_id: str, attempt: protocol.Attempt | None = None) -> AttemptState | None:
        """The attempt ``attempt_id``, reopened from the attempt files when this process does not
        hold it (a restarted scraper); None when it is unknown, already closed, or was
        opened before and its working directory is gone (uploaded and removed)."""
        state = self.attempts.get(attempt_id)
        if state is not None:
            return state
        runtime = self.config.runtime_dir
        if attempt_files.read(runtime, attempt_id, "ended") is not None:
            return None
        attempt = attempt or attempt_files.read_attempt(runtime, attempt_id)
        if attempt is None:
            return None
        if not Path(attempt.workdir).is_dir() and attempt_files.read(runtime, attempt_id, "attempt"):
            return None
        return self.open(attempt)

    def open(self, attempt: protocol.Attempt) -> AttemptState:
        if attempt.attempt_id in self.attempts:
            return self.attempts[attempt.attempt_id]
        folder = metadata.metadata_folder(attempt.workdir)
        runtime = self.config.runtime_dir
        saved = attempt_files.read(runtime, attempt.attempt_id, "scraped")
        scrape_path = folder / metadata.scrape_name(attempt.attempt_id)
        document = None
        if saved is not None or scrape_path.exists():
            document = self.restore(attempt, folder, scrape_path, saved or {})
        state = AttemptState(
            attempt=attempt,
            document=document or metadata.new_scrape_document(attempt, self.config.hostname),
            masker=Masker(secrets_of(attempt.request)),
            output_log=None,
            output_artifact=None,
            history=None,
            runner_log=None,
            scrape_path=scrape_path,
            next_save=time.monotonic() + attempt.save_frequency,
            next_saves={label: time.monotonic() + seconds
                        for label, seconds in (attempt.artifact_save_frequency or {}).items()},
            received=int(saved.get("offset") or 0) if saved else 0,
            lost=int(saved.get("lost") or 0) if saved else 0,
            output_bytes=int(saved.get("output_bytes") or 0) if saved else 0,
        )
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (Path(attempt.workdir) / "output").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.files_failed(state, exc)
        attempt_id = attempt.attempt_id
        state.output_log = self.open_appending(state, folder / metadata.output_name(attempt_id))
        state.runner_log = self.open_appending(state, folder / metadata.runner_log_name(attempt_id))
        if saved is not None and saved.get("artifact") is not None:
            state.output_artifact = self.open_appending(
                state, Path(attempt.workdir) / "output" / "output")
        if saved is not None and saved.get("history") is not None:
            state.history = self.open_appending(state,
                                                folder / metadata.metrics_name(attempt.attempt_id))
            if state.history is not None:
                try:
                    state.history_full = history.file_truncated(state.history)
                except OSError as exc:
                    self.files_failed(state, exc)
        self.attempts[attempt.attempt_id] = state
        self.wake(tick=True)  # from now on tick every TICK (periodic saves), not IDLE_TICK
        if document is not None:
            self.write_runner_log(state, "scraper restarted: attempt reopened from its "
                                           "last save")
            return state
        try:
            attempt_files.write_attempt(runtime, attempt)
        except OSError as exc:
            self.log.error("key=%s attempt=%s not written to the attempt files: %s",
                           attempt.key, attempt.attempt_id, exc)
        request_text = strict_json.dumps(redact_request(attempt.request), indent=1, sort_keys=True)
        self.write(state, state.runner_log, b"request (credentials redacted):\n"
                   + state.masker.mask(request_text.encode()) + b"\n")
        self.write_runner_log(state, f"attempt {attempt.attempt_id} ({attempt.attempts + 1}) on "
                                       f"{self.config.hostname} from queue {attempt.queue}")
        # The metadata files are first saved and uploaded one save period from now (or at
        # the end); only the metadata-store record is written at once.
        self.post("uploader", protocol.UploadRequest(attempt=attempt, final=False, record_only=True))
        return state

    def restore(self, attempt: protocol.Attempt, folder: Path, scrape_path: Path, saved: dict
                ) -> dict | None:
        """The scrape document of an attempt a previous scraper process held, with its
        files cut back to their sizes at that process's last save (``saved``)."""
        attempt_id = attempt.attempt_id
        sizes = {folder / metadata.output_name(attempt_id): saved.get("output_log"),
                 folder / metadata.runner_log_name(attempt_id): saved.get("runner_log"),
                 Path(attempt.workdir) / "output" / "output": saved.get("artifact"),
                 folder / metadata.metrics_name(attempt_id): saved.get("history")}
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

    def write_runner_log(self, state: AttemptState, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        line = f"{stamp}Z {text}\n".encode("utf-8", "replace")
        self.write(state, state.runner_log, state.masker.mask(line))

    def write(self, state: AttemptState, handle: BinaryIO | None, data: bytes) -> None:
        """Append ``data`` to one of the attempt's files; after a failed write the
        attempt's files are left as they are (:meth:`files_failed`)."""
        if state.write_error or handle is None:
            return
        try:
            handle.write(data)
        except OSError as exc:
            self.files_failed(state, exc)

    def open_appending(self, state: AttemptState, path: Path) -> BinaryIO | None:
        """``path`` opened to append, or None when it cannot be (:meth:`files_failed`)."""
        if state.write_error:
            return None
        try:
            return open(path, "ab")
        except OSError as exc:
            self.files_failed(state, exc)
            return None

    def files_failed(self, state: AttemptState, exc: OSError) -> None:
        """The attempt's files can no longer be written: keep why (in the scrape document
        too), write none of them any more, and have the executor stop the run; its fate is
        :func:`runner.fates.files_fault` (:meth:`files_outcome` for a run that ended by
        itself first)."""
        if state.write_error:
            return
        state.write_error = str(exc)
        state.no_space = exc.errno in fates.NO_SPACE
        state.document["runner"]["files_error"] = state.write_error
        attempt = state.attempt
        self.log.error("key=%s attempt=%s cannot write the attempt's files: %s", attempt.key,
                       attempt.attempt_id, exc)
        if state.closing:
            return
        self.post("executor", protocol.StopRuns(
            reason=state.write_error, attempt_ids=[attempt.attempt_id],
            cause="disk_full" if state.no_space else "files_unwritable"))

    def files_outcome(self, state: AttemptState, outcome: protocol.Outcome) -> protocol.Outcome:
        """``outcome``, or, for an attempt whose files could not be written and whose run
        ended by itself (completed, or failed by its own exit), the fate
        :func:`runner.fates.files_fault` gives it: its output and metadata are incomplete."""
        if (not state.write_error or outcome.kind not in (fates.NONE, fates.FAILURE)
                or outcome.status not in (fates.COMPLETED, fates.FAILED)):
            return outcome
        fault = fates.files_fault(state.write_error, state.no_space,
                                  disk_use(state.attempt.workdir),
                                  int(state.attempt.resources.get("hdd") or 0))
        return fates.outcome_for_exception(fault, outcome.exit_code)

    def scrape(self, state: AttemptState, data: bytes, scrape: bool = True,
               offset: int = protocol.RUNNER_NOTE) -> None:
        """Mask and log one chunk of whole output segments starting at ``offset`` in the
        run's output (:data:`~runner.protocol.RUNNER_NOTE`: a line of the runner's); unless
        it is a piece of an overlong line (``scrape`` False), merge its JSON lines (``\\r``
        ends a line too)."""
        if offset >= 0:
            if offset > state.received:
                self.output_lost(state, offset - state.received)
            elif offset < state.received:  # already scraped (sent again): skip that part
                data = data[state.received - offset:]
                offset = state.received
            state.received = offset + len(data)
            if not data:
                return
        if not state.output_bytes and data:
            # When the scraper saw the run's first output (publish-to-start benchmarks).
            state.document["runner"]["first_output"] = metadata.iso_utc(time.time())
        data = state.masker.mask(data)
        self.write(state, state.output_log, data)
        if state.output_artifact is None:
            # Opened only now: the cache manager may have unpacked an earlier attempt's
            # ``output`` artifact into the folder, and this attempt's output goes after it.
            state.output_artifact = self.open_appending(
                state, Path(state.attempt.workdir) / "output" / "output")
        self.write(state, state.output_artifact, data)
        state.output_bytes += len(data)
        if not scrape:
            return
        data = scrape_view(data)
        metric = last_json_line(data)
        if metric:
            state.last_metric = metric
        self.record_history(state, data)
        for line in _fast.merge_lines(state.document, data):
            operations = parse_patch(line)
            if operations is None:
                continue
            try:
                apply_patch(state.document, operations)
            except PatchRejected as exc:
                self.write_runner_log(state, f"JSON patch refused: {exc}")

    def record_history(self, state: AttemptState, data: bytes) -> None:
        """Append the JSON object lines of ``data`` (already masked) to the metric history."""
        objects = history.json_object_lines(data)
        if not objects:
            return
        if state.history is None:  # opened at the first line: no file without a line
            state.history = self.open_appending(
                state, state.scrape_path.parent / metadata.metrics_name(state.attempt.attempt_id))
            if state.history is not None and state.history.tell() == 0:
                self.write(state, state.history, history.history_header(
                    state.attempt.attempt_id, state.attempt.attempts + 1))
        if state.history is None or state.write_error:
            return
        cap = self.config.max_history or NO_HISTORY_CAP  # 0: no limit
        room = cap - state.history.tell()
        if state.history_full or room <= 0:
            return
        data, state.history_full = history.history_lines(objects, time=time.time(), room=room,
                                                         cap=cap)
        self.write(state, state.history, data)
        if state.history_full:
            self.write_runner_log(state, f"metric history reached its cap (--max-history "
                                  f"{cap} bytes): later JSON lines are only in the output "
                                  "log, and their latest values in the scrape document")

    def output_lost(self, state: AttemptState, size: int) -> None:
        """``size`` bytes of the run's output never arrived (they went down with a
        previous scraper process): say so where they belonged."""
        state.lost += size
        state.document["runner"]["output_lost"] = state.lost
        note = (f"[runner: {size} bytes of output were lost here: the scraper restarted]\n"
                ).encode()
        self.write(state, state.output_log, note)
        self.write_runner_log(state, note.decode().strip())

    def save(self, state: AttemptState) -> None:
        """Flush the logs, add a ``_metrics`` line, rewrite the scrape document
        (atomically), and note in the attempt files how far this save got (for a restarted
        scraper).  Nothing is written once the attempt's files failed (:meth:`files_failed`);
        raises nothing."""
        if state.write_error:
            return
        temporary = state.scrape_path.with_suffix(".json.tmp")
        try:
            for handle in (state.output_log, state.output_artifact, state.history,
                           state.runner_log):
                if handle is not None:
                    handle.flush()
            self.add_metrics_line(state)
            temporary.write_text(strict_json.dumps(state.document, indent=1, sort_keys=True))
            os.replace(temporary, state.scrape_path)
        except OSError as exc:
            try:
                temporary.unlink()
            except OSError:
                pass
            self.files_failed(state, exc)
            return
        artifact = state.output_artifact
        try:
            attempt_files.write(self.config.runtime_dir, state.attempt.attempt_id, "scraped", {
                "offset": state.received, "lost": state.lost,
                "output_bytes": state.output_bytes,
                "output_log": state.output_log.tell() if state.output_log else None,
                "runner_log": state.runner_log.tell() if state.runner_log else None,
                "artifact": artifact.tell() if artifact is not None else None,
                "history": state.history.tell() if state.history is not None else None})
        except OSError as exc:
            self.log.error("key=%s attempt=%s save not noted in the attempt files: %s",
                           state.attempt.key, state.attempt.attempt_id, exc)

    def add_metrics_line(self, state: AttemptState) -> None:
        """Append one line in the reference worker's format to ``_metrics/_metrics``, once
        the cache manager has placed the inputs (an earlier attempt's file is kept)."""
        workdir = Path(state.attempt.workdir)
        if not metadata.inputs_placed(workdir) or not (workdir / "_metrics").is_dir():
            return
        try:
            with open(workdir / "_metrics" / "_metrics", "a") as handle:
                handle.write(host_metrics_line() + "\n")
        except OSError as exc:
            self.write_runner_log(state, f"_metrics not written: {exc}")

    def tick(self) -> None:
        now = time.monotonic()
        for state in self.attempts.values():
            due = due_labels(state, now)
            if due is not None:
                self.save(state)
                self.post("uploader", protocol.UploadRequest(attempt=state.attempt, final=False,
                                                             labels=due))

    def close(self, ended: protocol.AttemptEnded) -> None:
        """Finish the attempt's metadata and ask for its final uploads.

        The final ``UploadRequest`` is always sent, also when writing the files fails (the
        attempt must reach the fetcher to free its slot); an attempt whose files could not
        be written gets its fate from :meth:`files_outcome` and sends its final scrape
        document in memory.  An attempt handed back for the
        host's fault before its run started adds no metadata files to storage
        (``metadata=False``): retries of a request that cannot start leave no trail of
        empty attempts.  An attempt already closed (``<id>.ended`` in the attempt files) is not
        closed twice; one whose working directory the uploader already removed is reported
        without files; one that lost output is not ``completed`` (module doc)."""
        outcome = ended.outcome
        runtime = self.config.runtime_dir
        state = None
        try:
            state = self.state_of(ended.attempt.attempt_id, ended.attempt)
            if state is None:
                if attempt_files.read(runtime, ended.attempt.attempt_id, "ended") is not None:
                    self.log.warning("key=%s attempt=%s already closed; %s ignored",
                                     ended.attempt.key, ended.attempt.attempt_id, outcome.status)
                    return
                # Its working directory is gone: the uploader finished it (the runner died
                # before the request was settled).  Nothing is left to write; the uploader
                # uploads nothing and reports, so that the attempt is settled.
                self.log.warning("key=%s attempt=%s has no working directory any more; "
                                 "ending it %s without files", ended.attempt.key,
                                 ended.attempt.attempt_id, outcome.status)
                attempt_files.write_ended(runtime, ended.attempt.attempt_id, outcome)
                self.post("uploader", protocol.UploadRequest(attempt=ended.attempt, final=True,
                                                             outcome=outcome, metadata=False))
                return
            state.closing = True
            sent = ended.facts.get("output_sent")
            if isinstance(sent, int) and sent > state.received:
                self.output_lost(state, sent - state.received)
            if state.lost and outcome.status == fates.COMPLETED:
                outcome = fates.outcome_for_exception(fates.RoleCrashed(
                    f"{state.lost} bytes of the run's output were lost when the scraper "
                    f"restarted; not called completed"), outcome.exit_code)
            facts = dict(ended.facts)
            if facts.get("build_log_tail"):
                # The run never started: the installer's last lines are its output.
                tail = state.masker.mask_text(str(facts["build_log_tail"]))
                facts["build_log_tail"] = tail
                self.scrape(state, b"environment build failed; the installer's last "
                            b"lines:\n" + tail.encode() + b"\n", scrape=False)
            outcome = self.finish_document(state, outcome, facts)
            self.save(state)
            if state.write_error:  # maybe only now: the fate and the document follow it
                outcome = self.finish_document(state, outcome, facts)
        except Exception:  # noqa: BLE001 - the attempt still ends
            self.log.exception("key=%s attempt=%s metadata not finished", ended.attempt.key,
                               ended.attempt.attempt_id)
        if state is None and attempt_files.read(runtime, ended.attempt.attempt_id, "ended") is not None:
            return  # closed before, or reported without files just above
        document = ""
        tail = ""
        if state is not None:
            for handle in (state.output_log, state.output_artifact, state.history,
                           state.runner_log):
                if handle is None:
                    continue
                try:
                    handle.close()  # flushed by the save; its descriptor is closed anyway
                except OSError as exc:
                    self.log.error("key=%s attempt=%s: %s not closed cleanly: %s",
                                   ended.attempt.key, ended.attempt.attempt_id, handle.name, exc)
            if state.write_error:
                document = strict_json.dumps(state.document, indent=1, sort_keys=True)
            if state.output_log is not None:
                tail = output_tail(state.output_log.name)
        self.attempts.pop(ended.attempt.attempt_id, None)
        try:
            attempt_files.write_ended(runtime, ended.attempt.attempt_id, outcome)
        except OSError as exc:
            self.log.error("key=%s attempt=%s not marked closed in the attempt files: %s",
                           ended.attempt.key, ended.attempt.attempt_id, exc)
        self.post("uploader", protocol.UploadRequest(
            attempt=ended.attempt, final=True, outcome=outcome,
            metadata=not fates.leaves_no_trail(outcome, started="pid" in ended.facts),
            scrape_document=document))
        self.phase(ended.attempt, protocol.PHASE_UPLOADING, status=outcome.status, tail=tail)

    def finish_document(self, state: AttemptState, outcome: protocol.Outcome,
                        facts: dict) -> protocol.Outcome:
        """Put the attempt's end into its scrape document (in memory): ``facts``, the stop
        time, the outcome (:meth:`files_outcome` first, returned) and its final status."""
        outcome = self.files_outcome(state, outcome)
        runner = state.document["runner"]
        runner.update(facts)
        runner.update({"stop": metadata.iso_utc(time.time()),
                       "exit_code": outcome.exit_code,
                       "error": outcome.error, "message": outcome.message,
                       "output_bytes": state.output_bytes,
                       "disk_use": disk_use(state.attempt.workdir)})
        state.document["studioml"]["status"] = outcome.status
        if state.ended_status != outcome.status:  # said once, or again when it changed
            state.ended_status = outcome.status
            self.write_runner_log(state, f"attempt ended {outcome.status}"
                                           + (f" ({outcome.error}: {outcome.message})"
                                              if outcome.error else ""))
        return outcome

    def stats(self) -> dict:
        return {"attempts": len(self.attempts),
                "last_metric": {attempt_id: a.last_metric for attempt_id, a in self.attempts.items()
                                if a.last_metric}}

    def shutdown(self) -> None:
        for state in self.attempts.values():
            self.save(state)

    def abandon(self) -> None:
        """Save every attempt (the next runner's recovery reopens them from here)."""
        for state in list(self.attempts.values()):
            try:
                self.save(state)
            except (OSError, ValueError):
                pass
