"""RabbitMQ end to end: publish-to-start latency and back-to-back throughput.

One real ``runner-supervisor`` serves an ``rmq_*`` queue on the broker at 127.0.0.1:5672
and a ``local_*`` queue at the same time, so every figure has baselines measured in the
same run on the same machine:

* ``bare_pika_roundtrip``: a plain pika publish (confirmed) → ``basic_consume`` delivery
  in one process: the floor any AMQP-based dispatch sits on;
* ``publish_to_start[local]``: the same experiment through the embedded local queue.

Run: python3 -m pytest benchmarks/test_bench_rabbitmq.py -q \
         --benchmark-columns=min,median,mean,max,rounds
"""
from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.rabbitmq_support import pika, shared_broker
from tests.support import Runner, short_tempdir

START_SCRIPT = """
    import os, time
    with open(os.environ["MARK"], "w") as handle:
        handle.write(repr(time.time()))
"""
THROUGHPUT_N = 20


@pytest.fixture(scope="module")
def broker():
    return shared_broker()


@pytest.fixture(scope="module")
def setup(broker):
    stem = f"rmq_bench{uuid.uuid4().hex[:6]}_"
    runner = Runner(short_tempdir(), queue="local_bench", executors=2,
                    **{"amqp-url": broker.url, "amqp-mgt-url": broker.mgt_url,
                       "queue-match": f"^({stem}|local_bench)"})
    queue = stem + "q"
    broker.declare(queue)
    runner.start()
    workspace = runner.workspace({"start.py": START_SCRIPT})
    # Warm up: the first request builds the (empty) environment once.
    marks = runner.root / "marks"
    marks.mkdir()
    warm = runner.request(workspace, "start.py", env={"MARK": str(marks / "warm")})
    runner.publish(warm)
    runner.wait_final(warm)
    conn = broker.connection()
    channel = conn.channel()
    channel.confirm_delivery()
    yield {"runner": runner, "queue": queue, "workspace": workspace, "marks": marks,
           "channel": channel}
    conn.close()
    runner.cleanup()
    broker.delete(queue)


def client_publish(channel, queue: str, request: dict) -> None:
    """Publish as the StudioML client does (exchange, routing key, properties)."""
    channel.basic_publish("StudioML.topic", f"StudioML.{queue}", json.dumps(request).encode(),
                          pika.BasicProperties(app_id="studioml",
                                               content_type="application/json"),
                          mandatory=True)


def wait_file(path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.002)


def test_bare_pika_roundtrip(benchmark, broker):
    """Baseline: confirmed publish → basic_consume delivery, one plain pika connection."""
    queue = f"rmq_benchbare_{uuid.uuid4().hex[:6]}"
    conn = broker.connection()
    ch = conn.channel()
    ch.queue_declare(queue, auto_delete=True)
    ch.confirm_delivery()
    got = []
    ch.basic_consume(queue, lambda c, m, p, b: (got.append(b), c.basic_ack(m.delivery_tag)))

    def roundtrip():
        got.clear()
        ch.basic_publish("", queue, b"{}", pika.BasicProperties(app_id="studioml"))
        while not got:
            conn.process_data_events(time_limit=0.001)

    benchmark.pedantic(roundtrip, rounds=200, warmup_rounds=10)
    conn.close()


@pytest.mark.parametrize("via", ["rmq", "local"])
def test_publish_to_start(benchmark, setup, via):
    """From publishing a request to an idle runner until the experiment's first line runs."""
    runner, marks = setup["runner"], setup["marks"]
    starts = []

    def make():
        mark = marks / uuid.uuid4().hex
        request = runner.request(setup["workspace"], "start.py", env={"MARK": str(mark)})
        runner.wait_for(lambda: not runner.status()["attempts"], what="an idle runner")
        return (request, mark), {}

    def run(request, mark):
        t0 = time.time()
        if via == "rmq":
            client_publish(setup["channel"], setup["queue"], request)
        else:
            runner.publish(request)
        wait_file(mark)
        starts.append(float(mark.read_text() or "nan") - t0)

    benchmark.pedantic(run, setup=make, rounds=15, warmup_rounds=1)
    starts.sort()
    benchmark.extra_info["start_latency_median_s"] = round(starts[len(starts) // 2], 4)


@pytest.mark.parametrize("via", ["rmq", "local"])
def test_back_to_back_throughput(benchmark, setup, via):
    """THROUGHPUT_N trivial experiments published at once, until all are final."""
    runner = setup["runner"]

    def make():
        requests = [runner.request(setup["workspace"], "start.py",
                                   env={"MARK": str(setup["marks"] / uuid.uuid4().hex)})
                    for _ in range(THROUGHPUT_N)]
        return (requests,), {}

    def run(requests):
        for request in requests:
            if via == "rmq":
                client_publish(setup["channel"], setup["queue"], request)
            else:
                runner.publish(request)
        for request in requests:
            assert runner.wait_final(request, timeout=300)["status"] == "completed"

    benchmark.pedantic(run, setup=make, rounds=3, warmup_rounds=0)
    benchmark.extra_info["experiments_per_s"] = round(
        THROUGHPUT_N / benchmark.stats.stats.median, 2)
