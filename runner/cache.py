"""The artifact cache, owned by the cache manager (SPEC section 4, "Cache").

Every artifact download goes through :meth:`ArtifactCache.lease`: the object is stat'ed,
its *content identity* comes from the store (:meth:`runner.storage.base.Store.identity`:
URL + ETag + size for S3, URL + generation + size for GCS, the compiled hot path's
content hash for ``file://``), and the bytes are served from
``<cache-dir>/artifacts/objects/<sha256(identity)>.<size>``, downloaded first when
absent.

* **One download per object.**  Concurrent leases of one identity share a single
  download (single-flight): the first caller downloads, the others wait for it and are
  served from the cache (they count as hits).  A failed download fails its waiters too.
* **LRU by bytes.**  Past ``max_bytes`` the least recently used entries are removed, but
  never one that is leased (in use by an attempt being prepared); the cache may stay over
  its size until those leases end.  An object larger than the whole cache is still
  downloaded, used, and evicted when released.
* **Restart safe.**  Downloads land in ``tmp/`` and are renamed into ``objects/`` only
  when complete (after ``fsync``).  On start ``tmp/`` is emptied (partial downloads of a
  crashed runner are discarded) and the index is rebuilt from ``objects/``: a file whose
  size disagrees with the size in its name, or whose name is not an entry's, is deleted,
  so a truncated file is never served.  Last use survives as the file's mtime.
* **Folders too.**  A store whose ``get`` writes a folder (an unpacked container image,
  :mod:`runner.containers.oci_bwrap`) is cached the same way: the entry is the folder, its
  size the sum of its files' sizes, evicted as a whole.
* **Counters** (``hits``, ``misses``, ``evictions``, bytes and entries) feed the cache
  manager's heartbeat stats, and from there ``runner-ctl status`` and metrics.

One process owns a cache directory at a time (``flock`` on ``<root>/lock``): a second
runner pointed at the same ``--cache-dir`` is refused instead of deleting the first one's
partial downloads.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StorageError
from .storage.base import ObjectInfo, ObjectMissing, Store

log = logging.getLogger(__name__)

_ENTRY_NAME = re.compile(r"^([0-9a-f]{64})\.([0-9]+)$")


@dataclass
class _Entry:
    path: Path
    size: int
    refs: int = 0


@dataclass
class _Flight:
    """A download in progress that other callers can wait for."""

    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass(frozen=True)
class Lease:
    """A cached object in use: read ``path``, never write it."""

    path: Path
    info: ObjectInfo
    hit: bool


class CacheBusy(StorageError):
    """Another process owns this cache directory."""


def entry_size(path: Path) -> int:
    """Bytes of a file, or of every file and link under a folder (not following links)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for folder, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def remove_entry(path: Path) -> None:
    """Delete a cache entry (file or folder); a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def cache_key(identity: str) -> str:
    return hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()


class ArtifactCache:
    """A content-addressed, size-bounded, thread-safe cache of downloaded objects."""

    def __init__(self, root: Path, max_bytes: int, name: str = "artifact cache"):
        self.name = name
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.max_bytes = max(0, int(max_bytes))
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._flights: dict[str, _Flight] = {}
        self._bytes = 0
        self.hits = self.misses = self.evictions = self.uncached = 0
        self.bytes_downloaded = 0
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / "lock", "a+")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock_file.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise CacheBusy(f"the {self.name} {self.root} is in use by another runner "
                                f"process; give each runner its own --cache-dir") from exc
            raise
        self._rebuild()
        self._evict()

    # -- start-up -------------------------------------------------------------------
    def _rebuild(self) -> None:
        discarded = 0
        for path in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                discarded += 1
        found = []
        for path in self.objects.iterdir():
            match = _ENTRY_NAME.match(path.name)
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            complete = (match is not None and not path.is_symlink()
                        and (path.is_file() or path.is_dir())
                        and entry_size(path) == int(match.group(2)))
            if match is None or not complete:
                log.warning("%s: discarding %s (not a complete entry)", self.name, path.name)
                with contextlib.suppress(OSError):
                    remove_entry(path)
                discarded += 1
                continue
            found.append((st.st_mtime, match.group(1), path, int(match.group(2))))
        for _mtime, key, path, size in sorted(found):
            if key in self._entries:  # two sizes for one key cannot both be right
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            self._entries[key] = _Entry(path, size)
            self._bytes += size
        log.info("%s %s: %d entries, %d bytes (limit %d); %d partial or broken "
                 "files discarded", self.name, self.root, len(self._entries), self._bytes, self.max_bytes,
                 discarded)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._lock_file.close()

    # -- use ------------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self, store: Store, url: str) -> Iterator[Lease]:
        """The object at ``url``, from the cache or downloaded into it, held while in use.

        Raises :class:`ObjectMissing` when there is no object, :class:`StorageError`
        when it cannot be read.  The entry cannot be evicted until the ``with`` ends.
        """
        info = store.stat(url)
        if info is None:
            raise ObjectMissing(url)
        identity = store.identity(info)
        if not identity:  # the store cannot name the content: download privately
            with self._private_download(store, url) as lease:
                yield lease
            return
        key, hit, got = self._acquire(cache_key(identity), store, url, info)
        try:
            with self._lock:
                path = self._entries[key].path
            yield Lease(path=path, info=got, hit=hit)
        finally:
            self._release(key)

    @contextlib.contextmanager
    def _private_download(self, store: Store, url: str) -> Iterator[Lease]:
        target = self.tmp / f"private-{secrets.token_hex(8)}"
        with self._lock:
            self.uncached += 1
        try:
            got = store.get(url, target)
            with self._lock:
                self.bytes_downloaded += entry_size(target)
            yield Lease(path=target, info=got, hit=False)
        finally:
            remove_entry(target)

    def _acquire(self, key: str, store: Store, url: str, info: ObjectInfo
                 ) -> tuple[str, bool, ObjectInfo]:
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.refs += 1
                    self._entries.move_to_end(key)
                    self.hits += 1
                    with contextlib.suppress(OSError):
                        os.utime(entry.path)
                    return key, True, info
                flight = self._flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._flights[key] = _Flight()
            if not leader:
                flight.done.wait()
                if flight.error is not None:
                    raise flight.error
                continue  # the entry is there now (or was evicted meanwhile: try again)
            try:
                final_key, got = self._download(key, store, url, info)
            except BaseException as exc:
                with self._lock:
                    self._flights.pop(key, None)
                flight.error = exc
                flight.done.set()
                raise
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()
            self._evict()
            return final_key, False, got

    def _download(self, key: str, store: Store, url: str, info: ObjectInfo) -> tuple[str, ObjectInfo]:
        target = self.tmp / f"{key}.{secrets.token_hex(6)}"
        try:
            got = store.get(url, target)
            size = entry_size(target)
            if got.etag and info.etag and got.etag != info.etag:
                log.info("%s changed between stat and download; caching what was read", url)
                key = cache_key(store.identity(got))
            final = self.objects / f"{key}.{size}"
            os.replace(target, final)
            self._fsync_dir(self.objects)
        except OSError as exc:
            raise StorageError(f"{self.name}: cannot store {url}: {exc}") from exc
        finally:
            remove_entry(target)
        with self._lock:
            existing = self._entries.get(key)
            if existing is not None and existing.path != final:
                self._bytes -= existing.size
            if existing is None or existing.path != final:
                self._bytes += size
            refs = existing.refs if existing is not None else 0
            self._entries[key] = _Entry(final, size, refs=refs + 1)
            self._entries.move_to_end(key)
            self.misses += 1
            self.bytes_downloaded += size
        return key, got

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _release(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.refs > 0:
                entry.refs -= 1
        self._evict()

    def _evict(self) -> None:
        """Remove least recently used entries not in use until the cache fits its size."""
        with self._lock:
            if self._bytes <= self.max_bytes:
                return
            for key in list(self._entries):
                if self._bytes <= self.max_bytes:
                    break
                entry = self._entries[key]
                if entry.refs > 0:
                    continue
                remove_entry(entry.path)
                del self._entries[key]
                self._bytes -= entry.size
                self.evictions += 1
                log.debug(self.name + ": evicted %s (%d bytes)", entry.path.name, entry.size)

    # -- reporting ------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters for the heartbeat: flat names, numbers only."""
        with self._lock:
            return {"cache_hits": self.hits, "cache_misses": self.misses,
                    "cache_evictions": self.evictions, "cache_uncached": self.uncached,
                    "cache_bytes": self._bytes, "cache_entries": len(self._entries),
                    "cache_in_use": sum(1 for e in self._entries.values() if e.refs),
                    "cache_limit": self.max_bytes,
                    "cache_bytes_downloaded": self.bytes_downloaded}

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries
