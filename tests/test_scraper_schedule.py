"""The scraper's save schedule: saveWorkspaceFrequency and per-artifact saveFrequency."""
from __future__ import annotations

from runner import protocol
from runner.roles.scraper import Attempt, due_labels


def attempt_for(own: dict, common: float = 3600.0) -> Attempt:
    artifacts = {label: {"mutable": True} for label in ("modeldir", "output", "_metadata")}
    artifacts["workspace"] = {"mutable": False}
    job = protocol.Job(job_id="h-1", queue="local_q", token="t", attempts=0, key="k",
                       project="p", request={"experiment": {"artifacts": artifacts}},
                       workdir="/nonexistent", resources={}, taken_at=0.0,
                       save_frequency=common, artifact_save_frequency=own)
    return Attempt(job=job, document={}, masker=None, output_log=None, output_artifact=None,
                   runner_log=None, scrape_path=None, next_save=common,
                   next_saves={label: seconds for label, seconds in own.items()})


def test_an_artifact_with_its_own_period_is_due_on_it_alone() -> None:
    attempt = attempt_for({"modeldir": 10.0})
    assert due_labels(attempt, 5.0) is None
    assert due_labels(attempt, 10.0) == ("modeldir",)
    assert due_labels(attempt, 15.0) is None
    assert due_labels(attempt, 20.0) == ("modeldir",)



def test_the_common_period_leaves_out_artifacts_with_their_own() -> None:
    attempt = attempt_for({"modeldir": 300.0}, common=60.0)
    # The common period covers the rest (never the workspace: it is not mutable).
    assert due_labels(attempt, 60.0) == ("_metadata", "output")
    assert due_labels(attempt, 61.0) is None
    assert due_labels(attempt, 120.0) == ("_metadata", "output")
    assert due_labels(attempt, 300.0) == ("_metadata", "modeldir", "output")


def test_the_metadata_files_may_have_their_own_period() -> None:
    attempt = attempt_for({"_metadata": 30.0}, common=60.0)
    assert due_labels(attempt, 30.0) == ("_metadata",)
    assert due_labels(attempt, 60.0) == ("_metadata", "modeldir", "output")


def test_the_common_period_is_due_even_with_nothing_mutable() -> None:
    attempt = attempt_for({}, common=60.0)
    attempt.job.request["experiment"]["artifacts"] = {"workspace": {"mutable": False}}
    assert due_labels(attempt, 60.0) == ()  # still asks for the metadata-store record
