"""Bus suite: msgpack frames through the runner's own ZeroMQ plumbing between two roles.

The far end is a real role (:class:`runner.roles.base.Role` loop on a :class:`runner.bus.Bus`)
in its own process that echoes every message with ``Role.post``, as roles send; this process
sends with ``Bus.post`` and receives with ``Bus.recv`` (encode and decode of every message
included).  Both ends therefore batch: messages posted to one destination go together in one
frame (up to 64 of them; everything is sent before ``recv`` waits, see :mod:`runner.bus`).
Baseline in the same run: bare pyzmq PUSH/PULL over the same kind of ``ipc://`` address,
echoing the same frames (already encoded) one frame per message in a bare loop.  Figures:
messages/s one way with a pipeline of echoes, and the round trip p50/p99 of one message at
a time.  Bar: the runner's rate >= 50% of bare.

Run: python3 -m pytest benchmarks/test_bench_bus.py -q -s
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
import zmq

from runner import protocol
from runner.bus import Bus, Endpoints
from tests.support import REPO, short_tempdir

from .figures import QUICK, percentile, record

MESSAGES = 20_000 if QUICK else 100_000
ROUND_TRIPS = 2_000 if QUICK else 10_000
WINDOW = 1000  # messages in flight at once in the rate test
LINE = (b'{"experiment": {"epoch": 3, "loss": 0.1234, "acc": 0.98}}\n'
        + b"2024-01-01 12:00:00 INFO step 1234 loss=0.123456 lr=1.00e-03 log\n" * 3)
MESSAGE = protocol.OutputChunk(attempt_id="host-1r31eq", data=LINE)
RESULTS: dict[str, float] = {}


class BareEnd:
    """This side of the bare baseline: a PULL inbox and a PUSH to the echo, raw frames."""

    def __init__(self, endpoints: Endpoints):
        context = zmq.Context.instance()
        self.inbox = context.socket(zmq.PULL)
        self.inbox.bind(endpoints.inbox("bench"))
        self.out = context.socket(zmq.PUSH)
        self.out.connect(endpoints.inbox("echo"))
        self.frame = protocol.encode(MESSAGE)

    def send(self) -> None:
        self.out.send(self.frame, copy=False)

    def recv(self) -> None:
        self.inbox.recv(copy=False)

    def close(self) -> None:
        self.out.send(b"stop")
        self.out.close(linger=1000)
        self.inbox.close(0)


class RunnerEnd:
    """This side through the runner's plumbing: ``Bus.post`` / ``Bus.recv`` of messages."""

    def __init__(self, endpoints: Endpoints):
        self.bus = Bus(endpoints, "bench")

    def send(self) -> None:
        self.bus.post("echo", MESSAGE)

    def recv(self) -> None:
        message = self.bus.recv(5.0)
        assert isinstance(message, protocol.OutputChunk) and message.data == LINE

    def close(self) -> None:
        self.bus.send("echo", protocol.Shutdown(reason="benchmark over"))
        self.bus.close()


@pytest.fixture(params=["bare", "runner"])
def pair(request):
    root = short_tempdir("bus")
    endpoints = Endpoints(root)
    end = (BareEnd if request.param == "bare" else RunnerEnd)(endpoints)
    echo = subprocess.Popen([sys.executable, "-m", "benchmarks.bus_echo", request.param,
                             str(root)], cwd=REPO, stdout=subprocess.PIPE)
    assert echo.stdout.readline().strip() == b"ready"
    for _ in range(100):  # the first messages connect the sockets
        end.send()
        end.recv()
    yield request.param, end
    end.close()
    echo.wait(10)
    shutil.rmtree(root, ignore_errors=True)


def test_rate(benchmark, pair):
    kind, end = pair

    def run():
        sent = received = 0
        while received < MESSAGES:
            while sent < MESSAGES and sent - received < WINDOW:
                end.send()
                sent += 1
            end.recv()
            received += 1

    benchmark.group = f"bus: {MESSAGES} echoed messages"
    benchmark.pedantic(run, rounds=3, iterations=1)
    RESULTS[f"rate:{kind}"] = MESSAGES / benchmark.stats.stats.min


def test_round_trip(benchmark, pair):
    kind, end = pair
    times: list[float] = []

    def run():
        for _ in range(ROUND_TRIPS):
            t0 = time.perf_counter()
            end.send()
            end.recv()
            times.append(time.perf_counter() - t0)

    benchmark.group = f"bus: {ROUND_TRIPS} round trips"
    benchmark.pedantic(run, rounds=1, iterations=1)
    RESULTS[f"p50:{kind}"] = percentile(times, 0.5)
    RESULTS[f"p99:{kind}"] = percentile(times, 0.99)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    r = RESULTS
    if {"rate:runner", "rate:bare"} <= r.keys():
        ratio = r["rate:runner"] / r["rate:bare"]
        record("bus", "messages/s, runner / bare pyzmq", ratio, "x",
               note=f"{r['rate:runner']:.0f} vs {r['rate:bare']:.0f} msg/s, {len(LINE)}-byte "
                    "OutputChunk", bar=">= 0.5", met=ratio >= 0.5)
    if {"p50:runner", "p50:bare"} <= r.keys():
        record("bus", "round trip p50, runner / bare", r["p50:runner"] / r["p50:bare"], "x",
               note=f"{r['p50:runner'] * 1e6:.0f} vs {r['p50:bare'] * 1e6:.0f} us")
        record("bus", "round trip p99, runner / bare", r["p99:runner"] / r["p99:bare"], "x",
               note=f"{r['p99:runner'] * 1e6:.0f} vs {r['p99:bare'] * 1e6:.0f} us")
