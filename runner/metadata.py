"""What the runner leaves behind about an experiment (SPEC section 6).

* attempt ids ``<hostname>-<base62 seconds>`` and the three per-attempt file names;
* where the ``_metadata`` files go (the artifact's key with its archive extension removed);
* the scrape document's skeleton;
* the metadata store: one redacted record per experiment at ``metadata/<project>/<key>.json``
  beside the request's storage, or under ``--metadata-store``;
* :func:`check_object_names`: at admission, a request whose record or metadata files would
  have object names too long for their store is a bad request (never run, dead-lettered);
* the hand-over from the cache manager to the uploader and the scraper:
  ``<workdir>/.runner/downloaded.json`` (:data:`DOWNLOADED_DIGESTS`), the content digest of
  each mutable artifact as it was downloaded, written once every input is in place
  (:func:`write_downloaded_digests`, :func:`read_downloaded_digests`, :func:`inputs_placed`).

Times the runner writes into these documents (``runner.start``, ``runner.stop``,
``runner.first_output``, the record's ``updated``) are ISO-8601 UTC strings with
milliseconds and ``Z`` (``2018-10-23T18:25:43.511Z``, :func:`iso_utc`), as the reference
runner writes them; the request's own fields (``time_added``) are kept as the client sent
them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from . import _fast, strict_json
from .errors import BadRequest, StorageError
from .redact import redact_request
from .storage import artifact_url, open_for_request, split_url
from .storage.base import PARTIAL_SUFFIX_BYTES
from .storage.file import check_file_url
from .storage.s3 import parse_s3_url

# Longest object names the stores take: S3 and GCS keys are at most 1024 bytes of UTF-8;
# a file:// path at most PATH_MAX bytes (4096 with its NUL) of NAME_MAX-byte (255) parts.
MAX_KEY_BYTES = 1024
MAX_PATH_BYTES = 4095
MAX_NAME_BYTES = 255
# The longest base62 second count an attempt id can carry (62^7 s is beyond year 100000).
_ATTEMPT_DIGITS = 7


def iso_utc(seconds: float) -> str:
    """``2018-10-23T18:25:43.511Z``: unix ``seconds`` as ISO-8601 UTC, milliseconds, ``Z``."""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def unix_seconds(value) -> float | None:
    """Unix seconds from a time as the runner writes it (:func:`iso_utc`; older documents
    hold plain float seconds); None for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            moment = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z")
                                            else value)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    return None


log = logging.getLogger(__name__)

_ARCHIVE_SUFFIX = re.compile(r"\.(tar(\.(gz|bz2|xz|zst))?|tgz|tbz2|txz|tzst)$")


class AttemptIds:
    """Attempt ids that are unique on this host even for two attempts in one second.

    An id never repeats one given before: within a process the seconds only go up, and
    with ``state_path`` the last second given is kept on disk, so a restarted runner (a
    new supervisor a second after the old one) does not give the same id twice.
    """

    def __init__(self, hostname: str, state_path: str | os.PathLike | None = None):
        self.hostname = hostname
        self.state_path = Path(state_path) if state_path else None
        self._last = 0
        if self.state_path is not None:
            try:
                self._last = int(self.state_path.read_text().strip() or 0)
            except (OSError, ValueError):
                self._last = 0

    def next(self, now: float | None = None) -> str:
        seconds = int(time.time() if now is None else now)
        seconds = max(seconds, self._last + 1)
        self._last = seconds
        if self.state_path is not None:
            try:
                self.state_path.parent.mkdir(parents=True, exist_ok=True)
                temporary = self.state_path.with_name(self.state_path.name + ".tmp")
                temporary.write_text(str(seconds))
                os.replace(temporary, self.state_path)
            except OSError as exc:
                log.warning("cannot keep the attempt clock in %s: %s", self.state_path, exc)
        return f"{self.hostname}-{_fast.b62encode(seconds)}"


def output_name(attempt_id: str) -> str:
    return f"output-host-{attempt_id}.log"


def runner_log_name(attempt_id: str) -> str:
    return f"runner-host-{attempt_id}.log"


def scrape_name(attempt_id: str) -> str:
    return f"scrape-host-{attempt_id}.json"


def metrics_name(attempt_id: str) -> str:
    """The attempt's metric history (:mod:`runner.history`)."""
    return f"metrics-host-{attempt_id}.jsonl"


def attempt_file_names(attempt_id: str) -> tuple[str, ...]:
    """The names of the metadata files an attempt may add (SPEC section 6, and its metric
    history): the only names the uploader uploads for it."""
    return (output_name(attempt_id), runner_log_name(attempt_id), scrape_name(attempt_id),
            metrics_name(attempt_id))


#: The suffix of the runner's private folder beside an attempt's working directory.
RUNNER_FOLDER_SUFFIX = ".runner"


def runner_folder(workdir: str | os.PathLike) -> Path:
    """``<workdir>.runner``: the runner's private folder beside the attempt's working
    directory.  The run is given ``workdir`` only (the sandbox binds that folder and hides
    the rest of the working directory), so what the runner keeps here is out of its reach:
    the attempt's metadata files (:func:`metadata_folder`).  Removed with the working
    directory once the attempt's uploads are done."""
    return Path(os.fspath(workdir).rstrip("/") + RUNNER_FOLDER_SUFFIX)


def metadata_folder(workdir: str | os.PathLike) -> Path:
    """Where the scraper writes the attempt's metadata files and the uploader reads them:
    ``<workdir>.runner/_metadata`` (never the ``_metadata`` folder inside the working
    directory, which the run can write)."""
    return runner_folder(workdir) / "_metadata"


def strip_archive_suffix(key_or_url: str) -> str:
    """``experiments/X/_metadata.tar`` → ``experiments/X/_metadata``."""
    return _ARCHIVE_SUFFIX.sub("", key_or_url)


def metadata_prefix_url(request: dict) -> str | None:
    """URL prefix under which this experiment's metadata files are uploaded, or None."""
    artifact = (request.get("experiment", {}).get("artifacts") or {}).get("_metadata")
    url = artifact_url(artifact) if isinstance(artifact, dict) else None
    return strip_archive_suffix(url) if url else None


def new_scrape_document(attempt, hostname: str) -> dict:
    """The scrape document at the start of an attempt (status ``running``)."""
    experiment = attempt.request.get("experiment", {})
    return {
        "runner": {"start": iso_utc(time.time()), "stop": None, "host": hostname,
                   "attempt": attempt.attempt_id, "attempt_number": attempt.attempts + 1,
                   "queue": attempt.queue},
        "experiment": {},
        "studioml": {"status": "running", "experiment": attempt.key, "project": attempt.project,
                     "owner": experiment.get("owner"), "time_added": experiment.get("time_added")},
        "asset": str(uuid.uuid4()),
    }


def bucket_root(url: str, bucket: str | None = None) -> str | None:
    """The root of the store ``url`` is in: ``s3://host/bucket``, ``gs://bucket``, or for
    ``file://`` the path up to the folder named ``bucket`` (None without one)."""
    try:
        scheme, rest = split_url(url)
        if scheme == "s3":
            return parse_s3_url(url).root
        if scheme == "gs":
            return "gs://" + rest.partition("/")[0] if rest.partition("/")[0] else None
    except StorageError:
        return None
    if scheme == "file" and bucket and f"/{bucket}/" in rest:
        return f"file://{rest[: rest.rindex(f'/{bucket}/') + len(bucket) + 1]}"
    return None


def store_root(request: dict) -> tuple[str | None, dict | None]:
    """The storage root of the request and the artifact it was taken from (whose
    credentials reach it).  ``_metadata`` is preferred, then the other mutable artifacts
    (the runner writes there anyway).  The root is an artifact's URL with its ``key``
    removed; an artifact given only by its ``qualified`` URL (the client sends some so)
    gives its store's root (:func:`bucket_root`)."""
    artifacts = request.get("experiment", {}).get("artifacts") or {}
    ordered = sorted(artifacts.items(), key=lambda item: (
        item[0] != "_metadata", not (isinstance(item[1], dict) and item[1].get("mutable"))))
    derived: tuple[str | None, dict | None] = (None, None)
    for _label, artifact in ordered:
        if not isinstance(artifact, dict):
            continue
        url, key = artifact_url(artifact), artifact.get("key")
        if not url or url.startswith(("http://", "https://")):
            continue
        if key and url.endswith(key):
            return url[: -len(key)].rstrip("/"), artifact
        if not key and derived[0] is None:
            bucket = artifact.get("bucket")
            root = bucket_root(url, bucket if isinstance(bucket, str) else None)
            if root:
                derived = (root, artifact)
    return derived


def store_root_url(request: dict) -> str | None:
    """The storage root of the request: an artifact's URL with its ``key`` removed."""
    return store_root(request)[0]


def record_url(request: dict, override: str = "") -> str | None:
    """Where the metadata store keeps this request's record, or None when it has no storage."""
    experiment = request.get("experiment", {})
    project = experiment.get("project") or "_default"
    root = override.rstrip("/") if override else store_root_url(request)
    if not root:
        return None
    return f"{root}/metadata/{project}/{experiment.get('key')}.json"


def write_record(request: dict, *, status: str, attempt_id: str, attempts: int, final: bool,
                 hostname: str, override: str = "", reason: str = "") -> None:
    """Write the redacted request and its latest status to the metadata store.

    ``reason`` (when given) says why the request is in that state, e.g. why a runner
    cannot run it ("runner-a: needs 1 GPU; this runner has 0"); ``runner-submit --wait``
    prints it.

    Raises :class:`~runner.errors.StorageError` when the store cannot be written.
    """
    url = record_url(request, override)
    if url is None:
        log.warning("request %s has no storage for its metadata record",
                    request.get("experiment", {}).get("key"))
        return
    record = {"request": redact_request(request), "status": status, "final": final,
              "attempt": attempt_id, "attempts": attempts, "host": hostname,
              "updated": iso_utc(time.time())}
    if reason:
        record["reason"] = reason
    artifact = None if override else store_root(request)[1]
    store = open_for_request(url, request, artifact)
    store.put_bytes(url, strict_json.dumps(record, indent=1, sort_keys=True).encode())


def _name_problem(url: str) -> str | None:
    """Why the store of ``url`` cannot hold an object of that name, or None."""
    try:
        scheme, rest = split_url(url)
        if scheme == "s3":
            name = parse_s3_url(url).key
        elif scheme == "gs":
            name = rest.partition("/")[2]
        elif scheme == "file":
            # the file store writes <name>.partial-<hex> beside it first: that must fit too
            path = rest.encode("utf-8", "surrogatepass") + b"x" * PARTIAL_SUFFIX_BYTES
            long_part = max(path.split(b"/"), key=len)
            if len(path) > MAX_PATH_BYTES:
                return (f"a path of {len(path)} bytes with its temporary suffix (file "
                        f"systems take {MAX_PATH_BYTES})")
            if len(long_part) > MAX_NAME_BYTES:
                return (f"a name of {len(long_part)} bytes in the path with its temporary "
                        f"suffix (file systems take {MAX_NAME_BYTES})")
            return None
        else:
            return None
    except StorageError:
        return None  # not a store URL: the request's own validation speaks of it
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        return f"an object name of {size} bytes ({scheme} takes {MAX_KEY_BYTES})"
    return None


def check_object_names(request: dict, hostname: str, override: str = "") -> None:
    """Refuse a request whose metadata-store record or ``_metadata`` files would have
    object names too long for their store (SPEC section 12: a key the store refuses is the
    request's fault), or would lie outside the runner's ``--file-store-roots`` on
    ``file://`` (an artifact ``key`` that strips the URL above the store's folder).
    Checked at admission, so that such a request is dead-lettered with the reason instead
    of running and ending without its record.

    Raises :class:`~runner.errors.BadRequest` naming the object and the limit.
    """
    names = []
    record = record_url(request, override)
    if record:
        names.append(("metadata record", record))
    prefix = metadata_prefix_url(request)
    if prefix:
        longest_id = f"{hostname}-" + "z" * _ATTEMPT_DIGITS
        for name in (output_name(longest_id), runner_log_name(longest_id),
                     scrape_name(longest_id)):
            names.append(("metadata file", f"{prefix}/{name}"))
    artifacts = (request.get("experiment") or {}).get("artifacts") or {}
    for label, artifact in sorted(artifacts.items()) if isinstance(artifacts, dict) else ():
        url = artifact_url(artifact) if isinstance(artifact, dict) and artifact.get(
            "mutable") else None
        if url:  # uploaded at the end: a name the store refuses would lose the outputs
            names.append((f"mutable artifact {label!r}", url))
    for what, url in names:
        if url.startswith("file://"):
            try:
                check_file_url(url)
            except StorageError as exc:
                raise BadRequest(f"the {what}: {exc}") from exc
        problem = _name_problem(url)
        if problem:
            shown = url if len(url) <= 160 else f"{url[:120]}...{url[-30:]}"
            raise BadRequest(f"the {what} {shown} would need {problem}: "
                             "use a shorter experiment key or project")


#: Where the cache manager leaves the digests of the mutable artifacts it downloaded,
#: relative to the attempt's working directory.
DOWNLOADED_DIGESTS = Path(".runner") / "downloaded.json"


def write_downloaded_digests(workdir: str | os.PathLike, digests: dict[str, str]) -> None:
    """Record ``digests`` (artifact label -> content digest, :func:`runner.archive.tree_digest`)
    of what was downloaded into ``workdir``: written last, atomically, also when empty, since
    the file's presence says every input is in place.  Raises OSError when it cannot be
    written."""
    target = Path(workdir) / DOWNLOADED_DIGESTS
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(digests))
    os.replace(tmp, target)


def read_downloaded_digests(workdir: str | os.PathLike) -> dict[str, str] | None:
    """The digests :func:`write_downloaded_digests` left in ``workdir``, or None while the
    inputs are not all in place (no file yet, or one that cannot be read as a JSON object's
    worth of labels; entries are strings)."""
    try:
        seeds = json.loads((Path(workdir) / DOWNLOADED_DIGESTS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(seeds, dict):
        return {}
    return {str(label): str(digest) for label, digest in seeds.items()}


def inputs_placed(workdir: str | os.PathLike) -> bool:
    """True once the cache manager has placed every input in ``workdir`` (module doc)."""
    return (Path(workdir) / DOWNLOADED_DIGESTS).exists()
