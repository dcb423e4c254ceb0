"""``runner-results``: list, show, compare, fetch, export and sync experiments; serve a page.

Every command reads the metadata store and the experiments' ``_metadata``/``_metrics``
files of one storage root (``--storage``, the same option and credentials as
``runner-submit``) through the runner's :class:`~runner.storage.Store` back ends.

Exit statuses: 0 done, 1 nothing matched (``show``/``fetch``/``compare`` of an unknown
key, or ``fetch`` of artifacts another project's experiment of the same key shares), 2 bad
options or unreachable storage.

StudioML's layout puts an experiment's files under ``experiments/<key>/`` whatever its
project, so the same key in two projects shares one folder.  ``show --project P`` shows P's
record and P's own scrape document (the one of the attempt P's record names) and says which
projects share the folder; ``fetch`` refuses such artifacts (they may be the other
project's) unless ``--shared`` is given.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import metadata
from .. import storage as storage_module
from ..config import OptionParser, env_value
from ..errors import RunnerError
from ..submit import add_storage_options, storage_access
from ..units import UnitError, format_size, parse_duration
from .catalog import Catalog, NotFound
from .query import EXPORT_FORMATS, export, select
from .sync import connect, sync

#: rich styles of the statuses.
STATUS_STYLES = {"completed": "green", "running": "yellow", "failed": "red bold",
                 "expired": "magenta", "cancelled": "bright_black", "queued": "cyan"}

#: Row columns that hold times (unix seconds in the tables, ISO-8601 in --json output).
TIME_COLUMNS = ("start", "stop", "updated")

#: Columns every listing has before the metric columns.
BASE_COLUMNS = ("key", "project", "status", "attempts", "host", "start", "duration")


def build_parser() -> argparse.ArgumentParser:
    parser = OptionParser(
        prog="runner-results",
        description="Look at the experiments a runner finished or is running: list, show, "
                    "compare, fetch, export, sync into DuckDB, serve a web page.")
    add_storage_options(parser)
    parser.add_argument("--metadata-store", default=env_value("metadata-store"),
                        help="URL of the metadata store when the runner was given one "
                             "(default: metadata/ under --storage) [env RUNNER_METADATA_STORE]")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def listing_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--metrics", default="",
                         help="comma-separated metric columns (default: every metric)")
        sub.add_argument("--sort", default="",
                         help="column to sort by (a metric or a base column); --sort=-NAME for "
                              "descending")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sub.add_argument("--db", default="",
                         help="a DuckDB file to sync into first and read from (fast repeated "
                              "listings; default: read the store into memory)")

    listing = commands.add_parser("list", help="one row per experiment")
    listing.add_argument("--project", default=None)
    listing.add_argument("--status", default=None,
                         help="completed, failed, running, expired, cancelled (comma-separated)")
    listing.add_argument("--since", default=None,
                         help="only experiments started after this: a duration ago (2h, 30m) "
                              "or an ISO date/time (2024-05-01, 2024-05-01T12:00)")
    listing_options(listing)

    compare = commands.add_parser("compare", help="the named experiments in one table")
    compare.add_argument("keys", nargs="+", metavar="KEY")
    compare.add_argument("--project", default=None)
    listing_options(compare)

    show = commands.add_parser("show", help="record, newest scrape document, output tail, "
                                            "artifacts of one experiment")
    show.add_argument("key", metavar="KEY")
    show.add_argument("--project", default=None)
    show.add_argument("--lines", type=int, default=20, help="output lines shown (default 20)")
    show.add_argument("--json", action="store_true")

    fetch = commands.add_parser("fetch", help="download and unpack an experiment's artifacts")
    fetch.add_argument("key", metavar="KEY")
    fetch.add_argument("dest", metavar="DIR")
    fetch.add_argument("--project", default=None)
    fetch.add_argument("--label", action="append", default=[],
                       help="only this artifact (repeatable; default: every stored one)")
    fetch.add_argument("--shared", action="store_true",
                       help="fetch even when an experiment of the same key in another project "
                            "shares the artifacts' folder (they may be that one's)")

    export_parser = commands.add_parser("export", help="one row per experiment (and per "
                                                       "history point) to a file")
    export_parser.add_argument("out", metavar="OUT")
    export_parser.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                               help="default: from OUT's extension (.parquet, .csv, .jsonl)")
    export_parser.add_argument("--history", default="", metavar="FILE",
                               help="also write one row per metric history point here (same "
                                    "format)")
    export_parser.add_argument("--db", default="", help="a DuckDB file to sync into first")

    sync_parser = commands.add_parser("sync", help="incremental ETL into a DuckDB file")
    sync_parser.add_argument("--into", required=True, metavar="FILE.duckdb")
    sync_parser.add_argument("--no-history", action="store_true",
                             help="leave the metric history out (faster)")
    sync_parser.add_argument("--json", action="store_true", help="print the report as JSON")

    serve = commands.add_parser("serve", help="a read-only web page with tables and plots")
    serve.add_argument("--address", default="127.0.0.1:8080",
                       help="HOST:PORT to listen on (default 127.0.0.1:8080; port 0: any)")
    serve.add_argument("--refresh", default="5s",
                       help="how often the page re-reads the store (default 5s)")
    serve.add_argument("--db", default="", help="a DuckDB file to keep synced (default: memory)")
    return parser


def open_catalog(args: argparse.Namespace) -> Catalog:
    """The catalog of ``--storage`` with the command line's credentials."""
    if args.s3_key and not args.s3_cert:
        raise RunnerError("--s3-key needs --s3-cert")
    storage_module.configure(s3_ca=args.s3_ca, s3_cert=args.s3_cert, s3_key=args.s3_key)
    credentials, storage = storage_access(args)
    return Catalog(args.storage, credentials=credentials, storage_config=storage,
                   metadata_store=args.metadata_store)


def parse_since(text: str, now: float) -> float:
    """Unix seconds from ``--since``: a duration ago, or an ISO date/time (UTC if naive).

    Raises :class:`UnitError` naming the value when it is neither.
    """
    try:
        return now - parse_duration(text)
    except UnitError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UnitError(f"--since {text!r}: neither a duration (2h, 30m) nor an ISO "
                        "date/time (2024-05-01T12:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def console() -> Console:
    """stdout; tables are not cut to 80 columns when stdout is not a terminal."""
    out = Console()
    return out if out.is_terminal else Console(width=400, no_color=True)


def progress_bar(what: str) -> Progress:
    """A progress bar on stderr (shown only when stderr is a terminal)."""
    return Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True,
                    disable=not sys.stderr.isatty())


def load(catalog: Catalog, db: str, with_history: bool = False):
    """A DuckDB connection synced with ``catalog`` (``db`` file, or memory)."""
    connection = connect(db or ":memory:")
    with progress_bar("reading experiments") as bar:
        task = bar.add_task("read", total=None)
        report = sync(catalog, connection, with_history=with_history,
                      progress=lambda done, total: bar.update(task, completed=done, total=total))
    say_problems(report)
    return connection


def say_problems(report) -> None:
    """One stderr line per experiment a sync could not read (left out, or as last read)."""
    for project, key, reason in report.problems:
        print(f"runner-results: skipped {project}/{key}: {reason}", file=sys.stderr)


def format_cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "start":
        return dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    if column == "duration":
        return f"{value:.1f}s"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def print_rows(rows: list[dict], metrics: list[str], as_json: bool) -> None:
    if as_json:
        # Times as the runner writes them (ISO-8601 UTC), like runner-ctl --json.
        print(json.dumps([{name: metadata.iso_utc(value) if name in TIME_COLUMNS
                           and value is not None else value for name, value in row.items()}
                          for row in rows], indent=1))
        return
    table = Table(show_lines=False)
    for column in (*BASE_COLUMNS, *metrics):
        table.add_column(column, justify="right" if column in metrics or column in
                         ("attempts", "duration") else "left")
    for row in rows:
        cells = [format_cell(column, row.get(column)) for column in BASE_COLUMNS]
        cells += [format_cell(name, row["metrics"].get(name)) for name in metrics]
        style = STATUS_STYLES.get(row["status"], "")
        cells[2] = f"[{style}]{cells[2]}[/]" if style else cells[2]
        table.add_row(*cells)
    console().print(table)
    print(f"{len(rows)} experiment(s)", file=sys.stderr)


def command_list(args: argparse.Namespace, catalog: Catalog, keys: list[str] | None = None) -> int:
    since = parse_since(args.since, dt.datetime.now().timestamp()) \
        if getattr(args, "since", None) else None
    statuses = [s.strip() for s in (getattr(args, "status", None) or "").split(",") if s.strip()]
    connection = load(catalog, args.db)
    rows, metrics = select(connection, project=args.project, statuses=statuses, since=since,
                           keys=keys, metrics=[m.strip() for m in args.metrics.split(",")
                                               if m.strip()], sort=args.sort)
    if keys:
        missing = sorted(set(keys) - {row["key"] for row in rows})
        if missing:
            print(f"runner-results: no experiment {', '.join(missing)}", file=sys.stderr)
            return 1
    print_rows(rows, metrics, args.json)
    return 0


def shared_note(catalog: Catalog, info, record: dict) -> str:
    """A sentence naming the other projects whose experiment of this key shares its
    folder (``""`` when none)."""
    others = catalog.sharing_projects(info, record)
    if not others:
        return ""
    project, key = catalog.name_of(info.url)
    return (f"experiment {key!r} of project {project!r} shares its storage folder with the "
            f"same key in project(s) {', '.join(others)}: artifacts and output there are "
            "whichever ran last")


def command_show(args: argparse.Namespace, catalog: Catalog) -> int:
    info = catalog.find(args.key, args.project)
    experiment = catalog.experiment(info)
    note = shared_note(catalog, info, experiment.record)
    if note:
        print(f"runner-results: warning: {note}", file=sys.stderr)
    tail = catalog.output_tail(experiment.record, args.lines)
    artifacts: list[dict[str, Any]] = [{"label": label, "url": url, "stored": found is not None,
                  "size": found.size if found else None}
                 for label, url, found in catalog.artifacts(experiment.record)]
    if args.json:
        print(json.dumps({"record": experiment.record, "scrape": experiment.scrape,
                          "scrape_url": experiment.scrape_url, "output_tail": tail,
                          "artifacts": artifacts}, indent=1))
        return 0
    out = console()
    row = experiment.row()
    out.print(f"[bold]{experiment.project}/{experiment.key}[/]  "
              f"[{STATUS_STYLES.get(row['status'], '')}]{row['status']}[/]"
              f"  attempts {row['attempts']}  host {row['host'] or '-'}"
              f"  start {format_cell('start', row['start'])}"
              f"  duration {format_cell('duration', row['duration'])}")
    out.print("[bold]record[/]", f"({experiment.record_url})")
    print(json.dumps({k: v for k, v in experiment.record.items() if k != "request"}, indent=1))
    out.print("[bold]newest scrape document[/]", f"({experiment.scrape_url or 'none'})")
    print(json.dumps(experiment.scrape, indent=1) if experiment.scrape else "-")
    out.print(f"[bold]output, last {args.lines} lines[/]")
    print(tail or "-")
    out.print("[bold]artifacts[/]")
    for item in artifacts:
        size = format_size(item["size"]) if item["stored"] else "not stored"
        print(f"  {item['label']:<12} {size:>10}  {item['url']}")
    return 0


def command_fetch(args: argparse.Namespace, catalog: Catalog) -> int:
    info = catalog.find(args.key, args.project)
    record = catalog.experiment(info, scrape=False).record
    note = shared_note(catalog, info, record)
    if note and not args.shared:
        print(f"runner-results: {note}; not fetched (--shared fetches them anyway)",
              file=sys.stderr)
        return 1
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    stored = [item for item in catalog.artifacts(record) if item[2] is not None
              and (not args.label or item[0] in args.label)]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[size]}"),
                  console=Console(stderr=True), disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("fetching", size="",
                            total=sum(info.size for _, _, info in stored if info is not None))
        fetched = catalog.fetch(record, dest, args.label or None, progress=lambda label, size:
                                bar.update(task, advance=size, size=f"{label} {format_size(size)}"))
    for label, folder in fetched:
        print(f"{label}\t{folder}")
    return 0


def command_export(args: argparse.Namespace, catalog: Catalog) -> int:
    connection = load(catalog, args.db, with_history=bool(args.history))
    counts = export(connection, args.out, args.format, history_out=args.history or None)
    print(f"wrote {counts[0]} experiment rows to {args.out}" +
          (f" and {counts[1]} history rows to {args.history}" if args.history else ""),
          file=sys.stderr)
    return 0


def command_sync(args: argparse.Namespace, catalog: Catalog) -> int:
    connection = connect(args.into)
    with progress_bar("syncing") as bar:
        task = bar.add_task("sync", total=None)
        report = sync(catalog, connection, with_history=not args.no_history,
                      progress=lambda done, total: bar.update(task, completed=done, total=total))
    connection.close()
    say_problems(report)
    if args.json:
        print(json.dumps(report.__dict__))
    else:
        print(f"{report.listed} experiments listed, {report.skipped} skipped as finished, "
              f"{report.refreshed} refreshed, {report.deleted} deleted, {report.failed} "
              f"unreadable; {report.reads} objects read")
    return 0


def command_serve(args: argparse.Namespace, catalog: Catalog) -> int:
    from .web import serve

    return serve(catalog, args.address, refresh=parse_duration(args.refresh), db=args.db)


COMMANDS = {"list": command_list, "show": command_show, "fetch": command_fetch,
            "export": command_export, "sync": command_sync, "serve": command_serve,
            "compare": lambda args, catalog: command_list(args, catalog, keys=args.keys)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="runner-results: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        catalog = open_catalog(args)
        try:
            return COMMANDS[args.command](args, catalog)
        finally:
            catalog.close()
    except NotFound as exc:
        print(f"runner-results: {exc}", file=sys.stderr)
        return 1
    except (RunnerError, OSError) as exc:
        print(f"runner-results: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
