"""The storage back-end interface (DESIGN convention 7) and helpers shared by back ends.

A :class:`Store` reads and writes whole objects named by URL.  Every back end keeps the
same contracts:

* ``get`` streams into a hidden temporary file beside ``dest``
  (``dest.name + ".partial-<random>"``) and renames it over ``dest`` only when the object
  is complete, so a reader never sees a partial file at ``dest``;
* a missing object is :class:`ObjectMissing` (a :class:`StorageError`), any other
  failure is a plain :class:`StorageError`;
* ``put`` streams the source and is atomic at the destination where the back end allows;
  ``put_stream`` lets a producer (the archive packer) write straight into the upload;
* :meth:`Store.identity` names an object's content for the artifact cache.

Runner-wide storage options (TLS files for S3, retry and part sizes) are set once per
process with :func:`configure` and read by the back ends from :data:`SETTINGS`.

Sizes are ``int`` bytes, times are ``float`` unix seconds.
"""
from __future__ import annotations

import abc
import builtins
import contextlib
import logging
import os
import secrets
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Callable, ClassVar, TypeVar

from ..errors import PermanentStorageError, StorageError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

#: Bytes moved per read/write when a back end streams.
CHUNK_SIZE = 1024 * 1024

T = TypeVar("T")


@dataclass(frozen=True)
class StorageSettings:
    """Process-wide storage options, from the runner's configuration.

    ``s3_ca``/``s3_cert``/``s3_key``: TLS files for S3 hosts that are not AWS (a CA bundle
    to verify the server, a client certificate and its key); giving any of them makes
    such hosts use https.  ``part_size``: bytes per multipart/resumable upload part;
    ``parts_in_flight``: S3 parts uploaded at once by one upload (memory: about
    ``part_size * (parts_in_flight + 1)`` per upload).
    ``tries``: attempts of one storage operation inside a back end before it gives up.
    ``file_roots``: the real (symlink-free) absolute folders ``file://`` objects may lie
    under (``--file-store-roots``); ``None``: anywhere (the user's own tools,
    ``runner-submit`` and ``runner-results``, not the runner).
    """

    s3_ca: str = ""
    s3_cert: str = ""
    s3_key: str = ""
    part_size: int = 8 * 1024 * 1024
    parts_in_flight: int = 1
    tries: int = 4
    backoff: float = 0.5
    file_roots: tuple | None = None


#: The settings in force in this process; change them with :func:`configure`.
SETTINGS = StorageSettings()


def configure(**changes) -> StorageSettings:
    """Replace fields of :data:`SETTINGS` (``configure(s3_ca="/etc/ca.pem")``); the result."""
    global SETTINGS
    SETTINGS = replace(SETTINGS, **changes)
    return SETTINGS


def retrying(action: Callable[[], T], what: str, *, transient: Callable[[BaseException], bool],
             tries: int | None = None, backoff: float | None = None) -> T:
    """``action()``, tried up to ``tries`` times while it raises a transient error.

    Sleeps ``backoff * 2**n`` (with jitter) between tries.  Errors for which
    ``transient(exc)`` is false propagate at once; the last transient one propagates too.
    """
    tries = SETTINGS.tries if tries is None else tries
    backoff = SETTINGS.backoff if backoff is None else backoff
    for attempt in range(1, max(1, tries) + 1):
        try:
            return action()
        except Exception as exc:
            if attempt >= tries or not transient(exc):
                raise
            delay = backoff * (2 ** (attempt - 1)) * (0.75 + random.random() / 2)
            log.warning("%s failed (try %d of %d): %s; retrying in %.1fs",
                        what, attempt, tries, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object.

    ``etag`` is an opaque identity that changes when the content changes (an S3 ETag,
    a GCS generation, ``size-mtime_ns`` for files); the cache keys on it.
    """

    url: str
    size: int
    etag: str
    mtime: float




class ObjectMissing(StorageError):
    """The object named by ``url`` does not exist (normal for a fresh mutable artifact)."""

    def __init__(self, url: str, message: str | None = None):
        self.url = url
        super().__init__(message or f"no object at {url}")


def split_url(url: str) -> tuple[str, str]:
    """``("s3", "host/bucket/key")`` from ``"s3://host/bucket/key"``; scheme lower-cased.

    Raises :class:`StorageError` when ``url`` has no ``scheme://``.
    """
    if not isinstance(url, str) or "://" not in url:
        raise StorageError(f"not a storage URL: {url!r}")
    scheme, rest = url.split("://", 1)
    if not scheme or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        raise StorageError(f"not a storage URL: {url!r}")
    return scheme.lower(), rest


PARTIAL_SUFFIX_BYTES = len(".partial-") + 12  # what partial_path adds to a name


def partial_path(dest: Path) -> Path:
    """A fresh hidden-by-name temporary path beside ``dest`` for an atomic write: its
    name is ``PARTIAL_SUFFIX_BYTES`` longer than ``dest``'s."""
    return dest.with_name(f"{dest.name}.partial-{secrets.token_hex(6)}")


@contextlib.contextmanager
def atomic_destination(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on clean exit rename it over ``dest``.

    Parent directories of ``dest`` are created.  On any exception the temporary file is
    removed and the exception propagates; ``dest`` is left as it was.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {dest.parent}: {exc}") from exc
    tmp = partial_path(dest)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class Store(abc.ABC):
    """One storage back end, chosen by URL scheme (see :func:`runner.storage.open_store`).

    Implementations must be safe to use from several threads at once.
    """

    scheme: ClassVar[str]
    #: Whether :meth:`stat` is a request to a server (S3, GCS, HTTP): then the artifact cache
    #: downloads a URL it never stored without a stat first.  False for ``file://``, whose
    #: stat and content identity are local (two paths with the same bytes share one entry).
    stat_is_remote: ClassVar[bool] = True

    @classmethod
    def from_url(cls, url: str, *, credentials: dict | None = None,
                 storage_config: dict | None = None, env: dict | None = None) -> Store:
        """Build a store able to serve ``url`` (the registry calls this).

        ``credentials`` is an artifact's ``credentials`` map (``{"aws": {...}}`` /
        ``{"gcp": {...}}``), ``storage_config`` the request's ``config.storage``, ``env``
        the request's ``config.env`` (``%NAME%`` already expanded).  The default ignores
        them and calls ``cls()``; back ends that need them override this.
        """
        return cls()

    def identity(self, info: ObjectInfo) -> str:
        """A string naming the content of the object ``info`` describes (cache key).

        Two objects with the same identity must have the same bytes.  The default is the
        URL with the back end's etag and the size; a back end with a cheaper or stronger
        content identity overrides it.
        """
        return f"{info.url}\n{info.etag}\n{info.size}"

    @abc.abstractmethod
    def stat(self, url: str) -> ObjectInfo | None:
        """Information about the object at ``url``, or ``None`` when it does not exist.

        Raises :class:`StorageError` when the store cannot be asked.
        """

    @abc.abstractmethod
    def get(self, url: str, dest: Path) -> ObjectInfo:
        """Download ``url`` to ``dest`` atomically (temp file beside it, then rename).

        Returns the info of the object actually read.  Raises :class:`ObjectMissing` when
        the object does not exist, :class:`StorageError` on any other failure; in both
        cases no file is left at ``dest`` or beside it.
        """

    @abc.abstractmethod
    def put(self, url: str, src: Path) -> ObjectInfo:
        """Upload the file ``src`` to ``url`` (streamed; atomic where the back end allows).

        Raises :class:`StorageError` on failure (including ``src`` being unreadable).
        """

    def put_stream(self, url: str, fill: Callable[[BinaryIO], object]) -> ObjectInfo:
        """Upload what ``fill(fileobj)`` writes to ``url``.

        ``fill`` may be called again when the back end retries the whole upload, so it
        must write the same bytes each time.  The default writes a temporary file and
        calls :meth:`put`; back ends that can stream (multipart) override it.
        """
        import tempfile

        with tempfile.TemporaryDirectory(prefix="runner-put-") as tmpdir:
            src = Path(tmpdir) / "object"
            with open(src, "wb") as out:
                fill(out)
            return self.put(url, src)

    def put_file_by_stream(self, url: str, src: Path) -> ObjectInfo:
        """``put`` for back ends that stream: the file ``src`` fed through :meth:`put_stream`.

        The file is opened once and re-read from its start if ``put_stream`` retries.
        """
        try:
            handle = open(src, "rb")
        except OSError as exc:
            raise StorageError(f"cannot read upload source {src}: {exc}") from exc
        with handle:
            def fill(out: BinaryIO) -> None:
                handle.seek(0)
                while True:
                    chunk = handle.read(CHUNK_SIZE)
                    if not chunk:
                        return
                    out.write(chunk)
            return self.put_stream(url, fill)

    def put_bytes(self, url: str, data: bytes) -> ObjectInfo:
        """Upload ``data`` to ``url``; default implementation goes through a temp file."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="runner-put-") as tmpdir:
            src = Path(tmpdir) / "object"
            src.write_bytes(data)
            return self.put(url, src)

    @abc.abstractmethod
    def list(self, prefix_url: str) -> list[str]:
        """Sorted URLs of every object whose URL starts with ``prefix_url``.

        An empty or absent prefix gives ``[]``.  Raises :class:`StorageError` on failure.
        """

    def existing(self, urls: builtins.list[str]) -> set[str] | None:
        """Which of ``urls`` (objects of this store) exist, told by one request, or None
        when this store cannot tell them that cheaply (then ask each).  Raises
        :class:`StorageError` when the request fails; the default tells nothing."""
        return None

    def list_info(self, prefix_url: str) -> builtins.list[ObjectInfo]:
        """:meth:`list` with each object's :class:`ObjectInfo`, sorted by URL.

        The default stats each listed object (cheap for files); back ends whose listing
        already carries size and etag (S3, GCS) override it to make one listing call.
        An object deleted between the listing and its stat is left out.
        Raises :class:`StorageError` on failure.
        """
        found = []
        for url in self.list(prefix_url):
            info = self.stat(url)
            if info is not None:
                found.append(info)
        return found

    def close(self) -> None:
        """Release connections; the default has nothing to release."""
