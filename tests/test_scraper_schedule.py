"""The scraper's save schedule: saveWorkspaceFrequency and per-artifact saveFrequency."""
from __future__ import annotations

from runner import protocol
from runner.roles.scraper import AttemptState, due_labels


def state_for(own: dict, common: float = 3600.0) -> AttemptState:
    artifacts = {label: {"mutable": True} for label in ("modeldir", "output", "_metadata")}
    artifacts["workspace"] = {"mutable": False}
    attempt = protocol.Attempt(attempt_id="h-1", queue="local_q", token="t", attempts=0, key="k",
                       project="p", request={"experiment": {"artifacts": artifacts}},
                       workdir="/nonexistent", resources={}, taken_at=0.0,
                       save_frequency=common, artifact_save_frequency=own)
    return AttemptState(attempt=attempt, document={}, masker=None, output_log=None, output_artifact=None,
                   runner_log=None, scrape_path=None, next_save=common,
                   next_saves={label: seconds for label, seconds in own.items()})


def test_an_artifact_with_its_own_period_is_due_on_it_alone() -> None:
    state = state_for({"modeldir": 10.0})
    assert due_labels(state, 5.0) is None
    assert due_labels(state, 10.0) == ("modeldir",)
    assert due_labels(state, 15.0) is None
    assert due_labels(state, 20.0) == ("modeldir",)



def test_the_common_period_leaves_out_artifacts_with_their_own() -> None:
    state = state_for({"modeldir": 300.0}, common=60.0)
    # The common period covers the rest (never the workspace: it is not mutable).
    assert due_labels(state, 60.0) == ("_metadata", "output")
    assert due_labels(state, 61.0) is None
    assert due_labels(state, 120.0) == ("_metadata", "output")
    assert due_labels(state, 300.0) == ("_metadata", "modeldir", "output")


def test_the_metadata_files_may_have_their_own_period() -> None:
    state = state_for({"_metadata": 30.0}, common=60.0)
    assert due_labels(state, 30.0) == ("_metadata",)
    assert due_labels(state, 60.0) == ("_metadata", "modeldir", "output")


def test_the_common_period_is_due_even_with_nothing_mutable() -> None:
    state = state_for({}, common=60.0)
    state.attempt.request["experiment"]["artifacts"] = {"workspace": {"mutable": False}}
    assert due_labels(state, 60.0) == ()  # still asks for the metadata-store record
