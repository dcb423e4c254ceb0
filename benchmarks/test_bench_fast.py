"""Hot-path benchmarks: compiled vs pure twin (vs a stdlib baseline).

Run: python3 -m pytest benchmarks/test_bench_fast.py -q --benchmark-columns=min,mean,median,rounds
"""
from __future__ import annotations

import json
import random

import orjson
import pytest

import runner._fast as fast

IMPLS = fast.implementations()
KINDS = [k for k in ("compiled", "pure") if IMPLS[k] is not None]


@pytest.fixture(scope="module")
def stream() -> bytes:
    """~5 MB of output: 90% log lines, 10% ~20-key nested JSON lines."""
    rng = random.Random(5)
    out, size, i = [], 0, 0
    while size < 5_000_000:
        i += 1
        if rng.random() < 0.9:
            line = b"2024-01-01 12:00:%02d INFO step %d loss=%.6f lr=%.2e some training log text here" % (
                i % 60, i, rng.random(), rng.random() / 100)
        else:
            line = orjson.dumps({"experiment": {
                "epoch": i, "loss": rng.random(), "acc": rng.random(), "lr": 1e-3, "step": i * 100,
                "phase": "train", "name": f"run-{i % 7}", "ok": True, "note": None, "batch": 256,
                "metrics": {"precision": rng.random(), "recall": rng.random(), "f1": rng.random(),
                            "tags": ["a", "b"]},
                "gpu": {"util": 97, "mem": 12345, "temp": 71.5}, "ts": 1700000000.5 + i}})
        out.append(line)
        size += len(line) + 1
    return b"\n".join(out) + b"\n"


def _chunks(data: bytes, size: int = 65536):
    """Line-aligned chunks, as the output reader hands them over."""
    res, start = [], 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + size)
        end = len(data) if end < start else end + 1
        res.append(data[start:end])
        start = end
    return res


@pytest.mark.parametrize("kind", KINDS)
def test_b62encode(benchmark, kind):
    enc = IMPLS[kind].b62encode
    values = list(range(1700000000, 1700010000))

    def run():
        for v in values:
            enc(v)

    benchmark.group = "b62encode x10000"
    benchmark(run)


@pytest.mark.parametrize("kind", KINDS + ["stdlib-json-baseline"])
def test_merge_lines(benchmark, kind, stream):
    chunks = _chunks(stream)
    if kind == "stdlib-json-baseline":
        def merge(doc, chunk):
            for line in chunk.decode("utf-8", "replace").splitlines():
                s = line.strip()
                if s.startswith("{") and s.endswith("}"):
                    try:
                        obj = json.loads(s)
                    except ValueError:
                        continue
                    if isinstance(obj, dict):
                        doc.update(obj)  # shallow; a lower bound for a naive merge
    else:
        merge = IMPLS[kind].merge_lines

    def run():
        doc = {}
        for ch in chunks:
            merge(doc, ch)
        return doc

    benchmark.group = "merge_lines ~5MB"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("hash") / "64mib.bin"
    block = random.Random(64).randbytes(1 << 20)
    with open(p, "wb") as f:
        for _ in range(64):
            f.write(block)
    return p


@pytest.mark.parametrize("kind", KINDS + ["plain-read"])
def test_content_hash(benchmark, kind, big_file):
    if kind == "plain-read":
        def run():
            buf = bytearray(1 << 20)
            with open(big_file, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    else:
        h = IMPLS[kind].content_hash

        def run():
            return h(big_file)

    benchmark.group = "content_hash 64MiB"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
