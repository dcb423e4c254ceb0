"""Queries over the DuckDB tables of :mod:`runner.results.sync`: listings and exports."""
from __future__ import annotations

import duckdb

from ..errors import RunnerError

#: Row fields of a listing, before ``metrics``.
ROW_COLUMNS = ("project", "key", "status", "final", "attempts", "attempt", "host", "start",
               "stop", "duration", "updated")

#: ``export`` formats and the DuckDB ``COPY`` options that write them.
EXPORT_FORMATS = {"parquet": "FORMAT parquet", "csv": "FORMAT csv, HEADER true",
                  "jsonl": "FORMAT json"}
_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "jsonl"}


def rows_of(connection: duckdb.DuckDBPyConnection, where: str = "", params: list | None = None
            ) -> list[dict]:
    """Experiment rows (``ROW_COLUMNS`` plus ``metrics``: name → final value)."""
    names = ", ".join(f'"{c}"' for c in ROW_COLUMNS)
    rows = [dict(zip(ROW_COLUMNS, values)) for values in connection.execute(
        f"SELECT {names} FROM experiments {where}", params or []).fetchall()]
    by_name = {(row["project"], row["key"]): row for row in rows}
    for row in rows:
        row["metrics"] = {}
    for project, key, name, value in connection.execute(
            "SELECT project, key, name, value FROM metrics").fetchall():
        entry = by_name.get((project, key))
        if entry is not None:
            entry["metrics"][name] = value
    return rows


def _count(connection: duckdb.DuckDBPyConnection, table: str) -> int:
    """Rows in ``table``."""
    row = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def select(connection: duckdb.DuckDBPyConnection, *, project: str | None = None,
           statuses: list[str] | None = None, since: float | None = None,
           keys: list[str] | None = None, metrics: list[str] | None = None, sort: str = ""
           ) -> tuple[list[dict], list[str]]:
    """Filtered, sorted experiment rows and the metric columns to show.

    ``since``: unix seconds; an experiment counts from its start (its last update when it
    never started).  ``metrics``: the columns wanted (default: every metric any selected
    experiment has, sorted).  ``sort``: a row column or a metric name, ``-`` prefix for
    descending; empty values sort last.  Default order: start, then project and key.
    Raises :class:`RunnerError` for a sort column that is neither.
    """
    clauses: list[str] = []
    params: list = []
    if project:
        clauses.append("project = ?")
        params.append(project)
    if statuses:
        clauses.append(f"status IN ({', '.join('?' for _ in statuses)})")
        params.extend(statuses)
    if since is not None:
        clauses.append("coalesce(start, updated) >= ?")
        params.append(since)
    if keys:
        clauses.append(f"key IN ({', '.join('?' for _ in keys)})")
        params.extend(keys)
    rows = rows_of(connection, ("WHERE " + " AND ".join(clauses)) if clauses else "", params)
    columns = list(metrics) if metrics else sorted({name for row in rows for name in row["metrics"]})
    descending = sort.startswith("-")
    column = sort.lstrip("-")
    if column and column not in ROW_COLUMNS and column not in columns:
        raise RunnerError(f"--sort {sort!r}: not a column ({', '.join(ROW_COLUMNS)}) or a "
                          f"metric ({', '.join(columns) or 'none'})")

    def value(row: dict):
        return row.get(column) if column in ROW_COLUMNS else row["metrics"].get(column)

    if column:
        present = [row for row in rows if value(row) is not None]
        absent = [row for row in rows if value(row) is None]
        present.sort(key=lambda row: (value(row), row["project"], row["key"]), reverse=descending)
        rows = present + absent
    else:
        rows.sort(key=lambda row: (row["start"] is None, row["start"] or 0.0, row["project"],
                                   row["key"]))
    return rows, columns


def format_of(path: str, given: str | None) -> str:
    """The export format: ``given``, else from the file's extension."""
    if given:
        return given
    for extension, name in _EXTENSIONS.items():
        if path.lower().endswith(extension):
            return name
    raise RunnerError(f"{path}: say --format ({', '.join(EXPORT_FORMATS)}); the extension "
                      "does not tell")


def export(connection: duckdb.DuckDBPyConnection, out: str, fmt: str | None = None,
           history_out: str | None = None) -> tuple[int, int]:
    """Write one row per experiment (row columns and one column per metric) to ``out``,
    and with ``history_out`` one row per history value (``project, key, point, attempt,
    attempt_number, time, name, value``).  Returns the two row counts.
    Raises :class:`RunnerError` for an unknown format or a file DuckDB cannot write.
    """
    fmt = format_of(out, fmt)
    options = EXPORT_FORMATS[fmt]
    names = ", ".join(f'e."{c}"' for c in ROW_COLUMNS)
    try:
        metric_names = [name for (name,) in connection.execute(
            "SELECT DISTINCT name FROM metrics ORDER BY name").fetchall()]
        if metric_names:
            connection.execute(
                "CREATE OR REPLACE TEMP TABLE wide AS PIVOT (SELECT project, key, name, value "
                "FROM metrics) ON name USING first(value) GROUP BY project, key")
            query = (f"SELECT {names}, w.* EXCLUDE (project, key) FROM experiments e "
                     "LEFT JOIN wide w USING (project, key) ORDER BY e.project, e.key")
        else:
            query = f"SELECT {names} FROM experiments e ORDER BY e.project, e.key"
        connection.execute(f"COPY ({query}) TO '{_quoted(out)}' ({options})")
        count = _count(connection, "experiments")
        history_count = 0
        if history_out:
            history_options = EXPORT_FORMATS[format_of(history_out, fmt if not any(
                history_out.lower().endswith(e) for e in _EXTENSIONS) else None)]
            connection.execute(
                "COPY (SELECT project, key, point, attempt, attempt_number, time, name, value "
                f"FROM history ORDER BY project, key, point, name) TO '{_quoted(history_out)}' "
                f"({history_options})")
            history_count = _count(connection, "history")
    except duckdb.Error as exc:
        raise RunnerError(f"export to {out}: {exc}") from exc
    return count, history_count


def _quoted(path: str) -> str:
    return path.replace("'", "''")
