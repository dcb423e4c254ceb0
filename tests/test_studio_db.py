"""The StudioML database record (runner/studio_db.py) against real stores: S3 on
``moto_server``, the GCS emulator and a local folder, plus the background updater with a
database that cannot be reached."""
from __future__ import annotations

import json
import threading
import time

import pytest

from runner import studio_db

from .support import TEST_AWS, free_port

CREDENTIALS = {"aws": {"access_key": TEST_AWS["AWS_ACCESS_KEY_ID"],
                       "secret_access_key": TEST_AWS["AWS_SECRET_ACCESS_KEY"],
                       "region": "us-east-1"}}


def client_record(key: str) -> dict:
    """A record as the client's add_experiment leaves it (fields from its Experiment)."""
    return {"key": key, "filename": "train.py", "args": [], "pythonenv": ["studioml==0.0.49"],
            "project": "p", "status": "waiting", "time_added": time.time() - 5,
            "time_started": None, "time_last_checkpoint": None, "time_finished": None,
            "owner": "guest", "info": {}, "metric": None, "max_duration": None,
            "artifacts": {"retval": {"key": f"experiments/{key}/retval.tar", "mutable": True,
                                     "unpack": True}}}


def request_for(database: dict, key: str = "exp-1") -> dict:
    return {"experiment": {"key": key, "filename": "train.py", "artifacts": {}},
            "config": {"database": database}}


@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.integration),
                        pytest.param("gs", marks=pytest.mark.integration), "local"])
def database(request, tmp_path, monkeypatch):
    """(database config, write(key, record), read(key)) for each database type."""
    kind = request.param
    if kind == "s3":
        moto = request.getfixturevalue("moto")
        bucket = moto.create_bucket()
        s3 = moto.client()
        config = {"type": "s3", "endpoint": moto.endpoint, "bucket": bucket,
                  "credentials": CREDENTIALS}

        def write(key, record):
            s3.put_object(Bucket=bucket, Key=f"experiments/{key}", Body=json.dumps(record))

        def read(key):
            return json.loads(s3.get_object(Bucket=bucket, Key=f"experiments/{key}")["Body"].read())
    elif kind == "gs":
        gcs = request.getfixturevalue("gcs_env")
        bucket = gcs.create_bucket()
        config = {"type": "gcloud", "bucket": bucket}

        def write(key, record):
            gcs.client().bucket(bucket).blob(f"experiments/{key}").upload_from_string(
                json.dumps(record))

        def read(key):
            return json.loads(gcs.client().bucket(bucket).blob(f"experiments/{key}")
                              .download_as_bytes())
    else:
        config = {"type": "local", "endpoint": str(tmp_path), "bucket": "meta"}

        def write(key, record):
            path = tmp_path / "meta" / "experiments" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))

        def read(key):
            return json.loads((tmp_path / "meta" / "experiments" / key).read_text())
    return config, write, read


def test_record_goes_running_checkpointed_finished_keeping_other_fields(database):
    config, write, read = database
    write("exp-1", client_record("exp-1"))
    request = request_for(config)
    location = studio_db.locate(request)

    studio_db.update_record(location, studio_db.started(request, now=100.0))
    assert read("exp-1")["status"] == "running" and read("exp-1")["time_started"] == 100.0
    studio_db.update_record(location, studio_db.checkpointed(now=110.0))
    studio_db.update_record(location, studio_db.ended(final=True, now=120.0))
    record = read("exp-1")
    expected = dict(client_record("exp-1"), status="finished", time_started=100.0,
                    time_last_checkpoint=120.0, time_finished=120.0)
    expected["time_added"] = record["time_added"]
    assert record == expected


def test_a_requeued_attempt_puts_the_record_back_to_waiting(database):
    config, write, read = database
    write("exp-1", client_record("exp-1"))
    location = studio_db.locate(request_for(config))
    studio_db.update_record(location, studio_db.started(request_for(config), now=100.0))
    studio_db.update_record(location, studio_db.ended(final=False, now=105.0))
    record = read("exp-1")
    assert record["status"] == "waiting" and record["time_started"] == 100.0
    assert record["time_finished"] is None


def test_a_stopped_record_stays_stopped_until_the_run_has_finished(database):
    config, write, read = database
    write("exp-1", dict(client_record("exp-1"), status="stopped"))
    location = studio_db.locate(request_for(config))
    after = studio_db.update_record(location, studio_db.started(request_for(config), now=1.0))
    assert after["status"] == "stopped" and read("exp-1")["status"] == "stopped"
    studio_db.update_record(location, studio_db.ended(final=True, now=2.0))
    assert read("exp-1")["status"] == "finished"


def test_no_record_means_nothing_is_written(database):
    config, _write, _read = database
    location = studio_db.locate(request_for(config, key="never-made"))
    assert studio_db.update_record(location, studio_db.started(request_for(config))) is None
    assert studio_db.read_record(location) is None


def test_the_output_artifact_added_for_completion_service_reaches_the_record(database):
    config, write, read = database
    write("exp-1", client_record("exp-1"))
    request = request_for(config)
    request["experiment"]["artifacts"] = {
        "retval": {"key": "experiments/exp-1/retval.tar", "mutable": True, "unpack": True,
                   "qualified": "s3://h:1/b/experiments/exp-1/retval.tar", "bucket": "b",
                   "credentials": CREDENTIALS},
        "args": {"key": "blobstore/x.tar", "mutable": False, "unpack": True}}
    added = studio_db.add_output_artifact(request)
    assert added == {"key": "experiments/exp-1/output.tar", "mutable": True, "unpack": True,
                     "qualified": "s3://h:1/b/experiments/exp-1/output.tar", "bucket": "b",
                     "credentials": CREDENTIALS}
    assert studio_db.add_output_artifact(request) is None  # it has one now
    studio_db.update_record(studio_db.locate(request), studio_db.started(request))
    record = read("exp-1")
    assert record["artifacts"]["output"]["key"] == "experiments/exp-1/output.tar"
    assert record["artifacts"]["retval"] == client_record("exp-1")["artifacts"]["retval"]


def test_requests_without_a_database_or_with_an_unknown_type():
    assert studio_db.locate({"experiment": {"key": "k"}, "config": {}}) is None
    with pytest.raises(studio_db.NoDatabase, match="firebase"):
        studio_db.locate(request_for({"type": "firebase"}))
    # runner-submit's own requests: the runner's metadata store is the only record.
    assert studio_db.locate(request_for({"type": "studioml-runner", "bucket": "b"})) is None


class Recorder:
    def __init__(self):
        self.states: list[tuple[str, dict]] = []
        self.stopped: list[str] = []
        self.changed = threading.Condition()

    def on_state(self, attempt_id, state):
        with self.changed:
            self.states.append((attempt_id, state))
            self.changed.notify_all()

    def on_stopped(self, attempt_id):
        with self.changed:
            self.stopped.append(attempt_id)
            self.changed.notify_all()

    def wait(self, predicate, timeout=30.0):
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; states {self.states}, stopped {self.stopped}"
                self.changed.wait(left)


def test_an_unreachable_database_is_retried_in_the_background_without_blocking(moto):
    recorder = Recorder()
    updater = studio_db.RecordUpdater(recorder.on_state, recorder.on_stopped, retry_for=600)
    dead = {"type": "s3", "endpoint": f"http://127.0.0.1:{free_port()}", "bucket": "meta",
            "credentials": CREDENTIALS}
    try:
        started = time.monotonic()
        assert updater.submit("attempt-1", request_for(dead), studio_db.started(request_for(dead)))
        assert time.monotonic() - started < 1.0  # submit never waits for the database
        recorder.wait(lambda: any(s["state"] == "retrying" for _, s in recorder.states))
        assert not updater.flush(0.1)  # still waiting, not dropped
    finally:
        updater.close(timeout=0.1)


def test_the_updater_reports_a_client_stop_once(moto):
    recorder = Recorder()
    updater = studio_db.RecordUpdater(recorder.on_state, recorder.on_stopped)
    bucket = moto.create_bucket()
    moto.client().put_object(Bucket=bucket, Key="experiments/exp-1",
                             Body=json.dumps(dict(client_record("exp-1"), status="stopped")))
    request = request_for({"type": "s3", "endpoint": moto.endpoint, "bucket": bucket,
                           "credentials": CREDENTIALS})
    try:
        updater.submit("attempt-1", request, studio_db.started(request))
        recorder.wait(lambda: recorder.stopped == ["attempt-1"])
        updater.submit("attempt-1", request, studio_db.checkpointed())
        assert updater.flush(30)
        assert recorder.stopped == ["attempt-1"]
        assert [s["state"] for _, s in recorder.states] == ["ok", "ok"]
    finally:
        updater.close()
