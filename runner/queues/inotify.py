"""A minimal Linux inotify watcher (ctypes), so a queue back end can be waited on.

:class:`Watcher` owns one non-blocking inotify descriptor; the fetcher polls it beside its
inbox and calls :meth:`Watcher.drain` when it is readable.  Where inotify is unavailable
(not Linux, no libc symbol, the per-user watch limit reached) :func:`open_watcher` answers
``None`` and the caller keeps polling on a timer.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import sys

logger = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT = struct.Struct("iIII")
_libc = None


def _load_libc():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        libc = ctypes.CDLL(name, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = libc
    return _libc


class Watcher:
    """Watches directories; :meth:`drain` says which of them saw an event since."""

    def __init__(self, fd: int, libc) -> None:
        self.fd = fd
        self._libc = libc
        self._paths: dict[int, str] = {}   # watch descriptor -> path
        self._wds: dict[str, int] = {}     # path -> watch descriptor

    def add(self, path: str, mask: int) -> bool:
        """Watch ``path`` (a directory) for ``mask``; False when it cannot be watched."""
        if path in self._wds:
            return True
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOENT, errno.ENOTDIR):
                logger.debug("inotify_add_watch %s: %s", path, os.strerror(err))
            return False
        self._paths[wd] = path
        self._wds[path] = wd
        return True

    def watching(self, path: str) -> bool:
        return path in self._wds

    def drain(self) -> set[str] | None:
        """Read every pending event: the paths that saw one, or ``None`` on an overflow
        (events were lost: the caller must look everywhere)."""
        seen: set[str] = set()
        overflow = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                break
            if not data:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    overflow = True
                    continue
                path = self._paths.get(wd)
                if path is None:
                    continue
                if mask & IN_IGNORED:  # the directory is gone (or was unwatched)
                    del self._paths[wd]
                    self._wds.pop(path, None)
                seen.add(path)
        return None if overflow else seen

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        self._paths.clear()
        self._wds.clear()


def open_watcher() -> Watcher | None:
    """A new :class:`Watcher`, or ``None`` where inotify cannot be used."""
    if not sys.platform.startswith("linux") or os.environ.get("RUNNER_NO_INOTIFY"):
        return None
    try:
        libc = _load_libc()
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    except (OSError, AttributeError) as exc:
        logger.debug("inotify unavailable: %s", exc)
        return None
    if fd < 0:
        logger.debug("inotify_init1: %s", os.strerror(ctypes.get_errno()))
        return None
    return Watcher(fd, libc)
