# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled JSON-line merge (twin: :mod:`runner._fast.jsonlines_py`; the contract is documented there).

The speed comes from scanning the chunk in C: lines are found with ``memchr`` and trimmed by
pointer, so a plain log line never becomes a Python object; only lines whose first and last
non-white-space bytes are ``{``/``}`` or ``[``/``]`` are sliced out and parsed. The merge is a
typed recursive ``cdef`` function over ``dict`` objects.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem, PyDict_Next
from cpython.object cimport PyObject
from libc.string cimport memchr

import json

import orjson

# One parse rule shared with the twin: orjson first, stdlib json (NaN/Infinity rejected) second.
from runner._fast.jsonlines_py import _reject_constant

cdef object _orjson_loads = orjson.loads
cdef object _OrjsonError = orjson.JSONDecodeError
cdef object _json_loads = json.loads
cdef object _NOT_JSON = object()


cdef inline bint _isws(char c) nogil:
    # Same set as bytes.strip(): space, \t, \n, \r, \v, \f
    return c == 32 or (9 <= c <= 13)


cdef object _parse(bytes line):
    try:
        return _orjson_loads(line)
    except _OrjsonError:
        pass
    try:
        return _json_loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
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
    while PyDict_Next(obj, &pos, &kp, &vp):
        k = <object>kp
        if k == "runner" or k == "asset":
            continue
        if k == "studioml":
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
                    obj = _parse(PyBytes_FromStringAndSize(buf + a, b - a))
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
