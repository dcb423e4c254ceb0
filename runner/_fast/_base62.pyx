# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled base62 (twin: :mod:`runner._fast.base62_py`).

Works in C unsigned 64-bit arithmetic and falls back to arbitrary precision, with the same
results, for values that do not fit.
"""
from runner._fast import base62_py as _py

cdef const char* _ALPHABET = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
cdef signed char _INDEX[128]
cdef int _i
for _i in range(128):
    _INDEX[_i] = -1
for _i in range(62):
    _INDEX[<unsigned char>_ALPHABET[_i]] = _i

cdef object _U64_MAX = (1 << 64) - 1


def b62encode(n):
    """Encode a non-negative int; ``ValueError`` when negative, ``TypeError`` when not an int."""
    cdef unsigned long long v
    cdef char buf[16]
    cdef int pos = 16
    if not isinstance(n, int):
        raise TypeError(f"b62encode needs an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"b62encode needs a non-negative int, got {n}")
    if n > _U64_MAX:
        return _py.b62encode(n)
    v = n
    if v == 0:
        return "0"
    while v:
        pos -= 1
        buf[pos] = _ALPHABET[v % 62]
        v //= 62
    return buf[pos:16].decode("ascii")


def b62decode(s):
    """Decode a base62 string; ``ValueError`` when empty or holding a character outside the alphabet."""
    cdef unsigned long long v = 0
    cdef Py_UCS4 c
    cdef signed char d
    if not isinstance(s, str):
        raise TypeError(f"b62decode needs a str, got {type(s).__name__}")
    if len(s) == 0:
        raise ValueError("b62decode: empty string")
    if len(s) > 10:  # 62**10 < 2**64 <= 62**11: longer strings may overflow
        return _py.b62decode(s)
    for c in <str>s:
        if c >= 128:
            raise ValueError(f"b62decode: invalid character {c!r} in {s!r}")
        d = _INDEX[c]
        if d < 0:
            raise ValueError(f"b62decode: invalid character {c!r} in {s!r}")
        v = v * 62 + <unsigned long long>d
    return v
