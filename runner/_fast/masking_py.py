"""Pure-Python twin of :mod:`runner._fast._masking`: where masking must look (runner.redact).

Contract, identical in both implementations:

``mask_hits(data: bytes, literals: tuple[bytes, ...]) -> list[tuple[int, int]]`` returns,
sorted, one ``(position, kind)`` for

* every position where ``data`` holds, in any ASCII case, ``key``, ``token``, ``secret`` or
  ``passw`` (kind 0; one entry per position);
* every position of ``://`` (kind 1);
* every position where ``literals[i]`` occurs, overlapping occurrences included
  (kind ``2 + i``; empty literals are never found).

The compiled module finds them in one pass over ``data``; this twin with ``bytes.find``.
"""
from __future__ import annotations

KEYWORDS = (b"key", b"token", b"secret", b"passw")


def _positions(haystack: bytes, needle: bytes, step: int) -> list[int]:
    found = []
    position = haystack.find(needle)
    while position >= 0:
        found.append(position)
        position = haystack.find(needle, position + step)
    return found


def mask_hits(data: bytes, literals: tuple = ()) -> list[tuple[int, int]]:
    """Every place masking must look at (see the module docstring), sorted."""
    if not isinstance(data, bytes):
        data = bytes(data)
    lowered = data.lower()
    keyword_positions: set[int] = set()
    for word in KEYWORDS:
        keyword_positions.update(_positions(lowered, word, len(word)))
    hits = [(position, 0) for position in keyword_positions]
    hits += [(position, 1) for position in _positions(data, b"://", 3)]
    for index, literal in enumerate(literals):
        if literal:
            hits += [(position, 2 + index) for position in _positions(data, bytes(literal), 1)]
    hits.sort()
    return hits
