# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled content hashing (twin: :mod:`runner._fast.hashing_py`): xxh3_128 hex digests.

A file is read in chunks of up to 4 MiB and hashed in C with the GIL released for the whole file
(``filehash.c``), through the vendored xxHash (``vendor/xxhash``) whose x86 dispatcher uses
the widest vector unit the CPU has.  Big files, when a second CPU is free, are read on a
helper thread into one buffer while this thread hashes the other, so reading and hashing
overlap.  Digests equal the ``xxhash`` package's ``xxh3_128(...).hexdigest()``, which the
twin uses.
"""
import os

import xxhash

cdef extern from "filehash.h" nogil:
    ctypedef struct XXH3_state_t:
        pass
    ctypedef struct XXH128_hash_t:
        unsigned long long low64
        unsigned long long high64
    XXH3_state_t* XXH3_createState()
    int XXH3_freeState(XXH3_state_t* state)
    int XXH3_128bits_reset(XXH3_state_t* state)
    XXH128_hash_t XXH3_128bits_digest(const XXH3_state_t* state)
    int runner_hash_fd_serial(int fd, char* buf, size_t size, XXH3_state_t* state)
    int runner_hash_fd_overlapped(int fd, char* buf0, char* buf1, size_t size,
                                  XXH3_state_t* state)

# 4 MiB: with 1 MiB the overlapped loop synchronised its threads four times as often and
# reached 0.85-0.88 of a plain read of the same buffers here, with 4 MiB 0.98.
cdef Py_ssize_t CHUNK = 4194304
HASH_CHUNK = CHUNK  # the buffer size, for the benchmark's plain-read baseline

cdef object _xxh3_128 = xxhash.xxh3_128


# Files at least this big are read on a helper thread while this one hashes, when a CPU is
# free for it: reading from the page cache and xxh3 then overlap instead of adding up.
OVERLAP_FROM = 16 * 1048576


def _may_overlap():
    """Whether a second CPU is free now: this process may use two or more, and fewer tasks
    are runnable at this moment than it may use (``/proc/loadavg``'s running count, this
    thread included).  A busy machine gets the serial loop, which is faster there."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if cpus < 2:
        return False
    try:
        with open("/proc/loadavg", "rb") as handle:
            running = int(handle.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return True
    return running < cpus


def content_hash(path):
    """xxh3_128 hex digest (32 chars) of the file's bytes, read in chunks of up to ``CHUNK``
    bytes; files of ``OVERLAP_FROM`` bytes or more are read into two buffers by a helper
    thread while this one hashes (same digest)."""
    cdef bytearray first, second
    cdef char* buf0
    cdef char* buf1
    cdef Py_ssize_t size
    cdef int fd, failed
    cdef XXH128_hash_t digest
    cdef XXH3_state_t* state = XXH3_createState()
    if state == NULL:
        raise MemoryError("xxh3 state")
    try:
        XXH3_128bits_reset(state)
        with open(os.fspath(path), "rb", buffering=0) as handle:
            fd = handle.fileno()
            size = os.fstat(fd).st_size
            if size >= OVERLAP_FROM and _may_overlap():
                first, second = bytearray(CHUNK), bytearray(CHUNK)
                buf0, buf1 = first, second
                with nogil:
                    failed = runner_hash_fd_overlapped(fd, buf0, buf1, CHUNK, state)
            else:
                # a small file gets a buffer its size (plus one byte, to see the end at once)
                size = min(CHUNK, max(size, 4095) + 1)
                first = bytearray(size)
                buf0 = first
                with nogil:
                    failed = runner_hash_fd_serial(fd, buf0, size, state)
            if failed:
                raise OSError(failed, os.strerror(failed), os.fspath(path))
        digest = XXH3_128bits_digest(state)
    finally:
        XXH3_freeState(state)
    return f"{digest.high64:016x}{digest.low64:016x}"


def hash_bytes(data):
    """xxh3_128 hex digest of ``data``; equals :func:`content_hash` of a file holding ``data``."""
    return _xxh3_128(data).hexdigest()
