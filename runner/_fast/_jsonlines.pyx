# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled JSON-line merge (twin: :mod:`runner._fast.jsonlines_py`; the contract is documented there).

The speed comes from scanning the chunk in C: lines are found with ``memchr`` and trimmed by
pointer, so a plain log line never becomes a Python object; only lines whose first and last
non-white-space bytes are ``{``/``}`` or ``[``/``]`` are sliced out and parsed. The merge is a
typed recursive ``cdef`` function over ``dict`` objects.

Parsing: ``orjson.loads``, which differs from the twin's stdlib rule only where it raises on what
``json`` accepts (lone surrogate escapes, ``1e400``: when orjson raises on a line holding a
``\\ud..`` escape or an exponent, the twin's own ``parse_json`` decides; any other line orjson
rejects is rejected by ``json`` too, and skipping the second parse matters: ``{not json}`` text
lines are common), accepts nesting that ``json`` refuses (500 or more opening brackets: the twin's
rule decides), or turns an integer wider than 64 bits into a ``float``. The latter needs at
least 19 consecutive digits, so a line holding such a run (other than the fraction digits after a
``.``, which both parsers round to the same double; found with a skipping byte scan that looks at
one byte in 19 of text without digits) is parsed by the twin's rule as well. The result
is the twin's result on every input.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem, PyDict_Next
from cpython.object cimport PyObject
from libc.string cimport memchr

from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_GET_LENGTH

import orjson

# The twin's parse rule (stdlib json, strict), used wherever orjson could answer differently.
from runner._fast.jsonlines_py import parse_json as _twin_parse

cdef object _orjson_loads = orjson.loads
cdef object _OrjsonError = orjson.JSONDecodeError
cdef object _NOT_JSON = object()

# Fewer digits than this always fit orjson's 64-bit integers (|n| < 10**18 < 2**63).
DEF LONG_DIGITS = 19
# Lines with fewer opening brackets nest less deep than this, well inside the stdlib's limit.
DEF DEEP_NESTING = 500


cdef inline bint _isws(char c) nogil:
    # Same set as bytes.strip(): space, \t, \n, \r, \v, \f
    return c == 32 or (9 <= c <= 13)


cdef inline bint _isdigit(char c) nogil:
    return <unsigned char>(c - 48) < 10


cdef bint _has_long_digit_run(const char* s, Py_ssize_t n) nogil:
    """True when ``s`` holds LONG_DIGITS or more consecutive ASCII digits not right after a ``.``.

    Such a run is the only way to write an integer orjson turns into a ``float`` (a run right
    after ``.`` is a fraction, which both parsers round to the same double). Invariant: every
    maximal run whose LONG_DIGITS-th digit lies before index ``i`` has been ruled out. A non-digit
    at ``i`` rules out those ending it in ``[i, i + LONG_DIGITS)``; a fraction through ``i`` (found
    by looking back only) rules out those up to ``i + LONG_DIGITS``, as the next run starts after
    ``i + 1``; a short run ``[lo, hi)`` those up to ``hi + LONG_DIGITS - 1``.
    """
    cdef Py_ssize_t i = LONG_DIGITS - 1, lo, hi
    while i < n:
        if not _isdigit(s[i]):
            i += LONG_DIGITS
            continue
        lo = i
        while lo > 0 and _isdigit(s[lo - 1]):
            lo -= 1
        if lo > 0 and s[lo - 1] == b'.':
            i += LONG_DIGITS + 1
            continue
        hi = i + 1
        while hi < n and _isdigit(s[hi]):
            hi += 1
        if hi - lo >= LONG_DIGITS:
            return True
        i = hi + LONG_DIGITS
    return False


cdef Py_ssize_t _opening_brackets(const char* s, Py_ssize_t n) nogil:
    cdef Py_ssize_t i, count = 0
    for i in range(n):
        count += (s[i] == b'{') | (s[i] == b'[')
    return count


cdef bint _json_may_accept(const char* s, Py_ssize_t n) nogil:
    """Whether a line orjson rejected may still be JSON to the twin's rule: it holds an exponent
    (``1e400`` is ``inf`` to ``json``, an error to orjson) or a ``\\u`` escape of the surrogate
    range ``d800``-``dfff`` (a lone surrogate). Anything else orjson rejects, ``json`` rejects too."""
    cdef Py_ssize_t i
    cdef char c
    for i in range(1, n):
        c = s[i]
        if (c == b'e' or c == b'E') and _isdigit(s[i - 1]):
            return True
        if c == b'u' and s[i - 1] == b'\\' and i + 1 < n and (s[i + 1] == b'd' or s[i + 1] == b'D'):
            return True
    return False


cdef object _parse(const char* p, Py_ssize_t n):
    cdef bytes line = PyBytes_FromStringAndSize(p, n)
    # Where orjson could accept a line differently from the twin (an integer wider than 64 bits;
    # nesting past the interpreter's recursion limit, which orjson allows up to 1024 levels),
    # the twin's rule decides. DEEP_NESTING opening brackets need at least twice as many bytes.
    if _has_long_digit_run(p, n) or (
            n >= 2 * DEEP_NESTING and _opening_brackets(p, n) >= DEEP_NESTING):
        return _twin_parse(line)
    try:
        return _orjson_loads(line)
    except _OrjsonError:
        pass
    if _json_may_accept(p, n):
        return _twin_parse(line)
    return _NOT_JSON


cdef int _merge_into(dict dst, dict src) except -1:
    cdef Py_ssize_t pos = 0
    cdef PyObject* kp
    cdef PyObject* vp
    cdef PyObject* cur
    while PyDict_Next(src, &pos, &kp, &vp):
        if isinstance(<object>vp, dict):
            cur = PyDict_GetItem(dst, <object>kp)
            if cur is not NULL and isinstance(<object>cur, dict):
                _merge_into(<dict>cur, <dict>vp)
                continue
        PyDict_SetItem(dst, <object>kp, <object>vp)
    return 0


cdef int _add_only(dict dst, dict src) except -1:
    cdef Py_ssize_t pos = 0
    cdef PyObject* kp
    cdef PyObject* vp
    cdef PyObject* cur
    while PyDict_Next(src, &pos, &kp, &vp):
        cur = PyDict_GetItem(dst, <object>kp)
        if cur is NULL:
            PyDict_SetItem(dst, <object>kp, <object>vp)
        elif isinstance(<object>cur, dict) and isinstance(<object>vp, dict):
            _add_only(<dict>cur, <dict>vp)
    return 0


cdef int _merge_object(dict doc, dict obj) except -1:
    cdef Py_ssize_t pos = 0
    cdef PyObject* kp
    cdef PyObject* vp
    cdef PyObject* cur
    cdef object k
    cdef Py_ssize_t klen
    while PyDict_Next(obj, &pos, &kp, &vp):
        k = <object>kp
        # Only keys of 5, 6 or 8 characters can be special: skip the comparisons for the rest.
        klen = PyUnicode_GET_LENGTH(k) if PyUnicode_CheckExact(k) else 6
        if (klen == 6 or klen == 5) and (k == "runner" or k == "asset"):
            continue
        if klen == 8 and k == "studioml":
            cur = PyDict_GetItem(doc, k)
            if cur is NULL:
                PyDict_SetItem(doc, k, <object>vp)
            elif isinstance(<object>cur, dict) and isinstance(<object>vp, dict):
                _add_only(<dict>cur, <dict>vp)
            continue
        if isinstance(<object>vp, dict):
            cur = PyDict_GetItem(doc, k)
            if cur is not NULL and isinstance(<object>cur, dict):
                _merge_into(<dict>cur, <dict>vp)
                continue
        PyDict_SetItem(doc, k, <object>vp)
    return 0


def merge_object(doc, obj):
    """Merge one JSON-line object into ``doc`` in place (rules: :mod:`runner._fast.jsonlines_py`)."""
    if not isinstance(doc, dict) or not isinstance(obj, dict):
        raise TypeError("merge_object needs two dicts")
    _merge_object(<dict>doc, <dict>obj)


def merge_lines(doc, chunk):
    """Merge every JSON-object line of ``chunk`` into ``doc``; return the ``[...]`` lines."""
    if not isinstance(doc, dict):
        raise TypeError("merge_lines needs a dict")
    if not isinstance(chunk, bytes):
        chunk = bytes(chunk)
    return _merge_chunk(<dict>doc, <bytes>chunk, None)


def merge_lines_parsed_by(doc, chunk, loads):
    """``merge_lines`` with another parser (``loads(bytes) -> object``, ``ValueError`` when the
    line is not JSON): the benchmark hook that compares parsers inside the compiled scan
    (``benchmarks/test_bench_fast.py``). Not part of the twin's contract."""
    if not isinstance(doc, dict):
        raise TypeError("merge_lines needs a dict")
    if not isinstance(chunk, bytes):
        chunk = bytes(chunk)
    return _merge_chunk(<dict>doc, <bytes>chunk, loads)


cdef list _merge_chunk(dict d, bytes data, object loads):
    cdef const char* buf = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t start = 0, end, a, b
    cdef const char* nl
    cdef char c0, c1
    cdef list patches = []
    cdef object obj
    while True:
        nl = <const char*>memchr(buf + start, b'\n', <size_t>(n - start))
        end = (nl - buf) if nl != NULL else n
        a = start
        b = end
        while a < b and _isws(buf[a]):
            a += 1
        while b > a and _isws(buf[b - 1]):
            b -= 1
        if b - a >= 2:
            c0 = buf[a]
            c1 = buf[b - 1]
            if c0 == b'{' and c1 == b'}':
                if loads is None:
                    obj = _parse(buf + a, b - a)
                else:
                    try:
                        obj = loads(PyBytes_FromStringAndSize(buf + a, b - a))
                    except ValueError:
                        obj = _NOT_JSON
                if isinstance(obj, dict):
                    _merge_object(d, <dict>obj)
            elif c0 == b'[' and c1 == b']':
                patches.append(PyBytes_FromStringAndSize(buf + a, b - a))
        if nl == NULL:
            break
        start = end + 1
    return patches


