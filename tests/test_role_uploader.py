"""The uploader alone: hosted in a thread on the in-memory bus, uploading into the stub
store (runner.storage.memory); its final request always ends in ``AttemptDone``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner import attempt_files, metadata, protocol
from runner.archive import tree_digest

from .roles_support import RoleRig, eventually

COMPLETED = protocol.Outcome(status="completed", exit_code=0)


@pytest.fixture()
def rig():
    rig = RoleRig("--storage-retry", "0")
    rig.host("uploader")
    yield rig
    rig.close()


def placed(rig: RoleRig, request: dict, output: dict[str, str] | None) -> protocol.Attempt:
    """An attempt whose inputs the cache manager placed (``output`` downloaded as given,
    or an empty output folder when None)."""
    attempt = rig.attempt(request)
    workdir = Path(attempt.workdir)
    (workdir / "output").mkdir(parents=True)
    metadata.metadata_folder(workdir).mkdir(parents=True)
    digests = {}
    for name, text in (output or {}).items():
        (workdir / "output" / name).write_text(text)
    if output is not None:
        digests["output"] = tree_digest(workdir / "output")
    metadata.write_downloaded_digests(workdir, digests)
    folder = metadata.metadata_folder(workdir)
    (folder / metadata.output_name(attempt.attempt_id)).write_text("hi\n")
    return attempt


def final(rig: RoleRig, attempt: protocol.Attempt) -> protocol.AttemptDone:
    rig.probe("scraper").send("uploader", protocol.UploadRequest(
        attempt=attempt, final=True, outcome=COMPLETED))
    return rig.probe("fetcher").expect(protocol.AttemptDone,
                                       lambda m: m.attempt.attempt_id == attempt.attempt_id)


def test_a_final_upload_saves_what_changed_and_reports_done(rig) -> None:
    request = rig.request()
    attempt = placed(rig, request, None)
    (Path(attempt.workdir) / "output" / "result.txt").write_text("42\n")
    done = final(rig, attempt)
    assert done.upload_error == "" and done.outcome.status == "completed"
    output_url = request["experiment"]["artifacts"]["output"]["qualified"]
    log_url = f"{metadata.metadata_prefix_url(request)}/{metadata.output_name(attempt.attempt_id)}"
    assert output_url in rig.objects.puts() and rig.objects.read(log_url) == b"hi\n"
    # removed right after the AttemptDone (no --debug)
    assert eventually(lambda: not Path(attempt.workdir).exists())


def test_an_output_left_as_downloaded_is_not_uploaded_again(rig) -> None:
    request = rig.request()
    attempt = placed(rig, request, {"model.txt": "from the last attempt\n"})
    assert final(rig, attempt).upload_error == ""
    assert request["experiment"]["artifacts"]["output"]["qualified"] not in rig.objects.puts()


def test_mutable_folders_wait_until_the_inputs_are_placed(rig) -> None:
    request = rig.request()
    attempt = placed(rig, request, None)
    (Path(attempt.workdir) / metadata.DOWNLOADED_DIGESTS).unlink()  # still downloading
    (Path(attempt.workdir) / "output" / "half.bin").write_text("half")
    assert final(rig, attempt).upload_error == ""
    assert request["experiment"]["artifacts"]["output"]["qualified"] not in rig.objects.puts()


def test_a_failed_upload_is_reported_in_attempt_done(rig) -> None:
    request = rig.request()
    request["experiment"]["artifacts"]["output"]["qualified"] = "memory://no-key"
    attempt = placed(rig, request, None)
    (Path(attempt.workdir) / "output" / "result.txt").write_text("42\n")
    done = final(rig, attempt)
    assert "StorageError" in done.upload_error


def test_the_running_record_is_written_when_the_attempt_opens(rig) -> None:
    request = rig.request()
    attempt = placed(rig, request, None)
    rig.probe("scraper").send("uploader", protocol.UploadRequest(
        attempt=attempt, final=False, record_only=True))
    url = metadata.record_url(request)
    assert eventually(lambda: url in rig.objects.urls())  # held RECORD_AFTER first
    record = json.loads(rig.objects.read(url))
    assert record["status"] == "running" and record["final"] is False


def test_only_the_attempts_own_metadata_files_are_uploaded(rig) -> None:
    """A file in the metadata folder under another name (a forged scrape document of
    another attempt) is never uploaded; neither is the ``_metadata`` folder the run can
    write inside its working directory."""
    request = rig.request()
    attempt = placed(rig, request, None)
    folder = metadata.metadata_folder(attempt.workdir)
    (folder / metadata.scrape_name("host-zzzzzz")).write_text('{"studioml": {}}')
    inside = Path(attempt.workdir) / "_metadata"
    inside.mkdir()
    (inside / metadata.scrape_name(attempt.attempt_id)).write_text('{"forged": true}')
    assert final(rig, attempt).upload_error == ""
    prefix = metadata.metadata_prefix_url(request)
    assert sorted(url for url in rig.objects.urls() if url.startswith(prefix + "/")) == [
        f"{prefix}/{metadata.output_name(attempt.attempt_id)}"]


def test_a_scrape_document_sent_in_memory_is_uploaded_in_place_of_the_file(rig) -> None:
    request = rig.request()
    attempt = placed(rig, request, None)
    name = metadata.scrape_name(attempt.attempt_id)
    (metadata.metadata_folder(attempt.workdir) / name).write_text('{"status": "running"}')
    rig.probe("scraper").send("uploader", protocol.UploadRequest(
        attempt=attempt, final=True, outcome=COMPLETED, scrape_document='{"status": "failed"}'))
    done = rig.probe("fetcher").expect(protocol.AttemptDone)
    assert done.upload_error == ""
    url = f"{metadata.metadata_prefix_url(request)}/{name}"
    assert rig.objects.read(url) == b'{"status": "failed"}'


def test_a_released_attempt_uploads_its_own_metadata_files_only(rig) -> None:
    """An attempt a dead runner left (marked released at start-up) never overwrites the
    request's mutable artifacts: a newer attempt may have written them."""
    request = rig.request()
    attempt = placed(rig, request, None)
    (Path(attempt.workdir) / "output" / "result.txt").write_text("from the old attempt\n")
    attempt_files.write(rig.config.runtime_dir, attempt.attempt_id, "released", {})
    done = final(rig, attempt)
    assert done.upload_error == ""
    output_url = request["experiment"]["artifacts"]["output"]["qualified"]
    log_url = f"{metadata.metadata_prefix_url(request)}/{metadata.output_name(attempt.attempt_id)}"
    assert output_url not in rig.objects.puts() and rig.objects.read(log_url) == b"hi\n"
    assert metadata.record_url(request) not in rig.objects.urls()
