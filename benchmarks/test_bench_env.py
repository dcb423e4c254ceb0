"""Environment preparation.

One requirement set (a tiny local package, offline): (a) the store's cache hit
(``EnvironmentStore.ensure`` of a built set), (b) a cold build through the store (a fresh store
each round), (c) ``uv venv`` + ``uv pip install`` by hand, (d) the anchor strategy of older
runners: a fresh ``python -m venv`` + ``pip install`` per experiment.  uv shares one warm cache
in (b) and (c), so both do the same work.  Bars: (a) < 5% of (c); (b) <= 1.3x (c); reported:
(d)/(a) and (d)/(b).

A changed set (the real StudioML 0.0.49 client's ``pip freeze``, from PyPI through the host's
uv cache; ``six`` changed to another release each round, interleaved): (e) the store's
``ensure`` of the new set, built from the nearest stored one whose spare copy the cache
manager laid aside after its build, (f) ``uv pip install six==X`` into an existing venv
holding the freeze, (g) (e) without a spare copy (the nearest linked file by file), and once
(h) the same set built from nothing in an empty store.  Bar: (e) <= 1.5x (f).

Run: python3 -m pytest benchmarks/test_bench_env.py -q -s
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from runner.environments import EnvironmentStore, _find_uv
from tests.support import make_tiny_package, short_tempdir, tiny_requirement

from .figures import QUICK, record

ROUNDS = 3 if QUICK else 5
RESULTS: dict[str, float] = {}
PRISTINE = dict(os.environ)  # before the offline fixture below changes it
SIX_RELEASES = ["1.16.0", "1.15.0", "1.14.0", "1.13.0", "1.12.0", "1.11.0"]


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


# -- a changed set ------------------------------------------------------------------------

@pytest.fixture()
def online():
    """The host's environment as it was (index reachable, the host's uv cache)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(PRISTINE)
    yield
    os.environ.clear()
    os.environ.update(saved)


def client_freeze() -> list[str]:
    from tests.studio_client import client_python
    python = client_python()  # skips when the client cannot be installed
    out = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True,
                         timeout=300, check=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def with_six(freeze: list[str], release: str) -> list[str]:
    return [f"six=={release}" if line.lower().startswith("six==") else line for line in freeze]


@pytest.mark.timeout(1800)
def test_e_changed_set(online):
    uv = _find_uv()
    if uv is None:
        pytest.skip("uv is not installed")
    freeze = client_freeze()
    if not any(line.lower().startswith("six==") for line in freeze):
        pytest.skip(f"no six in the client's freeze: {freeze}")
    releases = [r for r in SIX_RELEASES if f"six=={r}" not in freeze][:3 if QUICK else 5]
    root = short_tempdir("envd")
    python = Path(sys.executable)
    try:
        store = EnvironmentStore(root / "store", installer="uv")
        base = store.ensure(python, freeze)
        store.make_spare(base.key)
        existing = root / "existing"
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(existing)], check=True)
        pip_in = [uv, "pip", "install", "-q", "--python", str(existing / "bin" / "python")]
        subprocess.run(pip_in + freeze, check=True)
        for release in releases:  # each release's wheel into uv's cache, for both sides
            subprocess.run(pip_in + [f"six=={release}"], check=True)
        subprocess.run(pip_in + [next(line for line in freeze
                                      if line.lower().startswith("six=="))], check=True)

        e, f, g = [], [], []
        for release in releases:
            changed = with_six(freeze, release)
            t0 = time.perf_counter()
            env = store.ensure(python, changed)
            e.append(time.perf_counter() - t0)
            assert env.built and store.list()[-1]["built_from"]
            store.make_spare(env.key)  # what the cache manager does after a build

            t0 = time.perf_counter()
            subprocess.run(pip_in + [f"six=={release}"], check=True)
            f.append(time.perf_counter() - t0)

            store.remove(env.key)  # the same set again, with no spare anywhere
            for spare in store.root.glob("*.spare"):
                shutil.rmtree(spare)
            t0 = time.perf_counter()
            env = store.ensure(python, changed)
            g.append(time.perf_counter() - t0)
            store.make_spare(env.key)

        cold = EnvironmentStore(root / "cold", installer="uv")
        t0 = time.perf_counter()
        cold.ensure(python, with_six(freeze, releases[0]))
        h = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    e_med, f_med, g_med = (statistics.median(x) for x in (e, f, g))
    print("\n" + "\n".join(f"({name}) " + " ".join(f"{v * 1e3:.0f}" for v in values) + " ms"
                            for name, values in (("e", e), ("f", f), ("g", g))))
    note = f"{len(freeze)}-line freeze, six changed, medians of {len(releases)}"
    record("environments", "(e) new set, one line changed / (f) uv pip install of that line",
           e_med / f_med, "x", bar="<= 1.5", met=e_med / f_med <= 1.5,
           note=f"{e_med * 1e3:.0f} ms vs {f_med * 1e3:.0f} ms; {note}")
    record("environments", "(g) the same without a spare copy / (f)", g_med / f_med, "x",
           note=f"{g_med * 1e3:.0f} ms")
    record("environments", "(h) the set built from nothing / (e)", h / e_med, "x",
           note=f"(h) {h:.1f} s, one round")
