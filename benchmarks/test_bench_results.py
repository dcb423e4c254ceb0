"""``runner-results sync``: a second sync over a large store of which a few experiments changed.

A ``file://`` store is filled with what the runner leaves for 10,000 experiments (1,000 with
``BENCH_QUICK=1``): the metadata-store record, the scrape document, output and runner logs of
one attempt, and its 5-point metric history (``metrics-host-<attempt>.jsonl``).  All but 10 are final; the 10
are running.  The first sync into a DuckDB file reads everything; then the 10 running ones
finish (new record, scrape document and history) and a second sync runs.

Figures: the second sync's objects read / all objects in the store (bar <= 1%) and its time
/ the first sync's time (bar <= 5%).

Run: python3 -m pytest benchmarks/test_bench_results.py -q -s
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from runner import _fast, metadata
from runner.requests import MUTABLE_LABELS
from runner.results.catalog import Catalog
from runner.results.sync import connect, sync

from .figures import QUICK, record

EXPERIMENTS = 1_000 if QUICK else 10_000
CHANGED = 10
POINTS = 5
START = 1_700_000_000


def _history(attempt: str, points: int) -> bytes:
    return b"".join(json.dumps({"time": START + n, "attempt": attempt, "attempt_number": 1,
                                "line": {"experiment": {"epoch": n, "loss": 1 / (n + 1)}}}
                               ).encode() + b"\n" for n in range(points))


def write_experiment(root: Path, number: int, *, final: bool, points: int) -> int:
    """The files the runner leaves for experiment ``number``; how many files."""
    key = f"exp-{number:05d}"
    attempt = f"bench-{_fast.b62encode(START + number)}"
    url = root.as_uri()
    artifacts = {label: {"key": f"experiments/{key}/{label}.tar", "mutable": True,
                         "qualified": f"{url}/experiments/{key}/{label}.tar"}
                 for label in MUTABLE_LABELS}
    status = "completed" if final else "running"
    request = {"experiment": {"key": key, "project": "bench", "artifacts": artifacts}}
    folder = root / "experiments" / key
    (folder / "_metadata").mkdir(parents=True, exist_ok=True)
    scrape = {"runner": {"start": START + number, "stop": START + number + 60 if final else None,
                         "host": "bench", "attempt": attempt},
              "experiment": {"epoch": points - 1, "loss": 1 / points},
              "studioml": {"status": status, "experiment": key, "project": "bench"},
              "asset": f"asset-{number}"}
    (folder / "_metadata" / metadata.scrape_name(attempt)).write_text(json.dumps(scrape))
    (folder / "_metadata" / metadata.output_name(attempt)).write_text("epoch\n" * points)
    (folder / "_metadata" / metadata.runner_log_name(attempt)).write_text("request\n")
    (folder / "_metadata" / metadata.metrics_name(attempt)).write_bytes(_history(attempt, points))
    records = root / "metadata" / "bench"
    records.mkdir(parents=True, exist_ok=True)
    (records / f"{key}.json").write_text(json.dumps({
        "request": request, "status": status, "final": final, "attempt": attempt,
        "attempts": 0, "host": "bench", "updated": START + number + 60}))
    return 5


@pytest.fixture(scope="module")
def store():
    root = Path(tempfile.mkdtemp(prefix="bench-results-"))
    files = sum(write_experiment(root, n, final=n >= CHANGED, points=POINTS)
                for n in range(EXPERIMENTS))
    yield root, files
    shutil.rmtree(root, ignore_errors=True)


def test_second_sync_reads_only_what_changed(store, tmp_path):
    root, files = store
    catalog = Catalog(root.as_uri())
    connection = connect(str(tmp_path / "results.duckdb"))
    began = time.perf_counter()
    first = sync(catalog, connection)
    first_seconds = time.perf_counter() - began
    assert first.refreshed == EXPERIMENTS and first.failed == 0
    for number in range(CHANGED):
        write_experiment(root, number, final=True, points=POINTS + 3)
    began = time.perf_counter()
    second = sync(catalog, connection)
    second_seconds = time.perf_counter() - began
    assert second.refreshed == CHANGED and second.skipped == EXPERIMENTS - CHANGED
    history = connection.execute("SELECT count(*) FROM history").fetchone()[0]
    assert history == (EXPERIMENTS * POINTS + CHANGED * 3) * 2  # epoch and loss per point
    read_share = second.reads / files
    time_share = second_seconds / first_seconds
    note = (f"{EXPERIMENTS} experiments, {files} files, {CHANGED} changed; first sync "
            f"{first_seconds:.2f} s ({first.reads} reads), second {second_seconds * 1000:.0f} ms "
            f"({second.reads} reads)")
    record("results", "second sync reads / files", read_share, "x", bar="<= 0.01",
           met=read_share <= 0.01, note=note)
    record("results", "second sync time / first sync", time_share, "x", bar="<= 0.05",
           met=time_share <= 0.05, note=note)
