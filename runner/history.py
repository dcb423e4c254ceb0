"""Metric history: every JSON object line an experiment printed, with its time and attempt.

The scraper merges JSON lines into one scrape document (SPEC section 6), which keeps only
the latest value of each key.  Curves need every value, so the scraper also appends each
JSON object line to a fourth per-attempt metadata file,
``<workdir>.runner/_metadata/metrics-host-<attempt>.jsonl`` (:func:`runner.metadata.metrics_name`),
uploaded with the other ``_metadata`` files every save period and at the end.  It is not
put in the ``_metrics`` artifact: the StudioML client reads ``_metrics`` as the one file
the runner writes there (SPEC section 11), and a second file would turn it into a folder.

One history line (strict JSON, one object per line)::

    {"time": 1700000000.25, "attempt": "host-1r31eq", "attempt_number": 1,
     "line": {"experiment": {"epoch": 3, "loss": 0.25}}}

``time`` is float unix seconds when the scraper read the chunk holding the line (lines read
together share it; the file's order is the printed order), ``attempt_number`` counts
from 1, ``line`` is the object as printed (secrets already masked).  An experiment's
history is its attempts' files in the order of their base62 stamps.

Metric names (:func:`numeric_leaves`) are dotted paths of numeric leaves; the user's own
``experiment`` section loses its prefix (``experiment.loss`` → ``loss``), other top-level
keys keep theirs, and the runner's own ``runner``/``studioml``/``asset`` are not metrics.
"""
from __future__ import annotations

import math
from typing import Iterator

import orjson
import simdjson


_RUNNER_KEYS = frozenset(("runner", "studioml", "asset"))


def json_object_lines(chunk: bytes) -> list[bytes]:
    """The lines of ``chunk`` (split on ``\\n`` and ``\\r``, white space trimmed) that are
    strict JSON objects, in order, as they were printed.

    Checked with simdjson, which builds no Python objects (the scraper's merge has already
    built the values it keeps): NaN/Infinity, numbers out of range, invalid UTF-8 and
    anything not an object are left out.
    """
    if b"{" not in chunk:
        return []
    parser = simdjson.Parser()
    found = []
    for segment in chunk.splitlines():  # \n, \r and \r\n end a line
        line = segment.strip()
        if len(line) < 2 or line[0] != 0x7B or line[-1] != 0x7D:
            continue
        try:
            document = parser.parse(line)
        except (ValueError, RuntimeError):
            continue
        is_object = isinstance(document, simdjson.Object)
        del document  # the parser is reused: no proxy may outlive this line
        if is_object:
            found.append(line)
    return found


def history_lines(lines: list[bytes], *, time: float, attempt: str, attempt_number: int) -> bytes:
    """History lines (UTF-8, ``\\n``-terminated) around the JSON object ``lines`` as printed."""
    head = orjson.dumps({"time": time, "attempt": attempt, "attempt_number": attempt_number,
                         "line": 0})[:-2]  # without the placeholder's "0}"
    return b"".join(head + line + b"}\n" for line in lines)


def numeric_leaves(document: dict, *, strip_experiment: bool = True) -> Iterator[tuple[str, float]]:
    """``(name, value)`` for every finite numeric leaf of ``document`` (booleans excluded),
    named by dotted path as the module docstring says."""
    def walk(prefix: str, value) -> Iterator[tuple[str, float]]:
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                yield prefix, value
    for key, value in document.items():
        if key in _RUNNER_KEYS:
            continue
        if key == "experiment" and strip_experiment:
            yield from walk("", value)
        else:
            yield from walk(str(key), value)


def parse_history(data: bytes) -> list[dict]:
    """History lines from the bytes of a history file; a torn or foreign line is skipped."""
    found = []
    for line in data.splitlines():
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict) and isinstance(value.get("line"), dict):
            found.append(value)
    return found
