"""Reading what runs left behind, through the :class:`~runner.storage.Store` back ends.

A *catalog* is one storage root (``file:///dir``, ``s3://host:port/bucket``, ``gs://bucket``)
or a metadata store URL.  It holds:

* the metadata store: one record per experiment at ``metadata/<project>/<key>.json``
  (the redacted request, ``status``, ``final``, ``attempt``, ``attempts``, ``host``,
  ``updated``; :mod:`runner.metadata`);
* for each experiment, the ``_metadata`` files of every attempt (SPEC section 6), found
  from the record's request: ``scrape-host-<attempt>.json``, ``output-host-<attempt>.log``,
  ``runner-host-<attempt>.log``; the newest attempt is the one with the highest base62
  stamp (the last ``-`` field of the attempt id: ``<hostname>-<base62 seconds>``);
* the metric history of each attempt, ``metrics-host-<attempt>.jsonl`` beside them
  (:mod:`runner.history`);
* the mutable artifacts (``modeldir``, ``output``, ``_metrics``, …) as tars.

Records carry no credentials (they are redacted), so the catalog reads every URL with the
credentials it was opened with (artifact-style ``{"aws": {...}}``/``{"gcp": {...}}`` and a
``config.storage``-style map with ``endpoint``), else the back end's defaults (``AWS_*``,
``GOOGLE_APPLICATION_CREDENTIALS``, ``STORAGE_EMULATOR_HOST``).

Times are float unix seconds; sizes are bytes.
"""
from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import _fast, history, metadata
from ..archive import unpack
from ..errors import RunnerError, StorageError
from ..storage import ObjectInfo, ObjectMissing, artifact_url, open_store
from ..storage.base import Store

log = logging.getLogger(__name__)

#: Statuses after which an experiment changes no more (SPEC section 6), and ``running``.
FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")


class NotFound(RunnerError):
    """No experiment (or no object) matches what was asked for."""


def stamp_of(name_or_attempt: str) -> int:
    """The base62 seconds of an attempt id or a per-attempt file name, ``-1`` when none.

    ``scrape-host-gpu-1-1r31eq.json`` → ``1700000000``.
    """
    stem = name_or_attempt.rsplit("/", 1)[-1]
    for suffix in (".json", ".log"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    try:
        return _fast.b62decode(stem.rsplit("-", 1)[-1])
    except (ValueError, TypeError):
        return -1


def newest(infos: Iterable[ObjectInfo]) -> ObjectInfo | None:
    """The object of the newest attempt (highest base62 stamp, then name)."""
    return max(infos, key=lambda info: (stamp_of(info.url), info.url), default=None)


@dataclass
class Experiment:
    """One experiment as its record and newest scrape document describe it.

    ``metrics`` holds the final value of each numeric metric of the scrape document's
    ``experiment`` section (names from :func:`runner.history.numeric_leaves`).
    """

    project: str
    key: str
    record_url: str
    record: dict
    scrape_url: str | None = None
    scrape: dict | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return str(self.record.get("status") or "unknown")

    @property
    def final(self) -> bool:
        return bool(self.record.get("final"))

    @property
    def request(self) -> dict:
        request = self.record.get("request")
        return request if isinstance(request, dict) else {}

    @property
    def runner(self) -> dict:
        runner = (self.scrape or {}).get("runner")
        return runner if isinstance(runner, dict) else {}

    @property
    def start(self) -> float | None:
        """Unix seconds the newest attempt started (the scrape document's ISO time)."""
        return metadata.unix_seconds(self.runner.get("start"))

    @property
    def stop(self) -> float | None:
        return metadata.unix_seconds(self.runner.get("stop"))

    @property
    def updated(self) -> float | None:
        """Unix seconds the record was last written."""
        return metadata.unix_seconds(self.record.get("updated"))

    @property
    def duration(self) -> float | None:
        """Seconds from the newest attempt's start to its stop (or to the record's last
        update while it runs)."""
        if self.start is None:
            return None
        end = self.stop if self.stop is not None else self.updated
        return max(0.0, end - self.start) if end is not None else None

    @property
    def attempts(self) -> int:
        """How many attempts ran: the newest attempt's number (1 for a run that went
        through at once), else the record's count of failed attempts (0 before any ran).
        Hand-backs (a drain, a full host) are not attempts."""
        number = self.runner.get("attempt_number")
        if isinstance(number, int) and not isinstance(number, bool) and number > 0:
            return number
        return int(self.record.get("attempts") or 0)

    def row(self) -> dict:
        """The experiment as one flat row (what ``list`` and ``export`` show)."""
        return {"project": self.project, "key": self.key, "status": self.status,
                "final": self.final, "attempts": self.attempts,
                "attempt": self.record.get("attempt") or "", "host": self.record.get("host") or "",
                "start": self.start, "stop": self.stop, "duration": self.duration,
                "updated": self.updated}


class Catalog:
    """The experiments under one storage root (module docstring).

    ``root``: ``file:///dir``, ``s3://host:port/bucket``, ``gs://bucket``; the metadata
    store is ``<root>/metadata/`` unless ``metadata_store`` (the runner's
    ``--metadata-store``) names another place.  Raises :class:`StorageError` when a store
    cannot be opened or read.  Safe to use from several threads.
    """

    def __init__(self, root: str, *, credentials: dict | None = None,
                 storage_config: dict | None = None, metadata_store: str = ""):
        self.root = root.rstrip("/")
        self.records_prefix = (metadata_store.rstrip("/") if metadata_store
                               else self.root) + "/metadata/"
        self.credentials = credentials
        self.storage_config = storage_config
        self._stores: dict[str, Store] = {}
        self._lock = threading.Lock()
        self.reads = 0  # objects downloaded (what sync's figure counts)

    # -- stores ---------------------------------------------------------------------------
    def store(self, url: str) -> Store:
        """The store serving ``url`` (one per scheme and host/bucket, kept)."""
        scheme, _, rest = url.partition("://")
        name = f"{scheme}://{rest.split('/', 1)[0]}"
        with self._lock:
            store = self._stores.get(name)
            if store is None:
                store = open_store(url, credentials=self.credentials,
                                   storage_config=self.storage_config)
                self._stores[name] = store
            return store

    def read_bytes(self, url: str) -> bytes:
        """The bytes of the object at ``url``; :class:`ObjectMissing` when it is absent."""
        with tempfile.TemporaryDirectory(prefix="runner-results-") as tmp:
            target = Path(tmp) / "object"
            self.store(url).get(url, target)
            self.count_read()
            return target.read_bytes()

    def count_read(self) -> None:
        with self._lock:
            self.reads += 1

    def read_json(self, url: str) -> dict:
        """The JSON object at ``url``; :class:`StorageError` when it is not one."""
        try:
            value = json.loads(self.read_bytes(url))
        except ValueError as exc:
            raise StorageError(f"{url}: not JSON: {exc}") from exc
        except RecursionError as exc:
            raise StorageError(f"{url}: JSON nested too deeply to read") from exc
        if not isinstance(value, dict):
            raise StorageError(f"{url}: not a JSON object")
        return value

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()

    # -- records --------------------------------------------------------------------------
    def record_infos(self) -> list[ObjectInfo]:
        """Every record of the metadata store (one listing call)."""
        return [info for info in self.store(self.records_prefix).list_info(self.records_prefix)
                if info.url.endswith(".json")]

    def name_of(self, record_url: str) -> tuple[str, str]:
        """``(project, key)`` from a record URL ``…/metadata/<project>/<key>.json``."""
        relative = record_url[len(self.records_prefix):]
        project, _, name = relative.partition("/")
        return project, name[: -len(".json")]

    def find(self, key: str, project: str | None = None) -> ObjectInfo:
        """The record of experiment ``key`` (in ``project`` when given).

        Raises :class:`NotFound` when none matches or when the key is in several projects
        and no project was given (the message names them).
        """
        matches = [info for info in self.record_infos()
                   if self.name_of(info.url)[1] == key
                   and (project is None or self.name_of(info.url)[0] == project)]
        if not matches:
            raise NotFound(f"no experiment {key!r}" + (f" in project {project!r}" if project else "")
                           + f" under {self.records_prefix}")
        if len(matches) > 1:
            projects = ", ".join(sorted(self.name_of(info.url)[0] for info in matches))
            raise NotFound(f"experiment {key!r} is in several projects ({projects}): "
                           "name one with --project")
        return matches[0]

    # -- one experiment -------------------------------------------------------------------
    def metadata_prefix(self, record: dict) -> str | None:
        request = record.get("request")
        return metadata.metadata_prefix_url(request) if isinstance(request, dict) else None

    def metadata_files(self, record: dict, kind: str) -> list[ObjectInfo]:
        """The ``kind`` files (``scrape``, ``output``, ``runner``, ``metrics``) of every
        attempt, in the order of their base62 stamps."""
        prefix = self.metadata_prefix(record)
        if not prefix:
            return []
        listing = f"{prefix}/{kind}-host-"
        return sorted(self.store(listing).list_info(listing),
                      key=lambda info: (stamp_of(info.url), info.url))

    def newest_scrape_info(self, record: dict) -> ObjectInfo | None:
        """The scrape document of the attempt the record names (its ``attempt``), else the
        newest by stamp (the record's attempt has not saved one yet).

        Preferring the record's attempt keeps an experiment's own document when its folder
        holds others' too (the same key in two projects, see :meth:`sharing_projects`)."""
        found = self.metadata_files(record, "scrape")
        attempt = record.get("attempt")
        if isinstance(attempt, str) and attempt:
            own = [info for info in found
                   if info.url.rsplit("/", 1)[-1] == metadata.scrape_name(attempt)]
            if own:
                return own[-1]
        return newest(found)

    def sharing_projects(self, info: ObjectInfo, record: dict) -> list[str]:
        """Other projects with an experiment of the same key whose files lie in the same
        folder as this one's (``experiments/<key>/``: StudioML's layout names no project),
        so that artifacts and metadata files there may be theirs."""
        project, key = self.name_of(info.url)
        prefix = self.metadata_prefix(record)
        found = []
        for other in self.record_infos():
            other_project, other_key = self.name_of(other.url)
            if other_key != key or other_project == project:
                continue
            try:
                other_record = self.read_json(other.url)
            except (StorageError, ObjectMissing):
                continue
            if self.metadata_prefix(other_record) == prefix:
                found.append(other_project)
        return sorted(found)

    def experiment(self, info: ObjectInfo, *, scrape: bool = True) -> Experiment:
        """Read one record (and, with ``scrape``, its newest scrape document)."""
        project, key = self.name_of(info.url)
        found = Experiment(project=project, key=key, record_url=info.url,
                           record=self.read_json(info.url))
        if scrape:
            scrape_info = self.newest_scrape_info(found.record)
            if scrape_info is not None:
                self.attach_scrape(found, scrape_info.url, self.read_json(scrape_info.url))
        return found

    @staticmethod
    def attach_scrape(found: Experiment, url: str, document: dict) -> None:
        found.scrape_url, found.scrape = url, document
        found.metrics = dict(history.numeric_leaves({"experiment": document.get("experiment")})
                             if isinstance(document.get("experiment"), dict) else ())

    def output_tail(self, record: dict, lines: int = 20) -> str:
        """The last ``lines`` lines of the newest attempt's output log ("" when none)."""
        info = newest(self.metadata_files(record, "output"))
        if info is None:
            return ""
        text = self.read_bytes(info.url).decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def artifacts(self, record: dict) -> list[tuple[str, str, ObjectInfo | None]]:
        """``(label, url, info or None when absent)`` of every artifact with a URL."""
        request = record.get("request")
        if not isinstance(request, dict):
            request = {}
        found = []
        for label, artifact in sorted(((request.get("experiment") or {}).get("artifacts") or {}).items()):
            url = artifact_url(artifact) if isinstance(artifact, dict) else None
            if not url or url.startswith(("http://", "https://")):
                continue
            if label == "_metadata":
                url = metadata.strip_archive_suffix(url) + "/"
                files = self.store(url).list_info(url)
                size = sum(info.size for info in files)
                found.append((label, url, ObjectInfo(url, size, f"{len(files)} files", 0.0)
                              if files else None))
                continue
            found.append((label, url, self.store(url).stat(url)))
        return found

    def history(self, record: dict) -> list[dict]:
        """The metric history (:mod:`runner.history`) of every attempt, oldest first."""
        return self.read_history(self.history_infos(record))

    def history_infos(self, record: dict) -> list[ObjectInfo]:
        """The history files of the experiment's attempts, oldest attempt first."""
        return self.metadata_files(record, "metrics")

    def read_history(self, infos: list[ObjectInfo]) -> list[dict]:
        """History lines of the files ``infos``, in that order; a file gone meanwhile is
        left out."""
        lines: list[dict] = []
        for info in infos:
            try:
                lines.extend(history.parse_history(self.read_bytes(info.url)))
            except ObjectMissing:
                continue
        return lines

    def fetch(self, record: dict, dest: Path, labels: Iterable[str] | None = None,
              progress: Callable[[str, int], None] | None = None) -> list[tuple[str, Path]]:
        """Download and unpack the experiment's artifacts into ``dest/<label>/``.

        ``labels`` limits which (default: every stored artifact, ``_metadata`` as its
        files).  Tars are unpacked with the runner's safe unpacker (hostile members
        refused).  ``progress(label, bytes)`` after each artifact.  Returns
        ``(label, folder)`` of what was fetched; absent artifacts are skipped.
        Raises :class:`StorageError` or :class:`ArchiveError` when one cannot be fetched.
        """
        wanted = set(labels) if labels else None
        fetched = []
        for label, url, info in self.artifacts(record):
            if info is None or (wanted is not None and label not in wanted):
                continue
            folder = Path(dest) / label
            folder.mkdir(parents=True, exist_ok=True)
            store = self.store(url)
            if label == "_metadata":
                for item in store.list_info(url):
                    store.get(item.url, folder / item.url.rsplit("/", 1)[-1])
            else:
                with tempfile.TemporaryDirectory(prefix="runner-fetch-", dir=dest) as tmp:
                    archive = Path(tmp) / "artifact.tar"
                    store.get(url, archive)
                    unpack(archive, folder)
            fetched.append((label, folder))
            if progress:
                progress(label, info.size)
        if wanted:
            missing = wanted - {label for label, _ in fetched}
            if missing:
                raise NotFound(f"no stored artifact {', '.join(sorted(missing))}")
        return fetched
