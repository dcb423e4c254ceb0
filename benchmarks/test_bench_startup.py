"""Start-up: from ``runner-supervisor`` being started until it is ready to take work.

*Ready* means what an operator (or systemd) can see: ``runner-ctl status`` answers, every
role has booted (sent its first heartbeat) and the fetcher is taking work.  The runner serves
a local queue and, when the broker at 127.0.0.1:5672 answers, RabbitMQ too (its back end is
built and connects on the fetcher's first tick).  Baselines in the same run: ``python -c
pass`` (the interpreter alone) and ``python -c "import runner.supervisor"``.  Also reported:
the CPU seconds the supervisor and its five roles used until ready (their imports and
``initialize()``; children excluded), the part of the figure a busy machine stretches.

Run: python3 -m pytest benchmarks/test_bench_startup.py -q -s
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

from runner import ctl
from tests.support import Runner, short_tempdir

from .figures import QUICK, record

ROUNDS = 3 if QUICK else 7
POLL = 0.01


def cpu_seconds(pid: int) -> float:
    """User + system time of ``pid`` itself (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interpreter(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def options() -> dict:
    try:
        from tests.rabbitmq_support import shared_broker
        broker = shared_broker()
    except BaseException:  # noqa: BLE001 - no broker: the local queue alone
        return {}
    stem = f"rmq_startb{uuid.uuid4().hex[:6]}_"
    return {"amqp-url": broker.url, "amqp-mgt-url": broker.mgt_url,
            "queue-match": f"^({stem}|local_start)"}


def start_once(extra: dict) -> tuple[float, float]:
    """(seconds until ready, CPU seconds of the supervisor and its roles by then)."""
    runner = Runner(short_tempdir(), queue="local_start", **extra)
    runtime = str(runner.options["runtime-dir"])
    try:
        started = time.perf_counter()
        runner.start(wait=False)
        while True:
            if runner.process.poll() is not None:
                raise AssertionError(f"supervisor exited:\n{runner.log()}")
            try:
                data = ctl.request(runtime, "status", timeout=2.0).data
            except (ctl.NoSupervisor, TimeoutError):
                data = None
            if data and all(r["ready"] for r in data["roles"].values()) \
                    and data["supervisor"]["taking"]:
                break
            time.sleep(POLL)
        ready = time.perf_counter() - started
        pids = [runner.process.pid] + [r["pid"] for r in data["roles"].values()]
        return ready, sum(cpu_seconds(p) for p in pids)
    finally:
        runner.cleanup()


def test_supervisor_ready(benchmark):
    extra = options()
    bare = [interpreter("pass") for _ in range(ROUNDS)]
    imports = [interpreter("import runner.supervisor") for _ in range(ROUNDS)]
    readies, cpus = [], []

    def run():
        ready, cpu = start_once(extra)
        readies.append(ready)
        cpus.append(cpu)

    benchmark.group = "start-up"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    queues = "local and RabbitMQ queues" if extra else "a local queue"
    record("start-up", "supervisor ready (ctl answers, roles up, taking)", median(readies),
           "s", note=f"median of {ROUNDS}, serving {queues}; python -c pass "
                     f"{median(bare) * 1e3:.0f} ms, import runner.supervisor "
                     f"{median(imports) * 1e3:.0f} ms",
           bar="<= 2 s", met=median(readies) <= 2.0)
    record("start-up", "supervisor ready / python -c pass", median(readies) / median(bare), "x",
           note="same run")
    record("start-up", "CPU of supervisor + 5 roles until ready", median(cpus), "s",
           note="user+system, children excluded")
