"""Pure-Python twin of :mod:`runner._fast._jsonlines`: merging JSON lines into the scrape document.

Contract (spec section 6), identical in both implementations:

* ``merge_object(doc, obj)`` merges one object in place. Dicts merge recursively, a scalar or list
  replaces the earlier value, ``None`` is stored (it does not delete). Top-level ``runner`` and
  ``asset`` keys of ``obj`` are ignored; under top-level ``studioml`` the merge is add-only at every
  depth. Sub-objects of ``obj`` may be inserted by reference (the caller hands ``obj`` over).
* ``merge_lines(doc, chunk)`` splits ``chunk`` on ``b"\\n"`` (a trailing partial line counts as a
  line), strips ASCII white space, merges every ``{...}`` line that parses as a JSON object and
  returns the stripped ``[...]`` lines (patch candidates) in order. Anything else is plain output.
* Parse rule: stdlib ``json.loads`` of the strictly UTF-8 decoded line. Integers of any width
  come back as exact ``int``; strings with lone UTF-16 surrogate escapes (``"\\ud800"``),
  out-of-range floats (``1e400`` → ``inf``) and the constants ``NaN``, ``Infinity`` and
  ``-Infinity`` (what Python's ``json.dumps`` prints for non-finite floats) are accepted as
  ``json`` accepts them; the runner writes non-finite values as strings
  (:mod:`runner.strict_json`). Invalid UTF-8 and nesting too deep for the interpreter
  (``RecursionError``) are not JSON: such a line is plain output.

This twin is pure Python (stdlib ``json`` only). The compiled module parses with simdjson,
applies a chunk's lines newest first (building only the values no later line replaces) and falls
back to exactly this rule wherever simdjson could differ, so both give identical documents on
every input, key order included.
"""
from __future__ import annotations

import json
from typing import Any

_json_loads = json.loads
_MISSING = object()
_NOT_JSON = object()


def parse_json(line: bytes) -> Any:
    """Parse with the strict rule; returns the module's ``_NOT_JSON`` sentinel on failure."""
    try:
        return _json_loads(line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):  # UnicodeDecodeError: a ValueError too
        return _NOT_JSON


def _merge_into(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict):
            cur = dst.get(k, _MISSING)
            if isinstance(cur, dict):
                _merge_into(cur, v)
                continue
        dst[k] = v


def _add_only(dst: dict, src: dict) -> None:
    for k, v in src.items():
        cur = dst.get(k, _MISSING)
        if cur is _MISSING:
            dst[k] = v
        elif isinstance(cur, dict) and isinstance(v, dict):
            _add_only(cur, v)


def merge_object(doc: dict, obj: dict) -> None:
    """Merge one JSON-line object into ``doc`` in place (see module docstring for the rules)."""
    if not isinstance(doc, dict) or not isinstance(obj, dict):
        raise TypeError("merge_object needs two dicts")
    for k, v in obj.items():
        if k == "runner" or k == "asset":
            continue
        if k == "studioml":
            cur = doc.get(k, _MISSING)
            if cur is _MISSING:
                doc[k] = v
            elif isinstance(cur, dict) and isinstance(v, dict):
                _add_only(cur, v)
            continue
        if isinstance(v, dict):
            cur = doc.get(k, _MISSING)
            if isinstance(cur, dict):
                _merge_into(cur, v)
                continue
        doc[k] = v


def merge_lines(doc: dict, chunk: bytes) -> list[bytes]:
    """Merge every JSON-object line of ``chunk`` into ``doc``; return the ``[...]`` lines."""
    if not isinstance(doc, dict):
        raise TypeError("merge_lines needs a dict")
    if not isinstance(chunk, bytes):
        chunk = bytes(chunk)
    patches: list[bytes] = []
    for line in chunk.split(b"\n"):
        s = line.strip()
        if len(s) < 2:
            continue
        first = s[0]
        last = s[-1]
        if first == 0x7B and last == 0x7D:  # { }
            obj = parse_json(s)
            if isinstance(obj, dict):
                merge_object(doc, obj)
        elif first == 0x5B and last == 0x5D:  # [ ]
            patches.append(s)
    return patches
