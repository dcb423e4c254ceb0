"""Sizes and durations at the edge of the program (runner.units)."""
from __future__ import annotations

import pytest

from runner.units import UnitError, format_size, parse_duration, parse_size


@pytest.mark.parametrize("text, expected", [
    ("2gb", 2 * 10**9),
    ("2GB", 2 * 10**9),
    ("2g", 2 * 10**9),
    ("2gib", 2 * 2**30),
    ("2GiB", 2 * 2**30),
    ("10GiB", 10 * 2**30),
    ("500mb", 500 * 10**6),
    ("500MiB", 500 * 2**20),
    ("1.5gb", 1_500_000_000),
    ("1.5gib", 3 * 2**29),
    ("4kb", 4000),
    ("4kib", 4096),
    ("1tb", 10**12),
    ("1048576", 1048576),
    (" 2 GiB ", 2 * 2**30),
    ("0", 0),
    ("12b", 12),
    (1048576, 1048576),
    (0, 0),
    (2.0, 2),
])
def test_parse_size(text, expected) -> None:
    result = parse_size(text)
    assert result == expected
    assert isinstance(result, int)


@pytest.mark.parametrize("bad", [
    "", "   ", "gb", "2zb", "2 g b", "-1", "-1gb", "1e3", "two gb", "2gb2", "nan", None, True,
    False, -1, -0.5, float("nan"), float("inf"),
])
def test_parse_size_rejects(bad) -> None:
    with pytest.raises(UnitError):
        parse_size(bad)


def test_unit_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize("text, expected", [
    ("90s", 90.0),
    ("20m", 1200.0),
    ("1h", 3600.0),
    ("1h30m", 5400.0),
    ("1.5h", 5400.0),
    ("250ms", 0.25),
    ("1m30s", 90.0),
    ("2d", 172800.0),
    ("1H", 3600.0),
    ("  45s ", 45.0),
    ("500us", 0.0005),
    ("30", 30.0),
    ("2.5", 2.5),
    ("0", 0.0),
    (30, 30.0),
    (2.5, 2.5),
    (0, 0.0),
])
def test_parse_duration(text, expected) -> None:
    result = parse_duration(text)
    assert result == pytest.approx(expected)
    assert isinstance(result, float)


@pytest.mark.parametrize("bad", [
    "", "  ", "abc", "5x", "h", "1h 30m", "-5s", "-5", "1h-30m", "s90", "10 minutes",
    "nan", "inf", None, True, -1, float("nan"), float("inf"),
])
def test_parse_duration_rejects(bad) -> None:
    with pytest.raises(UnitError):
        parse_duration(bad)


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (3 * 2**30, "3.0 GiB")])
def test_format_size(n, text) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize("n, text", [
    (2 * 10**9, "2 GB"), (2 * 2**30, "2 GiB"), (1_500_000_000, "1.5 GB"), (100 * 10**6, "100 MB"),
    (512 * 2**20, "512 MiB"), (123, "123 B"), (2**10, "1 KiB"), (0, "0 B"),
])
def test_describe_size_reads_like_the_request(n, text) -> None:
    from runner.units import describe_size

    assert describe_size(n) == text
