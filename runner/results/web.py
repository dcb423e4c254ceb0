"""``runner-results serve``: a read-only web page over a catalog (Starlette + uvicorn).

Pages (static HTML + JavaScript from ``runner/results/static/``, charts by the vendored
uPlot; nothing is loaded from outside the server):

* ``/`` — the experiments table: filters (project, status, text), status colours,
  refreshed every ``refresh`` seconds;
* ``/experiments/<project>/<key>`` — one experiment: runner facts, one chart per numeric
  series of its metric history, the output tail, links to its artifacts; redrawn every
  ``refresh`` seconds until its status is final.

JSON behind them: ``/api/experiments`` (rows as ``runner-results list --json``, with
``sync_error`` and ``unreadable``: ``[project, key, reason]`` of experiments whose files
could not be read, left out or shown as last read; 503 with the reason until a first sync
succeeded, never an empty 200),
``/api/experiments/<project>/<key>`` (row, scrape document, ``history``: name →
``[[times…], [values…]]``, output tail, artifacts).  Artifacts download from
``/artifacts/<project>/<key>/<label>`` (the stored tar; ``_metadata`` files by name
below it).  Nothing is ever written to the store.

A background thread syncs the catalog into DuckDB (:mod:`runner.results.sync`) every
``refresh`` seconds; requests read the synced tables, except the output tail and the
artifact list, read from the store when asked.
"""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import metadata
from ..errors import RunnerError, StorageError
from .catalog import FINAL_STATUSES, Catalog
from .query import rows_of
from .sync import connect, sync

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")


class Results:
    """The catalog, its DuckDB mirror and the thread that keeps the mirror synced."""

    def __init__(self, catalog: Catalog, refresh: float = 5.0, db: str = ""):
        self.catalog = catalog
        self.refresh = refresh
        self.connection = connect(db or ":memory:")
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.synced = threading.Event()
        self.thread: threading.Thread | None = None
        self.ever_synced = False
        self.sync_error = ""    # why the last sync failed as a whole ("" when it did not)
        self.problems: list = []  # [project, key, reason] of experiments it could not read

    def sync_once(self) -> None:
        """One sync; never raises (the loop must go on), it records what went wrong."""
        try:
            with self.lock:
                report = sync(self.catalog, self.connection)
            self.ever_synced, self.sync_error, self.problems = True, "", report.problems
        except (StorageError, RunnerError) as exc:
            log.warning("cannot read the store: %s", exc)
            self.sync_error = f"cannot read the store: {exc}"
        except Exception as exc:  # a fault of this program: said, and tried again
            log.exception("sync failed")
            self.sync_error = f"sync failed: {type(exc).__name__}: {exc}"
        self.synced.set()

    def state(self) -> dict:
        """What the last sync could not do, for the JSON replies (``sync_error``,
        ``unreadable``: ``[project, key, reason]`` of experiments left out or stale)."""
        return {"sync_error": self.sync_error or None, "unreadable": list(self.problems)}

    def start(self) -> None:
        def loop() -> None:
            while not self.stopped.is_set():
                self.sync_once()
                self.stopped.wait(self.refresh)
        self.thread = threading.Thread(target=loop, name="results-sync", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(30)
        self.connection.close()

    def rows(self, where: str = "", params: list | None = None) -> list[dict]:
        with self.lock:
            return rows_of(self.connection, where, params)

    def history(self, project: str, key: str) -> dict[str, list[list]]:
        """name → ``[[times…], [values…]]`` in time order."""
        with self.lock:
            points = self.connection.execute(
                "SELECT name, time, value FROM history WHERE project = ? AND key = ? "
                "ORDER BY name, point", [project, key]).fetchall()
        series: dict[str, list[list]] = {}
        for name, time, value in points:
            pair = series.setdefault(name, [[], []])
            pair[0].append(time)
            pair[1].append(value)
        return series

    def record(self, project: str, key: str) -> dict:
        with self.lock:
            found = self.connection.execute(
                "SELECT record, scrape FROM experiments WHERE project = ? AND key = ?",
                [project, key]).fetchone()
        if found is None:
            raise HTTPException(404, f"no experiment {project}/{key}")
        return {"record": json.loads(found[0]), "scrape": json.loads(found[1]) if found[1] else None}


def build_app(results: Results) -> Starlette:
    """The Starlette application (module docstring)."""

    async def page(request: Request):
        return FileResponse(STATIC / "index.html")

    async def experiment_page(request: Request):
        return FileResponse(STATIC / "experiment.html")

    async def experiments(request: Request):
        await wait_synced()
        if not results.ever_synced:  # no data yet: say so, never an empty 200
            return JSONResponse({"error": results.sync_error or "not synced yet",
                                 **results.state()}, status_code=503)
        rows = await asyncio.to_thread(results.rows)
        rows.sort(key=lambda row: (row["start"] is None, -(row["start"] or 0.0), row["key"]))
        return JSONResponse({"experiments": rows, "refresh": results.refresh,
                             "final_statuses": FINAL_STATUSES, **results.state()})

    async def experiment(request: Request):
        await wait_synced()
        project, key = request.path_params["project"], request.path_params["key"]
        rows = await asyncio.to_thread(results.rows, "WHERE project = ? AND key = ?",
                                       [project, key])
        if not rows:
            raise HTTPException(404, f"no experiment {project}/{key}")
        documents = await asyncio.to_thread(results.record, project, key)
        history = await asyncio.to_thread(results.history, project, key)

        def from_store():
            try:
                tail = results.catalog.output_tail(documents["record"], 40)
                artifacts = [{"label": label, "stored": info is not None,
                              "size": info.size if info else None,
                              "href": f"/artifacts/{project}/{key}/{label}"}
                             for label, _url, info in results.catalog.artifacts(documents["record"])]
            except StorageError as exc:
                return f"(cannot read the output: {exc})", []
            return tail, artifacts
        tail, artifacts = await asyncio.to_thread(from_store)
        return JSONResponse({"experiment": rows[0], "scrape": documents["scrape"],
                             "history": history, "output_tail": tail, "artifacts": artifacts,
                             "refresh": results.refresh, "final_statuses": FINAL_STATUSES})

    async def artifact(request: Request):
        project, key = request.path_params["project"], request.path_params["key"]
        label, _, name = request.path_params["path"].partition("/")
        record = (await asyncio.to_thread(results.record, project, key))["record"]
        try:
            listed = await asyncio.to_thread(results.catalog.artifacts, record)
        except StorageError as exc:
            raise HTTPException(502, f"cannot read the store: {exc}") from None
        urls = {item[0]: item[1] for item in listed}
        if label not in urls:
            raise HTTPException(404, f"no artifact {label}")
        if label == "_metadata":
            prefix = metadata.strip_archive_suffix(urls[label])
            if not name:
                files = await asyncio.to_thread(lambda: results.catalog.store(prefix).list(prefix))
                return JSONResponse([url.rsplit("/", 1)[-1] for url in files])
            if "/" in name or name in ("", ".", ".."):
                raise HTTPException(404, "no such file")
            url, filename = f"{prefix}{name}", name
        else:
            url, filename = urls[label], urls[label].rsplit("/", 1)[-1]
        folder = tempfile.mkdtemp(prefix="runner-results-")
        target = Path(folder) / "object"
        try:
            await asyncio.to_thread(results.catalog.store(url).get, url, target)
        except StorageError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPException(404, str(exc)) from None
        return FileResponse(target, filename=f"{key}-{filename}",
                            background=BackgroundTask(shutil.rmtree, folder, True))

    async def wait_synced() -> None:
        await asyncio.to_thread(results.synced.wait, 60)

    routes = [
        Route("/", page),
        Route("/experiments/{project}/{key}", experiment_page),
        Route("/api/experiments", experiments),
        Route("/api/experiments/{project}/{key}", experiment),
        Route("/artifacts/{project}/{key}/{path:path}", artifact),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)


def listen(address: str) -> socket.socket:
    """A listening socket on ``HOST:PORT`` (``:PORT`` is 127.0.0.1; port 0: any free one).

    Raises :class:`RunnerError` for a malformed address or one that cannot be bound.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RunnerError(f"--address {address!r}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise RunnerError(f"--address {address}: {exc}") from exc
    sock.listen(128)
    return sock


def serve(catalog: Catalog, address: str, refresh: float = 5.0, db: str = "") -> int:
    """Serve the page until interrupted; prints ``serving on http://HOST:PORT/`` first."""
    sock = listen(address)
    host, port = sock.getsockname()[:2]
    results = Results(catalog, refresh=max(0.5, refresh), db=db)
    results.start()
    print(f"serving on http://{host}:{port}/", flush=True)
    config = uvicorn.Config(build_app(results), log_level="warning", lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        results.stop()
        sock.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use runner-results serve")
