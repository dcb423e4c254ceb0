"""Start of a run through the executor's two ways: Popen → the experiment's first line.

* direct: the run's cgroup made (when this host lets this process make cgroups), then
  ``subprocess.Popen`` of ``/bin/sh`` (joining it) → ``python -I -S runner/launcher.py`` →
  the experiment;
* spare: a launcher started ahead of need inside a cgroup of its own (``launcher.py PID
  --spare``, settled and blocked on its input before the clock starts) gets the run's limits
  written into that cgroup, the run's name, and the spec.

The experiment is ``python -c "print('started', flush=True)"`` with the environment the
script runs in; the clock stops when that line is read.  Rounds alternate between the two
ways; medians are printed.  A figure for docs/benchmarks.md, not a test (no bar).

Run: .venv/bin/python benchmarks/spare_launcher.py [ROUNDS] [--cgroups off]
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner import cgroups, launcher  # noqa: E402
from runner.roles.executor import joined, launched, spare_command  # noqa: E402

COMMAND = [sys.executable, "-c", "print('started', flush=True)"]


def first_line(process: subprocess.Popen, started: float) -> float:
    assert process.stdout is not None
    line = process.stdout.readline()
    elapsed = time.perf_counter() - started
    assert line == b"started\n", line
    process.communicate()
    assert process.returncode == 0, process.returncode
    return elapsed


LIMITS = cgroups.Limits(cpus=1, ram=2**30)


def direct(driver: cgroups.Cgroups | None, name: str, cwd: str, env: dict) -> float:
    started = time.perf_counter()
    cgroup = driver.create(name, LIMITS) if driver else None
    command = launched(COMMAND)
    process = subprocess.Popen(cgroup.wrap(command) if cgroup else command, cwd=cwd, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
    try:
        return first_line(process, started)
    finally:
        if cgroup is not None:
            cgroups.wait_removed(cgroup)


def ready_spare(cgroup: cgroups.RunCgroup | None) -> subprocess.Popen:
    command = cgroup.wrap(spare_command()) if cgroup else spare_command()
    spare = subprocess.Popen(command, cwd="/", env={}, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 30
    while not joined(spare.pid) or "read" not in Path(f"/proc/{spare.pid}/wchan").read_text():
        assert time.monotonic() < deadline, "the spare never blocked on its input"
        time.sleep(0.01)
    return spare


def through_spare(driver: cgroups.Cgroups | None, name: str, cwd: str, env: dict) -> float:
    # off the clock, as the executor makes it at the previous tick
    cgroup = driver.create(f"spare-{name}", cgroups.Limits()) if driver else None
    spare = ready_spare(cgroup)
    started = time.perf_counter()
    if driver is not None and cgroup is not None:
        driver.apply(cgroup, LIMITS)
        cgroup.rename(name)
    assert spare.stdin is not None
    spare.stdin.write(launcher.encode_spec(COMMAND, cwd, env))
    spare.stdin.close()
    spare.stdin = None
    try:
        return first_line(spare, started)
    finally:
        if cgroup is not None:
            cgroups.wait_removed(cgroup)


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv and argv[0].isdigit() else 30
    driver = None
    if "--cgroups" not in argv or argv[argv.index("--cgroups") + 1] != "off":
        driver, why = cgroups.detect("auto", f"bench-{uuid.uuid4().hex[:8]}")
        if driver is None:
            print(f"no cgroups: {why}")
    env, cwd = dict(os.environ), os.getcwd()
    times: dict[str, list[float]] = {"direct": [], "spare": []}
    try:
        for index in range(rounds):
            for way, start in (("direct", direct), ("spare", through_spare))[::1 - 2 * (index % 2)]:
                times[way].append(start(driver, f"{way}-{index}", cwd, env))
    finally:
        if driver is not None:
            driver.cleanup()
    where = driver.describe().split(":")[0] if driver else "no cgroup"
    direct_ms = statistics.median(times["direct"]) * 1e3
    spare_ms = statistics.median(times["spare"]) * 1e3
    print(f"Popen -> first line, medians of {rounds} ({where}, load {os.getloadavg()[0]:.2f}): "
          f"direct {direct_ms:.1f} ms, spare {spare_ms:.1f} ms, "
          f"saved {direct_ms - spare_ms:.1f} ms ({spare_ms / direct_ms:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
