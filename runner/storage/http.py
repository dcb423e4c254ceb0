"""``http://`` and ``https://`` artifacts: read-only downloads of an artifact's ``url``.

``stat`` is a ``HEAD`` (falling back to a ranged ``GET`` for servers that refuse
``HEAD``); an object's etag is the server's ``ETag``, else ``Last-Modified``, else empty
(then the cache keys on URL and size alone).  ``get`` streams the body into a temporary
file beside the destination and checks ``Content-Length`` when the server sent one.
404 and 410 are :class:`ObjectMissing`; other 4xx are permanent; 5xx and connection
errors are retried with backoff.  Writing or listing is a :class:`StorageError`: these
URLs are inputs only.
"""
from __future__ import annotations

import email.utils
import logging
import os
from pathlib import Path

from ..errors import StorageError
from .base import (CHUNK_SIZE, ObjectInfo, ObjectMissing, PermanentStorageError, Store,
                   atomic_destination, retrying, split_url)

log = logging.getLogger(__name__)

TIMEOUT = (10, 60)  # connect, read (seconds)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, StorageError) and not isinstance(
        exc, (PermanentStorageError, ObjectMissing))


def _check(url: str, status: int, what: str) -> None:
    if status in (404, 410):
        raise ObjectMissing(url)
    if 400 <= status < 500 and status not in (408, 429):
        raise PermanentStorageError(f"cannot {what} {url}: HTTP {status}")
    if status >= 400:
        raise StorageError(f"cannot {what} {url}: HTTP {status}")


def _info(url: str, headers, size: int | None) -> ObjectInfo:
    etag = (headers.get("ETag") or "").strip()
    modified = headers.get("Last-Modified") or ""
    mtime = 0.0
    if modified:
        try:
            mtime = email.utils.parsedate_to_datetime(modified).timestamp()
        except (TypeError, ValueError):
            pass
    return ObjectInfo(url=url, size=-1 if size is None else size, etag=etag or modified,
                      mtime=mtime)


class HttpStore(Store):
    """Read-only objects behind plain http(s) URLs (requests, streamed)."""

    scheme = "https"

    def __init__(self) -> None:
        import requests

        self.session = requests.Session()

    def _request(self, method: str, url: str, **kwargs):
        import requests

        scheme, _ = split_url(url)
        if scheme not in ("http", "https"):
            raise StorageError(f"not an http(s) URL: {url!r}")
        try:
            return self.session.request(method, url, timeout=TIMEOUT, allow_redirects=True,
                                        **kwargs)
        except requests.RequestException as exc:
            raise StorageError(f"cannot {method} {url}: {type(exc).__name__}: {exc}") from exc

    def stat(self, url: str) -> ObjectInfo | None:
        def once():
            response = self._request("HEAD", url)
            if response.status_code in (403, 405, 501):  # some servers refuse HEAD
                response = self._request("GET", url, headers={"Range": "bytes=0-0"}, stream=True)
                response.close()
                if response.status_code == 206:
                    total = (response.headers.get("Content-Range") or "").rpartition("/")[2]
                    return _info(url, response.headers, int(total) if total.isdigit() else None)
            _check(url, response.status_code, "stat")
            length = response.headers.get("Content-Length")
            return _info(url, response.headers, int(length) if length and length.isdigit() else None)
        try:
            return retrying(once, f"stat {url}", transient=_transient)
        except ObjectMissing:
            return None

    def get(self, url: str, dest: Path) -> ObjectInfo:
        dest = Path(dest)

        def once():
            response = self._request("GET", url, stream=True)
            with response:
                _check(url, response.status_code, "download")
                length = response.headers.get("Content-Length")
                expected = int(length) if length and length.isdigit() else None
                if response.headers.get("Content-Encoding"):
                    expected = None  # requests decodes; the length is of the encoded body
                copied = 0
                with atomic_destination(dest) as tmp:
                    with open(tmp, "wb") as out:
                        try:
                            for chunk in response.iter_content(CHUNK_SIZE):
                                out.write(chunk)
                                copied += len(chunk)
                        except Exception as exc:
                            raise StorageError(f"download of {url} broke off: {exc}") from exc
                        out.flush()
                        os.fsync(out.fileno())
                    if expected is not None and copied != expected:
                        raise StorageError(
                            f"download of {url} truncated: {copied} of {expected} bytes")
                return _info(url, response.headers, copied)
        return retrying(once, f"download {url}", transient=_transient)

    def identity(self, info: ObjectInfo) -> str:
        """URL + validator + size; ``""`` (do not cache) when the server sent no validator."""
        if not info.etag:
            return ""
        return super().identity(info)

    def put(self, url: str, src: Path) -> ObjectInfo:
        raise PermanentStorageError(f"http(s) artifacts are read-only: cannot upload to {url}")

    def put_stream(self, url, fill) -> ObjectInfo:
        raise PermanentStorageError(f"http(s) artifacts are read-only: cannot upload to {url}")

    def put_bytes(self, url: str, data: bytes) -> ObjectInfo:
        raise PermanentStorageError(f"http(s) artifacts are read-only: cannot upload to {url}")

    def list(self, prefix_url: str) -> list[str]:
        raise PermanentStorageError(f"http(s) artifacts cannot be listed: {prefix_url}")

    def close(self) -> None:
        self.session.close()
