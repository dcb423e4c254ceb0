"""The figures every suite reports, collected into one JSON file for the table.

Each suite calls :func:`record` with a figure and, where the issue sets one, its bar.  Figures
land in ``$BENCH_RESULTS`` (default ``.bench/results.json`` in the checkout), which
``scripts/bench.sh`` empties before a run and prints as a table afterwards
(``python3 -m benchmarks.table``).  Nothing here asserts a time: the suites report.

``BENCH_QUICK=1`` (``scripts/bench.sh --quick``) shrinks every suite's sizes and counts; the
sizes used are part of each figure's note.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICK = os.environ.get("BENCH_QUICK", "").strip().lower() in ("1", "true", "yes", "on")


def results_path() -> Path:
    return Path(os.environ.get("BENCH_RESULTS") or REPO / ".bench" / "results.json")


def record(suite: str, figure: str, value: float, unit: str = "", *, bar: str = "",
           met: bool | None = None, note: str = "") -> None:
    """Add (or replace) one figure; ``met`` says whether ``bar`` was reached in this run."""
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {"figures": []}
        data["figures"] = [f for f in data["figures"]
                           if (f["suite"], f["figure"]) != (suite, figure)]
        data["figures"].append({"suite": suite, "figure": figure, "value": value, "unit": unit,
                                "bar": bar, "met": met, "note": note, "quick": QUICK,
                                "at": time.time()})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    mark = "" if met is None else ("  [bar met]" if met else "  [bar MISSED]")
    print(f"\n[{suite}] {figure}: {value:.4g} {unit}{(' (' + note + ')') if note else ''}"
          f"{(' bar: ' + bar) if bar else ''}{mark}")


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank of the sorted values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[index]


CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system time of ``pid`` itself (children excluded), from ``/proc``."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def machine_cpu_seconds() -> float:
    """Busy CPU time of the whole machine, all cores (user, nice, system, irq, softirq,
    steal), in seconds, from the first line of ``/proc/stat`` (proc(5))."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK
