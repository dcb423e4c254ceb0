# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled twin of :mod:`runner._fast.masking_py` (the contract is documented there).

One pass over the bytes: a 256-entry table says which bytes may start a keyword (``k t s p``
in either case), ``://`` or a literal; a bitmap of the literals' first two bytes rules out
almost every other candidate before any comparison.  Ordinary output costs one table look-up
per byte.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromObject, PyBytes_GET_SIZE
from libc.string cimport memcmp, memset

DEF KEYWORD = 1
DEF URL = 2
DEF LITERAL = 4


cdef inline bint _is(unsigned char c, char lower) noexcept nogil:
    # ASCII case-insensitive comparison with a lower-case letter
    return (c | 0x20) == <unsigned char>lower


cdef inline bint _keyword_at(const unsigned char* s, Py_ssize_t left) noexcept nogil:
    cdef unsigned char c = s[0] | 0x20
    if c == b'k':
        return left >= 3 and _is(s[1], b'e') and _is(s[2], b'y')
    if c == b't':
        return left >= 5 and _is(s[1], b'o') and _is(s[2], b'k') and _is(s[3], b'e') \
            and _is(s[4], b'n')
    if c == b's':
        return left >= 6 and _is(s[1], b'e') and _is(s[2], b'c') and _is(s[3], b'r') \
            and _is(s[4], b'e') and _is(s[5], b't')
    if c == b'p':
        return left >= 5 and _is(s[1], b'a') and _is(s[2], b's') and _is(s[3], b's') \
            and _is(s[4], b'w')
    return False


def mask_hits(data, literals=()):
    """Every place masking must look at, sorted (rules: :mod:`runner._fast.masking_py`)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    cdef bytes buffer = <bytes>data
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(buffer)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buffer)
    cdef unsigned char flags[256]
    cdef unsigned char pairs[8192]  # a bit per first-two-bytes pair of the literals
    cdef list items = [given if type(given) is bytes else PyBytes_FromObject(given)
                       for given in literals]
    cdef list hits = []
    cdef Py_ssize_t count = len(items), i, p, length, pair
    cdef const unsigned char* literal
    cdef bytes item
    cdef unsigned char f
    memset(flags, 0, sizeof(flags))
    memset(pairs, 0, sizeof(pairs))
    for c in b"kKtTsSpP":
        flags[c] |= KEYWORD
    flags[b':'] |= URL
    cdef bint single = False  # a literal of one byte: the pair bitmap cannot filter it
    for item in items:
        length = PyBytes_GET_SIZE(item)
        if length == 0:
            continue
        literal = <const unsigned char*>PyBytes_AS_STRING(item)
        flags[literal[0]] |= LITERAL
        if length == 1:
            single = True
        else:
            pair = (literal[0] << 8) | literal[1]
            pairs[pair >> 3] |= 1 << (pair & 7)
    for p in range(n):
        f = flags[s[p]]
        if f == 0:
            continue
        if f & KEYWORD and _keyword_at(s + p, n - p):
            hits.append((p, 0))
        if f & URL and p + 2 < n and s[p + 1] == b'/' and s[p + 2] == b'/':
            hits.append((p, 1))
        if f & LITERAL:
            if not single:
                if p + 1 >= n:
                    continue
                pair = (s[p] << 8) | s[p + 1]
                if not (pairs[pair >> 3] & (1 << (pair & 7))):
                    continue
            for i in range(count):
                item = <bytes>items[i]
                length = PyBytes_GET_SIZE(item)
                if length and length <= n - p and memcmp(
                        s + p, PyBytes_AS_STRING(item), <size_t>length) == 0:
                    hits.append((p, 2 + i))
    return hits
