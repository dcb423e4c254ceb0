"""Attempt ids, metadata file names and the metadata store (SPEC section 6)."""
from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from runner import _fast, metadata
from runner.errors import BadRequest
from runner.metadata import (AttemptIds, metadata_prefix_url, output_name, record_url,
                             runner_log_name, scrape_name, store_root_url, strip_archive_suffix,
                             write_record)
from runner.protocol import Attempt

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ACCESS = "AKIAEXAMPLEID0001"
ENV_SECRET = "env-secret-value-123"
ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"  # the seed's "2018-10-23T18:25:43.511Z"


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def b62(n: int) -> str:
    digits = ""
    while n:
        n, r = divmod(n, 62)
        digits = ALPHABET[r] + digits
    return digits or "0"


@pytest.mark.parametrize("seconds, text", [(1546495043, "1gew0R"), (1541618418, "1gKTNC"),
                                           (1700000000, "1r31eq")])
def test_attempt_id_is_base62_of_seconds(seconds: int, text: str) -> None:
    assert AttemptIds("host").next(seconds) == f"host-{text}"
    assert AttemptIds("gpu-node.example").next(seconds + 0.9) == f"gpu-node.example-{text}"


def test_attempt_ids_unique_and_increasing_within_one_second() -> None:
    ids = AttemptIds("host")
    made = [ids.next(1700000000.0), ids.next(1700000000.2), ids.next(1700000000.7),
            ids.next(1700000000.99), ids.next(1700000001.0)]
    assert made[0] == "host-1r31eq"
    assert len(set(made)) == len(made)
    suffixes = [m.split("-", 1)[1] for m in made]
    values = [sum(ALPHABET.index(c) * 62**i for i, c in enumerate(reversed(s)))
              for s in suffixes]
    assert values == [1700000000 + i for i in range(5)]
    assert made == sorted(made)  # names sort in time order


def test_attempt_ids_survive_a_clock_step_back() -> None:
    ids = AttemptIds("host")
    first = ids.next(1700000100)
    second = ids.next(1700000000)  # clock went back
    assert second > first
    assert second == f"host-{b62(1700000101)}"


def test_attempt_ids_default_to_now() -> None:
    ids = AttemptIds("h")
    before = int(time.time())
    made = [ids.next() for _ in range(20)]
    assert len(set(made)) == 20
    first = made[0].split("-", 1)[1]
    assert first in {b62(before + d) for d in range(0, 3)}


def test_file_names_exactly() -> None:
    attempt = "host-1r31eq"
    assert output_name(attempt) == "output-host-host-1r31eq.log"
    assert runner_log_name(attempt) == "runner-host-host-1r31eq.log"
    assert scrape_name(attempt) == "scrape-host-host-1r31eq.json"
    attempt = AttemptIds("gpu7").next(1700000000)
    assert output_name(attempt) == "output-host-gpu7-1r31eq.log"
    assert runner_log_name(attempt) == "runner-host-gpu7-1r31eq.log"
    assert scrape_name(attempt) == "scrape-host-gpu7-1r31eq.json"


@pytest.mark.parametrize("key, expected", [
    ("experiments/X/_metadata.tar", "experiments/X/_metadata"),
    ("experiments/X/_metadata.tar.gz", "experiments/X/_metadata"),
    ("experiments/X/_metadata.tgz", "experiments/X/_metadata"),
    ("experiments/X/_metadata.tar.bz2", "experiments/X/_metadata"),
    ("experiments/X/_metadata.tar.xz", "experiments/X/_metadata"),
    ("experiments/X/_metadata.tar.zst", "experiments/X/_metadata"),
    ("s3://minio:9000/bkt/experiments/X/_metadata.tar", "s3://minio:9000/bkt/experiments/X/_metadata"),
    ("experiments/X/_metadata", "experiments/X/_metadata"),
    ("experiments/X/_metadata.zip", "experiments/X/_metadata.zip"),
    ("experiments/X/_metadata.tar.gz.bak", "experiments/X/_metadata.tar.gz.bak"),
    ("experiments/X.tar/_metadata", "experiments/X.tar/_metadata"),
    ("experiments/X/_metadatatar", "experiments/X/_metadatatar"),
])
def test_strip_archive_suffix(key: str, expected: str) -> None:
    assert strip_archive_suffix(key) == expected


def artifact(root: str, label: str, mutable: bool = True, **extra) -> dict:
    key = f"experiments/exp-1/{label}.tar"
    return {"key": key, "bucket": "bkt", "qualified": f"{root}/{key}", "mutable": mutable,
            "unpack": True, **extra}


def make_request(root: str, project: str | None = "proj") -> dict:
    creds = {"aws": {"access_key": ACCESS, "secret_access_key": SECRET}}
    return {
        "experiment": {
            "key": "exp-1", "project": project, "filename": "train.py", "args": [],
            "artifacts": {
                "workspace": artifact(root, "workspace", mutable=False, credentials=creds),
                "_metadata": artifact(root, "_metadata", credentials=creds),
            },
        },
        "config": {"env": {"AWS_SECRET_ACCESS_KEY": ENV_SECRET, "EPOCHS": "3"}},
    }


def test_metadata_prefix_url() -> None:
    request = make_request("s3://minio:9000/bkt")
    assert metadata_prefix_url(request) == "s3://minio:9000/bkt/experiments/exp-1/_metadata"
    request["experiment"]["artifacts"]["_metadata"]["qualified"] = \
        "gs://bkt/experiments/exp-1/_metadata.tar.gz"
    assert metadata_prefix_url(request) == "gs://bkt/experiments/exp-1/_metadata"
    del request["experiment"]["artifacts"]["_metadata"]
    assert metadata_prefix_url(request) is None
    assert metadata_prefix_url({"experiment": {}}) is None


def test_record_url_from_qualified_url_minus_key() -> None:
    request = make_request("s3://minio:9000/bkt")
    assert store_root_url(request) == "s3://minio:9000/bkt"
    assert record_url(request) == "s3://minio:9000/bkt/metadata/proj/exp-1.json"


def test_record_url_skips_artifacts_whose_url_does_not_end_with_key() -> None:
    request = make_request("gs://bkt")
    arts = request["experiment"]["artifacts"]
    arts["workspace"]["qualified"] = "gs://other/somewhere/else.tar"
    assert record_url(request) == "gs://bkt/metadata/proj/exp-1.json"


def test_record_url_without_project_or_storage() -> None:
    assert record_url(make_request("file:///srv/s", project=None)) == \
        "file:///srv/s/metadata/_default/exp-1.json"
    no_storage = {"experiment": {"key": "exp-1", "artifacts": {
        "workspace": {"local": "/home/client/ws", "key": "ws.tar"}}}}
    assert record_url(no_storage) is None


def test_record_url_override() -> None:
    request = make_request("s3://minio:9000/bkt")
    assert record_url(request, "file:///srv/meta/") == "file:///srv/meta/metadata/proj/exp-1.json"
    no_storage = {"experiment": {"key": "k", "project": "p", "artifacts": {}}}
    assert record_url(no_storage, "file:///srv/meta") == "file:///srv/meta/metadata/p/k.json"


def test_write_record_writes_a_redacted_record(tmp_path: Path) -> None:
    root = f"file://{tmp_path}/store"
    request = make_request(root)
    write_record(request, status="running", attempt_id="host-1r31eq", attempts=1, final=False,
                 hostname="host")
    path = tmp_path / "store" / "metadata" / "proj" / "exp-1.json"
    assert path.is_file()
    text = path.read_text()
    for secret in (SECRET, ACCESS, ENV_SECRET):
        assert secret not in text
    record = json.loads(text)
    assert record["status"] == "running"
    assert record["final"] is False
    assert record["attempt"] == "host-1r31eq"
    assert record["attempts"] == 1
    assert record["host"] == "host"
    assert re.fullmatch(ISO_UTC, record["updated"])
    exp = record["request"]["experiment"]
    assert exp["key"] == "exp-1"
    assert exp["artifacts"]["workspace"]["key"] == "experiments/exp-1/workspace.tar"
    assert exp["artifacts"]["workspace"]["credentials"]["aws"]["secret_access_key"] == "***"
    assert record["request"]["config"]["env"] == {"AWS_SECRET_ACCESS_KEY": "***", "EPOCHS": "3"}
    # the caller's request is untouched
    assert request["experiment"]["artifacts"]["workspace"]["credentials"]["aws"][
        "secret_access_key"] == SECRET

    # a later write replaces the record
    write_record(request, status="completed", attempt_id="host-1r31er", attempts=1, final=True,
                 hostname="host")
    record = json.loads(path.read_text())
    assert (record["status"], record["final"], record["attempt"]) == \
        ("completed", True, "host-1r31er")
    assert not [p for p in path.parent.iterdir() if p.name != "exp-1.json"]


def test_write_record_with_override(tmp_path: Path) -> None:
    request = make_request("s3://minio:9000/bkt")
    write_record(request, status="failed", attempt_id="h-1", attempts=3, final=True,
                 hostname="h", override=f"file://{tmp_path}/meta")
    record = json.loads((tmp_path / "meta" / "metadata" / "proj" / "exp-1.json").read_text())
    assert record["status"] == "failed" and record["attempts"] == 3
    assert SECRET not in json.dumps(record)


def test_write_record_without_storage_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = []
    monkeypatch.setattr(metadata, "open_for_request", lambda *a, **k: opened.append(a))
    request = {"experiment": {"key": "k", "artifacts": {}}}
    assert write_record(request, status="running", attempt_id="h-1", attempts=0, final=False,
                        hostname="h") is None
    assert opened == []


def test_new_scrape_document() -> None:
    attempt = Attempt(attempt_id="host-1r31eq", queue="local_q", token="t", attempts=1, key="exp-1",
              project="proj", request={"experiment": {"owner": "alice", "time_added": 1.5}},
              workdir="/w", resources={}, taken_at=1.0)
    before = time.time()
    doc = metadata.new_scrape_document(attempt, "host")
    assert set(doc) == {"runner", "experiment", "studioml", "asset"}
    assert doc["studioml"]["status"] == "running"
    assert doc["studioml"]["experiment"] == "exp-1"
    assert doc["studioml"]["project"] == "proj"
    assert doc["runner"]["host"] == "host"
    assert doc["runner"]["attempt"] == "host-1r31eq"
    assert doc["runner"]["attempt_number"] == 2
    assert re.fullmatch(ISO_UTC, doc["runner"]["start"])
    assert parse_iso(doc["runner"]["start"]) >= before - 0.001
    assert doc["experiment"] == {}
    assert len(doc["asset"]) == 36
    assert metadata.new_scrape_document(attempt, "host")["asset"] != doc["asset"]


def test_attempt_ids_do_not_repeat_across_restarts(tmp_path) -> None:
    clock = tmp_path / "work" / ".attempt-clock"
    first = AttemptIds("host", clock).next(1700000000)
    again = AttemptIds("host", clock).next(1700000000)  # a new runner in the same second
    assert first == "host-1r31eq" and again != first
    assert _fast.b62decode(again.rsplit("-", 1)[1]) == 1700000001


# -- times, qualified-only artifacts, object names ------------------------------------------

def test_iso_utc_is_the_seeds_form() -> None:
    assert metadata.iso_utc(1540319143.511) == "2018-10-23T18:25:43.511Z"
    assert metadata.iso_utc(0) == "1970-01-01T00:00:00.000Z"
    now = time.time()
    assert abs(parse_iso(metadata.iso_utc(now)) - now) < 0.001


@pytest.mark.parametrize("url, bucket, root", [
    ("s3://minio:9000/bkt/experiments/exp-1/_metadata.tar", "bkt", "s3://minio:9000/bkt"),
    ("gs://bkt/experiments/exp-1/_metadata.tar", None, "gs://bkt"),
    ("file:///srv/data/bkt/experiments/exp-1/_metadata.tar", "bkt", "file:///srv/data/bkt"),
])
def test_record_url_of_artifacts_given_only_by_qualified(url, bucket, root) -> None:
    request = make_request("s3://unused/bkt")
    for artifact in request["experiment"]["artifacts"].values():
        del artifact["key"]
        artifact["qualified"] = url
        if bucket is None:
            artifact.pop("bucket")
    assert store_root_url(request) == root
    assert record_url(request) == f"{root}/metadata/proj/exp-1.json"


def test_a_keyed_artifact_wins_over_a_qualified_only_one() -> None:
    request = make_request("s3://minio:9000/bkt")
    arts = request["experiment"]["artifacts"]
    del arts["_metadata"]["key"]
    arts["_metadata"]["qualified"] = "s3://other:9000/elsewhere/x/_metadata.tar"
    assert store_root_url(request) == "s3://minio:9000/bkt"


def test_qualified_only_file_artifact_without_bucket_has_no_root() -> None:
    request = make_request("file:///srv/bkt")
    for artifact in request["experiment"]["artifacts"].values():
        del artifact["key"]
        artifact.pop("bucket")
    assert record_url(request) is None


def test_write_record_for_qualified_only_artifacts(tmp_path: Path) -> None:
    request = make_request(f"file://{tmp_path}/bkt")
    for artifact in request["experiment"]["artifacts"].values():
        del artifact["key"]
    write_record(request, status="running", attempt_id="host-1r31eq", attempts=0, final=False,
                 hostname="host")
    record = json.loads((tmp_path / "bkt" / "metadata" / "proj" / "exp-1.json").read_text())
    assert record["status"] == "running" and SECRET not in json.dumps(record)


@pytest.mark.parametrize("root", ["s3://minio:9000/bkt", "gs://bkt"])
def test_keys_too_long_for_an_object_store_are_refused(root: str) -> None:
    request = make_request(root)
    metadata.check_object_names(request, "host")  # an ordinary key passes
    request["experiment"]["key"] = "k" * 1020  # the record's name passes 1024 bytes
    with pytest.raises(BadRequest, match="metadata record .* 10[0-9][0-9] bytes"):
        metadata.check_object_names(request, "host")


def test_keys_too_long_for_a_file_system_are_refused(tmp_path: Path) -> None:
    request = make_request(f"file://{tmp_path}/bkt")
    # k…k.json.partial-<12 hex>, the file the store writes first: 256 bytes, one over NAME_MAX
    request["experiment"]["key"] = "k" * 230
    with pytest.raises(BadRequest, match="name of 256 bytes .* temporary suffix"):
        metadata.check_object_names(request, "host")
    request["experiment"]["key"] = "k" * 229
    metadata.check_object_names(request, "host")
    record = tmp_path / "bkt" / "metadata" / "proj" / ("k" * 229 + ".json")
    write_record(request, status="running", attempt_id="host-1r31eq", attempts=0, final=False,
                 hostname="host")
    assert json.loads(record.read_text())["status"] == "running"  # the longest that fits
    request["experiment"]["key"] = "/".join(["k" * 200] * 21)
    with pytest.raises(BadRequest, match="path of"):
        metadata.check_object_names(request, "host")


def test_mutable_artifacts_named_too_long_for_their_store_are_refused(tmp_path: Path) -> None:
    """A mutable artifact is uploaded once the run ends: a name its store refuses would
    lose the run's outputs after it ran, so it is refused at admission."""
    request = make_request(f"file://{tmp_path}/bkt")
    output = {"mutable": True, "qualified": f"file://{tmp_path}/bkt/experiments/exp-1/"
                                            + "o" * 240 + ".tar"}
    request["experiment"]["artifacts"]["output"] = output
    with pytest.raises(BadRequest, match="mutable artifact 'output'"):
        metadata.check_object_names(request, "host")
    output["qualified"] = f"file://{tmp_path}/bkt/experiments/exp-1/output.tar"
    metadata.check_object_names(request, "host")
    output["mutable"] = False  # only read: its name is the store's already
    output["qualified"] = f"s3://minio:9000/bkt/{'o' * 1100}.tar"
    metadata.check_object_names(request, "host")
    output["mutable"] = True
    with pytest.raises(BadRequest, match="mutable artifact 'output'.* 11[0-9][0-9] bytes"):
        metadata.check_object_names(request, "host")


def test_metadata_file_names_count_the_host_name() -> None:
    request = make_request("s3://minio:9000/bkt")
    arts = request["experiment"]["artifacts"]
    arts["_metadata"]["key"] = "x" * 980 + "/_metadata.tar"
    arts["_metadata"]["qualified"] = "s3://minio:9000/bkt/" + arts["_metadata"]["key"]
    metadata.check_object_names(request, "h")
    with pytest.raises(BadRequest, match="metadata file"):
        metadata.check_object_names(request, "a-much-longer-host-name.example.com")


def test_override_store_is_the_one_checked(tmp_path: Path) -> None:
    request = make_request("s3://minio:9000/bkt")
    request["experiment"]["key"] = "k" * 300
    metadata.check_object_names(request, "host")
    with pytest.raises(BadRequest, match="metadata record"):
        metadata.check_object_names(request, "host", override=f"file://{tmp_path}/store")


def test_metadata_files_outside_the_file_store_roots_are_refused(tmp_path: Path) -> None:
    """An artifact ``key`` that strips its URL above the store's folder would put the
    record outside ``--file-store-roots`` (``file:///tmp/metadata/…``): refused at
    admission; the operator's own ``--metadata-store`` override is allowed."""
    from runner import storage
    from runner.storage.file import real_roots

    store = tmp_path / "store"
    request = make_request(f"file://{store}/bkt")
    saved = storage.base.SETTINGS
    storage.configure(file_roots=real_roots([store, tmp_path / "meta"]))
    try:
        metadata.check_object_names(request, "host")  # inside: fine
        for artifact in request["experiment"]["artifacts"].values():
            artifact["key"] = "store/bkt/" + artifact["key"]  # the root is now tmp_path
        with pytest.raises(BadRequest, match="metadata record: file:// path .*/metadata/proj/"
                                             "exp-1.json is outside the runner's file stores"):
            metadata.check_object_names(request, "host")
        request = make_request(f"file://{store}/bkt")
        metadata.check_object_names(request, "host", override=f"file://{tmp_path}/meta")
    finally:
        storage.base.SETTINGS = saved
