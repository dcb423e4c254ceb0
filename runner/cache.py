"""The artifact cache, owned by the cache manager (SPEC section 4, "Cache").

Every artifact download goes through :meth:`ArtifactCache.lease`.  The object's *content
identity* comes from the store (:meth:`runner.storage.base.Store.identity`: URL + ETag + size
for S3, URL + generation + size for GCS, the compiled hot path's content hash for
``file://``), and the bytes are served from
``<cache-dir>/artifacts/objects/<sha256(identity)>.<size>``, downloaded first when absent.

* **One request for a new URL.**  A URL this cache has never stored (every experiment's own
  workspace) is downloaded at once, one ``GET``, its identity taken from the download, where
  the store's stat is a request (:attr:`~runner.storage.base.Store.stat_is_remote`).  A URL
  it has stored is stat'ed first (a ``HEAD``), and served from the cache when its identity
  is unchanged.  Which URLs were stored, and as which entry, is kept in
  ``<root>/urls/<sha256(url)>`` (the entry's key), removed with the entry.

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
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StorageError
from .storage.base import ObjectInfo, ObjectMissing, Store

log = logging.getLogger(__name__)

_ENTRY_NAME = re.compile(r"^([0-9a-f]{64})\.([0-9]+)$")
_KEY = re.compile(r"^[0-9a-f]{64}$")
DOWNLOADS_AT_ONCE = 8  # lease_all: an attempt's artifacts downloaded side by side


def _run_now(function, *args) -> Future:
    """``function(*args)`` run in this thread, as a finished future."""
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except BaseException as exc:  # noqa: BLE001 - handed to the future's reader
        future.set_exception(exc)
    return future


@dataclass
class _Entry:
    path: Path
    size: int
    refs: int = 0
    urls: set[str] = field(default_factory=set)  # url keys (urls/ files) naming this entry


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
        self.urls = self.root / "urls"
        self.max_bytes = max(0, int(max_bytes))
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._flights: dict[str, _Flight] = {}
        self._url_keys: dict[str, str] = {}  # sha256(url) -> entry key, for stored URLs
        self._pool: ThreadPoolExecutor | None = None  # lease_all's downloads, made on first use
        self._bytes = 0
        self.hits = self.misses = self.evictions = self.uncached = 0
        self.bytes_downloaded = 0
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.urls.mkdir(parents=True, exist_ok=True)
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
        for path in self.urls.iterdir():
            with contextlib.suppress(OSError, UnicodeDecodeError):
                key = path.read_text("ascii") if _KEY.match(path.name) else ""
                if key in self._entries:
                    self._url_keys[path.name] = key
                    self._entries[key].urls.add(path.name)
                else:
                    path.unlink()
        log.info("%s %s: %d entries, %d bytes (limit %d); %d partial or broken "
                 "files discarded", self.name, self.root, len(self._entries), self._bytes, self.max_bytes,
                 discarded)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(OSError, ValueError):
            self._lock_file.close()

    # -- use ------------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self, store: Store, url: str) -> Iterator[Lease]:
        """The object at ``url``, from the cache or downloaded into it, held while in use.

        Raises :class:`ObjectMissing` when there is no object, :class:`StorageError`
        when it cannot be read.  The entry cannot be evicted until the ``with`` ends.
        """
        url_key = cache_key(url)
        new = None  # (entry key, or None for a private file; lease) of a download unstat'ed
        while new is None and store.stat_is_remote and not self._knows(url_key):
            # Callers may read one URL with different credentials: one refused is no
            # answer for another, so a waiter whose leader failed downloads itself.  None:
            # another caller stored it meanwhile (served below).
            new = self._single_flight(f"url {url_key}", lambda: url_key in self._url_keys,
                                      lambda: self._download_new(store, url, url_key),
                                      share_errors=False)
        if new is None:
            info = store.stat(url)
            if info is None:
                raise ObjectMissing(url)
            identity = store.identity(info)
            if identity:
                held, hit, got = self._acquire(cache_key(identity), store, url, info)
                try:
                    with self._lock:
                        path = self._entries[held].path
                    yield Lease(path=path, info=got, hit=hit)
                finally:
                    self._release(held)
                return
            # The stat cannot name the content: downloaded privately (or cached, when the
            # download's own answer names it).
            new = self._download_new(store, url, url_key)
        key, lease = new
        try:
            yield lease
        finally:
            if key is None:
                remove_entry(lease.path)
            else:
                self._release(key)

    @contextlib.contextmanager
    def lease_all(self, wanted: Sequence[tuple[Store, str]]) -> Iterator[list[Lease | StorageError]]:
        """:meth:`lease` of every ``(store, url)`` in ``wanted``, downloaded side by side
        (:data:`DOWNLOADS_AT_ONCE` at a time), all held until the ``with`` ends.

        Yields one item per ``wanted``, in order: its :class:`Lease`, or the
        :class:`StorageError` (:class:`ObjectMissing` included) its lease raised.  Any other
        exception is raised once every lease taken is released.
        """
        submit = self._downloads().submit if len(wanted) > 1 else _run_now

        def enter(store: Store, url: str):
            manager = self.lease(store, url)
            return manager, manager.__enter__()

        with contextlib.ExitStack() as held:
            futures = [submit(enter, store, url) for store, url in wanted]
            results: list[Lease | StorageError] = []
            crash: BaseException | None = None
            for future in futures:
                try:
                    manager, lease = future.result()
                except StorageError as exc:
                    results.append(exc)
                    continue
                except BaseException as exc:
                    crash = crash or exc
                    continue
                held.push(manager.__exit__)
                results.append(lease)
            if crash is not None:
                raise crash
            yield results

    def _downloads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(DOWNLOADS_AT_ONCE, thread_name_prefix="download")
            return self._pool

    def _knows(self, url_key: str) -> bool:
        with self._lock:
            return url_key in self._url_keys

    def _single_flight(self, name: str, settled, work, *, share_errors: bool = True):
        """``work()``, run by one caller at a time per ``name``; None (nothing run) when
        ``settled()`` (called under the lock) or once another caller's run ended.

        Raises what ``work`` raised, in the caller that ran it and, with ``share_errors``,
        in those that waited (without it they get None, to try for themselves).
        """
        with self._lock:
            if settled():
                return None
            flight = self._flights.get(name)
            leader = flight is None
            if flight is None:
                flight = self._flights[name] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None and share_errors:
                raise flight.error
            return None
        try:
            result = work()
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                self._flights.pop(name, None)
            flight.done.set()
        return result

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
            done = self._single_flight(key, lambda: key in self._entries,
                                       lambda: self._download(key, store, url, info))
            if done is not None:
                self._evict()
                return done[0], False, done[1]
            # the entry is there now (or was evicted meanwhile): try again

    def _download(self, key: str, store: Store, url: str, info: ObjectInfo) -> tuple[str, ObjectInfo]:
        """Download ``url`` (stat'ed as ``info``) into the entry ``key``, held once."""
        target = self.tmp / f"{key}.{secrets.token_hex(6)}"
        try:
            got = store.get(url, target)
            if got.etag and info.etag and got.etag != info.etag:
                log.info("%s changed between stat and download; caching what was read", url)
                key = cache_key(store.identity(got))
        except BaseException:
            remove_entry(target)
            raise
        return self._install(key, target, url, got), got

    def _download_new(self, store: Store, url: str, url_key: str
                      ) -> tuple[str | None, Lease]:
        """Download ``url`` without a stat: (entry key, lease) with the entry held once, or
        (None, lease of a private file the caller removes) when the store gives no identity."""
        target = self.tmp / f"new-{secrets.token_hex(8)}"
        try:
            got = store.get(url, target)
            identity = store.identity(got)
        except BaseException:
            remove_entry(target)
            raise
        if not identity:
            with self._lock:
                self.uncached += 1
                self.bytes_downloaded += entry_size(target)
            return None, Lease(path=target, info=got, hit=False)
        key = self._install(cache_key(identity), target, url, got)
        self._evict()
        with self._lock:
            path = self._entries[key].path
        return key, Lease(path=path, info=got, hit=False)

    def _install(self, key: str, target: Path, url: str, got: ObjectInfo) -> str:
        """Move the download ``target`` into the entry ``key``, held once, and remember
        that ``url`` is stored as it.  Raises :class:`StorageError` when it cannot be stored."""
        try:
            size = entry_size(target)
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
            entry = self._entries[key] = _Entry(
                final, size, refs=(existing.refs if existing else 0) + 1,
                urls=existing.urls if existing else set())
            self._entries.move_to_end(key)
            self.misses += 1
            self.bytes_downloaded += size
            self._remember_url(cache_key(url), key, entry)
        return key

    def _remember_url(self, url_key: str, key: str, entry: _Entry) -> None:
        """Under the lock: ``urls/<url_key>`` names the entry ``key`` (best effort: without
        the file the URL is only downloaded again, never served wrong)."""
        previous = self._url_keys.get(url_key)
        if previous == key:
            return
        if previous is not None and previous in self._entries:
            self._entries[previous].urls.discard(url_key)
        self._url_keys[url_key] = key
        entry.urls.add(url_key)
        note = self.urls / f".{url_key}.{secrets.token_hex(4)}"
        try:
            note.write_text(key, "ascii")
            os.replace(note, self.urls / url_key)
        except OSError as exc:
            log.debug("%s: cannot note %s: %s", self.name, url_key, exc)
            with contextlib.suppress(OSError):
                note.unlink()

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
                for url_key in entry.urls:
                    if self._url_keys.get(url_key) == key:
                        del self._url_keys[url_key]
                        with contextlib.suppress(OSError):
                            (self.urls / url_key).unlink()
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
