"""The attempt files: what is in flight, on disk, so that a new runner finds it again.

One folder, ``<runtime-dir>/attempts/``, with small JSON files per attempt id (each
written whole, then renamed in, by the one role that owns it):

* ``<id>.attempt`` — the attempt's ``Attempt``; written by the scraper when it opens the attempt;
* ``<id>.run`` — the run's launcher: ``{"pid", "ticks", "cgroup": [folders]}``, written by
  the executor when the run starts (with the ``Attempt`` too, for a run whose ``.attempt`` is late);
* ``<id>.scraped`` — what the scraper had saved at its last save: the run's output bytes
  consumed (``offset``) and the sizes of the files written so far (for a restarted scraper);
* ``<id>.ended`` — the attempt's ``Outcome``, written by the scraper when it closed it (a
  restarted uploader gets its final upload again with it);
* ``<id>.released`` — written at start-up for an attempt a dead runner left: its request
  was released when that runner died (back in its queue, or redelivered to another runner),
  so the attempt no longer holds it.  The uploader then uploads only the attempt's own
  metadata files: never the request's mutable artifacts or records, which a newer attempt
  of the same request may have written already (:func:`is_released`).

The fetcher removes every file of an attempt once its request is settled (after the ack or
requeue).  Whatever a runner finds here at start-up was left by a runner that died: its
processes are killed and each attempt is ended ``cancelled`` through the scraper and the
uploader, so that its scrape document gets a final status (see ``docs/architecture.md``).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import proctree, protocol

log = logging.getLogger("runner.attempt_files")
FOLDER = "attempts"
KINDS = ("attempt", "run", "scraped", "ended", "released")


def folder(runtime_dir: str) -> Path:
    return Path(runtime_dir) / FOLDER


def _path(runtime_dir: str, attempt_id: str, kind: str) -> Path:
    if "/" in attempt_id or attempt_id.startswith("."):
        raise ValueError(f"not an attempt id: {attempt_id!r}")
    return folder(runtime_dir) / f"{attempt_id}.{kind}"


def write(runtime_dir: str, attempt_id: str, kind: str, value: dict) -> None:
    """Write ``<id>.<kind>`` atomically (a crash leaves the old file or the new one)."""
    target = _path(runtime_dir, attempt_id, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value, sort_keys=True))
    os.replace(temporary, target)


def read(runtime_dir: str, attempt_id: str, kind: str) -> dict | None:
    """The content of ``<id>.<kind>``, or None when it is absent or unreadable."""
    try:
        value = json.loads(_path(runtime_dir, attempt_id, kind).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_attempt(runtime_dir: str, attempt: protocol.Attempt) -> None:
    write(runtime_dir, attempt.attempt_id, "attempt", protocol.to_map(attempt))


def read_attempt(runtime_dir: str, attempt_id: str) -> protocol.Attempt | None:
    """The attempt's ``Attempt`` from ``.attempt`` (or the copy in ``.run``), or None."""
    value = read(runtime_dir, attempt_id, "attempt") or (read(runtime_dir, attempt_id, "run") or {}).get("attempt")
    if not isinstance(value, dict):
        return None
    try:
        return protocol.from_map(protocol.Attempt, value)
    except Exception:  # noqa: BLE001 - a damaged file must not stop the recovery
        log.warning("attempt %s: unreadable attempt file", attempt_id)
        return None


def write_ended(runtime_dir: str, attempt_id: str, outcome: protocol.Outcome) -> None:
    write(runtime_dir, attempt_id, "ended", protocol.to_map(outcome))


def read_ended(runtime_dir: str, attempt_id: str) -> protocol.Outcome | None:
    value = read(runtime_dir, attempt_id, "ended")
    try:
        return protocol.from_map(protocol.Outcome, value) if value else None
    except Exception:  # noqa: BLE001
        return None


def is_released(runtime_dir: str, attempt_id: str) -> bool:
    """True when the attempt no longer holds its request (``<id>.released``, see the
    module doc)."""
    return _path(runtime_dir, attempt_id, "released").exists()


def forget(runtime_dir: str, attempt_id: str) -> None:
    """Remove every file of the attempt (its request is settled)."""
    for kind in KINDS:
        try:
            _path(runtime_dir, attempt_id, kind).unlink()
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("attempt %s: cannot remove its %s entry: %s", attempt_id, kind, exc)


def forget_kind(runtime_dir: str, attempt_id: str, kind: str) -> None:
    """Remove ``<id>.<kind>`` only."""
    try:
        _path(runtime_dir, attempt_id, kind).unlink()
    except FileNotFoundError:
        pass


def attempt_ids(runtime_dir: str) -> list[str]:
    """Ids of the attempts that have any attempt file, sorted."""
    try:
        names = os.listdir(folder(runtime_dir))
    except FileNotFoundError:
        return []
    return sorted({name.rsplit(".", 1)[0] for name in names
                   if not name.startswith(".") and name.rsplit(".", 1)[-1] in KINDS})


@dataclass
class Leftover:
    """An attempt a dead runner left in the attempt files."""

    attempt_id: str
    attempt: protocol.Attempt | None
    killed: int  # processes of its run that were still alive and were killed


def kill_run(runtime_dir: str, attempt_id: str) -> int:
    """Kill what is left of the attempt's run: its launcher's tree and group, and every
    process in its cgroup; returns how many processes were signalled."""
    run = read(runtime_dir, attempt_id, "run") or {}
    killed = 0
    pid, ticks = run.get("pid"), run.get("ticks")
    if isinstance(pid, int) and pid > 1:
        killed += proctree.kill_tree(pid, ticks)
    for cgroup in run.get("cgroup") or []:
        try:
            pids = [int(p) for p in (Path(cgroup) / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            continue
        for target in pids:
            try:
                os.kill(target, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def remove_cgroups(runtime_dir: str, attempt_id: str, wait: float = 2.0) -> None:
    """Remove the (emptied) cgroup folders of the attempt's run, and their parent folder
    (``studioml-runs-<instance>`` of the dead runner) once it is empty."""
    folders = [Path(p) for p in (read(runtime_dir, attempt_id, "run") or {}).get("cgroup") or []]
    deadline = time.monotonic() + wait
    for folder in folders:
        while True:
            try:
                folder.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # its last processes are still exiting
                if time.monotonic() >= deadline:
                    log.warning("attempt %s: cannot remove cgroup %s", attempt_id, folder)
                    break
                time.sleep(0.05)
        try:
            folder.parent.rmdir()
        except OSError:
            pass  # other runs of that runner, or not ours to remove


def recover(runtime_dir: str) -> list[Leftover]:
    """Kill the runs of every attempt left in the attempt files by a runner that is gone.

    Call it only while holding the runtime directory's lock (no live runner uses these
    entries).  Entries are kept: the caller ends each attempt, and the fetcher forgets it
    once settled.  Each attempt found is marked released (``<id>.released``: its request
    left with the dead runner).  An entry without a readable ``Attempt`` is removed here."""
    found = []
    for attempt_id in attempt_ids(runtime_dir):
        killed = kill_run(runtime_dir, attempt_id)
        remove_cgroups(runtime_dir, attempt_id)
        attempt = read_attempt(runtime_dir, attempt_id)
        log.warning("attempt %s was in flight when the previous runner stopped; %d of its "
                    "processes were still alive and were killed; ending it as cancelled",
                    attempt_id, killed)
        if attempt is None:
            forget(runtime_dir, attempt_id)
        else:
            write(runtime_dir, attempt_id, "released", {"since": time.time()})
        found.append(Leftover(attempt_id=attempt_id, attempt=attempt, killed=killed))
    return found
