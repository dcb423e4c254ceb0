"""What isolation costs a run's start: ``python -c pass`` (a) as it is, (b) in the python-mode
bubblewrap sandbox (runner/sandbox.py, the command line the executor builds), (c) in a tiny
OCI image under the ``bwrap`` runtime (runner/containers/oci_bwrap.py, image already in the
cache).  Reported: (b)/(a) and (c)/(a); no bar (the issue sets none).

Run: python3 -m pytest benchmarks/test_bench_sandbox.py -q -s
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from runner import containers, sandbox
from runner.cache import ArtifactCache
from runner.config import from_values
from tests.container_support import Registry, push, python_image_layout
from tests.support import short_tempdir

from .figures import QUICK, record

ROUNDS = 10 if QUICK else 30
RESULTS: dict[str, float] = {}


def run(argv: list[str], env: dict | None = None, cwd: str | None = None) -> None:
    subprocess.run(argv, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def setup():
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap is not installed")
    root = short_tempdir("sbxb")
    workdir = root / "attempt"
    (workdir / "workspace").mkdir(parents=True)
    yield {"root": root, "workdir": workdir}
    shutil.rmtree(root, ignore_errors=True)


def test_a_plain(benchmark, setup):
    benchmark.pedantic(run, args=([sys.executable, "-c", "pass"],), rounds=ROUNDS,
                       iterations=1, warmup_rounds=2)
    RESULTS["a"] = benchmark.stats.stats.median


def test_b_sandboxed(benchmark, setup):
    config = from_values({"sandbox": "bwrap", "working_dir": str(setup["root"]),
                          "cache_dir": str(setup["root"] / "c")}, {})
    box, _ = sandbox.detect(config)
    argv = box.wrap([sys.executable, "-c", "pass"], workdir=str(setup["workdir"]),
                    cwd=str(setup["workdir"] / "workspace"),
                    readable=[os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))])
    benchmark.pedantic(run, args=(argv,), rounds=ROUNDS, iterations=1, warmup_rounds=2)
    RESULTS["b"] = benchmark.stats.stats.median
    record("sandbox", "sandboxed start / plain start", RESULTS["b"] / RESULTS["a"], "x",
           note=f"python -c pass, median of {ROUNDS}")


def test_c_oci_image(benchmark, setup):
    for program in ("skopeo", "umoci", "docker-registry"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed")
    registry = Registry(setup["root"] / "registry").start()
    try:
        reference = push(python_image_layout(), registry, "bench/python:1")
        runtime = containers.RUNTIMES["bwrap"]()
        cache = ArtifactCache(setup["root"] / "images", 10**10, name="image cache")
        with cache.lease(runtime.registry(), reference) as lease:
            launch = containers.Launch(image=str(lease.path), command=["python3", "-c", "pass"],
                                       workdir=str(setup["workdir"]), variables={})
            argv, env = runtime.command(launch, dict(os.environ))
            benchmark.pedantic(run, args=(argv, env), rounds=ROUNDS, iterations=1,
                               warmup_rounds=2)
        cache.close()
    finally:
        registry.stop()
    RESULTS["c"] = benchmark.stats.stats.median
    record("sandbox", "OCI image (bwrap) start / plain start", RESULTS["c"] / RESULTS["a"], "x",
           note=f"python -c pass in a cached image, median of {ROUNDS}")
