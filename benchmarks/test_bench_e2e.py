"""Dispatch, throughput and footprint, end to end through a real ``runner-supervisor``.

One supervisor (default executor count: one per CPU core) serves a ``local_*`` queue and, when
the broker at 127.0.0.1:5672 answers, an ``rmq_*`` queue; its environment is warm (built by
a first request).

* **publish-to-start**: from publishing a request to an idle runner until the scraper sees the
  experiment's first output line (``runner.first_output`` of the scrape document), p50/p99, local
  queue and RabbitMQ (published as the StudioML client does);
* **completion**: from the experiment's exit (the last thing its script does is write the time)
  until the request is settled with its uploads done (the metadata record, written just before
  the ack), p50/p99;
* **throughput**: N trivial experiments (print one JSON line, exit) published at once, until the
  last is acked.  Baseline in the same run: the same interpreter (the environment's python) run
  on the same script N times, one after another, and with as many at once as the runner has
  executors;
* **runner CPU per experiment**: user+system time of the supervisor and its five role
  processes (not their children) over the throughput run, divided by N;
* **footprint**: RSS of those six processes idle and at the peak of the throughput run, and
  their CPU use over an idle period (60 s; 10 s quick) while serving the local queue and, when
  the broker answers, RabbitMQ.

Run: python3 -m pytest benchmarks/test_bench_e2e.py -q -s
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from runner import metadata
from tests.support import Runner, short_tempdir

from .figures import QUICK, cpu_seconds, percentile, record

ROUNDS = 12 if QUICK else 30
THROUGHPUT_N = 60 if QUICK else 200
IDLE_SECONDS = 10 if QUICK else 60
EXECUTORS = os.cpu_count() or 1
SCRIPT = """
    import json, os, time
    print(json.dumps({"experiment": {"hello": 1}}), flush=True)
    mark = os.environ.get("MARK")
    if mark:
        with open(mark, "w") as handle:
            handle.write(repr(time.time()))
"""
RESULTS: dict[str, float] = {}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def bench():
    broker = None
    try:
        from tests.rabbitmq_support import pika, shared_broker
        broker = shared_broker()
    except BaseException:  # noqa: BLE001 - no broker here: the local figures still count
        broker = None
    stem = f"rmq_e2eb{uuid.uuid4().hex[:6]}_"
    options = {"queue-match": f"^({stem}|local_bench)"}
    if broker is not None:
        options.update({"amqp-url": broker.url, "amqp-mgt-url": broker.mgt_url})
    runner = Runner(short_tempdir(), queue="local_bench", executors=EXECUTORS, **options)
    runner.options.pop("min-save-interval")  # the defaults, as deployed
    rmq_queue = stem + "q"
    if broker is not None:
        broker.declare(rmq_queue)
    runner.start()
    workspace = runner.workspace({"start.py": SCRIPT})
    blob = f"blobstore/{uuid.uuid4().hex}.tar"
    runner.upload_folder(workspace, f"{runner.store_root}/{blob}")
    marks = runner.root / "marks"
    marks.mkdir()
    warm = runner.request(workspace, "start.py", blob=blob, save_frequency="60s")
    runner.publish(warm)
    assert runner.wait_final(warm, timeout=120)["status"] == "completed"
    channel = conn = None
    if broker is not None:
        conn = broker.connection()
        channel = conn.channel()
        channel.confirm_delivery()
    pids = list(runner.role_pids().values()) + [runner.process.pid]
    yield {"runner": runner, "workspace": workspace, "blob": blob, "marks": marks,
           "broker": broker, "channel": channel, "rmq_queue": rmq_queue, "pids": pids,
           "pika": pika if broker is not None else None}
    if conn is not None:
        conn.close()
    runner.cleanup()
    if broker is not None:
        broker.delete(rmq_queue)


def new_request(b, mark: bool = True) -> dict:
    env = {"MARK": str(b["marks"] / uuid.uuid4().hex)} if mark else {}
    return b["runner"].request(b["workspace"], "start.py", blob=b["blob"], env=env,
                               save_frequency="60s")


def record_path(b, request: dict) -> Path:
    return Runner.store_path(metadata.record_url(request))


def scrape_document(b, request: dict) -> dict:
    folder = b["runner"].experiment_dir(request) / "_metadata"
    return json.loads(next(folder.glob("scrape-host-*.json")).read_text())


def wait_settled(b, request: dict, timeout: float = 60.0) -> None:
    path = record_path(b, request)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(path.read_text()).get("final"):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"{request['experiment']['key']} not settled:\n{b['runner'].log()}")


def publish(b, via: str, request: dict) -> None:
    if via == "local":
        b["runner"].publish(request)
        return
    pika = b["pika"]
    b["channel"].basic_publish(
        "StudioML.topic", f"StudioML.{b['rmq_queue']}", json.dumps(request).encode(),
        pika.BasicProperties(app_id="studioml", content_type="application/json"), mandatory=True)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("via", ["local", "rmq"])
def test_publish_to_start_and_completion(benchmark, bench, via):
    if via == "rmq" and bench["broker"] is None:
        pytest.skip("no RabbitMQ broker on 127.0.0.1:5672")
    starts, completions = [], []

    def make():
        time.sleep(0.3)  # an idle runner: nothing in flight, loops back to waiting
        return (new_request(bench),), {}

    def run(request):
        t0 = time.time()
        publish(bench, via, request)
        wait_settled(bench, request)
        document = scrape_document(bench, request)
        first_output = datetime.fromisoformat(document["runner"]["first_output"].replace("Z", "+00:00"))
        starts.append(first_output.timestamp() - t0)  # ISO-8601 with ms: 1 ms resolution
        mark = Path(request["config"]["env"]["MARK"])
        completions.append(record_path(bench, request).stat().st_mtime - float(mark.read_text()))

    benchmark.group = "end to end"
    benchmark.pedantic(run, setup=make, rounds=ROUNDS, warmup_rounds=1)
    starts, completions = starts[1:], completions[1:]  # the warm-up round
    RESULTS[f"start_p50:{via}"] = percentile(starts, 0.5)
    RESULTS[f"start_p99:{via}"] = percentile(starts, 0.99)
    if via == "local":
        RESULTS["done_p50"] = percentile(completions, 0.5)
        RESULTS["done_p99"] = percentile(completions, 0.99)


def bare_runs(python: str, cwd: Path, n: int, parallel: int) -> float:
    """Seconds to run ``python start.py`` n times, ``parallel`` at a time."""
    started = time.perf_counter()
    running: list[subprocess.Popen] = []
    for _ in range(n):
        while len(running) >= parallel:
            running.pop(0).wait()
        running.append(subprocess.Popen([python, "start.py"], cwd=cwd,
                                        stdout=subprocess.DEVNULL))
    for process in running:
        process.wait()
    return time.perf_counter() - started


def queue_drained(root: Path) -> bool:
    qdir = root / "local_bench"
    if any(not name.startswith(".") for name in os.listdir(qdir)):
        return False
    claimed = qdir / ".claimed"
    return not any(os.listdir(claimed / owner) for owner in os.listdir(claimed))


@pytest.mark.timeout(900)
def test_throughput_and_footprint(benchmark, bench):
    runner, pids = bench["runner"], bench["pids"]
    python = str(next((runner.root / "c" / "envs").glob("*/bin/python")))
    time.sleep(1.0)
    RESULTS["rss_idle"] = sum(rss_bytes(p) for p in pids)
    idle_cpu0, idle_t0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
    time.sleep(IDLE_SECONDS)
    RESULTS["idle_cpu"] = ((sum(cpu_seconds(p) for p in pids) - idle_cpu0)
                           / (time.monotonic() - idle_t0))

    RESULTS["bare_serial"] = bare_runs(python, bench["workspace"], THROUGHPUT_N, 1)
    RESULTS["bare_parallel"] = bare_runs(python, bench["workspace"], THROUGHPUT_N, EXECUTORS)

    requests = [new_request(bench, mark=False) for _ in range(THROUGHPUT_N)]
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.2):
            peak[0] = max(peak[0], sum(rss_bytes(p) for p in pids))

    sampler = threading.Thread(target=sample, daemon=True)
    queue_root = Path(runner.options["queue-root"])

    def run():
        for request in requests:
            runner.publish(request)
        while not queue_drained(queue_root):
            time.sleep(0.05)

    cpu0 = sum(cpu_seconds(p) for p in pids)
    sampler.start()
    benchmark.group = "end to end"
    benchmark.pedantic(run, rounds=1, iterations=1)
    stop.set()
    sampler.join()
    RESULTS["runner_cpu_per_experiment"] = (sum(cpu_seconds(p) for p in pids) - cpu0) / THROUGHPUT_N
    RESULTS["throughput"] = benchmark.stats.stats.min
    RESULTS["rss_load"] = peak[0]
    statuses = [runner.wait_final(r, timeout=60)["status"] for r in requests]
    assert statuses == ["completed"] * THROUGHPUT_N


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    r = RESULTS
    for via, bar in (("local", 0.150), ("rmq", 0.250)):
        if f"start_p50:{via}" in r:
            record("dispatch", f"publish-to-start p50, {via}", r[f"start_p50:{via}"] * 1e3, "ms",
                   note=f"p99 {r[f'start_p99:{via}'] * 1e3:.0f} ms, {ROUNDS - 1} runs",
                   bar=f"<= {bar * 1e3:.0f} ms", met=r[f"start_p50:{via}"] <= bar)
    if "start_p50:rmq" in r and "start_p50:local" in r:
        ratio = r["start_p50:rmq"] / r["start_p50:local"]
        record("dispatch", "publish-to-start p50, RabbitMQ / local queue", ratio, "x",
               note="same runner, same run", bar="<= 1.2x", met=ratio <= 1.2)
    if "done_p50" in r:
        record("dispatch", "completion p50 (exit -> settled with uploads)", r["done_p50"] * 1e3,
               "ms", note=f"p99 {r['done_p99'] * 1e3:.0f} ms, local queue")
    if "throughput" in r:
        n = THROUGHPUT_N
        rate = n / r["throughput"]
        vs_serial = r["bare_serial"] / r["throughput"]
        vs_parallel = r["bare_parallel"] / r["throughput"]
        record("dispatch", "throughput / bare interpreter (one at a time)", vs_serial, "x",
               note=f"{n} experiments, {rate:.1f}/s vs {n / r['bare_serial']:.1f}/s, "
                    f"{EXECUTORS} executors", bar=">= 0.35", met=vs_serial >= 0.35)
        record("dispatch", f"throughput / bare interpreter ({EXECUTORS} at a time)", vs_parallel,
               "x", note=f"{n / r['bare_parallel']:.1f}/s bare")
        record("dispatch", "runner CPU per trivial experiment",
               r["runner_cpu_per_experiment"] * 1e3, "ms",
               note="supervisor + 5 roles, user+system, children excluded")
    if "rss_idle" in r:
        record("footprint", "RSS of the 6 runner processes, idle", r["rss_idle"] / 2**20, "MiB")
    if "rss_load" in r:
        record("footprint", "RSS of the 6 runner processes, peak under throughput",
               r["rss_load"] / 2**20, "MiB")
    if "idle_cpu" in r:
        record("footprint", f"idle CPU over {IDLE_SECONDS} s", r["idle_cpu"] * 100,
               "% of one core", bar="< 0.5%", met=r["idle_cpu"] < 0.005,
               note="local and RabbitMQ queues served" if "start_p50:rmq" in r else "")
