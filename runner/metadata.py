"""What the runner leaves behind about an experiment (SPEC section 6).

* attempt ids ``<hostname>-<base62 seconds>`` and the three per-attempt file names;
* where the ``_metadata`` files go (the artifact's key with its archive extension removed);
* the scrape document's skeleton;
* the metadata store: one redacted record per experiment at ``metadata/<project>/<key>.json``
  beside the request's storage, or under ``--metadata-store``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

from . import _fast
from .redact import redact_request
from .storage import artifact_url, open_for_request

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


def strip_archive_suffix(key_or_url: str) -> str:
    """``experiments/X/_metadata.tar`` → ``experiments/X/_metadata``."""
    return _ARCHIVE_SUFFIX.sub("", key_or_url)


def metadata_prefix_url(request: dict) -> str | None:
    """URL prefix under which this experiment's metadata files are uploaded, or None."""
    artifact = (request.get("experiment", {}).get("artifacts") or {}).get("_metadata")
    url = artifact_url(artifact) if isinstance(artifact, dict) else None
    return strip_archive_suffix(url) if url else None


def new_scrape_document(job, hostname: str) -> dict:
    """The scrape document at the start of an attempt (status ``running``)."""
    experiment = job.request.get("experiment", {})
    return {
        "runner": {"start": time.time(), "stop": None, "host": hostname,
                   "attempt": job.job_id, "attempt_number": job.attempts + 1,
                   "queue": job.queue},
        "experiment": {},
        "studioml": {"status": "running", "experiment": job.key, "project": job.project,
                     "owner": experiment.get("owner"), "time_added": experiment.get("time_added")},
        "asset": str(uuid.uuid4()),
    }


def store_root(request: dict) -> tuple[str | None, dict | None]:
    """The storage root of the request (an artifact's URL with its ``key`` removed) and
    the artifact it was taken from (whose credentials reach it).  ``_metadata`` is
    preferred, then the other mutable artifacts (the runner writes there anyway)."""
    artifacts = request.get("experiment", {}).get("artifacts") or {}
    ordered = sorted(artifacts.items(), key=lambda item: (
        item[0] != "_metadata", not (isinstance(item[1], dict) and item[1].get("mutable"))))
    for _label, artifact in ordered:
        if not isinstance(artifact, dict):
            continue
        url, key = artifact_url(artifact), artifact.get("key")
        if url and key and url.endswith(key) and not url.startswith(("http://", "https://")):
            return url[: -len(key)].rstrip("/"), artifact
    return None, None


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
                 hostname: str, override: str = "") -> None:
    """Write the redacted request and its latest status to the metadata store.

    Raises :class:`~runner.errors.StorageError` when the store cannot be written.
    """
    url = record_url(request, override)
    if url is None:
        log.warning("request %s has no storage for its metadata record",
                    request.get("experiment", {}).get("key"))
        return
    record = {"request": redact_request(request), "status": status, "final": final,
              "attempt": attempt_id, "attempts": attempts, "host": hostname,
              "updated": time.time()}
    artifact = None if override else store_root(request)[1]
    store = open_for_request(url, request, artifact)
    store.put_bytes(url, json.dumps(record, indent=1, sort_keys=True).encode())
