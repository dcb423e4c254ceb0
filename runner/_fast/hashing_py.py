"""Pure-Python twin of :mod:`runner._fast._hashing`: xxh3_128 content digests."""
from __future__ import annotations

import os

import xxhash

CHUNK = 1 << 20  # 1 MiB


def content_hash(path: str | os.PathLike[str]) -> str:
    """xxh3_128 hex digest (32 chars) of the file's bytes, streamed in 1 MiB chunks into one buffer."""
    h = xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(os.fspath(path), "rb", buffering=0) as f:
        while True:
            got = f.readinto(buf)
            if not got:
                break
            h.update(view[:got])
    return h.hexdigest()


def hash_bytes(data: bytes) -> str:
    """xxh3_128 hex digest of ``data``; equals :func:`content_hash` of a file holding ``data``."""
    return xxhash.xxh3_128(data).hexdigest()
