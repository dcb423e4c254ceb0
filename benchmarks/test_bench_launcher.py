"""What the run launcher adds to the start of every run.

Median wall time of ``python -c pass`` started (a) directly and (b) through the launcher
(``python -I -S runner/launcher.py -- python -c pass``, as the executor starts every run),
reported as the ratio (b)/(a) and the difference in ms.  Reported, no bar: the e2e suite's
publish-to-start bar covers what a user sees.

Run: python3 -m pytest benchmarks/test_bench_launcher.py -q -s
"""
from __future__ import annotations

import subprocess
import sys
import time

from runner.roles.executor import launched

from .figures import QUICK, record

ROUNDS = 10 if QUICK else 40
COMMAND = [sys.executable, "-c", "pass"]


def median_seconds(command: list[str]) -> float:
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        subprocess.run(command, check=True)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def test_launcher_start_cost(benchmark):
    bare = median_seconds(COMMAND)
    through = benchmark.pedantic(median_seconds, args=(launched(COMMAND),), rounds=1,
                                 iterations=1)
    record("launcher", "run start through the launcher / direct", through / bare, "x",
           note=f"medians of {ROUNDS}: {through * 1e3:.1f} ms vs {bare * 1e3:.1f} ms "
                f"(+{(through - bare) * 1e3:.1f} ms)")
