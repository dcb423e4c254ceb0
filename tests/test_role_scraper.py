"""The scraper alone: hosted in a thread on the in-memory bus; it writes an attempt's
metadata files and asks the uploader for the record, the periodic and the final uploads."""
from __future__ import annotations

import json
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
