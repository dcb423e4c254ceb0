"""Hot-path suites: scrape (JSON-line merge), base62 and content hashing.

Every figure is a ratio against a baseline measured in the same run (module ``RESULTS``,
reported by :mod:`benchmarks.figures` when the module ends):

* **scrape** — a generated output stream (200 MB; 20 MB with ``BENCH_QUICK=1``): about 90%
  log lines, 10% JSON object lines of 5–30 keys nested up to 3 levels, some indented, some
  ``{not json}`` text lines, handed over in 64 KiB line-aligned chunks as the executor does.
  MB/s of stdlib ``json`` line by line with the same deep merge (baseline), ``orjson`` line by
  line, the pure twin, the compiled path (simdjson DOM, each chunk's lines applied newest
  first), the compiled scan merging oldest first what ``orjson.loads`` or ``simdjson.loads``
  return, and the ceiling of merely iterating the lines in Python.
* **base62** — ``b62encode`` compiled vs twin, per call.
* **hashing** — ``content_hash`` of a 1 GiB file (256 MiB quick) vs just ``readinto`` of the same
  file into the same buffers (page cache warm for both).

Run: python3 -m pytest benchmarks/test_bench_fast.py -q -s --benchmark-columns=min,median,rounds
"""
from __future__ import annotations

import json
import random

import orjson
import pytest

import runner._fast as fast
from runner._fast import hashing_py, jsonlines_py

from .figures import QUICK, record

IMPLS = fast.implementations()
COMPILED = IMPLS["compiled"]
SCRAPE_MB = 20 if QUICK else 200
HASH_MIB = 256 if QUICK else 1024
RESULTS: dict[str, float] = {}

try:  # the parser the design card names, measured inside the compiled scan when installed
    import simdjson
except ImportError:  # pragma: no cover
    simdjson = None


def _value(rng: random.Random, depth: int):
    kind = rng.random()
    if depth < 3 and kind < 0.15:
        return _object(rng, depth + 1, rng.randint(2, 6))
    if kind < 0.45:
        return rng.random()
    if kind < 0.7:
        return rng.randint(-10**6, 10**9)
    if kind < 0.85:
        return "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(3, 24)))
    if kind < 0.93:
        return [rng.random() for _ in range(rng.randint(0, 4))]
    return rng.choice([True, False, None])


def _object(rng: random.Random, depth: int, keys: int) -> dict:
    return {f"k{rng.randint(0, 60)}_{depth}": _value(rng, depth) for _ in range(keys)}


def _json_line(rng: random.Random) -> bytes:
    obj = {"experiment": _object(rng, 1, rng.randint(5, 30))}
    line = orjson.dumps(obj)
    roll = rng.random()
    if roll < 0.1:
        return b"    " + line + b"  "           # indented
    if roll < 0.15:
        return b"{not json: " + line[:40] + b"}"  # looks like an object, is text
    return line


def _log_line(rng: random.Random, i: int) -> bytes:
    return (b"2024-01-01 12:00:%02d INFO epoch %d step %d loss=%.6f lr=%.2e training log text"
            % (i % 60, i // 1000, i, rng.random(), rng.random() / 100))


@pytest.fixture(scope="module")
def stream() -> bytes:
    """SCRAPE_MB of output, assembled from pools of distinct lines (fast to generate)."""
    rng = random.Random(7)
    json_pool = [_json_line(rng) for _ in range(4000)]
    log_pool = [_log_line(rng, i) for i in range(20000)]
    target = SCRAPE_MB * 1_000_000
    out, size = [], 0
    while size < target:
        line = rng.choice(log_pool) if rng.random() < 0.9 else rng.choice(json_pool)
        out.append(line)
        size += len(line) + 1
    return b"\n".join(out) + b"\n"


@pytest.fixture(scope="module")
def chunks(stream) -> list[bytes]:
    """Line-aligned chunks of about 64 KiB, as the executor's reader hands them over."""
    res, start, data = [], 0, stream
    while start < len(data):
        end = data.rfind(b"\n", start, start + 65536)
        end = len(data) if end < start else end + 1
        res.append(data[start:end])
        start = end
    return res


def _line_by_line(loads, error):
    merge_object = jsonlines_py.merge_object

    def merge(doc, chunk):
        for line in chunk.split(b"\n"):
            s = line.strip()
            if s.startswith(b"{") and s.endswith(b"}"):
                try:
                    obj = loads(s)
                except error:
                    continue
                if isinstance(obj, dict):
                    merge_object(doc, obj)
    return merge


def _iterate_only(doc, chunk):
    for _line in chunk.split(b"\n"):
        pass


SCRAPERS = {
    "stdlib-json": _line_by_line(json.loads, ValueError),
    "orjson-line-by-line": _line_by_line(orjson.loads, orjson.JSONDecodeError),
    "pure-twin": jsonlines_py.merge_lines,
    "line-iteration-ceiling": _iterate_only,
}
if COMPILED is not None:
    from runner._fast import _jsonlines

    # The shipped path: simdjson DOM, lines applied newest first (runner/_fast/sjmerge.h).
    SCRAPERS["compiled"] = COMPILED.merge_lines
    # The same C scan merging oldest first what another parser returns for each line.
    SCRAPERS["compiled-scan+orjson"] = (
        lambda doc, chunk: _jsonlines.merge_lines_parsed_by(doc, chunk, orjson.loads))
    if simdjson is not None:
        SCRAPERS["compiled-scan+simdjson.loads"] = (
            lambda doc, chunk: _jsonlines.merge_lines_parsed_by(doc, chunk, simdjson.loads))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", list(SCRAPERS))
def test_scrape(benchmark, kind, chunks):
    merge = SCRAPERS[kind]

    def run():
        doc = {}
        for chunk in chunks:
            merge(doc, chunk)
        return doc

    benchmark.group = f"scrape {SCRAPE_MB} MB"
    benchmark.pedantic(run, rounds=1 if not QUICK else 2, iterations=1, warmup_rounds=0)
    RESULTS[f"scrape:{kind}"] = SCRAPE_MB / benchmark.stats.stats.min


@pytest.mark.parametrize("kind", [k for k in ("compiled", "pure") if IMPLS[k] is not None])
def test_base62(benchmark, kind):
    enc = IMPLS[kind].b62encode
    values = list(range(1700000000, 1700010000))

    def run():
        for v in values:
            enc(v)

    benchmark.group = "b62encode x10000"
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    RESULTS[f"base62:{kind}"] = benchmark.stats.stats.min / len(values)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hash") / "big.bin"
    block = random.Random(64).randbytes(1 << 20)
    with open(path, "wb") as handle:
        for _ in range(HASH_MIB):
            handle.write(block)
    yield path
    path.unlink()


def _plain_read(path) -> None:
    """The baseline: read the file into the buffers the compiled hash uses, nothing else."""
    size = getattr(COMPILED, "HASH_CHUNK", None) or hashing_py.CHUNK
    buffers = [bytearray(size), bytearray(size)]
    i = 0
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffers[i]):
            i ^= 1


HASHERS = {"plain-read": _plain_read, "pure-twin": hashing_py.content_hash}
if COMPILED is not None:
    HASHERS["compiled"] = COMPILED.content_hash


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", list(HASHERS))
def test_content_hash(benchmark, kind, big_file):
    fn = HASHERS[kind]
    benchmark.group = f"content_hash {HASH_MIB} MiB"
    # Best of many short rounds: on a shared 2-core VM the overlapped hash needs the second
    # core free, and the baseline is timed the same way.
    benchmark.pedantic(fn, args=(big_file,), rounds=10 if QUICK else 12, iterations=1,
                       warmup_rounds=1)
    RESULTS[f"hash:{kind}"] = HASH_MIB / benchmark.stats.stats.min


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    r = RESULTS
    note = f"{SCRAPE_MB} MB stream"
    if "scrape:stdlib-json" in r:
        for kind in SCRAPERS:
            if f"scrape:{kind}" in r:
                record("scrape", f"{kind} MB/s", r[f"scrape:{kind}"], "MB/s", note=note)
    if {"scrape:compiled", "scrape:stdlib-json", "scrape:pure-twin"} <= r.keys():
        vs_std = r["scrape:compiled"] / r["scrape:stdlib-json"]
        vs_twin = r["scrape:compiled"] / r["scrape:pure-twin"]
        record("scrape", "compiled / stdlib json", vs_std, "x", bar=">= 3x", met=vs_std >= 3)
        record("scrape", "compiled / pure twin", vs_twin, "x", bar=">= 2x", met=vs_twin >= 2)
        if "scrape:line-iteration-ceiling" in r:
            record("scrape", "compiled / line-iteration ceiling",
                   r["scrape:compiled"] / r["scrape:line-iteration-ceiling"], "x")
        if "scrape:compiled-scan+orjson" in r:
            record("scrape", "compiled (simdjson, newest first) / compiled scan + orjson",
                   r["scrape:compiled"] / r["scrape:compiled-scan+orjson"], "x",
                   note="> 1: the simdjson path wins and is kept")
    if {"base62:compiled", "base62:pure"} <= r.keys():
        ratio = r["base62:pure"] / r["base62:compiled"]
        record("base62", "compiled speed-up per call", ratio, "x",
               note=f"{r['base62:compiled'] * 1e9:.0f} ns vs {r['base62:pure'] * 1e9:.0f} ns",
               bar=">= 10x", met=ratio >= 10)
    if {"hash:compiled", "hash:plain-read"} <= r.keys():
        ratio = r["hash:compiled"] / r["hash:plain-read"]
        record("hashing", "content_hash / plain read", ratio, "x",
               note=f"{HASH_MIB} MiB: {r['hash:compiled']:.0f} vs {r['hash:plain-read']:.0f} MiB/s;"
                    f" pure twin {r.get('hash:pure-twin', float('nan')):.0f} MiB/s",
               bar=">= 0.8", met=ratio >= 0.8)
