# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled content hashing (twin: :mod:`runner._fast.hashing_py`): xxh3_128 hex digests,
files streamed in 1 MiB chunks with ``readinto`` into one reused buffer."""
import os

import xxhash

cdef Py_ssize_t CHUNK = 1048576

cdef object _xxh3_128 = xxhash.xxh3_128


def content_hash(path):
    """xxh3_128 hex digest (32 chars) of the file's bytes, streamed in 1 MiB chunks into one buffer."""
    cdef Py_ssize_t got
    cdef bytearray buf = bytearray(CHUNK)
    cdef object view = memoryview(buf)
    h = _xxh3_128()
    update = h.update
    with open(os.fspath(path), "rb", buffering=0) as f:
        readinto = f.readinto
        while True:
            got = readinto(buf)
            if got <= 0:
                break
            if got == CHUNK:
                update(buf)
            else:
                update(view[:got])
    return h.hexdigest()


def hash_bytes(data):
    """xxh3_128 hex digest of ``data``; equals :func:`content_hash` of a file holding ``data``."""
    return _xxh3_128(data).hexdigest()
