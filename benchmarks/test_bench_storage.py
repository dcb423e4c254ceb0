"""Storage benchmarks against a real S3 endpoint (moto_server on loopback).

* experiment start, uncached vs cached: the cache manager's real ``download_artifacts``
  for a request whose workspace is a 32 MiB archive in S3 — with an empty artifact cache
  (download + unpack) and with a warm one (stat + unpack);
* upload throughput: the uploader's streamed multipart upload of a 64 MiB folder
  (``pack_to_stream`` into ``S3Store.put_stream``), against the baseline of raw boto3
  ``upload_file`` copying the same tar bytes from a file already on disk.

Run: python3 -m pytest benchmarks/test_bench_storage.py -q --benchmark-columns=min,mean,median,rounds
Ratios are printed at the end (``-s``) and recorded in README's benchmark table.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from runner import protocol
from runner.archive import pack, pack_to_stream
from runner.cache import ArtifactCache
from runner.roles.cache_manager import CacheManager
from runner.storage import S3Store
from tests.support import TEST_AWS

WORKSPACE_MIB = 32
UPLOAD_MIB = 64
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def aws_env():
    saved = {k: os.environ.get(k) for k in TEST_AWS}
    os.environ.update(TEST_AWS)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if RESULTS:
        print("\nstorage benchmark means (s):", {k: round(v, 4) for k, v in RESULTS.items()})
        if {"uncached", "cached"} <= RESULTS.keys():
            print(f"cached start is {RESULTS['uncached'] / RESULTS['cached']:.1f}x faster than uncached")
        if {"runner_upload", "boto3_upload"} <= RESULTS.keys():
            print(f"runner upload throughput = {RESULTS['boto3_upload'] / RESULTS['runner_upload']:.2f}"
                  f" x raw boto3 ({UPLOAD_MIB / RESULTS['runner_upload']:.0f} MiB/s vs "
                  f"{UPLOAD_MIB / RESULTS['boto3_upload']:.0f} MiB/s)")


def random_folder(root: Path, mib: int) -> Path:
    folder = root / f"f-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    for i in range(mib // 8):
        (folder / f"part{i}.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    return folder


@pytest.fixture(scope="module")
def workspace_request(moto):
    bucket = moto.create_bucket()
    root = Path(tempfile.mkdtemp(prefix="bench"))
    folder = random_folder(root, WORKSPACE_MIB)
    (folder / "train.py").write_text("print('hi')\n")
    pack(folder, root / "ws.tar", "none")
    url = f"{moto.root_url(bucket)}/blobstore/ws.tar"
    S3Store().put(url, root / "ws.tar")
    request = {"experiment": {"key": "bench", "filename": "train.py", "artifacts": {
        "workspace": {"key": "blobstore/ws.tar", "qualified": url, "unpack": True,
                      "mutable": False}}}, "config": {}}
    yield root, request
    shutil.rmtree(root, ignore_errors=True)


def start_experiment(cache: ArtifactCache, root: Path, request: dict) -> None:
    """What the cache manager does for an experiment's inputs, with its real code."""
    manager = CacheManager.__new__(CacheManager)  # no bus needed for download_artifacts
    manager.cache = cache
    workdir = root / f"w-{uuid.uuid4().hex[:6]}"
    attempt = protocol.Attempt(attempt_id="bench-1", queue="local_bench", token="t", attempts=0,
                       key="bench", project="", request=request, workdir=str(workdir),
                       resources={"hdd": 0}, taken_at=0.0)
    manager.download_artifacts(attempt, lambda text: None)
    shutil.rmtree(workdir)


def test_experiment_start_uncached(benchmark, workspace_request):
    root, request = workspace_request
    caches = []

    def setup():
        cache_root = root / f"c-{uuid.uuid4().hex[:6]}"
        caches.append(cache_root)
        return (ArtifactCache(cache_root, 10 * 2**30), root, request), {}
    benchmark.pedantic(start_experiment, setup=setup, rounds=5, iterations=1)
    RESULTS["uncached"] = benchmark.stats.stats.mean
    for cache_root in caches:
        shutil.rmtree(cache_root, ignore_errors=True)


def test_experiment_start_cached(benchmark, workspace_request):
    root, request = workspace_request
    cache = ArtifactCache(root / "warm", 10 * 2**30)
    start_experiment(cache, root, request)
    benchmark.pedantic(start_experiment, args=(cache, root, request), rounds=5, iterations=1)
    assert cache.stats()["cache_misses"] == 1
    RESULTS["cached"] = benchmark.stats.stats.mean
    cache.close()


@pytest.fixture(scope="module")
def upload_source(moto):
    root = Path(tempfile.mkdtemp(prefix="benchup"))
    folder = random_folder(root, UPLOAD_MIB)
    pack(folder, root / "same.tar", "none")  # the same bytes the runner streams
    yield moto.create_bucket(), folder, root / "same.tar"
    shutil.rmtree(root, ignore_errors=True)


def test_upload_runner_streamed_multipart(benchmark, moto, upload_source):
    bucket, folder, _ = upload_source
    store = S3Store()
    url = f"{moto.root_url(bucket)}/runner/modeldir.tar"
    info = benchmark.pedantic(
        lambda: store.put_stream(url, lambda out: pack_to_stream(folder, out, "none")),
        rounds=3, iterations=1)
    assert info.size >= UPLOAD_MIB * 2**20
    RESULTS["runner_upload"] = benchmark.stats.stats.mean


def test_upload_raw_boto3_baseline(benchmark, moto, upload_source):
    bucket, _, archive = upload_source
    client = moto.client()
    benchmark.pedantic(lambda: client.upload_file(str(archive), bucket, "boto3/modeldir.tar"),
                       rounds=3, iterations=1)
    RESULTS["boto3_upload"] = benchmark.stats.stats.mean
