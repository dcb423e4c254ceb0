"""End to end through a real ``runner-supervisor`` with S3 (``moto_server``) and GCS
(``gcp-storage-emulator``) storage: workspaces read from and outputs written back to a
real endpoint, the shared artifact cache, a storage outage during the final upload, the
memory of the storage roles with a 200 MB artifact, and ``runner-submit``."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from runner import metadata

from .support import TEST_AWS, MotoServer, Runner, short_tempdir

pytestmark = pytest.mark.integration

OUTPUT_SCRIPT = """
    import json, os
    print("hello from", os.getcwd().rsplit("/", 1)[-1])
    print(json.dumps({"experiment": {"accuracy": 0.93}}))
    with open(os.path.join("..", "modeldir", "weights.txt"), "w") as handle:
        handle.write("w=42")
    with open(os.path.join("..", "data", "input.txt")) as handle:
        print("input:", handle.read())
"""


def tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


@pytest.fixture()
def harnesses():
    made = []

    def make(**kwargs) -> Runner:
        harness = Runner(short_tempdir(), **kwargs)
        made.append(harness)
        return harness
    yield make
    for harness in made:
        harness.cleanup()


def cache_stats(runner: Runner, ready) -> dict:
    """The cache manager's heartbeat stats once ``ready(stats)`` (heartbeats lag ~1 s)."""
    return runner.wait_for(lambda: (lambda s: s if ready(s) else None)(
        runner.status()["roles"]["cache_manager"]["stats"]), timeout=10, what="cache stats")


def add_input(runner: Runner, request: dict, text: str) -> None:
    """An extra immutable, unpacked input artifact ``data`` (any other label: SPEC 2)."""
    folder = runner.workspace({"input.txt": text})
    key = "inputs/" + request["experiment"]["key"] + ".tar"
    runner.upload_folder(folder, f"{runner.store_root}/{key}")
    artifact = dict(request["experiment"]["artifacts"]["workspace"], key=key,
                    qualified=f"{runner.store_root}/{key}")
    request["experiment"]["artifacts"]["data"] = artifact


def check_completed_experiment(runner: Runner, request: dict) -> dict:
    record = runner.wait_final(request, timeout=120)
    assert record["status"] == "completed", runner.log()
    assert "\"testing\"" not in json.dumps(record), "credentials are redacted"
    attempt = record["attempt"]
    names = sorted(url.rsplit("/", 1)[-1]
                   for url in runner.list(runner.experiment_url(request, "_metadata/")))
    assert names == [metadata.metrics_name(attempt), metadata.output_name(attempt),
                     metadata.runner_log_name(attempt), metadata.scrape_name(attempt)]
    output = runner.read(runner.experiment_url(request, f"_metadata/{metadata.output_name(attempt)}"))
    assert b"hello from workspace" in output and b"input: from storage" in output
    assert tar_members(runner.read(runner.experiment_url(request, "modeldir.tar"))) == {
        "weights.txt": b"w=42"}
    assert tar_members(runner.read(runner.experiment_url(request, "output.tar")))["./output"] == output
    [document] = runner.scrape_documents(request)
    assert document["experiment"] == {"accuracy": 0.93}
    assert document["studioml"]["status"] == "completed"
    return record


def test_s3_experiment_reads_its_workspace_and_writes_outputs_back(moto, harnesses):
    bucket = moto.create_bucket()
    # The URL names an AWS host; config.storage.endpoint (moto) must win over it, and the
    # artifacts carry their own credentials.
    runner = harnesses(store_root=f"s3://s3.eu-west-1.amazonaws.com/{bucket}",
                       storage={"endpoint": moto.endpoint},
                       credentials={"aws": {"access_key": "testing",
                                            "secret_access_key": "testing"}})
    for name in TEST_AWS:
        runner.env.pop(name, None)  # only the artifacts' credentials are there to use
    runner.start()
    request = runner.request(runner.workspace({"train.py": OUTPUT_SCRIPT}), "train.py")
    add_input(runner, request, "from storage")
    runner.publish(request)
    check_completed_experiment(runner, request)
    keys = [o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert f"metadata/e2e/{request['experiment']['key']}.json" in keys, "the metadata store"
    assert any(k.startswith("blobstore/") for k in keys)
    stats = cache_stats(runner, lambda s: s["cache_misses"] >= 2)
    assert stats["cache_misses"] == 2 and stats["cache_entries"] == 2  # workspace + data
    assert runner.stop() == 0


def test_s3_mutable_artifacts_an_earlier_attempt_left_are_placed_and_absent_ones_skipped(
        moto, harnesses):
    """One listing of the experiment's folder tells which mutable artifacts exist: the
    checkpoint in ``modeldir`` reaches the run, the absent ones are noted as absent."""
    bucket = moto.create_bucket()
    runner = harnesses(store_root=f"s3://s3.eu-west-1.amazonaws.com/{bucket}",
                       storage={"endpoint": moto.endpoint})
    runner.start()
    script = """
        import os
        print("resumed from", open(os.path.join("..", "modeldir", "ckpt.txt")).read())
        print("tb holds", os.listdir(os.path.join("..", "tb")))
    """
    request = runner.request(runner.workspace({"train.py": script}), "train.py")
    runner.upload_folder(runner.workspace({"ckpt.txt": "epoch 7"}),
                         runner.experiment_url(request, "modeldir.tar"))
    runner.publish(request)
    record = runner.wait_final(request, timeout=120)
    assert record["status"] == "completed", runner.log()
    output = runner.read(runner.experiment_url(
        request, f"_metadata/{metadata.output_name(record['attempt'])}")).decode()
    assert "resumed from epoch 7" in output and "tb holds []" in output
    log = runner.read(runner.experiment_url(
        request, f"_metadata/{metadata.runner_log_name(record['attempt'])}")).decode()
    assert "modeldir: unpacked" in log and "tb: no object yet" in log, log
    assert runner.stop() == 0


def test_gcs_experiment_reads_its_workspace_and_writes_outputs_back(gcs, harnesses, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint)
    bucket = gcs.create_bucket()
    runner = harnesses(store_root=f"gs://{bucket}")
    runner.start()
    request = runner.request(runner.workspace({"train.py": OUTPUT_SCRIPT}), "train.py")
    add_input(runner, request, "from storage")
    runner.publish(request)
    check_completed_experiment(runner, request)
    names = [b.name for b in gcs.client().list_blobs(bucket)]
    assert f"metadata/e2e/{request['experiment']['key']}.json" in names
    assert runner.stop() == 0


def test_two_experiments_sharing_one_input_download_it_once(moto, harnesses):
    runner = harnesses(store_root=moto.root_url(moto.create_bucket()))
    workspace = runner.workspace({"w.py": "import time; time.sleep(1); print('done')",
                                  "blob.bin": "x" * 2_000_000})
    blob = "blobstore/shared.tar"
    runner.upload_folder(workspace, f"{runner.store_root}/{blob}")
    requests = [runner.request(workspace, "w.py", blob=blob) for _ in range(2)]
    for request in requests:
        runner.publish(request)
    runner.start()
    for request in requests:
        assert runner.wait_final(request)["status"] == "completed"
    stats = cache_stats(runner, lambda s: s["cache_misses"] + s["cache_hits"] >= 2)
    assert (stats["cache_misses"], stats["cache_hits"]) == (1, 1)
    logs = b"".join(runner.read(url) for request in requests
                    for url in runner.list(runner.experiment_url(request, "_metadata/runner-host-")))
    assert logs.count(b"workspace: unpacked") == 2
    assert logs.count(b"from the storage)") == 1 and logs.count(b"from the cache)") == 1
    assert runner.stop() == 0


def test_storage_outage_during_the_final_upload_delays_the_ack_until_uploads_succeed(harnesses):
    server = MotoServer(short_tempdir("motoout")).start()
    try:
        bucket = server.create_bucket()
        runner = harnesses(store_root=server.root_url(bucket), storage_retry="2m")
        runner.start()
        ready, go = runner.root / "ready", runner.root / "go"
        script = f"""
            import os, time
            with open(os.path.join("..", "modeldir", "model.bin"), "wb") as handle:
                handle.write(b"m" * 3_000_000)
            open({str(ready)!r}, "w").close()
            while not os.path.exists({str(go)!r}):
                time.sleep(0.05)
            print("finished")
        """
        # No periodic upload within the test: everything goes up in the final upload.
        request = runner.request(runner.workspace({"job.py": script}), "job.py",
                                 save_frequency="1h")
        runner.publish(request)
        runner.wait_for(ready.exists, timeout=60, what="the experiment to be ready")
        server.stop()                     # storage goes away ...
        go.write_text("go")               # ... and the experiment ends: the final upload meets it
        queue_dir = runner.root / "q" / runner.queue
        runner.wait_for(lambda: any(j["phase"] == "uploading" for j in runner.status()["attempts"]),
                        what="the final upload to start")
        time.sleep(3)                     # several failed tries
        claimed = [p for p in (queue_dir / ".claimed").rglob("*") if p.is_file()]
        assert len(claimed) == 1, "not acked (nor requeued) while the uploads fail"
        assert [j["phase"] for j in runner.status()["attempts"]] == ["uploading"]

        server.start()                    # storage is back (empty: moto keeps state in memory)
        server.create_bucket(bucket)
        record = runner.wait_final(request, timeout=120)
        assert record["status"] == "completed"
        assert [p for p in (queue_dir / ".claimed").rglob("*") if p.is_file()] == []
        assert [p for p in queue_dir.iterdir() if p.is_file()] == [], "acked"
        model = tar_members(runner.read(runner.experiment_url(request, "modeldir.tar")))
        assert model == {"model.bin": b"m" * 3_000_000}
        # (How the outage was ridden out — botocore's own retries or the uploader's backoff,
        # logged as "retrying in" — depends on timing; the contract is what is checked.)
        assert runner.stop() == 0
    finally:
        server.stop()


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_200mb_artifact_moves_with_the_storage_roles_memory_far_below_its_size(moto, harnesses):
    size = 200 * 1024 * 1024
    runner = harnesses(store_root=moto.root_url(moto.create_bucket()))
    folder = runner.root / "big-ws"
    folder.mkdir()
    with open(folder / "data.bin", "wb") as handle:
        for _ in range(size // (8 * 1024 * 1024)):
            handle.write(os.urandom(8 * 1024 * 1024))  # incompressible
    (folder / "copy.py").write_text(
        "import shutil\nshutil.copyfile('data.bin', '../modeldir/data.bin')\nprint('copied')\n")
    blob = "blobstore/big.tar"
    runner.upload_folder(folder, f"{runner.store_root}/{blob}")
    (folder / "data.bin").unlink()
    runner.start()
    pids = runner.role_pids()
    # Idle peaks, with the storage libraries already imported (they load on first use).
    warm = runner.request(runner.workspace({"w.py": "print(1)"}), "w.py")
    runner.publish(warm)
    runner.wait_final(warm)
    idle = {role: vm_hwm_kib(pids[role]) * 1024 for role in ("cache_manager", "uploader")}
    request = runner.request(folder, "copy.py", blob=blob, save_frequency="1h")
    request["experiment"]["resources_needed"]["hdd"] = "2gb"
    runner.publish(request)
    assert runner.wait_final(request, timeout=240)["status"] == "completed", runner.log()
    head = moto.client().head_object(Bucket=runner.store_root.rsplit("/", 1)[-1],
                                     Key=f"experiments/{request['experiment']['key']}/modeldir.tar")
    assert head["ContentLength"] > size
    peaks = {role: vm_hwm_kib(pids[role]) * 1024 for role in ("cache_manager", "uploader")}
    print("idle peak RSS (VmHWM) bytes:", idle, "peak with the 200 MiB artifact:", peaks)
    for role, peak in peaks.items():
        assert peak < size // 2, f"{role} peaked at {peak} bytes for a {size}-byte artifact"
        assert peak - idle[role] < size // 4, f"{role} grew by {peak - idle[role]} bytes"
    assert runner.stop() == 0


def test_runner_submit_with_s3_and_gcs_storage(moto, gcs, harnesses, monkeypatch, tmp_path):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint)
    s3_root = f"s3://{moto.host}/{moto.create_bucket()}"
    gs_root = f"gs://{gcs.create_bucket()}"
    runner = harnesses()
    runner.env["STORAGE_EMULATOR_HOST"] = gcs.endpoint
    for name in TEST_AWS:
        runner.env.pop(name, None)
    runner.start()
    workspace = runner.workspace({"main.py": """
        import json, os, sys
        print(json.dumps({"experiment": {"argv": sys.argv[1:]}}))
        with open(os.path.join("..", "modeldir", "model.txt"), "w") as handle:
            handle.write("weights")
    """})
    env = {k: v for k, v in runner.env.items() if k not in TEST_AWS}
    for root, extra in ((s3_root, ["--endpoint", moto.endpoint, "--access-key", "testing",
                                   "--secret-key", "testing"]), (gs_root, [])):
        key = f"cli-{root.split(':', 1)[0]}"
        result = subprocess.run(
            [sys.executable, "-m", "runner.submit", "--queue", runner.queue,
             "--queue-root", str(runner.options["queue-root"]), "--storage", root,
             "--project", "cli", "--key", key, "--wait", "--wait-timeout", "90s", *extra,
             str(workspace), "main.py", "--", "a b"],
            capture_output=True, text=True, timeout=150, env=env)
        assert result.returncode == 0, result.stderr + runner.log()
        assert "status: completed" in result.stdout
        runner.store_root = root
        runner.credentials = {"aws": {"access_key": "testing", "secret_access_key": "testing"}}
        listed = runner.list(f"{root}/")
        assert any(u.startswith(f"{root}/blobstore/") and u.endswith(".tar") for u in listed)
        assert f"{root}/experiments/{key}/modeldir.tar" in listed
        assert f"{root}/metadata/cli/{key}.json" in listed
        record = json.loads(runner.read(f"{root}/metadata/cli/{key}.json"))
        workspace_artifact = record["request"]["experiment"]["artifacts"]["workspace"]
        assert workspace_artifact["qualified"].startswith(f"{root}/blobstore/")
        assert "testing" not in json.dumps(record), "credentials are redacted in the store"
    assert runner.stop() == 0


def test_an_output_bucket_that_does_not_exist_ends_the_request_failed_at_once(moto, harnesses):
    """NoSuchBucket cannot be fixed by retrying: no --storage-retry wait, no requeue loop."""
    bucket = moto.create_bucket()
    runner = harnesses(store_root=moto.root_url(bucket), storage_retry="10m")
    runner.start()
    request = runner.request(runner.workspace({"train.py": "print('done')"}), "train.py")
    key = request["experiment"]["key"]
    missing = moto.root_url("bucket-nobody-made")
    request["experiment"]["artifacts"]["output"].update(
        bucket="bucket-nobody-made", qualified=f"{missing}/experiments/{key}/output.tar")
    runner.publish(request)
    record = runner.wait_final(request, timeout=120)
    assert record["status"] == "failed"
    assert "retrying cannot fix it" in runner.log() and "NoSuchBucket" in runner.log()
    lines = [line for line in runner.log().splitlines() if f"key={key} " in line]
    assert lines and not any(" requeue: " in line for line in lines)


def test_an_artifact_that_cannot_be_uploaded_keeps_nothing_else_from_storage(runner):
    """The run makes one mutable artifact's place in the store unusable (a file where its
    folder should be: no retry fixes it): the others and the run's own metadata
    files still go up, and the request ends failed with the reason."""
    runner.start()
    request = runner.request(runner.workspace({"train.py": """
        import os, sys
        open(sys.argv[1], "w").write("a file where a folder should be")
        os.makedirs("../modeldir", exist_ok=True)
        open("../modeldir/model.txt", "w").write("weights")
        print("done")
        """}), "train.py")
    key = request["experiment"]["key"]
    blocker = runner.experiment_dir(request) / "blocked"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    request["experiment"]["args"] = [str(blocker)]
    modeldir = request["experiment"]["artifacts"]["modeldir"]
    modeldir["key"] = f"experiments/{key}/blocked/modeldir.tar"
    modeldir["qualified"] = f"{runner.store_root}/{modeldir['key']}"
    runner.publish(request)
    record = runner.wait_final(request, timeout=120)
    assert record["status"] == "failed" and "retrying cannot fix it" in record["reason"], record
    attempt = record["attempt"]
    folder = runner.experiment_dir(request)
    assert (folder / "output.tar").exists()  # sorted after the one that failed
    assert b"done" in (folder / "_metadata" / f"output-host-{attempt}.log").read_bytes()
    assert "a file, not a folder" in record["reason"]
    [document] = runner.scrape_documents(request)
    assert document["runner"]["attempt"] == attempt
