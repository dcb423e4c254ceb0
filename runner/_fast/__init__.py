"""The compiled hot path behind a small switch (DESIGN convention 8).

Seven functions, each with a Cython implementation (``_base62``, ``_hashing``, ``_jsonlines``,
``_masking``) and a pure-Python twin (``base62_py``, ``hashing_py``, ``jsonlines_py``,
``masking_py``) of identical signature and result:

* ``b62encode(n: int) -> str`` / ``b62decode(s: str) -> int``
* ``content_hash(path) -> str`` / ``hash_bytes(data: bytes) -> str`` (xxh3_128 hex)
* ``merge_object(doc: dict, obj: dict) -> None`` / ``merge_lines(doc: dict, chunk: bytes) -> list[bytes]``
* ``mask_hits(data: bytes, literals: tuple[bytes, ...]) -> list[tuple[int, int]]`` (where
  :mod:`runner.redact` must look)

The compiled modules are used when they import. ``RUNNER_PUREPYTHON=1`` forces the twins. When the
compiled modules are absent (not built) the twins are used and a warning is logged; the packaged
build itself never ships without them (setup.py fails loudly). ``IMPLEMENTATION`` tells which is
in use.
"""
from __future__ import annotations

import importlib
import logging
import os
from types import SimpleNamespace

from runner._fast import base62_py as _base62_py
from runner._fast import hashing_py as _hashing_py
from runner._fast import jsonlines_py as _jsonlines_py
from runner._fast import masking_py as _masking_py

log = logging.getLogger("runner._fast")

__all__ = [
    "IMPLEMENTATION",
    "b62encode",
    "b62decode",
    "content_hash",
    "hash_bytes",
    "merge_object",
    "merge_lines",
    "mask_hits",
    "implementations",
]

_NAMES = ("b62encode", "b62decode", "content_hash", "hash_bytes", "merge_object", "merge_lines",
          "mask_hits")


def _namespace(base62, hashing, jsonlines, masking, kind: str) -> SimpleNamespace:
    return SimpleNamespace(
        IMPLEMENTATION=kind,
        b62encode=base62.b62encode,
        b62decode=base62.b62decode,
        content_hash=hashing.content_hash,
        hash_bytes=hashing.hash_bytes,
        merge_object=jsonlines.merge_object,
        merge_lines=jsonlines.merge_lines,
        mask_hits=masking.mask_hits,
    )


_PURE = _namespace(_base62_py, _hashing_py, _jsonlines_py, _masking_py, "pure")

_COMPILED: SimpleNamespace | None
_COMPILED_ERROR: ImportError | None
try:
    _base62 = importlib.import_module("runner._fast._base62")
    _hashing = importlib.import_module("runner._fast._hashing")
    _jsonlines = importlib.import_module("runner._fast._jsonlines")
    _masking = importlib.import_module("runner._fast._masking")
except ImportError as exc:  # not built: only this falls back, never other errors
    _COMPILED = None
    _COMPILED_ERROR = exc
else:
    _COMPILED = _namespace(_base62, _hashing, _jsonlines, _masking, "compiled")
    _COMPILED_ERROR = None


def _want_pure() -> bool:
    return os.environ.get("RUNNER_PUREPYTHON", "").strip().lower() in ("1", "true", "yes", "on")


if _want_pure():
    _active = _PURE
elif _COMPILED is None:
    log.warning(
        "runner._fast: compiled modules not built (%s); using the pure-Python twin. "
        "Build them with: python3 setup.py build_ext --inplace",
        _COMPILED_ERROR,
    )
    _active = _PURE
else:
    _active = _COMPILED

IMPLEMENTATION: str = _active.IMPLEMENTATION
b62encode = _active.b62encode
b62decode = _active.b62decode
content_hash = _active.content_hash
hash_bytes = _active.hash_bytes
merge_object = _active.merge_object
merge_lines = _active.merge_lines
mask_hits = _active.mask_hits


def implementations() -> dict[str, SimpleNamespace | None]:
    """Both implementations for tests: ``{"pure": ns, "compiled": ns or None}`` (None when not built).

    Each namespace has the seven functions and ``IMPLEMENTATION``.
    """
    return {"pure": _PURE, "compiled": _COMPILED}


def compiled_import_error() -> ImportError | None:
    """Why the compiled modules did not import (None when they did)."""
    return _COMPILED_ERROR
