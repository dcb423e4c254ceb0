"""Metric history: every JSON object line an experiment printed, with its time and attempt.

The scraper merges JSON lines into one scrape document (SPEC section 6), which keeps only
the latest value of each key.  Curves need every value, so the scraper also appends each
JSON object line to a fourth per-attempt metadata file,
``<workdir>.runner/_metadata/metrics-host-<attempt>.jsonl`` (:func:`runner.metadata.metrics_name`),
uploaded with the other ``_metadata`` files every save period and at the end.  It is not
put in the ``_metrics`` artifact: the StudioML client reads ``_metrics`` as the one file
the runner writes there (SPEC section 11), and a second file would turn it into a folder.

The file is JSON lines (UTF-8, ``\n``-terminated); the runner's own lines are arrays, so
they never look like a printed line, which is always an object::

    ["attempt", "host-1r31eq", 1]                      first line: attempt id and number
    ["time", 1700000000.25]                            the lines below were read then
    {"experiment": {"epoch": 3, "loss": 0.25}}         each JSON object line as printed
    {"experiment": {"epoch": 4, "loss": 0.2}}
    ["truncated", 1700000100.5, 67108864]              the cap was reached: nothing after

The attempt is written once and the time once per chunk the scraper read (lines read
together share it; the file's order is the printed order), so the file is about the size
of the JSON lines themselves.  ``time`` is float unix seconds, the attempt number counts
from 1, printed lines keep their bytes (secrets already masked).  A file stops growing at
the runner's ``--max-history`` (default :data:`MAX_HISTORY_BYTES`): the lines that do not
fit are left out and a ``truncated`` line (time, the cap in bytes) says so; the scrape document keeps the latest values and
the output log keeps every line.  :func:`parse_history` gives each printed line as
``{"time", "attempt", "attempt_number", "line"}`` and also reads the older form of one
such object per line.  An experiment's history is its attempts' files in the order of
their base62 stamps.

Metric names (:func:`numeric_leaves`) are dotted paths of numeric leaves; the user's own
``experiment`` section loses its prefix (``experiment.loss`` → ``loss``), other top-level
keys keep theirs, and the runner's own ``runner``/``studioml``/``asset`` are not metrics.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import BinaryIO

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


MAX_HISTORY_BYTES = 64 * 1024 * 1024
"""The default cap of one attempt's history file (``--max-history``), the ``truncated``
line included."""
_TRUNCATION_ROOM = 64  # bytes kept free for the ``truncated`` line


def history_header(attempt: str, attempt_number: int) -> bytes:
    """The first line of an attempt's history file."""
    return orjson.dumps(["attempt", attempt, attempt_number]) + b"\n"


def history_lines(lines: list[bytes], *, time: float, room: int,
                  cap: int = MAX_HISTORY_BYTES) -> tuple[bytes, bool]:
    """(bytes to append, whether lines were left out) for the JSON object ``lines`` as
    printed, read at ``time``, when the file has ``room`` bytes left below its ``cap``.

    The bytes are a ``time`` line and every line that fits; when one does not fit, it and
    the rest are left out and a ``truncated`` line ends the bytes (append nothing more).
    """
    marker = orjson.dumps(["time", time]) + b"\n"
    room -= _TRUNCATION_ROOM
    parts, used = [marker], len(marker)
    for line in lines:
        if used + len(line) + 1 > room:
            if used == len(marker):
                parts = []
            parts.append(orjson.dumps(["truncated", time, cap]) + b"\n")
            return b"".join(parts), True
        parts += (line, b"\n")
        used += len(line) + 1
    return b"".join(parts), False


_INT64 = 2**63


def numeric_leaves(document: dict, *, strip_experiment: bool = True) -> Iterator[tuple[str, float]]:
    """``(name, value)`` for every finite numeric leaf of ``document`` (booleans excluded),
    named by dotted path as the module docstring says.

    Any JSON an experiment printed is taken: an integer outside 64 bits is given as a float
    (left out beyond a float's range), and nesting of any depth is walked without recursion.
    """
    stack: list[tuple[str, object]] = []
    for key, value in reversed(list(document.items())):
        if key in _RUNNER_KEYS:
            continue
        stack.append(("" if key == "experiment" and strip_experiment else str(key), value))
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{prefix}.{key}" if prefix else str(key), inner)
                         for key, inner in reversed(list(value.items())))
        elif isinstance(value, int) and not isinstance(value, bool):
            if -_INT64 <= value < _INT64:
                yield prefix, value
            else:
                try:
                    yield prefix, float(value)
                except OverflowError:
                    continue
        elif isinstance(value, float) and math.isfinite(value):
            yield prefix, value


def parse_history(data: bytes) -> list[dict]:
    """``{"time", "attempt", "attempt_number", "line"}`` for each printed line in the bytes
    of a history file (either form, module docstring); a torn or foreign line is skipped."""
    found = []
    attempt, number, when = "", 0, None
    compact = data[:1] == b"["
    for raw in data.splitlines():
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if not compact:  # the older form: one object with its time and attempt per line
            if isinstance(value, dict) and isinstance(value.get("line"), dict):
                found.append(value)
        elif isinstance(value, dict):
            found.append({"time": when, "attempt": attempt, "attempt_number": number,
                          "line": value})
        elif isinstance(value, list) and len(value) == 3 and value[0] == "attempt":
            attempt, number = str(value[1]), value[2]
        elif isinstance(value, list) and len(value) == 2 and value[0] == "time":
            when = value[1]
    return found


def truncated(data: bytes) -> bool:
    """Whether the history ``data`` (a whole file or its end) ends with a ``truncated``
    line: it reached its cap."""
    return data.rstrip(b"\n").rsplit(b"\n", 1)[-1].startswith(b'["truncated"')


def file_truncated(handle: BinaryIO) -> bool:
    """:func:`truncated` for the history file open (for appending) as ``handle``."""
    with open(handle.name, "rb") as reader:
        reader.seek(max(0, handle.tell() - 128))
        return truncated(reader.read(128))
