"""Environment preparation for one requirement set (a tiny local package, offline).

(a) the store's cache hit (``EnvironmentStore.ensure`` of a built set), (b) a cold build through
the store (a fresh store each round), (c) ``uv venv`` + ``uv pip install`` by hand, (d) the anchor
strategy of older runners: a fresh ``python -m venv`` + ``pip install`` per experiment.  uv
shares one warm cache in (b) and (c), so both do the same work.  Bars: (a) < 5% of (c);
(b) <= 1.3x (c); reported: (d)/(a) and (d)/(b).

Run: python3 -m pytest benchmarks/test_bench_env.py -q -s
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from runner.environments import EnvironmentStore, _find_uv
from tests.support import make_tiny_package, short_tempdir, tiny_requirement

from .figures import QUICK, record

ROUNDS = 3 if QUICK else 5
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup():
    root = short_tempdir("envb")
    requirement = tiny_requirement(make_tiny_package(root))
    saved = {k: os.environ.get(k) for k in ("UV_OFFLINE", "PIP_NO_INDEX", "UV_CACHE_DIR")}
    os.environ.update(UV_OFFLINE="1", PIP_NO_INDEX="1", UV_CACHE_DIR=str(root / "uv-cache"))
    uv = _find_uv()
    if uv is None:
        pytest.skip("uv is not installed")
    warm = EnvironmentStore(root / "warm", installer="uv")
    warm.ensure(Path(sys.executable), [requirement])  # also warms uv's cache
    yield {"root": root, "req": requirement, "uv": uv, "warm": warm}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(root, ignore_errors=True)


def fresh(root: Path) -> Path:
    return root / f"x-{uuid.uuid4().hex[:8]}"


def test_a_store_hit(benchmark, setup):
    store, req = setup["warm"], setup["req"]
    env = benchmark.pedantic(store.ensure, args=(Path(sys.executable), [req]), rounds=50,
                             iterations=1, warmup_rounds=2)
    assert not env.built
    RESULTS["a"] = benchmark.stats.stats.median


def test_b_cold_build_through_store(benchmark, setup):
    def build():
        env = EnvironmentStore(fresh(setup["root"]), installer="uv").ensure(
            Path(sys.executable), [setup["req"]])
        assert env.built
    benchmark.pedantic(build, rounds=ROUNDS, iterations=1)
    RESULTS["b"] = benchmark.stats.stats.median


def test_c_uv_by_hand(benchmark, setup):
    def build():
        path = fresh(setup["root"])
        subprocess.run([setup["uv"], "venv", "-q", "--python", sys.executable, str(path)],
                       check=True)
        subprocess.run([setup["uv"], "pip", "install", "-q", "--python",
                        str(path / "bin" / "python"), setup["req"]], check=True)
    benchmark.pedantic(build, rounds=ROUNDS, iterations=1)
    RESULTS["c"] = benchmark.stats.stats.median


@pytest.mark.timeout(900)
def test_d_venv_and_pip_per_experiment(benchmark, setup):
    def build():
        path = fresh(setup["root"])
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", "--no-index", setup["req"]], check=True)
    benchmark.pedantic(build, rounds=2 if QUICK else 3, iterations=1)
    RESULTS["d"] = benchmark.stats.stats.median


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    r = RESULTS
    if {"a", "c"} <= r.keys():
        record("environments", "(a) store hit / (c) uv by hand", r["a"] / r["c"], "x",
               note=f"{r['a'] * 1e3:.2f} ms vs {r['c'] * 1e3:.0f} ms", bar="< 0.05",
               met=r["a"] / r["c"] < 0.05)
    if {"b", "c"} <= r.keys():
        record("environments", "(b) cold build through the store / (c)", r["b"] / r["c"], "x",
               note=f"{r['b'] * 1e3:.0f} ms vs {r['c'] * 1e3:.0f} ms", bar="<= 1.3",
               met=r["b"] / r["c"] <= 1.3)
    if {"a", "d"} <= r.keys():
        record("environments", "(d) venv + pip per experiment / (a)", r["d"] / r["a"], "x",
               note=f"(d) {r['d']:.2f} s")
    if {"b", "d"} <= r.keys():
        record("environments", "(d) / (b)", r["d"] / r["b"], "x")
