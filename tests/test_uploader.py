"""The uploader's choices, driven directly (no bus, no supervisor): what an attempt's
record-only, periodic and final requests upload, and which metadata files are read again."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from runner import _fast, metadata, protocol
from runner.config import load
from runner.roles import uploader as uploader_module
from runner.roles.uploader import Uploader
from runner.storage.file import FileStore

OUTCOME = protocol.Outcome(status="completed", error="", message="", exit_code=0)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store_root = tmp_path / "store"
    store_root.mkdir()
    workdir = tmp_path / "work" / "host-1r31eq"
    metadata.metadata_folder(workdir).mkdir(parents=True)
    (workdir / "output").mkdir(parents=True)
    metadata.write_downloaded_digests(workdir, {})

    def artifact(label: str) -> dict:
        key = f"experiments/exp-1/{label}.tar"
        return {"key": key, "mutable": True, "unpack": True,
                "qualified": f"file://{store_root}/{key}"}

    request = {"experiment": {"key": "exp-1", "project": "proj", "filename": "x.py",
                              "artifacts": {"_metadata": artifact("_metadata"),
                                            "output": artifact("output")}},
               "config": {"env": {}}}
    attempt = protocol.Attempt(attempt_id="x", queue="local_q", token="t", attempts=0,
                       key="exp-1", project="proj", request=request, workdir=str(workdir),
                       resources={}, taken_at=time.time())
    config = load(["--working-dir", str(tmp_path / "work"), "--runtime-dir", str(tmp_path / "run"),
                   "--debug"], environ={})
    role = Uploader(config, bus=None)
    role.initialize()
    puts: list[str] = []
    hashed: list[str] = []
    real_put, real_put_bytes, real_hash = FileStore.put, FileStore.put_bytes, _fast.content_hash
    real_put_stream = FileStore.put_stream

    def put_stream(self, url, fill):
        puts.append(url.rsplit("/", 1)[-1])
        return real_put_stream(self, url, fill)

    def put(self, url, src):
        puts.append(url.rsplit("/", 1)[-1])
        return real_put(self, url, src)

    def put_bytes(self, url, data):
        puts.append("record" if "/metadata/" in url else url.rsplit("/", 1)[-1])
        return real_put_bytes(self, url, data)

    def content_hash(path):
        hashed.append(Path(path).name)
        return real_hash(path)

    monkeypatch.setattr(FileStore, "put", put)
    monkeypatch.setattr(FileStore, "put_bytes", put_bytes)
    monkeypatch.setattr(FileStore, "put_stream", put_stream)
    monkeypatch.setattr(_fast, "content_hash", content_hash)
    lock = threading.Lock()

    def send(final=False, record_only=False, labels=None):
        puts.clear()
        hashed.clear()
        role.upload(protocol.UploadRequest(attempt=attempt, final=final, record_only=record_only,
                                           outcome=OUTCOME if final else None,
                                           labels=labels), lock)
        return sorted(puts), sorted(hashed)

    yield {"role": role, "attempt": attempt, "workdir": workdir, "send": send, "store": store_root,
           "request": request}
    role.pool.shutdown(wait=True)


def write_old(path: Path, text: str) -> None:
    """Write ``text`` and date the file 10 s back (not "racy": its stat can be trusted)."""
    path.write_text(text)
    past = time.time() - 10
    os.utime(path, (past, past))


def test_attempt_open_writes_the_record_only(setup):
    write_old(metadata.metadata_folder(setup["workdir"]) / "runner-host-x.log", "request\n")
    assert setup["send"](record_only=True) == (["record"], [])
    record = json.loads(Path(metadata.record_url(setup["request"])[len("file://"):]).read_text())
    assert record["status"] == "running" and record["final"] is False


def test_unchanged_metadata_file_is_neither_hashed_nor_uploaded_again(setup):
    folder = metadata.metadata_folder(setup["workdir"])
    write_old(folder / "output-host-x.log", "line 1\n")
    write_old(folder / "runner-host-x.log", "request\n")
    puts, hashed = setup["send"]()
    assert puts == ["output-host-x.log", "record", "runner-host-x.log"]
    assert hashed == ["output-host-x.log", "runner-host-x.log"]  # kept for the next request

    assert setup["send"]() == ([], [])  # same stat: not even read

    with open(folder / "output-host-x.log", "a") as handle:
        handle.write("line 2\n")
    puts, hashed = setup["send"]()
    assert puts == ["output-host-x.log"] and hashed == ["output-host-x.log"]
    uploaded = setup["store"] / "experiments" / "exp-1" / "_metadata" / "output-host-x.log"
    assert uploaded.read_text() == "line 1\nline 2\n"


def test_rewritten_file_with_the_same_content_is_hashed_not_uploaded(setup):
    scrape = metadata.metadata_folder(setup["workdir"]) / "scrape-host-x.json"
    write_old(scrape, '{"a": 1}')
    assert setup["send"]()[0] == ["record", "scrape-host-x.json"]
    temporary = scrape.with_suffix(".json.tmp")
    temporary.write_text('{"a": 1}')
    os.replace(temporary, scrape)  # as the scraper saves: a new inode, a new mtime
    assert setup["send"]() == ([], ["scrape-host-x.json"])


def test_recently_modified_file_is_hashed_even_with_the_same_stat(setup):
    log = metadata.metadata_folder(setup["workdir"]) / "output-host-x.log"
    log.write_text("fresh\n")  # modified just now: a same-size rewrite could hide in the tick
    setup["send"]()
    assert setup["send"]() == ([], ["output-host-x.log"])


def test_final_request_uploads_every_file_without_hashing_and_no_running_record(setup):
    folder = metadata.metadata_folder(setup["workdir"])
    for name in ("output-host-x.log", "runner-host-x.log", "scrape-host-x.json"):
        (folder / name).write_text(name)
    (folder / "scrape-host-x.json.tmp").write_text("half")
    puts, hashed = setup["send"](final=True)
    assert puts == ["output-host-x.log", "runner-host-x.log", "scrape-host-x.json"]
    assert hashed == []
    assert not Path(metadata.record_url(setup["request"])[len("file://"):]).exists()
    done = setup["role"]._outbox.get_nowait()
    assert done[0] == "fetcher" and isinstance(done[1], protocol.AttemptDone)
    assert done[1].upload_error == ""


def test_final_request_uploads_what_changed_since_a_periodic_one(setup):
    folder = metadata.metadata_folder(setup["workdir"])
    write_old(folder / "runner-host-x.log", "request\n")
    write_old(folder / "output-host-x.log", "")
    setup["send"]()
    with open(folder / "runner-host-x.log", "a") as handle:
        handle.write("attempt ended completed\n")
    (setup["workdir"] / "output" / "output").write_text("hello\n")
    puts, hashed = setup["send"](final=True)
    assert puts == ["output.tar", "runner-host-x.log"]
    assert "output-host-x.log" not in hashed and "runner-host-x.log" in hashed


def test_empty_output_artifact_is_not_uploaded(setup):
    assert uploader_module.is_empty(setup["workdir"] / "output")
    assert "output.tar" not in setup["send"](final=True)[0]


def record_path(setup) -> Path:
    return Path(metadata.record_url(setup["request"])[len("file://"):])


def test_running_record_is_held_and_dropped_when_the_attempt_ends_first(setup):
    role, attempt = setup["role"], setup["attempt"]
    role.handle(protocol.UploadRequest(attempt=attempt, final=False, record_only=True))
    role.tick()  # not due yet
    role.handle(protocol.UploadRequest(attempt=attempt, final=True, outcome=OUTCOME))
    role.pool.shutdown(wait=True)
    assert role.held_records == {}
    assert not record_path(setup).exists()  # the fetcher writes the settled record


def test_running_record_is_written_once_due(setup, monkeypatch):
    monkeypatch.setattr(uploader_module, "RECORD_AFTER", 0.0)
    role, attempt = setup["role"], setup["attempt"]
    role.handle(protocol.UploadRequest(attempt=attempt, final=False, record_only=True))
    assert role.tick_interval() == 0.0
    role.tick()
    role.pool.shutdown(wait=True)
    assert json.loads(record_path(setup).read_text())["status"] == "running"
    assert role.tick_interval() == role.TICK


def test_a_periodic_request_uploads_only_the_labels_that_are_due(setup):
    """Per-artifact saveFrequency: the scraper names the due labels (``_metadata``: the
    metadata files); the others wait for their own period or the final upload."""
    write_old(metadata.metadata_folder(setup["workdir"]) / "runner-host-x.log", "request\n")
    (setup["workdir"] / "output" / "output").write_text("hello\n")
    assert setup["send"](labels=("output",))[0] == ["output.tar", "record"]
    (setup["workdir"] / "output" / "output").write_text("hello again\n")
    assert setup["send"](labels=("_metadata",))[0] == ["runner-host-x.log"]
    assert setup["send"](labels=())[0] == []
    assert setup["send"](final=True, labels=("_metadata",))[0] == ["output.tar"]
