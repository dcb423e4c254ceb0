"""Pure-Python twin of :mod:`runner._fast._base62`.

Base62 with the alphabet ``0-9A-Za-z``, most significant digit first, no padding
(spec section 6): ``1546495043 -> "1gew0R"``, ``0 -> "0"``.
"""
from __future__ import annotations

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def b62encode(n: int) -> str:
    """Encode a non-negative int; ``ValueError`` when negative, ``TypeError`` when not an int."""
    if not isinstance(n, int):
        raise TypeError(f"b62encode needs an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"b62encode needs a non-negative int, got {n}")
    if n == 0:
        return "0"
    out = []
    while n:
        n, r = divmod(n, 62)
        out.append(ALPHABET[r])
    return "".join(reversed(out))


def b62decode(s: str) -> int:
    """Decode a base62 string; ``ValueError`` when empty or holding a character outside the alphabet."""
    if not isinstance(s, str):
        raise TypeError(f"b62decode needs a str, got {type(s).__name__}")
    if not s:
        raise ValueError("b62decode: empty string")
    n = 0
    for c in s:
        d = _INDEX.get(c)
        if d is None:
            raise ValueError(f"b62decode: invalid character {c!r} in {s!r}")
        n = n * 62 + d
    return n
