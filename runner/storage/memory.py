"""A storage back end held in this process's memory: the stub store for tests.

URLs are ``memory://<bucket>/<key>``.  Objects live in one :class:`MemoryObjects` table
per process.  Every scheme in :data:`runner.storage.STORES` is accepted in requests, so
the ``memory`` scheme is there only between :func:`install` and :func:`uninstall` (a
test's doing): a runner in production never accepts a ``memory://`` URL.  The store keeps
the contracts of :class:`~runner.storage.base.Store` (atomic ``get`` beside ``dest``,
:class:`~runner.storage.base.ObjectMissing` for a missing object, sorted listings) and
logs each operation in :attr:`MemoryObjects.operations` for tests to read.
"""
from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import ClassVar

from ..errors import StorageError
from .base import ObjectInfo, ObjectMissing, Store, atomic_destination, split_url

SCHEME = "memory"


class MemoryObjects:
    """Objects by URL, with their info; safe to use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, tuple[bytes, ObjectInfo]] = {}
        self.operations: list[tuple[str, str]] = []  # ("get" | "put", url), in order

    def write(self, url: str, data: bytes) -> ObjectInfo:
        """Store ``data`` at ``url`` (replacing what was there); its info."""
        _check_url(url)
        info = ObjectInfo(url=url, size=len(data), etag=hashlib.md5(data).hexdigest(),
                          mtime=time.time())
        with self._lock:
            self._objects[url] = (bytes(data), info)
            self.operations.append(("put", url))
        return info

    def read(self, url: str) -> bytes:
        """The bytes at ``url``; :class:`ObjectMissing` when there are none."""
        with self._lock:
            entry = self._objects.get(url)
            self.operations.append(("get", url))
        if entry is None:
            raise ObjectMissing(url)
        return entry[0]

    def info(self, url: str) -> ObjectInfo | None:
        with self._lock:
            entry = self._objects.get(url)
        return entry[1] if entry else None

    def urls(self, prefix: str = "") -> list[str]:
        """Sorted URLs that start with ``prefix``."""
        with self._lock:
            return sorted(url for url in self._objects if url.startswith(prefix))

    def puts(self) -> list[str]:
        """URLs written, in order (one entry per write)."""
        with self._lock:
            return [url for op, url in self.operations if op == "put"]


def _check_url(url: str) -> None:
    scheme, rest = split_url(url)
    if scheme != SCHEME or "/" not in rest.strip("/"):
        raise StorageError(f"not a memory storage URL (memory://bucket/key): {url!r}")


_installed: MemoryObjects | None = None


def install(objects: MemoryObjects | None = None) -> MemoryObjects:
    """Accept ``memory://`` URLs in this process, served from ``objects`` (a new table
    when None); the table."""
    from . import STORES

    global _installed
    _installed = objects or MemoryObjects()
    STORES[SCHEME] = MemoryStore
    return _installed


def uninstall() -> None:
    """Stop accepting ``memory://`` URLs."""
    from . import STORES

    global _installed
    _installed = None
    STORES.pop(SCHEME, None)


class MemoryStore(Store):
    """A :class:`~runner.storage.base.Store` on the installed :class:`MemoryObjects`."""

    scheme: ClassVar[str] = SCHEME

    def __init__(self, objects: MemoryObjects | None = None):
        objects = objects or _installed
        if objects is None:
            raise StorageError("memory:// storage is a test stub and is not installed")
        self.objects = objects

    def stat(self, url: str) -> ObjectInfo | None:
        _check_url(url)
        return self.objects.info(url)

    def get(self, url: str, dest: Path) -> ObjectInfo:
        _check_url(url)
        data = self.objects.read(url)
        info = self.objects.info(url)
        try:
            with atomic_destination(Path(dest)) as tmp:
                tmp.write_bytes(data)
        except OSError as exc:
            raise StorageError(f"cannot write {dest}: {exc}") from exc
        return info or ObjectInfo(url=url, size=len(data), etag="", mtime=time.time())

    def put(self, url: str, src: Path) -> ObjectInfo:
        try:
            data = Path(src).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read upload source {src}: {exc}") from exc
        return self.objects.write(url, data)

    def put_bytes(self, url: str, data: bytes) -> ObjectInfo:
        return self.objects.write(url, data)

    def list(self, prefix_url: str) -> list[str]:
        if not prefix_url:
            return []
        return self.objects.urls(prefix_url)
