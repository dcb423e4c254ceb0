"""The scraper alone: hosted in a thread on the in-memory bus; it writes an attempt's
metadata files and asks the uploader for the record, the periodic and the final uploads."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from runner import metadata, protocol

from .roles_support import RoleRig

COMPLETED = protocol.Outcome(status="completed", exit_code=0)


@pytest.fixture()
def rig():
    rig = RoleRig()
    rig.host("scraper")
    yield rig
    rig.close()


def test_an_attempt_is_opened_scraped_and_closed_with_a_final_upload(rig) -> None:
    attempt = rig.attempt(rig.request())
    executor = rig.probe("executor")
    executor.send("scraper", protocol.AttemptOpened(attempt=attempt))
    first = rig.probe("uploader").expect(protocol.UploadRequest)
    assert first.record_only and not first.final and first.attempt.attempt_id == attempt.attempt_id

    line = b'{"experiment": {"loss": 0.25}}\n'
    executor.send("scraper", protocol.OutputChunk(attempt_id=attempt.attempt_id, data=line))
    executor.send("scraper", protocol.AttemptEnded(attempt=attempt, outcome=COMPLETED,
                                                   facts={"exit_code": 0, "pid": 1,
                                                          "output_sent": len(line)}))
    final = rig.probe("uploader").expect(protocol.UploadRequest, lambda m: m.final)
    assert final.outcome.status == "completed" and final.metadata
    phase = rig.probe("supervisor").expect(
        protocol.AttemptPhase, lambda m: m.phase == protocol.PHASE_UPLOADING)
    assert phase.detail["status"] == "completed"

    folder = metadata.metadata_folder(attempt.workdir)
    document = json.loads((folder / metadata.scrape_name(attempt.attempt_id)).read_text())
    assert document["experiment"] == {"loss": 0.25}
    assert document["studioml"]["status"] == "completed"
    assert (folder / metadata.output_name(attempt.attempt_id)).read_bytes() == line


def test_an_attempt_is_not_closed_twice(rig) -> None:
    attempt = rig.attempt(rig.request())
    executor = rig.probe("executor")
    executor.send("scraper", protocol.AttemptOpened(attempt=attempt))
    ended = protocol.AttemptEnded(attempt=attempt, outcome=COMPLETED, facts={})
    executor.send("scraper", ended)
    rig.probe("uploader").expect(protocol.UploadRequest, lambda m: m.final)
    executor.send("scraper", ended)  # a restarted executor reporting again
    assert [m for m in rig.probe("uploader").quiet(protocol.UploadRequest, 0.5) if m.final] == []


@pytest.mark.parametrize("used, hdd, status, error", [
    (2_000_000, 1_000_000, "failed", "DiskFull"),  # the run filled it: counted
    (0, 100_000_000, "cancelled", "AttemptFilesUnwritable"),  # the host's fault: handed back
])
def test_an_attempt_whose_files_hit_a_full_disk_still_ends(rig, caplog, used, hdd, status,
                                                           error) -> None:
    """A write to the attempt's files that fails with ENOSPC (the output log is the
    kernel's /dev/full: every write to it fails so, at the real write call) stops the run,
    never loops on the broken file, and the attempt still ends with its fate and its final
    scrape document in memory."""
    attempt = rig.attempt(rig.request(), save_frequency=0.0,
                          resources={"cpus": 1, "devices": "-1", "hdd": hdd})
    folder = metadata.metadata_folder(attempt.workdir)
    folder.mkdir(parents=True)
    (folder / metadata.output_name(attempt.attempt_id)).symlink_to("/dev/full")
    (Path(attempt.workdir) / "modeldir").mkdir(parents=True)
    (Path(attempt.workdir) / "modeldir" / "weights").write_bytes(b"w" * used)
    executor = rig.probe("executor")
    executor.send("scraper", protocol.AttemptOpened(attempt=attempt))
    chunk = b"x" * 65536 + b"\n"  # more than a write buffer: written through at once
    executor.send("scraper", protocol.OutputChunk(attempt_id=attempt.attempt_id, data=chunk,
                                                  offset=0))
    stop = executor.expect(protocol.StopRuns)
    assert stop.cause == "disk_full" and stop.attempt_ids == [attempt.attempt_id]
    assert "No space left" in stop.reason
    executor.send("scraper", protocol.OutputChunk(attempt_id=attempt.attempt_id, data=chunk,
                                                  offset=len(chunk)))
    time.sleep(0.6)  # a few periodic saves (save_frequency 0) meet the broken files
    executor.send("scraper", protocol.AttemptEnded(attempt=attempt, outcome=COMPLETED,
                                                   facts={"exit_code": 0, "pid": 1}))
    final = rig.probe("uploader").expect(protocol.UploadRequest, lambda m: m.final)
    assert final.outcome.status == status and final.outcome.error == error
    assert final.outcome.message.startswith("disk full: ")
    document = json.loads(final.scrape_document)
    assert document["studioml"]["status"] == status
    assert "No space left" in document["runner"]["files_error"]
    assert document["runner"]["output_bytes"] == 2 * len(chunk)
    assert not [r for r in caplog.records if "periodic work failed" in r.getMessage()
                or "failed to handle" in r.getMessage()]
