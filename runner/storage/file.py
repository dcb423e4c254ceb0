"""``file://`` storage: objects are plain files on a local (or locally mounted) file system.

URLs are ``file:///abs/path`` or ``file://localhost/abs/path``.  The path part is taken
literally (no percent-decoding), must be absolute and must not contain ``..``
components.  An object's ``etag`` is ``"<size>-<mtime_ns>"``; its cache identity is the
content hash of the compiled hot path (xxh3-128), so two paths with the same bytes share
one cache entry (the hash of a file is remembered while its size, mtime and inode stay).  Temporary files
(``*.partial-<hex>``) written by an in-progress ``get``/``put`` are never listed.  A writer
killed mid-write (SIGKILL, a power cut) leaves its partial file behind; every ``put`` first
removes the partial files in its destination's folder that nobody has written to for
:data:`STALE_PARTIAL_AFTER` seconds (a live writer streams into its partial file, so its
mtime keeps moving), so such leftovers last until the next upload into that folder.

Confinement: in the runner, every ``file://`` path must lie under one of the folders of
``--file-store-roots`` (:attr:`~runner.storage.base.StorageSettings.file_roots`), judged on
its real path (symlinks and ``..`` resolved), so that a request cannot read or write the
runner host's files.  A request naming another path is refused at admission
(:func:`check_file_url`, a bad request); a path that escapes later (a symlink made since)
fails the operation with :class:`PermanentStorageError`.
"""
from __future__ import annotations

import builtins
import errno
import logging
import os
import re
import stat as stat_mod
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import PermanentStorageError, StorageError, storage_error_for
from . import base
from .base import CHUNK_SIZE, ObjectInfo, ObjectMissing, Store, atomic_destination, split_url

log = logging.getLogger(__name__)

_PARTIAL_RE = re.compile(r"\.partial-[0-9a-f]{12}$")
#: A partial file not written to for this long (seconds) is a dead writer's leftover.
STALE_PARTIAL_AFTER = 15 * 60.0

# (path, size, mtime_ns, inode) -> content hash; bounded, shared by every FileStore.
_HASHES: OrderedDict[tuple, str] = OrderedDict()
_HASHES_LOCK = threading.Lock()
_HASHES_MAX = 4096


def file_url_to_path(url: str) -> Path:
    """The absolute local path named by a ``file://`` URL.

    Raises :class:`StorageError` for another scheme, a host other than ``localhost``, a
    relative path, ``..`` components, NUL bytes, or a query/fragment.
    """
    scheme, rest = split_url(url)
    if scheme != "file":
        raise StorageError(f"not a file:// URL: {url!r}")
    if rest.startswith("/"):
        path = rest
    elif rest.lower().startswith("localhost/"):
        path = rest[len("localhost"):]
    else:
        raise StorageError(
            f"file URL must be file:///absolute/path (no host, no relative path): {url!r}")
    if "\x00" in path or "?" in path or "#" in path:
        raise StorageError(f"file URL has characters not allowed in a path: {url!r}")
    if ".." in path.split("/"):
        raise StorageError(f"file URL must not contain '..' components: {url!r}")
    return Path(path)


def real_roots(paths) -> tuple:
    """``paths`` as real absolute folder paths (symlinks resolved), for ``file_roots``."""
    return tuple(os.path.realpath(os.path.abspath(os.fspath(p))) for p in paths)


def outside_roots(path: Path | str, roots: tuple | None = None) -> str:
    """Why ``path`` may not be used (its real path lies under none of ``roots``, default
    :attr:`~runner.storage.base.StorageSettings.file_roots`), or "" when it may.  No
    roots configured (``None``): every path may."""
    roots = base.SETTINGS.file_roots if roots is None else roots
    if roots is None:
        return ""
    real = os.path.realpath(os.fspath(path))
    for root in roots:
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return ""
    shown = os.fspath(path) + (f" (really {real})" if real != os.fspath(path) else "")
    return (f"file:// path {shown} is outside the runner's file stores "
            f"(--file-store-roots: {os.pathsep.join(roots) or 'none'})")


def check_file_url(url: str, roots: tuple | None = None) -> Path:
    """The path of ``url`` once it is a well-formed ``file://`` URL inside ``roots`` (default:
    the configured ones).  Raises :class:`PermanentStorageError` otherwise."""
    path = file_url_to_path(url)
    why = outside_roots(path, roots)
    if why:
        raise PermanentStorageError(why)
    return path


def path_to_file_url(path: Path | str) -> str:
    """``file:///abs/path`` for an absolute ``path`` (taken literally, like the parser)."""
    text = os.fspath(path)
    if not text.startswith("/"):
        raise StorageError(f"not an absolute path: {text!r}")
    return "file://" + text


def _info(url: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(url=url, size=st.st_size, etag=f"{st.st_size}-{st.st_mtime_ns}",
                      mtime=st.st_mtime)


def remove_stale_partials(folder: Path, older_than: float = STALE_PARTIAL_AFTER,
                          now: float | None = None) -> int:
    """Remove the ``*.partial-<hex>`` files directly in ``folder`` whose mtime is more
    than ``older_than`` seconds before ``now`` (a dead writer's leftovers, see the module
    doc); returns how many.  Never raises: a folder that cannot be read is left alone."""
    cutoff = (time.time() if now is None else now) - older_than
    removed = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not _PARTIAL_RE.search(entry.name):
                    continue
                try:
                    if entry.is_file(follow_symlinks=False) and \
                            entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                        log.info("removed %s, left by a writer that died", entry.path)
                except OSError:
                    continue  # gone meanwhile, or not ours to remove
    except OSError:
        return removed
    return removed


def _copy_stream(src: BinaryIO, dst: BinaryIO) -> int:
    """Copy ``src`` to ``dst`` in chunks; bytes copied."""
    total = 0
    while True:
        chunk = src.read(CHUNK_SIZE)
        if not chunk:
            return total
        dst.write(chunk)
        total += len(chunk)


class FileStore(Store):
    """Objects as files; ``put`` is atomic (temp file in the same directory + ``os.replace``)."""

    scheme = "file"
    stat_is_remote = False

    def stat(self, url: str) -> ObjectInfo | None:
        path = check_file_url(url)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        except OSError as exc:
            raise storage_error_for(exc, f"cannot stat {url}: {exc}") from exc
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return _info(url, st)

    def get(self, url: str, dest: Path) -> ObjectInfo:
        path = check_file_url(url)
        dest = Path(dest)
        try:
            if not stat_mod.S_ISREG(os.stat(path).st_mode):  # never open a FIFO or device
                raise ObjectMissing(url, f"not a regular file: {url}")
            src = open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectMissing(url) from exc
        except OSError as exc:
            raise storage_error_for(exc, f"cannot read {url}: {exc}") from exc
        with src:
            try:
                st = os.fstat(src.fileno())
                if not stat_mod.S_ISREG(st.st_mode):
                    raise ObjectMissing(url, f"not a regular file: {url}")
                with atomic_destination(dest) as tmp, open(tmp, "wb") as out:
                    copied = _copy_stream(src, out)
                    out.flush()
                    os.fsync(out.fileno())
            except StorageError:
                raise
            except OSError as exc:
                raise storage_error_for(exc, f"cannot copy {url} to {dest}: {exc}") from exc
        info = _info(url, st)
        if copied != info.size:
            log.warning("%s changed while being read (%d bytes read, %d at open)",
                        url, copied, info.size)
            info = ObjectInfo(url=url, size=copied, etag=info.etag, mtime=info.mtime)
        return info

    def identity(self, info: ObjectInfo) -> str:
        """``xxh3:<content hash>:<size>`` of the file (content-addressed, see module doc)."""
        from .. import _fast

        path = check_file_url(info.url)
        try:
            st = path.stat()
        except OSError as exc:
            raise storage_error_for(exc, f"cannot stat {info.url}: {exc}") from exc
        memo = (os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
        with _HASHES_LOCK:
            digest = _HASHES.get(memo)
            if digest is not None:
                _HASHES.move_to_end(memo)
        if digest is None:
            try:
                digest = _fast.content_hash(path)
            except OSError as exc:
                raise storage_error_for(exc, f"cannot read {info.url}: {exc}") from exc
            with _HASHES_LOCK:
                _HASHES[memo] = digest
                while len(_HASHES) > _HASHES_MAX:
                    _HASHES.popitem(last=False)
        return f"xxh3:{digest}:{st.st_size}"

    def put_stream(self, url: str, fill: Callable[[BinaryIO], object]) -> ObjectInfo:
        path = check_file_url(url)
        if path.name == "":
            raise StorageError(f"file URL names a directory, not an object: {url!r}")
        return self._write(url, path, fill)

    def put(self, url: str, src: Path) -> ObjectInfo:
        path = check_file_url(url)
        if path.name == "":
            raise StorageError(f"file URL names a directory, not an object: {url!r}")
        try:
            fsrc = open(src, "rb")
        except OSError as exc:
            raise StorageError(f"cannot read upload source {src}: {exc}") from exc
        with fsrc:
            return self._write(url, path, lambda out: _copy_stream(fsrc, out))

    def put_bytes(self, url: str, data: bytes) -> ObjectInfo:
        path = check_file_url(url)
        if path.name == "":
            raise StorageError(f"file URL names a directory, not an object: {url!r}")
        return self._write(url, path, lambda out: out.write(data))

    def _write(self, url: str, path: Path, fill) -> ObjectInfo:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:  # a file where a folder of the URL should be
            raise PermanentStorageError(f"cannot write {url}: {path.parent} or a folder above "
                                        f"it is a file, not a folder") from exc
        except OSError as exc:
            raise storage_error_for(exc, f"cannot write {url}: {exc}") from exc
        remove_stale_partials(path.parent)
        try:
            with atomic_destination(path) as tmp, open(tmp, "wb") as out:
                fill(out)
                out.flush()
                os.fsync(out.fileno())
            st = path.stat()
        except StorageError:
            raise
        except OSError as exc:
            raise storage_error_for(exc, f"cannot write {url}: {exc}") from exc
        return _info(url, st)

    def list(self, prefix_url: str) -> list[str]:
        prefix = os.fspath(check_file_url(prefix_url))
        if prefix_url.endswith("/") and not prefix.endswith("/"):
            prefix += "/"  # Path() drops the trailing slash; "dir/" must not match "dir2"
        if prefix.endswith("/"):
            roots = [prefix]
        else:
            parent, base = os.path.split(prefix)
            try:
                names = os.listdir(parent or "/")
            except (FileNotFoundError, NotADirectoryError):
                return []
            except OSError as exc:
                raise storage_error_for(exc, f"cannot list {prefix_url}: {exc}") from exc
            roots = [os.path.join(parent, n) for n in names if n.startswith(base)]
        found: list[str] = []
        for root in roots:
            found.extend(self._walk(root, prefix_url))
        return sorted(set(path_to_file_url(p) for p in found
                          if p.startswith(prefix)))

    @staticmethod
    def _walk(root: str, prefix_url: str) -> builtins.list[str]:
        out: list[str] = []
        try:
            st = os.stat(root)
        except (FileNotFoundError, NotADirectoryError):
            return out
        except OSError as exc:
            raise storage_error_for(exc, f"cannot list {prefix_url}: {exc}") from exc
        if stat_mod.S_ISREG(st.st_mode):
            if not _PARTIAL_RE.search(root):
                out.append(root)
            return out
        if not stat_mod.S_ISDIR(st.st_mode):
            return out

        def onerror(exc: OSError) -> None:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise StorageError(f"cannot list {prefix_url}: {exc}") from exc

        for dirpath, _dirs, files in os.walk(root, onerror=onerror):
            for name in files:
                if _PARTIAL_RE.search(name):
                    continue
                full = os.path.join(dirpath, name)
                if os.path.isfile(full):
                    out.append(full)
        return out
