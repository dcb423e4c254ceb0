"""RFC 6902 JSON Patch subset for scrape documents (spec section 6).

``add``, ``remove``, ``replace``, ``test``, ``move`` and ``copy`` with RFC 6901 pointers (``~0`` is
``~``, ``~1`` is ``/``, ``-`` appends to an array). Ownership rules on top of the RFC:

* any operation whose ``path`` or ``from`` is ``/runner``, ``/asset`` or under them is rejected;
* under ``/studioml`` only ``add`` of a key that does not exist yet, or an append to an array with
  ``-``, is allowed (``move``/``copy`` into it, ``replace``/``remove`` in it, ``add`` over an
  existing key or to the ``/studioml`` root itself are rejected). ``test`` is always allowed and
  ``/studioml`` may be a ``from`` of ``copy`` (reading is fine), but not of ``move``.

A patch is atomic: it is applied to a deep copy and swapped in only when every operation succeeds;
otherwise :class:`PatchRejected` is raised with the reason and ``doc`` is left untouched.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import orjson

from ._fast.jsonlines_py import parse_json

log = logging.getLogger(__name__)

__all__ = ["PatchRejected", "apply_patch", "parse_patch"]

_OPS = ("add", "remove", "replace", "test", "move", "copy")
_FORBIDDEN = ("runner", "asset")
_OWNED_ADD_ONLY = "studioml"


class PatchRejected(ValueError):
    """A JSON patch was refused; ``reason`` says why and ``op_index`` which op (or None)."""

    def __init__(self, reason: str, op_index: int | None = None) -> None:
        super().__init__(reason if op_index is None else f"op {op_index}: {reason}")
        self.reason = reason
        self.op_index = op_index


def parse_patch(line: bytes) -> list[dict] | None:
    """Return the ops when ``line`` is a JSON array of objects each with string ``op`` and ``path``.

    Uses the same strict parse rule as the JSON-line merge; returns None for anything else
    (including an empty array).
    """
    s = bytes(line).strip()
    if not (s.startswith(b"[") and s.endswith(b"]")):
        return None
    try:
        ops = orjson.loads(s)
    except orjson.JSONDecodeError:
        ops = parse_json(s)  # the merge's rule: wide ints, 1e400, NaN/Infinity

    if not isinstance(ops, list) or not ops:
        return None
    for op in ops:
        if not isinstance(op, dict):
            return None
        if not isinstance(op.get("op"), str) or not isinstance(op.get("path"), str):
            return None
    return ops


def _split(pointer: Any) -> list[str]:
    if not isinstance(pointer, str):
        raise PatchRejected(f"pointer must be a string, got {type(pointer).__name__}")
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchRejected(f"pointer {pointer!r} does not start with '/'")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _index(container: list, token: str, pointer: str, *, allow_end: bool) -> int:
    if token == "-":
        if allow_end:
            return len(container)
        raise PatchRejected(f"'-' is not an existing element in {pointer!r}")
    if not token.isdigit() or not token.isascii() or (len(token) > 1 and token[0] == "0"):
        raise PatchRejected(f"bad array index {token!r} in {pointer!r}")
    i = int(token)
    limit = len(container) if allow_end else len(container) - 1
    if i > limit:
        raise PatchRejected(f"array index {i} out of range in {pointer!r}")
    return i


def _parent(doc: Any, tokens: list[str], pointer: str) -> Any:
    node = doc
    for t in tokens[:-1]:
        if isinstance(node, dict):
            if t not in node:
                raise PatchRejected(f"path {pointer!r} does not exist")
            node = node[t]
        elif isinstance(node, list):
            node = node[_index(node, t, pointer, allow_end=False)]
        else:
            raise PatchRejected(f"path {pointer!r} goes through a scalar")
    return node


def _get(doc: Any, pointer: str) -> Any:
    tokens = _split(pointer)
    if not tokens:
        return doc
    parent = _parent(doc, tokens, pointer)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchRejected(f"path {pointer!r} does not exist")
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, pointer, allow_end=False)]
    raise PatchRejected(f"path {pointer!r} goes through a scalar")


def _exists(doc: Any, pointer: str) -> bool:
    try:
        _get(doc, pointer)
    except PatchRejected:
        return False
    return True


def _add(doc: Any, pointer: str, value: Any) -> Any:
    tokens = _split(pointer)
    if not tokens:
        raise PatchRejected("replacing the whole document is not allowed")
    parent = _parent(doc, tokens, pointer)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, pointer, allow_end=True), value)
    else:
        raise PatchRejected(f"path {pointer!r} goes through a scalar")
    return doc


def _remove(doc: Any, pointer: str) -> Any:
    tokens = _split(pointer)
    if not tokens:
        raise PatchRejected("removing the whole document is not allowed")
    parent = _parent(doc, tokens, pointer)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchRejected(f"path {pointer!r} does not exist")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, pointer, allow_end=False))
    raise PatchRejected(f"path {pointer!r} goes through a scalar")


def _check_ownership(doc: Any, op: str, path: str, frm: str | None) -> None:
    for pointer in (path, frm):
        if pointer is None:
            continue
        tokens = _split(pointer)
        if tokens and tokens[0] in _FORBIDDEN:
            raise PatchRejected(f"{pointer!r} belongs to the runner")
    ptoks = _split(path)
    if ptoks and ptoks[0] == _OWNED_ADD_ONLY and op != "test":
        if op != "add":
            raise PatchRejected(f"only 'add' is allowed under /studioml, not {op!r}")
        if len(ptoks) == 1:
            raise PatchRejected("/studioml itself cannot be replaced")
        parent = _parent(doc, ptoks, path)
        if isinstance(parent, dict):
            if ptoks[-1] in parent:
                raise PatchRejected(f"{path!r} already exists; /studioml is add-only")
        elif isinstance(parent, list):
            if ptoks[-1] != "-":
                raise PatchRejected(f"only appends ('-') are allowed to arrays under /studioml: {path!r}")
    if frm is not None and op == "move":
        ftoks = _split(frm)
        if ftoks and ftoks[0] == _OWNED_ADD_ONLY:
            raise PatchRejected(f"cannot move out of /studioml: {frm!r}")


def _apply_one(doc: Any, op: dict, i: int) -> Any:
    if not isinstance(op, dict):
        raise PatchRejected("operation is not an object", i)
    name = op.get("op")
    path = op.get("path")
    if name not in _OPS:
        raise PatchRejected(f"unknown op {name!r}", i)
    if not isinstance(path, str):
        raise PatchRejected("missing or non-string 'path'", i)
    frm = op.get("from") if name in ("move", "copy") else None
    if name in ("move", "copy") and not isinstance(frm, str):
        raise PatchRejected(f"{name!r} needs a string 'from'", i)
    if name in ("add", "replace", "test") and "value" not in op:
        raise PatchRejected(f"{name!r} needs a 'value'", i)
    try:
        _check_ownership(doc, name, path, frm)
        if name == "add":
            return _add(doc, path, copy.deepcopy(op["value"]))
        if name == "remove":
            _remove(doc, path)
            return doc
        if name == "replace":
            if not _exists(doc, path):
                raise PatchRejected(f"path {path!r} does not exist")
            tokens = _split(path)
            if not tokens:
                raise PatchRejected("replacing the whole document is not allowed")
            parent = _parent(doc, tokens, path)
            if isinstance(parent, dict):
                parent[tokens[-1]] = copy.deepcopy(op["value"])
            else:
                parent[_index(parent, tokens[-1], path, allow_end=False)] = copy.deepcopy(op["value"])
            return doc
        if name == "test":
            if not _json_equal(_get(doc, path), op["value"]):
                raise PatchRejected(f"test failed at {path!r}")
            return doc
        assert isinstance(frm, str)  # copy or move: checked above
        if name == "copy":
            return _add(doc, path, copy.deepcopy(_get(doc, frm)))
        # move
        if path != frm and (path + "/").startswith(frm + "/"):
            raise PatchRejected(f"cannot move {frm!r} into its own child {path!r}")
        value = _remove(doc, frm)
        return _add(doc, path, value)
    except PatchRejected as exc:
        if exc.op_index is None:
            raise PatchRejected(exc.reason, i) from None
        raise


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return a == b


def apply_patch(doc: dict, ops: list) -> None:
    """Apply ``ops`` to ``doc`` in place, atomically; raise :class:`PatchRejected` on any failure."""
    if not isinstance(doc, dict):
        raise TypeError("apply_patch needs a dict document")
    if not isinstance(ops, list):
        raise PatchRejected("a patch is a list of operations")
    work = copy.deepcopy(doc)
    for i, op in enumerate(ops):
        work = _apply_one(work, op, i)
    doc.clear()
    doc.update(work)
