# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# distutils: language = c++
"""Compiled JSON-line merge (twin: :mod:`runner._fast.jsonlines_py`; the contract is documented there).

The chunk is scanned in C: lines are found with ``memchr`` and trimmed by pointer, so a plain
log line never becomes a Python object; ``[...]`` lines are sliced out as patch candidates and
``{...}`` lines are parsed with simdjson (the single-file simdjson that pysimdjson ships, built
into this module) and applied *newest first* (``sjmerge.h``): a value a later line of the chunk
replaces is never turned into a Python object, which is most of them in metrics output.  The
document comes out equal to the twin's, key order included.

Where simdjson could answer differently from the twin's stdlib rule, the rule decides (the
line is parsed with the twin's ``parse_json`` and applied as a dict, in its place):

* simdjson refuses what ``json`` accepts: ``1e400`` (``inf`` to ``json``), lone surrogate
  escapes (``"\\ud800"``) and ``NaN``/``Infinity``.  A refused line holding an exponent, a
  ``\\u`` escape of the surrogate range or one of those constants goes to the rule; any other refused line is refused by ``json`` too, and is
  not parsed twice (``{not json}`` text lines are common);
* integers wider than 64 bits (simdjson refuses them; ``json`` keeps them exact): a line
  holding a run of 19 or more digits, other than fraction digits after a ``.`` (both round
  those to the same double), found with a skipping byte scan that looks at one byte in 19 of
  text without digits;
* nesting the interpreter refuses (500 or more opening brackets).

``merge_lines_parsed_by`` keeps the oldest-first scan with any parser: the benchmark's hook for
comparing parsers inside the compiled scan.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem, PyDict_Next
from cpython.object cimport PyObject
from libc.string cimport memchr, memcmp
from libcpp.vector cimport vector

from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_GET_LENGTH

# The twin's parse rule (stdlib json, strict), used wherever simdjson could answer differently.
from runner._fast.jsonlines_py import parse_json as _twin_parse

cdef extern from "sjmerge.h" namespace "runner_sj":
    cdef cppclass Accumulator:
        Accumulator() except +
    int apply_line(Accumulator& acc, const char* p, size_t n) except -1
    int apply_parsed(Accumulator& acc, object parsed) except -1
    int merge_final(Accumulator& acc, object doc) except -1
    int add_only "runner_sj::add_only" (object dst, object src) except -1

cdef object _NOT_JSON = object()

# Fewer digits than this always fit a 64-bit integer (|n| < 10**18 < 2**63).
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

    Such a run is the only way to write an integer wider than 64 bits (a run right after ``.``
    is a fraction, which every parser here rounds to the same double). Invariant: every
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
    """Whether a line simdjson rejected may still be JSON to the twin's rule: it holds an
    exponent (``1e400`` is ``inf`` to ``json``, an error to simdjson), a ``\\u`` escape of the
    surrogate range ``d800``-``dfff`` (a lone surrogate) or the constants ``NaN``/``Infinity``
    (what Python's ``json.dumps`` prints for non-finite floats). Anything else simdjson rejects,
    ``json`` rejects too."""
    cdef Py_ssize_t i
    cdef char c
    for i in range(1, n):
        c = s[i]
        if (c == b'e' or c == b'E') and _isdigit(s[i - 1]):
            return True
        if c == b'u' and s[i - 1] == b'\\' and i + 1 < n and (s[i + 1] == b'd' or s[i + 1] == b'D'):
            return True
        if c == b'N' and i + 2 < n and s[i + 1] == b'a' and s[i + 2] == b'N':
            return True
        if c == b'I' and i + 7 < n and memcmp(s + i + 1, b"nfinity", 7) == 0:
            return True
    return False


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
                add_only(<dict>cur, <dict>vp)
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
    return _merge_chunk_newest_first(<dict>doc, <bytes>chunk)


def merge_lines_parsed_by(doc, chunk, loads):
    """The same scan, merging oldest first what another parser (``loads(bytes) -> object``,
    ``ValueError`` when the line is not JSON) returns for each line: the benchmark hook that
    compares parsers inside the compiled scan (``benchmarks/test_bench_fast.py``). Not part
    of the twin's contract."""
    if not isinstance(doc, dict):
        raise TypeError("merge_lines needs a dict")
    if not isinstance(chunk, bytes):
        chunk = bytes(chunk)
    return _merge_chunk(<dict>doc, <bytes>chunk, loads)


cdef bint _twin_decides(const char* p, Py_ssize_t n) noexcept nogil:
    """Lines the twin's rule parses without asking simdjson: an integer wider than 64 bits (a
    run of LONG_DIGITS digits), or nesting past the interpreter's recursion limit (DEEP_NESTING
    opening brackets need twice as many bytes)."""
    return _has_long_digit_run(p, n) or (
        n >= 2 * DEEP_NESTING and _opening_brackets(p, n) >= DEEP_NESTING)


cdef list _scan(bytes data, vector[Py_ssize_t]& spans):
    """Find the lines of ``data``: append the start and length of each ``{...}`` line to
    ``spans`` (oldest first) and return the ``[...]`` lines (patch candidates) in order."""
    cdef const char* buf = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t start = 0, end, a, b
    cdef const char* nl
    cdef char c0, c1
    cdef list patches = []
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
                spans.push_back(a)
                spans.push_back(b - a)
            elif c0 == b'[' and c1 == b']':
                patches.append(PyBytes_FromStringAndSize(buf + a, b - a))
        if nl == NULL:
            break
        start = end + 1
    return patches


cdef list _merge_chunk_newest_first(dict d, bytes data):
    """Scan ``data``, apply its JSON lines newest first with simdjson (``sjmerge.h``; only
    values no later line replaces become Python objects), merge the result into ``d``; return
    the ``[...]`` lines in order."""
    cdef vector[Py_ssize_t] spans
    cdef list patches = _scan(data, spans)
    if spans.size() == 0:
        return patches
    cdef const char* buf = PyBytes_AS_STRING(data)
    cdef Accumulator acc
    cdef object obj
    cdef const char* p
    cdef Py_ssize_t n
    cdef Py_ssize_t i = <Py_ssize_t>spans.size() - 2
    while i >= 0:
        p = buf + spans[i]
        n = spans[i + 1]
        if _twin_decides(p, n) or (apply_line(acc, p, n) == 0 and _json_may_accept(p, n)):
            obj = _twin_parse(PyBytes_FromStringAndSize(p, n))
            if isinstance(obj, dict):
                apply_parsed(acc, obj)
        i -= 2
    merge_final(acc, d)
    return patches


cdef list _merge_chunk(dict d, bytes data, object loads):
    """Scan ``data`` and merge oldest first what ``loads`` returns for each JSON line."""
    cdef vector[Py_ssize_t] spans
    cdef list patches = _scan(data, spans)
    cdef const char* buf = PyBytes_AS_STRING(data)
    cdef object obj
    cdef Py_ssize_t i = 0
    while i < <Py_ssize_t>spans.size():
        try:
            obj = loads(PyBytes_FromStringAndSize(buf + spans[i], spans[i + 1]))
        except ValueError:
            obj = _NOT_JSON
        if isinstance(obj, dict):
            _merge_object(d, <dict>obj)
        i += 2
    return patches
