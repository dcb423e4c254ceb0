"""Tar archives of artifacts: safe streaming unpack and deterministic pack (SPEC section 4).

Unpacking detects the compression from the archive's bytes (the reference client writes
plain tars whatever the key says), streams it, and refuses hostile members: absolute
paths, ``..`` components, symlinks or hard links resolving outside the destination,
devices, FIFOs and unknown member types.  It never writes through a symlink that
resolves outside the destination, never writes into an existing inode (a file is
unlinked and recreated), drops setuid/setgid bits, does not chown, and stops before
writing past the byte budget.

Packing writes the contents of a directory (member names relative to it, sorted, no
``./``; or, for the client's single-file artifacts, its one file as ``./<name>``),
compressed as asked, and can stream to any writable file object so that an
uploader can stream a multipart upload.
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import logging
import lzma
import os
import stat as stat_mod
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from .errors import ArchiveError, DiskBudgetExceeded, StorageError
from .storage.base import atomic_destination

log = logging.getLogger(__name__)

COMPRESSIONS = ("none", "gzip", "bzip2", "xz", "zstd")

#: Bytes moved per read/write.
CHUNK_SIZE = 1024 * 1024

_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)

_KEY_SUFFIXES = (
    (".tar.gz", "gzip"), (".tgz", "gzip"),
    (".tar.bz2", "bzip2"), (".tbz2", "bzip2"), (".tbz", "bzip2"),
    (".tar.xz", "xz"), (".txz", "xz"),
    (".tar.zst", "zstd"), (".tar.zstd", "zstd"), (".tzst", "zstd"),
    (".tar", "none"),
)

_READ_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError,
    gzip.BadGzipFile, OSError, ValueError,
)


def detect_compression(head: bytes) -> str:
    """``"gzip" | "bzip2" | "xz" | "zstd" | "none"`` from an archive's first bytes (6 suffice)."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return "none"


def compression_for_key(key: str) -> str:
    """Compression an upload to ``key`` should use, from its extension (case-insensitive).

    ``.tar`` none, ``.tar.gz``/``.tgz`` gzip, ``.tar.bz2``/``.tbz2`` bzip2,
    ``.tar.xz``/``.txz`` xz, ``.tar.zst``/``.tzst`` zstd; anything else ``"none"``.
    """
    lowered = (key or "").lower()
    for suffix, name in _KEY_SUFFIXES:
        if lowered.endswith(suffix):
            return name
    return "none"


# --------------------------------------------------------------------------- unpack

def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def symlink_problem(target: str, parent: str, root: str) -> str | None:
    """Why :func:`unpack` refuses a symlink to ``target`` in folder ``parent`` under
    ``root`` (real paths), or None when it keeps it: an empty target, an absolute path,
    or a path resolving outside ``root``.  The text completes "<link> is ..."."""
    if not target or "\x00" in target:
        return "a symlink with an empty target"
    if target.startswith("/"):
        return f"a symlink to an absolute path {target!r}"
    if not _within(os.path.realpath(os.path.join(parent, target)), root):
        return f"a symlink pointing outside the destination ({target!r})"
    return None


def refused_symlinks(src_dir: Path) -> list[str]:
    """``"<relative path> -> <target>: <why>"`` for each symlink under ``src_dir`` that
    :func:`unpack` would refuse once packed (:func:`symlink_problem`): a folder holding
    one cannot be sent as an artifact.  Links are not followed."""
    root = os.path.realpath(src_dir)
    found = []
    for rel in _entries(Path(src_dir)):
        full = os.path.join(root, rel)
        if not os.path.islink(full):
            continue
        target = os.readlink(full)
        problem = symlink_problem(target, os.path.dirname(full), root)
        if problem:
            found.append(f"{rel} -> {target}: {problem}")
    return found


def _member_parts(name: str) -> list[str]:
    """Path components of a member name; raises ArchiveError for absolute or ``..`` names."""
    if not name or "\x00" in name:
        raise ArchiveError(f"archive member {name!r} has an empty or invalid name")
    if name.startswith("/"):
        raise ArchiveError(f"archive member {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"archive member {name!r} has a '..' component")
    return parts


@contextlib.contextmanager
def _decompressed(archive: Path) -> Iterator[BinaryIO]:
    """The archive's decompressed byte stream, compression detected from its bytes."""
    try:
        raw = open(archive, "rb")
    except OSError as exc:
        raise StorageError(f"cannot read archive {archive}: {exc}") from exc
    with raw:
        head = raw.read(8)
        raw.seek(0)
        kind = detect_compression(head)
        log.debug("unpacking %s (compression %s detected from bytes)", archive, kind)
        stream: Any  # a readable binary stream: the file or a decompressor over it
        if kind == "gzip":
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif kind == "bzip2":
            stream = bz2.BZ2File(raw, mode="rb")
        elif kind == "xz":
            stream = lzma.LZMAFile(raw, mode="rb")
        elif kind == "zstd":
            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        else:
            stream = raw
        try:
            yield stream
        finally:
            if stream is not raw:
                with contextlib.suppress(Exception):
                    stream.close()


class _Unpacker:
    """State of one unpack: destination, budget, bytes written, deferred directory modes."""

    def __init__(self, dest: Path, budget: int | None):
        self.root = os.path.realpath(dest)
        self.budget = budget
        self.written = 0
        self.dir_attrs: list[tuple[str, int, float]] = []

    # -- paths
    def _safe_dir(self, name: str, parts: list[str]) -> str:
        """Create (as needed) the directory ``parts`` under root; its real path, inside root."""
        current = self.root
        for part in parts:
            candidate = os.path.join(current, part)
            try:
                st = os.lstat(candidate)
            except FileNotFoundError:
                os.mkdir(candidate, 0o755)
                current = candidate
                continue
            if stat_mod.S_ISLNK(st.st_mode):
                real = os.path.realpath(candidate)
                if not _within(real, self.root):
                    raise ArchiveError(
                        f"archive member {name!r} would be written through a symlink "
                        f"pointing outside the destination")
                if not os.path.isdir(real):
                    raise ArchiveError(
                        f"archive member {name!r}: {part!r} is a symlink to a non-directory")
                current = real
            elif stat_mod.S_ISDIR(st.st_mode):
                current = candidate
            else:
                raise ArchiveError(f"archive member {name!r}: {part!r} is not a directory")
        return current

    def _clear_leaf(self, name: str, path: str) -> None:
        """Remove a non-directory already at ``path`` (so nothing is written into its inode)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat_mod.S_ISDIR(st.st_mode):
            raise ArchiveError(f"archive member {name!r} would replace a directory")
        os.unlink(path)

    # -- members
    def member(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        name = info.name
        if info.ischr() or info.isblk():
            raise ArchiveError(f"archive member {name!r} is a device file")
        if info.isfifo():
            raise ArchiveError(f"archive member {name!r} is a FIFO")
        if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
            raise ArchiveError(f"archive member {name!r} has unsupported type {info.type!r}")
        parts = _member_parts(name)
        if info.isdir():
            if parts:
                path = self._safe_dir(name, parts)
                self.dir_attrs.append((path, info.mode, info.mtime))
            return
        if not parts:
            raise ArchiveError(f"archive member {name!r} names the destination itself")
        parent = self._safe_dir(name, parts[:-1])
        leaf = os.path.join(parent, parts[-1])
        if info.issym():
            self._symlink(name, info.linkname, parent, leaf)
        elif info.islnk():
            self._hardlink(name, info.linkname, leaf)
        else:
            self._file(tar, info, leaf)

    def _symlink(self, name: str, target: str, parent: str, leaf: str) -> None:
        problem = symlink_problem(target, parent, self.root)
        if problem:
            raise ArchiveError(f"archive member {name!r} is {problem}")
        self._clear_leaf(name, leaf)
        os.symlink(target, leaf)

    def _hardlink(self, name: str, target: str, leaf: str) -> None:
        try:
            target_parts = _member_parts(target)
        except ArchiveError as exc:
            raise ArchiveError(f"archive member {name!r} is a hard link to {target!r}: "
                               f"{exc}") from None
        if not target_parts:
            raise ArchiveError(f"archive member {name!r} is a hard link to the destination")
        source = os.path.realpath(os.path.join(self.root, *target_parts))
        if not _within(source, self.root):
            raise ArchiveError(
                f"archive member {name!r} is a hard link pointing outside the destination "
                f"({target!r})")
        try:
            st = os.lstat(source)
        except FileNotFoundError:
            raise ArchiveError(
                f"archive member {name!r} is a hard link to missing member {target!r}") from None
        if not stat_mod.S_ISREG(st.st_mode):
            raise ArchiveError(
                f"archive member {name!r} is a hard link to a non-file {target!r}")
        if os.path.abspath(leaf) == source:
            return
        self._clear_leaf(name, leaf)
        os.link(source, leaf, follow_symlinks=False)

    def _file(self, tar: tarfile.TarFile, info: tarfile.TarInfo, leaf: str) -> None:
        name = info.name
        if self.budget is not None and self.written + info.size > self.budget:
            raise DiskBudgetExceeded(
                f"archive member {name!r} ({info.size} bytes) would exceed the disk budget "
                f"of {self.budget} bytes ({self.written} already written)")
        self._clear_leaf(name, leaf)
        source = tar.extractfile(info)
        if source is None:  # pragma: no cover - isreg() members always have data
            raise ArchiveError(f"archive member {name!r} has no data")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(leaf, flags, 0o600)
        try:
            while True:
                try:
                    chunk = source.read(CHUNK_SIZE)
                except _READ_ERRORS as exc:
                    raise ArchiveError(
                        f"corrupt archive while reading member {name!r}: {exc}") from exc
                if not chunk:
                    break
                if self.budget is not None and self.written + len(chunk) > self.budget:
                    raise DiskBudgetExceeded(
                        f"archive member {name!r} exceeds the disk budget of "
                        f"{self.budget} bytes")
                view = memoryview(chunk)
                while view:
                    done = os.write(fd, view)
                    view = view[done:]
                self.written += len(chunk)
            os.fchmod(fd, info.mode & 0o7777 & ~(stat_mod.S_ISUID | stat_mod.S_ISGID))
            with contextlib.suppress(OSError, OverflowError, ValueError):
                os.utime(fd, (info.mtime, info.mtime))
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Apply directory modes and times, deepest first (so earlier ones do not block)."""
        for path, mode, mtime in sorted(self.dir_attrs, key=lambda t: t[0], reverse=True):
            mode = (mode & 0o7777 & ~(stat_mod.S_ISUID | stat_mod.S_ISGID)) | 0o700
            with contextlib.suppress(OSError):
                os.chmod(path, mode)
            with contextlib.suppress(OSError, OverflowError, ValueError):
                os.utime(path, (mtime, mtime))


def unpack(archive: Path, dest: Path, *, budget: int | None = None) -> int:
    """Unpack the tar ``archive`` into ``dest`` (created if needed); bytes of file data written.

    Compression is detected from the archive's bytes, never its name.  Raises
    :class:`ArchiveError` naming the member for hostile members (absolute path, ``..``,
    links resolving outside ``dest``, devices, FIFOs) and for corrupt archives;
    :class:`DiskBudgetExceeded` before any write that would take the total past ``budget``
    bytes; :class:`StorageError` when the archive cannot be opened or ``dest`` cannot be
    written.  On error, what was already unpacked stays; the caller discards ``dest``.
    A zero-byte file is an empty archive.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {dest}: {exc}") from exc
    try:
        if archive.stat().st_size == 0:
            log.warning("archive %s is empty (0 bytes); nothing to unpack", archive)
            return 0
    except OSError as exc:
        raise StorageError(f"cannot read archive {archive}: {exc}") from exc
    unpacker = _Unpacker(dest, budget)
    with _decompressed(archive) as stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK_SIZE)
        except _READ_ERRORS as exc:
            raise ArchiveError(f"corrupt or unreadable archive {archive.name}: {exc}") from exc
        with tar:
            while True:
                try:
                    info = tar.next()
                except _READ_ERRORS as exc:
                    raise ArchiveError(f"corrupt archive {archive.name}: {exc}") from exc
                if info is None:
                    break
                try:
                    unpacker.member(tar, info)
                except (ArchiveError, StorageError):
                    raise
                except OSError as exc:  # reads are wrapped inside; this is the destination
                    raise StorageError(
                        f"cannot write archive member {info.name!r} into {dest}: {exc}") from exc
                except _READ_ERRORS as exc:
                    raise ArchiveError(
                        f"corrupt archive at member {info.name!r}: {exc}") from exc
        # Read to the end so that the compressed stream's own checksum is verified.
        try:
            while stream.read(CHUNK_SIZE):
                pass
        except _READ_ERRORS as exc:
            raise ArchiveError(f"corrupt archive {archive.name} (after the last member): "
                               f"{exc}") from exc
    unpacker.finish()
    log.debug("unpacked %s into %s: %d bytes", archive, dest, unpacker.written)
    return unpacker.written


# --------------------------------------------------------------------------- pack

class _CountingWriter(io.RawIOBase):
    """Forwards writes to ``target`` and counts the bytes."""

    def __init__(self, target: BinaryIO):
        self.target = target
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self.target.write(data)
        n = len(data)
        self.count += n
        return n


class _FixedSizeReader:
    """Reads exactly ``size`` bytes from ``f``: truncated if it grew, zero-padded if it shrank."""

    def __init__(self, f: BinaryIO, size: int, name: str):
        self.f, self.left, self.name, self.short = f, size, name, False

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = b"" if self.short else self.f.read(n)
        if len(data) < n:
            if not self.short:
                log.warning("%s shrank while being packed; padding with zeros", self.name)
            self.short = True
            data += b"\x00" * (n - len(data))
        self.left -= len(data)
        return data


def _entries(src_dir: Path) -> list[str]:
    """Relative paths under ``src_dir``, parents before children, each level sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(src_dir):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, src_dir)
        for name in dirnames + filenames:
            found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    return sorted(found, key=lambda p: p.split("/"))


def _compressor(fileobj: BinaryIO, compression: str) -> BinaryIO:
    if compression == "none":
        return fileobj
    if compression == "gzip":
        return gzip.GzipFile(fileobj=fileobj, mode="wb", compresslevel=6, mtime=0)  # type: ignore[return-value]
    if compression == "bzip2":
        return bz2.BZ2File(fileobj, mode="wb", compresslevel=9)  # type: ignore[return-value]
    if compression == "xz":
        return lzma.LZMAFile(fileobj, mode="wb")  # type: ignore[return-value]
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).stream_writer(fileobj, closefd=False)  # type: ignore[return-value]
    raise ArchiveError(f"unknown compression {compression!r} (known: {', '.join(COMPRESSIONS)})")


def single_file_of(src_dir: Path) -> str | None:
    """The name of the one regular file ``src_dir`` holds, or None when it holds anything
    else (no entry, several, a folder, a link)."""
    try:
        with os.scandir(src_dir) as scan:
            entries = list(scan)
    except OSError:
        return None
    if len(entries) != 1 or not entries[0].is_file(follow_symlinks=False):
        return None
    return entries[0].name


def pack_to_stream(src_dir: Path, fileobj: BinaryIO, compression: str, *,
                   single_file: bool = False) -> int:
    """Write a tar of ``src_dir``'s contents to ``fileobj``; bytes written to ``fileobj``.

    Members are named relative to ``src_dir`` (no ``./``), in sorted order, owner set to
    0/0 with no names; directories, regular files and symlinks (not followed) are kept,
    except symlinks :func:`unpack` would refuse (:func:`symlink_problem`: absolute, or
    pointing outside ``src_dir``), which are left out with a warning so that the archive
    can be unpacked again (a run's ``ln -s / modeldir/root`` cannot spoil its retries);
    sockets, FIFOs and devices are skipped; files that vanish meanwhile are skipped.
    With ``single_file`` and a folder that holds exactly one regular file, that file is
    the archive's only member, named ``./<name>``: the StudioML client reads such a tar
    as a file, anything else as a folder (SPEC section 11).
    ``fileobj`` is flushed but not closed.  Raises :class:`ArchiveError` for an unknown
    compression, :class:`StorageError` when ``src_dir`` cannot be read.
    """
    if compression not in COMPRESSIONS:
        raise ArchiveError(f"unknown compression {compression!r} (known: {', '.join(COMPRESSIONS)})")
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise StorageError(f"cannot pack {src_dir}: not a directory")
    counter = _CountingWriter(fileobj)
    compressed = _compressor(counter, compression)  # type: ignore[arg-type]
    try:
        with tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT,
                          bufsize=CHUNK_SIZE) as tar:
            only = single_file_of(src_dir) if single_file else None
            if only is not None:
                _add(tar, src_dir, only, arcname=f"./{only}")
            else:
                root = os.path.realpath(src_dir)
                for rel in _entries(src_dir):
                    _add(tar, src_dir, rel, root=root)
    except OSError as exc:
        raise StorageError(f"cannot pack {src_dir}: {exc}") from exc
    finally:
        if compressed is not counter:
            compressed.close()
    with contextlib.suppress(AttributeError, ValueError):
        fileobj.flush()
    return counter.count


def _add(tar: tarfile.TarFile, src_dir: Path, rel: str, arcname: str | None = None,
         root: str | None = None) -> None:
    full = os.path.join(src_dir, rel)
    try:
        info = tar.gettarinfo(full, arcname=arcname or rel)
    except FileNotFoundError:
        log.debug("skipping %s: vanished while packing", full)
        return
    if info is not None and info.issym() and root is not None:
        problem = symlink_problem(info.linkname, os.path.realpath(os.path.dirname(full)), root)
        if problem is not None:
            log.warning("leaving %s out of the archive: it is %s, which no unpack would "
                        "accept", full, problem)
            return
    if info is None or not (info.isreg() or info.isdir() or info.issym()):
        if info is not None and info.islnk():
            pass  # a second link to a file already added: keep it as a hard link
        else:
            log.info("skipping %s: not a file, directory or symlink", full)
            return
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if info.isreg():
        try:
            f = open(full, "rb")
        except FileNotFoundError:
            log.debug("skipping %s: vanished while packing", full)
            return
        with f:
            tar.addfile(info, _FixedSizeReader(f, info.size, full))  # type: ignore[arg-type]
    else:
        tar.addfile(info)


def tree_digest(folder: Path) -> str:
    """Content identity of a folder: paths, modes, sizes and content hashes of its files.

    Modification times are left out, so a folder unpacked from an archive has the digest
    of the folder that was packed into it.
    """
    from . import _fast

    parts = []
    for path in sorted(p for p in Path(folder).rglob("*")):
        stat = path.lstat()
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            parts.append(f"L {relative} {os.readlink(path)}")
        elif path.is_file():
            parts.append(f"F {relative} {stat.st_mode:o} {stat.st_size} "
                         f"{_fast.content_hash(path)}")
        else:
            parts.append(f"D {relative}")
    return _fast.hash_bytes("\n".join(parts).encode("utf-8", "surrogateescape"))


def pack(src_dir: Path, dest: Path, compression: str) -> int:
    """Write a tar of ``src_dir``'s contents to ``dest`` atomically; the size of ``dest``.

    Writes ``dest.name + ".partial-<random>"`` beside ``dest`` and renames it; see
    :func:`pack_to_stream` for the contents and errors.
    """
    dest = Path(dest)
    with atomic_destination(dest) as tmp, open(tmp, "wb") as out:
        pack_to_stream(src_dir, out, compression)
        out.flush()
        os.fsync(out.fileno())
    return dest.stat().st_size
