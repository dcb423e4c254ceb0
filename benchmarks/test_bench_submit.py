"""How long ``runner-submit`` takes to publish a request to a local queue (issue 17, item 4).

Median wall time of the whole command (start, pack and store a one-file workspace in a
``file://`` store, publish to a ``local_*`` queue, exit) against ``python -c pass`` in the
same run.  Bar: the request is published within 0.3 s of starting.  The commands run with
bytecode caching on, as an installed package has it (the first round warms the cache).

Run: python3 -m pytest benchmarks/test_bench_submit.py -q -s
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .figures import QUICK, record

ROUNDS = 5 if QUICK else 15
BAR_SECONDS = 0.3


def median_seconds(command: list[str], env: dict) -> float:
    subprocess.run(command, check=True, env=env, capture_output=True)  # warm the caches
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env, capture_output=True)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def test_submit_publishes_quickly(benchmark, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "train.py").write_text("print('hello')\n")
    submit = [sys.executable, "-m", "runner.submit", "--queue-root", str(tmp_path / "queues"),
              "--storage", f"file://{tmp_path / 'store'}", str(workspace), "train.py"]
    bare = median_seconds([sys.executable, "-c", "pass"], env)
    took = benchmark.pedantic(median_seconds, args=(submit, env), rounds=1, iterations=1)
    published = list((tmp_path / "queues").rglob("*"))
    assert any(p.is_file() for p in published), "runner-submit published nothing"
    record("startup", "runner-submit to a local queue", took, "s", bar=f"<= {BAR_SECONDS} s",
           met=took <= BAR_SECONDS,
           note=f"median of {ROUNDS}; python -c pass: {bare * 1e3:.0f} ms, "
                f"ratio {took / bare:.1f}x")
