"""Incremental ETL of a catalog into DuckDB (``runner-results sync --into FILE.duckdb``).

Tables (times are float unix seconds):

* ``experiments``: one row per experiment — ``project``, ``key``, ``status``, ``final``,
  ``attempts``, ``attempt``, ``host``, ``start``, ``stop``, ``duration`` (s), ``updated``,
  ``record`` and ``scrape`` (the JSON texts), and what the next sync compares:
  ``record_etag``/``record_size``, ``scrape_url``/``scrape_etag``/``scrape_size``,
  ``history_etag``;
* ``metrics``: ``project``, ``key``, ``name``, ``value`` — the final value of every numeric
  metric of the newest scrape document;
* ``history``: ``project``, ``key``, ``point``, ``attempt``, ``attempt_number``, ``time``,
  ``name``, ``value`` — one row per numeric value of every history line
  (:mod:`runner.history`); ``point`` numbers the lines of one experiment from 1 in the
  order they were printed (lines read in one chunk share their ``time``).

What a sync reads (the seed's "long-lived ETL"):

1. one listing of the metadata store (sizes and etags come with it);
2. an experiment synced as final whose record's etag and size are unchanged is skipped
   without any further call (a set over ``(project, key, etag, size)`` held in memory);
3. for the others the record is read only when its etag or size changed; the newest
   scrape document (by base62 stamp) is found with one listing and read only when its
   URL, etag or size changed; its history files (``metrics-host-*.jsonl``, one per
   attempt) are listed with one more call and read only when one of them is new or
   changed;
4. rows of experiments whose record is gone are deleted.

Objects are read by :data:`READERS` threads at once (reads are I/O-bound, above all on S3).

Everything one sync changes is written in one transaction: a sync that fails leaves the
file as the previous sync left it.

Experiments print what they like, so no experiment's files can stop a sync: whatever goes
wrong with one experiment (a document that is not JSON or nests too deeply, a value no
table column takes) is logged, reported in :attr:`SyncReport.problems` and that experiment
keeps its previous rows; every other experiment is synced.  Its rows are encoded while it
is read, so a bad value is met there, not in the shared insert.  Integers beyond 64 bits
become floats (:func:`runner.history.numeric_leaves`).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import duckdb
import orjson

from .. import history as history_module
from ..errors import StorageError
from .catalog import Catalog, Experiment

log = logging.getLogger(__name__)

#: Threads reading objects during one sync.
READERS = 8

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    project VARCHAR, key VARCHAR, status VARCHAR, final BOOLEAN, attempts INTEGER,
    attempt VARCHAR, host VARCHAR, start DOUBLE, stop DOUBLE, duration DOUBLE, updated DOUBLE,
    record VARCHAR, scrape VARCHAR, record_url VARCHAR, record_etag VARCHAR, record_size BIGINT,
    scrape_url VARCHAR, scrape_etag VARCHAR, scrape_size BIGINT, history_etag VARCHAR,
    PRIMARY KEY (project, key));
CREATE TABLE IF NOT EXISTS metrics (project VARCHAR, key VARCHAR, name VARCHAR, value DOUBLE);
CREATE TABLE IF NOT EXISTS history (project VARCHAR, key VARCHAR, point INTEGER,
    attempt VARCHAR, attempt_number INTEGER, time DOUBLE, name VARCHAR, value DOUBLE);
"""

_COLUMNS = {
    "experiments": {"project": "VARCHAR", "key": "VARCHAR", "status": "VARCHAR",
                    "final": "BOOLEAN", "attempts": "INTEGER", "attempt": "VARCHAR",
                    "host": "VARCHAR", "start": "DOUBLE", "stop": "DOUBLE",
                    "duration": "DOUBLE", "updated": "DOUBLE", "record": "VARCHAR",
                    "scrape": "VARCHAR", "record_url": "VARCHAR", "record_etag": "VARCHAR",
                    "record_size": "BIGINT", "scrape_url": "VARCHAR", "scrape_etag": "VARCHAR",
                    "scrape_size": "BIGINT", "history_etag": "VARCHAR"},
    "metrics": {"project": "VARCHAR", "key": "VARCHAR", "name": "VARCHAR", "value": "DOUBLE"},
    "history": {"project": "VARCHAR", "key": "VARCHAR", "point": "INTEGER", "attempt": "VARCHAR",
                "attempt_number": "INTEGER", "time": "DOUBLE", "name": "VARCHAR",
                "value": "DOUBLE"},
}


@dataclass
class SyncReport:
    """What one sync did: experiments listed, skipped as final, refreshed (rows
    rewritten), deleted; objects read (downloads, listing excluded); ``failed``
    experiments that could not be synced, each in ``problems`` as
    ``[project, key, reason]``."""

    listed: int = 0
    skipped: int = 0
    refreshed: int = 0
    deleted: int = 0
    reads: int = 0
    failed: int = 0
    problems: list = field(default_factory=list)


def connect(path: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the tables of the module docstring created."""
    connection = duckdb.connect(path)
    connection.execute(SCHEMA)
    return connection


def _encoded(rows: list[dict]) -> list[bytes]:
    """``rows`` as JSON lines for :func:`_bulk_insert`; raises ``TypeError`` for a value no
    column takes."""
    return [orjson.dumps(row) + b"\n" for row in rows]


def _bulk_insert(connection: duckdb.DuckDBPyConnection, table: str, lines: list[bytes],
                 folder: str) -> None:
    """Insert ``lines`` (rows as :func:`_encoded` JSON lines) into ``table`` through a
    JSON-lines file (DuckDB reads it in one statement; row-by-row inserts are far
    slower)."""
    if not lines:
        return
    path = os.path.join(folder, f"{table}.jsonl")
    with open(path, "wb") as out:
        out.writelines(lines)
    columns = _COLUMNS[table]
    spec = "{" + ", ".join(f"'{name}': '{kind}'" for name, kind in columns.items()) + "}"
    names = ", ".join(f'"{name}"' for name in columns)
    connection.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM "
                       f"read_json(?, format='newline_delimited', columns={spec})", [path])


def _delete(connection: duckdb.DuckDBPyConnection, names: list[tuple[str, str]],
            tables=("experiments", "metrics", "history")) -> None:
    if not names:
        return
    connection.execute("CREATE OR REPLACE TEMP TABLE gone (project VARCHAR, key VARCHAR)")
    connection.executemany("INSERT INTO gone VALUES (?, ?)", names)
    for table in tables:
        connection.execute(f"DELETE FROM {table} WHERE (project, key) IN "
                           "(SELECT (project, key) FROM gone)")
    connection.execute("DROP TABLE gone")


def strict_json_text(document: dict) -> str:
    """``document`` as strict JSON text (keys sorted): ``NaN``/``Infinity`` (which Python's
    reader accepts in stored files) become ``null``, so every reader of the text can parse
    it.  Raises ``RecursionError`` for nesting too deep to write."""
    try:
        return json.dumps(document, sort_keys=True, allow_nan=False)
    except ValueError:
        loose = json.loads(json.dumps(document), parse_constant=lambda _constant: None)
        return json.dumps(loose, sort_keys=True, allow_nan=False)


def history_rows(project: str, key: str, lines: list[dict]) -> list[dict]:
    """``history`` rows of an experiment's history lines."""
    rows = []
    for point, line in enumerate(lines, 1):
        for name, value in history_module.numeric_leaves(line["line"]):
            rows.append({"project": project, "key": key, "point": point,
                         "attempt": line.get("attempt"),
                         "attempt_number": line.get("attempt_number"),
                         "time": line.get("time"), "name": name, "value": value})
    return rows


def sync(catalog: Catalog, connection: duckdb.DuckDBPyConnection, *, with_history: bool = True,
         progress: Callable[[int, int], None] | None = None) -> SyncReport:
    """Bring ``connection``'s tables up to date with ``catalog`` (module docstring).

    ``progress(done, total)`` after each listed experiment.  An experiment whose files
    cannot be read is logged, counted in ``failed`` and keeps its previous rows.
    Raises :class:`StorageError` when the metadata store cannot be listed.
    """
    report = SyncReport()
    reads_before = catalog.reads
    # Only what the comparisons need; the JSON texts are loaded for the experiments to look
    # at again only (finished ones, most of a long-lived store, never).
    known = {(row[0], row[1]): row[2:] for row in connection.execute(
        "SELECT project, key, final, record_etag, record_size, scrape_url, scrape_etag,"
        " scrape_size, history_etag FROM experiments").fetchall()}
    finished = {(name[0], name[1], row[1], row[2]) for name, row in known.items() if row[0]}
    infos = catalog.record_infos()
    report.listed = len(infos)
    seen: set[tuple[str, str]] = set()
    todo = []
    for info in infos:
        name = catalog.name_of(info.url)
        seen.add(name)
        if (name[0], name[1], info.etag, info.size) in finished:
            report.skipped += 1
        else:
            todo.append((info, name))
    stored = _stored_documents(connection, [name for _, name in todo if name in known])

    def refresh(item):
        info, name = item
        try:
            rows = _refresh(catalog, info, name, known.get(name), stored.get(name),
                            with_history)
            if rows is None:
                return name, None
            experiment_row, metrics, history_lines = rows
            return name, (_encoded([experiment_row]), _encoded(metrics),
                          None if history_lines is None else
                          _encoded(history_rows(name[0], name[1], history_lines)))
        except Exception as exc:  # one experiment's files never stop the others' sync
            reason = exc if isinstance(exc, StorageError) else f"{type(exc).__name__}: {exc}"
            log.warning("cannot sync %s/%s (skipped, its previous rows kept): %s",
                        name[0], name[1], reason)
            return name, StorageError(str(reason))

    changed: list[tuple[str, str]] = []
    experiment_rows, metric_rows, history_out = [], [], []
    history_replaced: list[tuple[str, str]] = []
    done = report.skipped
    if progress:
        progress(done, len(infos))
    # Reads are I/O: a few threads overlap them (the store and the catalog are thread-safe).
    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="sync") as pool:
        for name, rows in pool.map(refresh, todo):
            done += 1
            if progress:
                progress(done, len(infos))
            if isinstance(rows, Exception):
                report.failed += 1
                report.problems.append([name[0], name[1], str(rows)])
                continue
            if rows is None:
                continue
            experiment_row, metrics, history_lines = rows
            changed.append(name)
            experiment_rows.extend(experiment_row)
            metric_rows.extend(metrics)
            if history_lines is not None:
                history_replaced.append(name)
                history_out.extend(history_lines)
    gone = [name for name in known if name not in seen]
    report.refreshed, report.deleted = len(changed), len(gone)
    with tempfile.TemporaryDirectory(prefix="runner-sync-") as folder:
        connection.execute("BEGIN TRANSACTION")
        try:
            _delete(connection, gone)
            _delete(connection, changed, ("experiments", "metrics"))
            _delete(connection, history_replaced, ("history",))
            _bulk_insert(connection, "experiments", experiment_rows, folder)
            _bulk_insert(connection, "metrics", metric_rows, folder)
            _bulk_insert(connection, "history", history_out, folder)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    report.reads = catalog.reads - reads_before
    return report


def _stored_documents(connection: duckdb.DuckDBPyConnection, names: list[tuple[str, str]]
                      ) -> dict[tuple[str, str], tuple[str, str | None]]:
    """``(record, scrape)`` JSON texts of the experiments ``names`` already in the tables."""
    if not names:
        return {}
    connection.execute("CREATE OR REPLACE TEMP TABLE wanted (project VARCHAR, key VARCHAR)")
    connection.executemany("INSERT INTO wanted VALUES (?, ?)", names)
    found = {(row[0], row[1]): (row[2], row[3]) for row in connection.execute(
        "SELECT e.project, e.key, e.record, e.scrape FROM experiments e "
        "JOIN wanted w USING (project, key)").fetchall()}
    connection.execute("DROP TABLE wanted")
    return found


def _refresh(catalog: Catalog, info, name: tuple[str, str], old: tuple | None,
             stored: tuple[str, str | None] | None, with_history: bool
             ) -> tuple[dict, list[dict], list[dict] | None] | None:
    """New rows for one experiment, or None when nothing of it changed.

    ``old`` is its previous row from ``known`` (``final, record_etag, record_size,
    scrape_url, scrape_etag, scrape_size, history_etag``) and ``stored`` its record and
    scrape JSON texts, or None for an experiment not synced before.  Reads only through
    ``catalog`` (called from several threads).
    """
    if stored is not None and old is not None and (old[1], old[2]) == (info.etag, info.size):
        record_changed, record = False, json.loads(stored[0])
    else:
        record_changed, record = True, catalog.read_json(info.url)
    experiment = Experiment(project=name[0], key=name[1], record_url=info.url, record=record)
    scrape_info = catalog.newest_scrape_info(record)
    scrape_changed = scrape_info is not None and (
        stored is None or old is None
        or (old[3], old[4], old[5]) != (scrape_info.url, scrape_info.etag, scrape_info.size))
    if scrape_info is not None and scrape_changed:
        catalog.attach_scrape(experiment, scrape_info.url, catalog.read_json(scrape_info.url))
    elif scrape_info is not None and stored is not None and stored[1]:
        catalog.attach_scrape(experiment, scrape_info.url, json.loads(stored[1]))
    history_lines, history_etag = None, (old[6] if old is not None else None)
    if with_history:
        infos = catalog.history_infos(record)
        etag = ";".join(f"{info.url.rsplit('/', 1)[-1]}:{info.etag}:{info.size}"
                        for info in infos) or None
        if etag != history_etag:
            history_lines = catalog.read_history(infos)
            history_etag = etag
    if not (record_changed or scrape_changed or history_lines is not None):
        return None
    row = experiment.row()
    row.update({"record": strict_json_text(record),
                "scrape": strict_json_text(experiment.scrape) if experiment.scrape else None,
                "record_url": info.url, "record_etag": info.etag, "record_size": info.size,
                "scrape_url": scrape_info.url if scrape_info else None,
                "scrape_etag": scrape_info.etag if scrape_info else None,
                "scrape_size": scrape_info.size if scrape_info else None,
                "history_etag": history_etag})
    metrics = [{"project": name[0], "key": name[1], "name": metric, "value": value}
               for metric, value in experiment.metrics.items()]
    return row, metrics, history_lines
