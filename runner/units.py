"""Parsing of sizes and durations at the edge of the program.

Inside the runner a size is always an ``int`` number of bytes and a duration is always
a ``float`` number of seconds; these functions are the only place where text becomes
either.
"""
from __future__ import annotations

import math
import re

from .errors import RunnerError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
    "ti": 2**40, "tib": 2**40, "pi": 2**50, "pib": 2**50,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0, "d": 86400.0}
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h|d)")


class UnitError(RunnerError, ValueError):
    """A size or duration could not be understood."""


def parse_size(value: str | int | float | None) -> int:
    """Bytes in ``value``: ``"2gb"`` is 2*10^9, ``"2gib"`` is 2*2^30, numbers are bytes.

    Raises :class:`UnitError` for anything else (negative, unknown unit, empty).
    """
    if value is None:
        raise UnitError("a size is required")
    if isinstance(value, bool):
        raise UnitError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise UnitError(f"not a size: {value!r}")
        return int(value)
    match = _SIZE_RE.match(str(value))
    if not match:
        raise UnitError(f"not a size: {value!r} (examples: 500mb, 2GiB, 1048576)")
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise UnitError(f"unknown size unit {unit!r} in {value!r}")
    return int(float(number) * factor)


def parse_duration(value: str | int | float | None) -> float:
    """Seconds in ``value``: ``"90s"``, ``"20m"``, ``"1h30m"``, ``"1.5h"``; numbers are seconds.

    Raises :class:`UnitError` for anything else.
    """
    if value is None:
        raise UnitError("a duration is required")
    if isinstance(value, bool):
        raise UnitError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise UnitError(f"not a duration (negative or not finite): {value!r}")
        return float(value)
    text = str(value).strip().lower()
    if not text:
        raise UnitError("empty duration")
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise UnitError(f"not a duration (negative or not finite): {value!r}")
        return seconds
    position = 0
    total = 0.0
    for match in _DURATION_PART_RE.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise UnitError(f"not a duration: {value!r} (examples: 90s, 20m, 1h30m)")
    return total


def parse_duration_with_unit(value: str) -> float:
    """Seconds in ``value`` as a person types it on a command line or in an options file:
    like :func:`parse_duration`, but a bare number other than 0 is refused (is ``5`` five
    seconds or five minutes?).  Raises :class:`UnitError`."""
    stripped = str(value).strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]*)?", stripped) and float(stripped) != 0:
        raise UnitError(f"a duration needs a unit: {stripped}s, {stripped}m or {stripped}h")
    return parse_duration(value)


def format_size(n: int) -> str:
    """Human form of a byte count (``1.5 GiB``), for messages only."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def describe_size(n: int) -> str:
    """A byte count the way a person wrote it: ``2 GB`` for 2*10^9, ``2 GiB`` for 2*2^30.

    Whole decimal or binary multiples are written exactly; anything else is written in
    the largest decimal unit with up to two decimals (``1.5 GB``).  For messages only.
    """
    n = int(n)
    if n <= 0:
        return f"{n} B"
    for power, prefix in ((4, "T"), (3, "G"), (2, "M"), (1, "k")):
        binary, decimal = 2 ** (10 * power), 10 ** (3 * power)
        if n % binary == 0:
            return f"{n // binary} {prefix.upper()}iB"
        if n % decimal == 0:
            return f"{n // decimal} {prefix}B"
        if n >= decimal:
            return f"{n / decimal:.2f}".rstrip("0").rstrip(".") + f" {prefix}B"
    return f"{n} B"
