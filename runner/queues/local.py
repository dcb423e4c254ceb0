"""The embedded queue back end: a directory per queue, one file per message.

Layout under ``root``::

    .owners/<owner>.lock              flock'ed (exclusive) by the live instance <owner>
    .incoming/                        publish writes here, then renames into a queue
    <queue>/<ns:020d>-<hex16>.a<N>    a waiting message; N = attempts already made
    <queue>/.claimed/<owner>/<name>   a message held by <owner>
    <queue>/.dead/<name>              a dead-lettered message ...
    <queue>/.dead/<name>.reason.txt   ... and why (written before the message is moved)

Every state change is one ``rename`` inside one filesystem, so a message is always in
exactly one place.  Order is FIFO by file name (the zero-padded ``time_ns`` comes first);
requeue and recovery keep the name's time part, so a message keeps its place.  Two
instances racing for one file: the loser's rename fails with ``FileNotFoundError`` and
it tries the next file.  An owner is alive while its lock is held; ``recover`` returns
the claims of owners whose lock it can take.

Other tools may publish by renaming any regular file into ``<queue>/`` under a name of
their own (names starting with ``.`` are left alone): it is renamed to the naming above
(0 attempts, at the back of the queue).  Entries that cannot be messages (links, pipes)
and messages that cannot be read are dead-lettered with the reason, never skipped.  A
folder (not starting with ``.``) is not a message either, but may hold someone's files: it
is left where it is, with one warning per folder that names it.

A token is the claim file's path relative to ``root`` (``<queue>/.claimed/<owner>/<name>``),
so any instance on the same root, in any process, can settle it.
"""
from __future__ import annotations

import errno
import fcntl
import heapq
import logging
import os
import re
import secrets
import stat
import threading
import time
from pathlib import Path
from typing import ClassVar

from ..errors import QueueError
from . import inotify
from .base import Delivery, Queue, is_reserved

logger = logging.getLogger(__name__)

PREFIX = "local_"
CLAIMED = ".claimed"
DEAD = ".dead"
OWNERS = ".owners"
INCOMING = ".incoming"
REASON_SUFFIX = ".reason.txt"

_MSG_RE = re.compile(r"^(\d{20}-[0-9a-f]{16})\.a(\d+)$")
_QUEUE_RE = re.compile(r"^local_[A-Za-z0-9_.\-]*$")
_OWNER_RE = re.compile(r"^[A-Za-z0-9_@:+\-][A-Za-z0-9_.@:+\-]*$")

_INCOMING_MAX_AGE_S = 3600.0
"""Temp files in ``.incoming`` older than this are a crashed publisher's and are removed."""


def _msg_name(base: str, attempts: int) -> str:
    return f"{base}.a{attempts}"


def _read_message(path: Path) -> bytes:
    """The bytes of the regular file ``path``; OSError for anything else (a pipe never
    blocks the reader, a link is not followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


class LocalQueue(Queue):
    """Queues as directories under ``root``; ``owner`` names this runner instance.

    The constructor creates ``root`` if missing and takes an exclusive lock on
    ``root/.owners/<owner>.lock`` (waiting up to ``lock_timeout_s`` seconds for a recovering
    peer to let go); an owner already held by a live instance raises ``QueueError``.
    The lock is released by :meth:`close`.  ``durable`` fsyncs published files and the
    directories they are renamed into.  One instance may be used from several threads.
    """

    kind: ClassVar[str] = "local"

    @classmethod
    def from_config(cls, config) -> LocalQueue:
        """The embedded default: always on, rooted at ``--queue-root``."""
        return cls(config.queue_root, owner=config.instance)

    @classmethod
    def publisher(cls, options) -> LocalQueue:
        return cls(options.queue_root, owner=f"submit-{os.getpid()}-{secrets.token_hex(3)}")

    @classmethod
    def client_queue(cls, options) -> dict:
        return {"local": {"root": str(options.queue_root)}}

    def __init__(self, root: Path | str, owner: str, *, durable: bool = True,
                 lock_timeout_s: float = 5.0) -> None:
        if not _OWNER_RE.match(owner):
            raise QueueError(f"invalid local queue owner name {owner!r}")
        self.root = Path(root)
        self.owner = owner
        self.durable = durable
        self._mutex = threading.Lock()
        self._last_ns = 0
        self._claim_dirs: set[str] = set()
        self._folders_reported: set[tuple[str, str]] = set()  # (queue, folder) warned about
        self._closed = False
        try:
            for sub in (OWNERS, INCOMING):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QueueError(f"cannot create local queue root {self.root}: {e}") from e
        deadline = time.monotonic() + lock_timeout_s
        while True:
            fd = self._try_lock_owner(owner)
            if fd is not None:
                break
            if time.monotonic() >= deadline:
                raise QueueError(f"local queue owner {owner!r} is held by a live instance "
                                 f"under {self.root}")
            time.sleep(0.05)
        self._lock_fd: int | None = fd
        self._watcher: inotify.Watcher | None = None  # made by wait_fd() (the fetcher)
        self._watch_tried = False
        self.poll_every: float | None = 0.05
        logger.debug("local queue root %s opened by owner %s", self.root, owner)

    # ----------------------------------------------------------------- owner locks

    def _lock_path(self, owner: str) -> Path:
        return self.root / OWNERS / f"{owner}.lock"

    def _try_lock_owner(self, owner: str) -> int | None:
        """Take ``owner``'s lock without waiting; its fd, or ``None`` when it is held.

        The lock file may be unlinked by whoever holds the lock, so after locking we check
        that the path still names the inode we locked (else retry on the new file).
        """
        path = self._lock_path(owner)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise QueueError(f"cannot open owner lock {path}: {e}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return None
                raise QueueError(f"cannot lock {path}: {e}") from e
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # locked a file that was unlinked meanwhile; try the new one

    def _release_owner(self, owner: str, fd: int) -> None:
        """Unlink ``owner``'s lock file (while still holding it), then release it."""
        try:
            os.unlink(self._lock_path(owner))
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("cannot remove owner lock of %s: %s", owner, e)
        os.close(fd)

    # ----------------------------------------------------------------- helpers

    def _check_open(self) -> None:
        if self._closed:
            raise QueueError("local queue is closed")

    def _qdir(self, queue: str) -> Path:
        if not _QUEUE_RE.match(queue):
            raise QueueError(f"not a local queue name: {queue!r}")
        return self.root / queue

    def _names(self, queue: str) -> list[str]:
        """Names of the waiting messages of ``queue`` (unsorted); [] if it does not exist.

        A file another tool renamed into the queue under a name of its own (not starting
        with ``.``) is taken in: renamed to this queue's naming (at the back of the queue,
        0 attempts).  Anything else there that is not a folder (a link, a pipe) cannot be
        a message and is dead-lettered with the reason; a folder is left alone with one
        warning."""
        qdir = self._qdir(queue)
        names, foreign = [], []
        try:
            with os.scandir(qdir) as it:
                for e in it:
                    if _MSG_RE.match(e.name):
                        names.append(e.name)
                    elif not e.name.startswith("."):
                        foreign.append(e)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise QueueError(f"cannot list local queue {qdir}: {e}") from e
        for entry in foreign:
            name = self._take_in(qdir, entry)
            if name is not None:
                names.append(name)
        return names

    def _take_in(self, qdir: Path, entry: os.DirEntry) -> str | None:
        """Normalise one foreign entry of ``qdir``; the message name it now has, or None."""
        try:
            regular = entry.is_file(follow_symlinks=False)
            folder = not regular and entry.is_dir(follow_symlinks=False)
        except OSError:
            return None
        if folder:  # not ours to judge or move; never taken as a message
            if (qdir.name, entry.name) not in self._folders_reported:
                self._folders_reported.add((qdir.name, entry.name))
                logger.warning("%s is a folder in queue %s: not a message, left alone "
                               "(publish files; folders starting with '.' are not looked at)",
                               qdir / entry.name, qdir.name)
            return None
        name = _msg_name(self._next_base(), 0)
        if not regular:
            self._dead_letter_file(qdir, entry.name, name, "not a regular file (a link, a "
                                   "pipe or a device cannot be a message)")
            return None
        try:
            os.rename(qdir / entry.name, qdir / name)
        except FileNotFoundError:
            return None  # another instance took it in first
        except OSError as e:
            logger.warning("cannot take in %s: %s", qdir / entry.name, e)
            return None
        logger.info("took in %s as message %s of %s", entry.name, name, qdir.name)
        return name

    def _dead_letter_file(self, qdir: Path, source: str, name: str, reason: str) -> None:
        """Move ``qdir/source`` (not claimed) to ``.dead/<name>`` with ``reason`` beside it."""
        ddir = qdir / DEAD
        try:
            ddir.mkdir(parents=True, exist_ok=True)
            self._write_atomic(ddir / (name + REASON_SUFFIX),
                               f"{reason} (was {source})".encode("utf-8", "replace"))
            os.rename(qdir / source, ddir / name)
        except FileNotFoundError:
            return
        except OSError as e:
            logger.warning("cannot dead-letter %s: %s", qdir / source, e)
            return
        logger.warning("dead-lettered %s from %s: %s", source, qdir.name, reason)

    def _fsync_dir(self, path: Path) -> None:
        if not self.durable:
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _next_base(self) -> str:
        now = time.time_ns()
        with self._mutex:
            if now <= self._last_ns:  # keep one publisher's messages in order
                now = self._last_ns + 1
            self._last_ns = now
        return f"{now:020d}-{secrets.token_hex(8)}"

    def _parse_token(self, d: Delivery) -> tuple[str, str, str, str, int]:
        """Split ``d.token`` into (queue, owner, base, name, attempts) or raise QueueError."""
        parts = d.token.split("/")
        if len(parts) != 4 or parts[1] != CLAIMED:
            raise QueueError(f"unknown local queue token {d.token!r}")
        queue, _, owner, name = parts
        m = _MSG_RE.match(name)
        if not _QUEUE_RE.match(queue) or not _OWNER_RE.match(owner) or m is None:
            raise QueueError(f"unknown local queue token {d.token!r}")
        if queue != d.queue:
            raise QueueError(f"token {d.token!r} does not belong to queue {d.queue!r}")
        return queue, owner, m.group(1), name, int(m.group(2))

    # ----------------------------------------------------------------- Queue API

    def discover(self) -> list[str]:
        """Directories under root named ``local_…``, minus ``_response``/``_dead`` ones; sorted."""
        self._check_open()
        try:
            with os.scandir(self.root) as it:
                names = [e.name for e in it
                         if e.is_dir() and _QUEUE_RE.match(e.name) and not is_reserved(e.name)]
        except OSError as e:
            raise QueueError(f"cannot list local queue root {self.root}: {e}") from e
        if self._watcher is not None and self.poll_every is None:
            for name in names:
                path = str(self.root / name)
                if not self._watcher.watching(path) and not self._watcher.add(
                        path, inotify.IN_MOVED_TO | inotify.IN_CREATE):
                    if (self.root / name).is_dir():  # e.g. the inotify watch limit reached
                        logger.warning("cannot watch %s; polling local queues instead", path)
                        self.poll_every = 0.05  # the descriptor stays open (it is polled)
                        break
        return sorted(names)

    def wait_fd(self) -> int | None:
        """An inotify descriptor watching root and each discovered queue (Linux), or None.

        Arrivals are announced by inotify (a publish or a requeue renames a file into a
        queue folder; a new queue is a new folder under root), so the fetcher need not
        poll: :attr:`poll_every` becomes ``None``.  Without inotify it stays 50 ms."""
        if not self._watch_tried:
            self._watch_tried = True
            watcher = inotify.open_watcher()
            if watcher is not None and watcher.add(
                    str(self.root), inotify.IN_CREATE | inotify.IN_MOVED_TO | inotify.IN_DELETE
                    | inotify.IN_MOVED_FROM):
                self._watcher = watcher
                self.poll_every = None
            elif watcher is not None:
                watcher.close()
        return None if self._watcher is None else self._watcher.fd

    def changes(self) -> bool:
        if self._watcher is None:
            return True
        seen = self._watcher.drain()
        return seen is None or str(self.root) in seen

    def take(self, queue: str) -> Delivery | None:
        """Claim the oldest waiting message by renaming it into this owner's claim folder."""
        self._check_open()
        names = self._names(queue)
        if not names:
            return None
        qdir = self.root / queue
        cdir = qdir / CLAIMED / self.owner
        heapq.heapify(names)
        while names:
            name = names[0]
            if queue not in self._claim_dirs:
                self._make_claim_dir(cdir, queue)
            try:
                os.rename(qdir / name, cdir / name)
            except FileNotFoundError:
                if not cdir.is_dir():  # claim folder removed under us: remake, retry
                    self._claim_dirs.discard(queue)
                    continue
                heapq.heappop(names)  # lost the race for this one; try the next
                continue
            except OSError as e:
                raise QueueError(f"cannot claim {qdir / name}: {e}") from e
            token = f"{queue}/{CLAIMED}/{self.owner}/{name}"
            m = _MSG_RE.match(name)
            assert m is not None
            delivery = Delivery(queue=queue, token=token, body=b"", attempts=int(m.group(2)))
            try:
                body = _read_message(cdir / name)
            except OSError as e:
                # A message that cannot be read would stay at the head for ever: dead.
                heapq.heappop(names)
                self.dead_letter(delivery, f"the message file cannot be read: {e}")
                continue
            return Delivery(queue=queue, token=token, body=body, attempts=delivery.attempts)
        return None

    def _make_claim_dir(self, cdir: Path, queue: str) -> None:
        try:
            cdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QueueError(f"cannot create claim folder {cdir}: {e}") from e
        self._claim_dirs.add(queue)

    def ack(self, d: Delivery) -> None:
        """Delete the claim file; ``QueueError`` if the token is unknown or already settled."""
        self._check_open()
        self._parse_token(d)
        try:
            os.unlink(self.root / d.token)
        except FileNotFoundError as e:
            raise QueueError(f"unknown or already settled token {d.token!r}") from e
        except OSError as e:
            raise QueueError(f"cannot ack {d.token!r}: {e}") from e

    def requeue(self, d: Delivery, *, attempts: int) -> None:
        """Rename the claim back into its queue under its original time, suffix ``.a<attempts>``."""
        self._check_open()
        if attempts < 0:
            raise QueueError(f"attempts must be >= 0, got {attempts}")
        queue, _, base, _, _ = self._parse_token(d)
        qdir = self.root / queue
        try:
            os.rename(self.root / d.token, qdir / _msg_name(base, attempts))
        except FileNotFoundError as e:
            raise QueueError(f"unknown or already settled token {d.token!r}") from e
        except OSError as e:
            raise QueueError(f"cannot requeue {d.token!r}: {e}") from e
        self._fsync_dir(qdir)

    def dead_letter(self, d: Delivery, reason: str) -> None:
        """Write ``.dead/<name>.reason.txt`` first, then move the message to ``.dead/<name>``."""
        self._check_open()
        queue, _, _, name, _ = self._parse_token(d)
        src = self.root / d.token
        if not os.path.lexists(src):
            raise QueueError(f"unknown or already settled token {d.token!r}")
        ddir = self.root / queue / DEAD
        try:
            ddir.mkdir(parents=True, exist_ok=True)
            self._write_atomic(ddir / (name + REASON_SUFFIX), reason.encode("utf-8", "replace"))
            os.rename(src, ddir / name)
        except FileNotFoundError as e:
            raise QueueError(f"unknown or already settled token {d.token!r}") from e
        except OSError as e:
            raise QueueError(f"cannot dead-letter {d.token!r}: {e}") from e
        self._fsync_dir(ddir)
        logger.warning("dead-lettered %s from %s: %s", name, queue, reason)

    def keep_alive(self, d: Delivery) -> None:
        """Nothing to extend locally; raises ``QueueError`` if the claim no longer exists."""
        self._check_open()
        self._parse_token(d)
        if not (self.root / d.token).exists():
            raise QueueError(f"claim {d.token!r} no longer exists")

    def queue_deleted(self, d: Delivery) -> bool:
        """True when ``d``'s queue folder was deleted (with the claim in it) while held: the
        user's way to abort, as deleting a RabbitMQ queue is."""
        return not (self.root / d.queue).is_dir()

    def depth(self, queue: str) -> int:
        """Number of waiting (unclaimed) messages; 0 for a queue that does not exist."""
        self._check_open()
        return len(self._names(queue))

    def peek(self, queue: str, limit: int) -> list[bytes]:
        """Bodies of up to ``limit`` oldest waiting messages; ones taken meanwhile are skipped."""
        self._check_open()
        if limit <= 0:
            return []
        qdir = self.root / queue
        out: list[bytes] = []
        names = self._names(queue)
        for name in heapq.nsmallest(limit, names):
            try:
                out.append((qdir / name).read_bytes())
            except FileNotFoundError:
                continue
            except OSError as e:
                raise QueueError(f"cannot read {qdir / name}: {e}") from e
        return out

    def _write_atomic(self, dest: Path, body: bytes) -> None:
        """Write ``body`` to a temp file in ``.incoming``, fsync, rename to ``dest``."""
        tmp = self.root / INCOMING / f"{self.owner}.{secrets.token_hex(8)}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.rename(tmp, dest)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def publish(self, queue: str, body: bytes, *, attempts: int = 0) -> str:
        """Atomically add ``body`` to ``queue`` (created if missing); returns the file name."""
        self._check_open()
        if attempts < 0:
            raise QueueError(f"attempts must be >= 0, got {attempts}")
        qdir = self._qdir(queue)
        name = _msg_name(self._next_base(), attempts)
        try:
            qdir.mkdir(parents=True, exist_ok=True)
            self._write_atomic(qdir / name, bytes(body))
        except OSError as e:
            raise QueueError(f"cannot publish to {qdir}: {e}") from e
        self._fsync_dir(qdir)
        return name

    def recover(self, *, include_own: bool = False) -> int:
        """Return to their queues the claims of dead owners (and our own if ``include_own``).

        An owner is dead when its lock can be taken; claims of live owners are left alone.
        Recovered messages keep their names (so their place and attempt count).  Also
        removes stale temp files from ``.incoming``.  Returns how many messages went back.
        """
        self._check_open()
        by_owner: dict[str, list[str]] = {}
        try:
            with os.scandir(self.root) as it:
                queues = [e.name for e in it if e.is_dir() and _QUEUE_RE.match(e.name)]
            for queue in queues:
                try:
                    with os.scandir(self.root / queue / CLAIMED) as it:
                        for e in it:
                            if e.is_dir() and _OWNER_RE.match(e.name):
                                by_owner.setdefault(e.name, []).append(queue)
                except FileNotFoundError:
                    continue
        except OSError as e:
            raise QueueError(f"cannot scan local queue root {self.root}: {e}") from e

        moved = 0
        for owner, owner_queues in sorted(by_owner.items()):
            if owner == self.owner:
                if include_own:
                    moved += self._return_claims(owner, owner_queues)
                continue
            fd = self._try_lock_owner(owner)
            if fd is None:
                logger.debug("owner %s is alive; its claims stay", owner)
                continue
            try:
                moved += self._return_claims(owner, owner_queues)
            finally:
                self._release_owner(owner, fd)
        self._clean_incoming()
        if moved:
            logger.info("recovered %d claimed message(s) under %s", moved, self.root)
        return moved

    def _return_claims(self, owner: str, queues: list[str]) -> int:
        moved = 0
        for queue in queues:
            qdir = self.root / queue
            cdir = qdir / CLAIMED / owner
            try:
                with os.scandir(cdir) as it:
                    names = [e.name for e in it if _MSG_RE.match(e.name)]
            except FileNotFoundError:
                continue
            for name in names:
                try:
                    os.rename(cdir / name, qdir / name)
                    moved += 1
                except FileNotFoundError:
                    continue  # settled or recovered by someone else meanwhile
                except OSError as e:
                    raise QueueError(f"cannot recover {cdir / name}: {e}") from e
            if owner != self.owner:
                try:
                    cdir.rmdir()
                except OSError:
                    pass
            if names:
                self._fsync_dir(qdir)
        return moved

    def _clean_incoming(self) -> None:
        cutoff = time.time() - _INCOMING_MAX_AGE_S
        try:
            with os.scandir(self.root / INCOMING) as it:
                for e in it:
                    try:
                        if e.is_file() and e.stat().st_mtime < cutoff:
                            os.unlink(e.path)
                    except OSError:
                        continue
        except OSError:
            pass

    def close(self) -> None:
        """Remove this owner's empty claim folders and release its lock; idempotent.

        Claims still held become recoverable by any other instance from now on.
        """
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        for queue in self._claim_dirs:
            try:
                (self.root / queue / CLAIMED / self.owner).rmdir()
            except OSError:
                pass  # not empty (claims still held) or already gone
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            self._release_owner(self.owner, fd)

    def __del__(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
