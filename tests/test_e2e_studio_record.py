"""The StudioML client's view through a real ``runner-supervisor``, without the client
package: its database record (a ``local`` database, the client's file layout), its
single-file artifacts, a stop written into the record, and a database that cannot be
reached.  tests/test_interop_studioml.py does the same with the real client."""
from __future__ import annotations

import json
import tarfile
import time

import pytest

from .support import BLOCKING, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = """
    import os
    print("working", flush=True)
    os.makedirs("../retval", exist_ok=True)
    open("../retval/retval", "wb").write(b"result-bytes")
"""


def with_database(runner, request: dict, status: str = "waiting") -> tuple[dict, object]:
    """``request`` with a ``local`` database holding the client's record; (request, path)."""
    key = request["experiment"]["key"]
    root = runner.root / "studio-db"
    record = runner.root / "studio-db" / "meta" / "experiments" / key
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key, "status": status, "time_added": time.time(),
                                  "time_started": None, "time_finished": None,
                                  "time_last_checkpoint": None, "owner": "guest",
                                  "pythonenv": ["x==1"], "artifacts": {}}))
    request["config"]["database"] = {"type": "local", "endpoint": str(root), "bucket": "meta"}
    return request, record


def members(path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_record_finished_and_single_file_artifacts_as_the_client_reads_them(runner):
    runner.start()
    request, record_path = with_database(
        runner, runner.request(runner.workspace({"job.py": SCRIPT}), "job.py"))
    runner.publish(request)
    assert runner.wait_final(request)["status"] == "completed"
    record = runner.wait_for(lambda: (r := json.loads(record_path.read_text()))["status"]
                             == "finished" and r, what="the record to be finished")
    assert record["time_started"] <= record["time_finished"]
    assert record["owner"] == "guest" and record["pythonenv"] == ["x==1"]
    folder = runner.experiment_dir(request)
    assert members(folder / "output.tar") == ["./output"]
    assert members(folder / "retval.tar") == ["./retval"]
    assert members(folder / "_metrics.tar") == ["./_metrics"]
    with tarfile.open(folder / "retval.tar") as tar:
        assert tar.extractfile("./retval").read() == b"result-bytes"
    [document] = runner.scrape_documents(request)
    assert document["runner"]["studio_record"]["state"] == "ok"


def test_a_record_marked_stopped_stops_the_run_within_a_save_period(runner):
    runner.start()
    flag = runner.root / "never"
    request, record_path = with_database(runner, runner.request(
        runner.workspace({"job.py": BLOCKING}), "job.py", env={"FLAG": str(flag)}))
    runner.publish(request)
    runner.wait_for(lambda: json.loads(record_path.read_text())["status"] == "running"
                    and any(j["phase"] == "running" for j in runner.status()["attempts"]),
                    what="the run to start")
    record = json.loads(record_path.read_text())
    record["status"] = "stopped"  # what the client's stop_experiment writes
    record_path.write_text(json.dumps(record))
    final = runner.wait_final(request, timeout=60)
    assert final["status"] == "cancelled"
    [document] = runner.scrape_documents(request)
    assert document["runner"]["error"] == "ClientStopped"
    assert json.loads(record_path.read_text())["status"] == "finished"
    assert not list((runner.root / "q" / runner.queue).glob("*.a*")), "acked, not requeued"


def test_an_unreachable_database_neither_fails_nor_blocks_the_run(runner):
    runner.start()
    flag = runner.root / "flag"
    request = runner.request(runner.workspace({"job.py": BLOCKING}), "job.py",
                             save_frequency="1s", env={"FLAG": str(flag)})
    request["config"]["database"] = {
        "type": "s3", "endpoint": f"http://127.0.0.1:{free_port()}", "bucket": "meta",
        "credentials": {"aws": {"access_key": "a", "secret_access_key": "b"}}}
    runner.publish(request)
    runner.wait_for(lambda: "retrying" in runner.log() and "studio record" in runner.log(),
                    what="the record write to fail and be retried")
    assert any(j["phase"] == "running" for j in runner.status()["attempts"]), "not blocked"
    flag.write_text("go")
    assert runner.wait_final(request)["status"] == "completed"
    [document] = runner.scrape_documents(request)
    assert document["runner"]["studio_record"]["state"] == "retrying"
    assert document["studioml"]["status"] == "completed"


def test_a_request_stale_on_arrival_ends_its_record_finished(runner):
    runner.start()
    request, record_path = with_database(runner, runner.request(
        runner.workspace({"job.py": SCRIPT}), "job.py", lifetime="1m",
        time_added=time.time() - 3600))
    runner.publish(request)
    assert runner.wait_final(request)["status"] == "expired"
    record = runner.wait_for(lambda: (r := json.loads(record_path.read_text()))["status"]
                             == "finished" and r, what="the record to be finished")
    assert record["time_finished"] and record["time_started"] is None
