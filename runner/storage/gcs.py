"""``gs://bucket/key`` storage with google-cloud-storage (SPEC section 4).

Credentials, first found wins (:func:`resolve_gcp_credentials`): the artifact's
``credentials.gcp`` (a service-account document), the file named by
``GOOGLE_APPLICATION_CREDENTIALS`` (the request's ``config.env``, then the runner's
environment), then Google's default chain (gcloud user credentials, the metadata server).

``STORAGE_EMULATOR_HOST`` in the runner's environment sends every request to that
emulator; an emulator checks no credentials, so the client is anonymous there (signing
with a real service account would try to reach Google's token endpoint).

An object's etag is its *generation* (it changes on every write), so the artifact cache
keys on ``url + generation + size``.  Downloads stream into a temporary file beside the
destination, pinned to the generation that was stat'ed; uploads stream through a
resumable upload in ``part_size`` chunks, so an archive is never held whole.
"""
from __future__ import annotations

import builtins
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import StorageError
from . import base
from .base import (ObjectInfo, ObjectMissing, PermanentStorageError, Store,
                   atomic_destination, retrying, split_url)

log = logging.getLogger(__name__)

SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
#: Resumable chunks must be multiples of 256 KiB.
_CHUNK_QUANTUM = 256 * 1024


def parse_gs_url(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``gs://bucket/key``; raises StorageError otherwise."""
    scheme, rest = split_url(url)
    if scheme != "gs":
        raise StorageError(f"not a gs:// URL: {url!r}")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"gs URL has no bucket: {url!r}")
    return bucket, key


@dataclass(frozen=True)
class GcpCredentials:
    """Where a GCS client's credentials come from: ``artifact`` (``info`` is the
    service-account document), ``file`` (``path``), ``default`` (Google's chain) or
    ``emulator`` (anonymous, ``STORAGE_EMULATOR_HOST`` is set)."""

    source: str
    info: str = ""   # the service-account document as canonical JSON (hashable)
    path: str = ""
    project: str = ""


def resolve_gcp_credentials(credentials: dict | None, env: dict | None,
                            environ: dict | None = None) -> GcpCredentials:
    """Which credentials a GCS client should use (precedence in the module doc)."""
    variables: Mapping[str, str] = os.environ if environ is None else environ
    document = credentials.get("gcp") if isinstance(credentials, dict) else None
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except ValueError:
            document = None
    chosen: GcpCredentials
    if isinstance(document, dict) and document.get("client_email") and document.get("private_key"):
        chosen = GcpCredentials("artifact", info=json.dumps(document, sort_keys=True),
                                project=str(document.get("project_id") or ""))
    else:
        path = ""
        for mapping in (env if isinstance(env, dict) else {}, variables):
            candidate = mapping.get("GOOGLE_APPLICATION_CREDENTIALS")
            if isinstance(candidate, str) and candidate and os.path.isfile(candidate):
                path = candidate
                break
        if path:
            project = ""
            try:
                with open(path) as handle:
                    project = str(json.load(handle).get("project_id") or "")
            except (OSError, ValueError, AttributeError):
                pass
            chosen = GcpCredentials("file", path=path, project=project)
        else:
            chosen = GcpCredentials("default")
    return chosen


_CLIENTS: OrderedDict[tuple, object] = OrderedDict()
_CLIENTS_LOCK = threading.Lock()


def _client(creds: GcpCredentials):
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    key = (creds, emulator)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is not None:
            _CLIENTS.move_to_end(key)
            return client
        from google.cloud import storage

        project = creds.project or os.environ.get("GOOGLE_CLOUD_PROJECT") or None
        try:
            if emulator:
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(project=project or "studioml-runner",
                                        credentials=AnonymousCredentials())
            elif creds.source == "artifact":
                from google.oauth2 import service_account

                credentials = service_account.Credentials.from_service_account_info(
                    json.loads(creds.info), scopes=SCOPES)
                client = storage.Client(project=project, credentials=credentials)
            elif creds.source == "file":
                import google.auth

                credentials, file_project = google.auth.load_credentials_from_file(
                    creds.path, scopes=SCOPES)
                client = storage.Client(project=project or file_project, credentials=credentials)
            else:
                client = storage.Client(project=project)
        except Exception as exc:
            raise PermanentStorageError(f"cannot build a Google Cloud Storage client "
                                        f"({creds.source} credentials): {exc}") from exc
        _CLIENTS[key] = client
        while len(_CLIENTS) > 16:
            _CLIENTS.popitem(last=False)
        return client


def _translate(exc: BaseException, url: str, what: str, *, reading: bool) -> StorageError:
    from google.api_core import exceptions as api

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, api.NotFound) and reading:
        return ObjectMissing(url)
    if isinstance(exc, (api.Forbidden, api.Unauthorized, api.BadRequest,
                        api.MethodNotAllowed, api.PreconditionFailed)):
        return PermanentStorageError(f"cannot {what} {url}: {exc}")
    try:
        from google.auth.exceptions import DefaultCredentialsError, RefreshError
    except ImportError:  # pragma: no cover
        DefaultCredentialsError = RefreshError = ()  # type: ignore[assignment, misc]
    if isinstance(exc, (DefaultCredentialsError, RefreshError)):
        return PermanentStorageError(f"cannot {what} {url}: no usable Google credentials: {exc}")
    if isinstance(exc, Exception):
        return StorageError(f"cannot {what} {url}: {type(exc).__name__}: {exc}")
    raise exc


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, StorageError) and not isinstance(
        exc, (PermanentStorageError, ObjectMissing))


def _info(url: str, blob) -> ObjectInfo:
    updated = blob.updated.timestamp() if getattr(blob, "updated", None) else 0.0
    return ObjectInfo(url=url, size=int(blob.size or 0), etag=str(blob.generation or ""),
                      mtime=updated)


class _Counting:
    """Counts the bytes written through to a GCS ``BlobWriter``."""

    def __init__(self, target):
        self.target, self.size = target, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.target.write(bytes(data) if not isinstance(data, bytes) else data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


class GcsStore(Store):
    """Google Cloud Storage (and its emulator) through google-cloud-storage."""

    scheme = "gs"

    def __init__(self, credentials: dict | None = None, env: dict | None = None):
        self.credentials = resolve_gcp_credentials(credentials, env)

    @classmethod
    def from_url(cls, url: str, *, credentials: dict | None = None,
                 storage_config: dict | None = None, env: dict | None = None) -> GcsStore:
        parse_gs_url(url)
        return cls(credentials, env)

    def _call(self, url: str, what: str, action: Callable, *, reading: bool):
        def once():
            try:
                return action(_client(self.credentials))
            except Exception as exc:
                raise _translate(exc, url, what, reading=reading) from exc
        return retrying(once, f"{what} {url}", transient=_transient)

    def stat(self, url: str) -> ObjectInfo | None:
        bucket, key = parse_gs_url(url)
        if not key:
            return None
        try:
            blob = self._call(url, "stat", lambda c: c.bucket(bucket).get_blob(key), reading=True)
        except ObjectMissing:
            return None
        return None if blob is None else _info(url, blob)

    def get(self, url: str, dest: Path) -> ObjectInfo:
        bucket, key = parse_gs_url(url)
        dest = Path(dest)

        def download(client):
            blob = client.bucket(bucket).get_blob(key)
            if blob is None:
                raise ObjectMissing(url)
            info = _info(url, blob)  # the download rewrites the blob's properties
            with atomic_destination(dest) as tmp:
                with open(tmp, "wb") as out:
                    blob.download_to_file(out, if_generation_match=blob.generation,
                                          raw_download=True)
                    out.flush()
                    os.fsync(out.fileno())
                    copied = out.tell()
                if copied != info.size:
                    raise StorageError(f"download of {url} truncated: {copied} of {info.size} bytes")
            return info
        return self._call(url, "download", download, reading=True)

    def put(self, url: str, src: Path) -> ObjectInfo:
        return self.put_file_by_stream(url, src)

    def put_stream(self, url: str, fill: Callable[[BinaryIO], object]) -> ObjectInfo:
        bucket, key = parse_gs_url(url)
        if not key or key.endswith("/"):
            raise StorageError(f"gs URL names no object: {url!r}")
        chunk = max(_CHUNK_QUANTUM, base.SETTINGS.part_size // _CHUNK_QUANTUM * _CHUNK_QUANTUM)

        def upload(client):
            blob = client.bucket(bucket).blob(key)
            writer = blob.open("wb", chunk_size=chunk, ignore_flush=True)
            counting = _Counting(writer)
            # Not closed when fill() fails: closing would finish the upload with what
            # was written so far; the unfinished resumable session expires on its own.
            fill(counting)  # type: ignore[arg-type]
            writer.close()
            return ObjectInfo(url=url, size=counting.size, etag=str(blob.generation or ""),
                              mtime=time.time())
        try:
            return upload(_client(self.credentials))
        except Exception as exc:
            raise _translate(exc, url, "upload", reading=False) from exc

    def put_bytes(self, url: str, data: bytes) -> ObjectInfo:
        return self.put_stream(url, lambda out: out.write(data))

    def list(self, prefix_url: str) -> list[str]:
        return [info.url for info in self.list_info(prefix_url)]

    def existing(self, urls: builtins.list[str]) -> set[str] | None:
        """One listing of the folder (``delimiter=/``) when every URL is an object of one
        folder of one bucket; else None."""
        if not urls:
            return set()
        names = {url: parse_gs_url(url) for url in urls}
        # The folder is the key up to and with its last "/" (see S3Store.existing).
        folders = {(bucket, key[:key.rfind("/") + 1]) for bucket, key in names.values()}
        if len(folders) != 1:
            return None
        bucket, prefix = folders.pop()

        def listing(client):
            blobs = client.list_blobs(bucket, prefix=prefix, delimiter="/")
            return {blob.name for blob in blobs}
        found = self._call(urls[0], "list", listing, reading=True)
        return {url for url, (_, key) in names.items() if key in found}

    def list_info(self, prefix_url: str) -> builtins.list[ObjectInfo]:
        bucket, key = parse_gs_url(prefix_url)

        def listing(client):
            return [_info(f"gs://{bucket}/{blob.name}", blob)
                    for blob in client.list_blobs(bucket, prefix=key)]
        try:
            return sorted(self._call(prefix_url, "list", listing, reading=True),
                          key=lambda info: info.url)
        except ObjectMissing:
            return []
