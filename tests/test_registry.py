"""The supervisor's registry of attempts in flight: phases, counts, hand-over, spans.

Pure state: fed ``AttemptPhase`` messages as the roles send them, nothing else runs.
"""
from __future__ import annotations

import pytest

from runner import fates, protocol
from runner import registry as registry_module
from runner.protocol import (PHASE_ENDING, PHASE_FINISHED, PHASE_PREPARING, PHASE_RUNNING,
                             PHASE_SETTLING, PHASE_TAKEN, PHASE_UPLOADING, STEP_DOWNLOAD,
                             STEP_ENVIRONMENT, STEP_IMAGE)
from runner.registry import (CLOSE, END, PHASE_OWNER, SETTLE, SPANS, UPLOAD, HandOver,
                             Registry)

ADDED = 1700000000.0


def make_attempt(attempt_id: str = "host-1", key: str = "exp-1",
                 project: str = "proj") -> protocol.Attempt:
    return protocol.Attempt(attempt_id=attempt_id, queue="local_q", token="tok", attempts=0,
                            key=key, project=project,
                            request={"experiment": {"key": key, "time_added": ADDED}},
                            workdir="/tmp/nowhere", resources={"cpus": 1},
                            taken_at=ADDED + 5)


def report(registry: Registry, attempt: protocol.Attempt, phase: str, at: float, **detail):
    return registry.track(protocol.AttemptPhase(attempt=attempt, phase=phase, role="x", at=at,
                                                detail=detail))


def test_each_phase_moves_the_entry_on_and_merges_its_facts():
    registry, attempt = Registry(), make_attempt()
    steps = [(PHASE_TAKEN, {}), (PHASE_PREPARING, {"step": STEP_DOWNLOAD}),
             (PHASE_PREPARING, {"step": STEP_ENVIRONMENT}), (PHASE_RUNNING, {"pid": 42}),
             (PHASE_ENDING, {}), (PHASE_UPLOADING, {"status": "completed", "tail": "ok\n"})]
    for at, (phase, detail) in enumerate(steps, start=10):
        report(registry, attempt, phase, float(ADDED + at), **detail)
        entry = registry.get(attempt.attempt_id)
        assert (entry.phase, entry.since) == (phase, ADDED + at)
    assert entry.detail == {"step": STEP_ENVIRONMENT, "pid": 42, "status": "completed",
                            "tail": "ok\n"}
    assert len(registry) == 1 and attempt.attempt_id in registry
    assert registry.taken == 1


def test_a_phase_never_goes_back():
    registry, attempt = Registry(), make_attempt()
    report(registry, attempt, PHASE_TAKEN, 1.0)
    report(registry, attempt, PHASE_RUNNING, 2.0)
    report(registry, attempt, PHASE_UPLOADING, 3.0, seen="uploading")  # the scraper's, before
    report(registry, attempt, PHASE_ENDING, 4.0, seen="ending")  # the executor's, late
    entry = registry.get(attempt.attempt_id)
    assert (entry.phase, entry.since) == (PHASE_UPLOADING, 3.0)
    assert entry.detail["seen"] == "ending"  # facts are merged whatever the order


def test_a_phase_that_arrives_after_finished_puts_nothing_in_flight_again(monkeypatch):
    """The uploader's ``uploading`` (or a dead executor's last report) can arrive behind the
    fetcher's ``finished``: it must not make the attempt in flight again (a drain then
    waited for it until --shutdown-timeout)."""
    registry, attempt = Registry(), make_attempt()
    report(registry, attempt, PHASE_TAKEN, 1.0)
    report(registry, attempt, PHASE_RUNNING, 2.0)
    report(registry, attempt, PHASE_FINISHED, 4.0, fate=fates.ACK, status="completed")
    for late in (PHASE_UPLOADING, PHASE_ENDING, PHASE_RUNNING):
        tracked = report(registry, attempt, late, 3.0)
        assert not (tracked.taken or tracked.finished or tracked.spans)
    assert len(registry) == 0 and registry.ids() == []
    assert registry.taken == 1 and registry.finished["completed"] == 1
    # the memory is bounded: the oldest finished ids are forgotten first
    monkeypatch.setattr(registry_module, "FINISHED_MEMORY", 3)
    for n in range(5):
        report(registry, make_attempt(f"host-{n + 2}"), PHASE_FINISHED, 5.0, fate=fates.ACK,
               status="completed")
    assert list(registry.finished_ids) == ["host-4", "host-5", "host-6"]


def test_only_a_newly_taken_attempt_counts_as_taken():
    registry, attempt = Registry(), make_attempt()
    assert report(registry, attempt, PHASE_TAKEN, 1.0).taken
    assert not report(registry, attempt, PHASE_TAKEN, 1.5).taken  # the same one again
    # A recovered attempt first heard of while ending was not taken by this runner.
    assert not report(registry, make_attempt("host-2"), PHASE_ENDING, 2.0).taken
    assert registry.taken == 1 and registry.ids() == ["host-1", "host-2"]


@pytest.mark.parametrize("fate,status,counted", [
    (fates.ACK, fates.COMPLETED, "completed"), (fates.ACK, fates.FAILED, "failed"),
    (fates.ACK, fates.EXPIRED, "expired"), (fates.ACK, fates.CANCELLED, "cancelled"),
    (fates.REQUEUE, fates.CANCELLED, "requeued"), (fates.DEAD, fates.FAILED, "dead"),
    (fates.DROP, fates.CANCELLED, "cancelled")])
def test_finished_removes_the_entry_and_counts_its_fate(fate, status, counted):
    registry, attempt = Registry(), make_attempt()
    report(registry, attempt, PHASE_TAKEN, 1.0)
    tracked = report(registry, attempt, PHASE_FINISHED, 2.0, fate=fate, status=status)
    assert tracked.finished and tracked.started and tracked.status == counted
    assert len(registry) == 0 and registry.get(attempt.attempt_id) is None
    assert registry.finished[counted] == 1
    assert sum(registry.finished.values()) == 1


def test_finished_for_an_attempt_never_seen_counts_but_was_not_started():
    registry = Registry()
    tracked = report(registry, make_attempt(), PHASE_FINISHED, 2.0, fate=fates.ACK,
                     status=fates.FAILED)
    assert tracked.finished and not tracked.started and registry.finished["failed"] == 1
    unknown = report(registry, make_attempt("host-2"), PHASE_FINISHED, 3.0, fate="???")
    assert unknown.status is None and sum(registry.finished.values()) == 1


def test_spans_measure_each_phase_from_its_boundaries():
    registry, attempt = Registry(), make_attempt()
    seen = {}
    for phase, at, detail in [(PHASE_TAKEN, 10.0, {}),
                              (PHASE_PREPARING, 11.0, {"step": STEP_DOWNLOAD}),
                              (PHASE_PREPARING, 12.0, {"step": STEP_IMAGE}),
                              (PHASE_PREPARING, 14.0, {"step": STEP_ENVIRONMENT}),
                              (PHASE_RUNNING, 20.0, {}), (PHASE_ENDING, 50.0, {}),
                              (PHASE_UPLOADING, 51.0, {}),
                              (PHASE_FINISHED, 55.0, {"fate": fates.ACK, "status": "completed"})]:
        seen.update(report(registry, attempt, phase, ADDED + at, **detail).spans)
    assert seen == {"queue_wait": 10.0, "download": 3.0, "environment": 6.0, "run": 30.0,
                    "upload": 4.0}
    assert set(seen) == set(SPANS)


def test_a_span_whose_start_is_unknown_is_not_measured():
    registry = Registry()
    attempt = make_attempt()
    attempt = protocol.Attempt(**{**protocol.to_map(attempt), "request": {"experiment": {}}})
    assert report(registry, attempt, PHASE_TAKEN, 1.0).spans == ()  # no time_added
    assert report(registry, attempt, PHASE_RUNNING, 2.0).spans == ()  # never prepared
    assert report(registry, attempt, PHASE_ENDING, 5.0).spans == (("run", 3.0),)
    # A boundary crossed twice keeps its first time.
    report(registry, attempt, PHASE_RUNNING, 9.0)
    assert registry.get(attempt.attempt_id).times[PHASE_RUNNING] == 2.0


def test_the_phase_owner_table_names_the_role_holding_each_phase():
    registry = Registry()
    for number, phase in enumerate((PHASE_TAKEN, PHASE_PREPARING, PHASE_RUNNING,
                                    PHASE_ENDING, PHASE_UPLOADING)):
        report(registry, make_attempt(f"host-{number}"), phase, 1.0)
    held = {role: [e.attempt_id for e in registry.held_by(role)]
            for role in set(PHASE_OWNER.values()) | {"fetcher"}}
    assert held == {"cache_manager": ["host-0", "host-1"], "executor": ["host-2"],
                    "scraper": ["host-3"], "uploader": ["host-4"], "fetcher": []}


def closed(outcomes: dict):
    return lambda attempt_id: outcomes.get(attempt_id)


@pytest.mark.parametrize("role,phase", [("cache_manager", PHASE_TAKEN),
                                        ("cache_manager", PHASE_PREPARING),
                                        ("executor", PHASE_RUNNING)])
def test_a_dead_preparing_or_running_role_hands_its_attempts_to_the_scraper(role, phase):
    registry, attempt = Registry(), make_attempt()
    report(registry, attempt, phase, 1.0)
    report(registry, make_attempt("host-other"), PHASE_UPLOADING, 1.0)  # not the role's
    assert registry.hand_over(role, closed({})) == [HandOver(attempt, END)]
    assert registry.get(attempt.attempt_id).phase == PHASE_ENDING
    assert registry.get("host-other").phase == PHASE_UPLOADING
    assert registry.hand_over(role, closed({})) == []  # handed on: no longer the role's


def test_a_dead_scraper_closes_again_what_it_had_not_closed():
    registry = Registry()
    open_one, closed_one = make_attempt("host-1"), make_attempt("host-2")
    for attempt in (open_one, closed_one):
        report(registry, attempt, PHASE_ENDING, 1.0)
    outcome = protocol.Outcome(status="completed", exit_code=0)
    assert registry.hand_over("scraper", closed({"host-2": outcome})) == [
        HandOver(open_one, CLOSE)]
    assert registry.get("host-1").phase == PHASE_ENDING  # the new scraper closes it
    assert registry.get("host-2").phase == PHASE_UPLOADING  # the uploader has its request


def test_a_dead_uploader_uploads_again_with_the_kept_outcome_or_settles():
    registry = Registry()
    kept, lost = make_attempt("host-1"), make_attempt("host-2")
    for attempt in (kept, lost):
        report(registry, attempt, PHASE_UPLOADING, 1.0)
    outcome = protocol.Outcome(status="failed", exit_code=1)
    assert registry.hand_over("uploader", closed({"host-1": outcome})) == [
        HandOver(kept, UPLOAD, outcome), HandOver(lost, SETTLE)]
    assert registry.get("host-1").phase == PHASE_UPLOADING
    assert registry.get("host-2").phase == PHASE_SETTLING
    # Settling is nobody's but the fetcher's: a second uploader death leaves it alone.
    assert registry.hand_over("uploader", closed({})) == [HandOver(kept, SETTLE)]
    # A late "uploading" from the old process cannot take a settling attempt back.
    report(registry, lost, PHASE_UPLOADING, 2.0)
    assert registry.get("host-2").phase == PHASE_SETTLING


def test_a_dead_fetcher_hands_nothing_on_its_replacement_adopts_everything():
    registry = Registry()
    report(registry, make_attempt(), PHASE_RUNNING, 1.0)
    assert registry.hand_over("fetcher", closed({})) == []
    assert registry.get("host-1").phase == PHASE_RUNNING


def test_recovered_attempts_and_keys():
    registry = Registry()
    registry.add(make_attempt("host-1"), PHASE_ENDING, 5.0, recovered=True)
    report(registry, make_attempt("host-2", project="other"), PHASE_TAKEN, 6.0)
    report(registry, make_attempt("host-3", key="exp-2"), PHASE_TAKEN, 6.0)
    entry = registry.get("host-1")
    assert (entry.phase, entry.since, entry.detail) == (PHASE_ENDING, 5.0, {"recovered": True})
    assert registry.taken == 2  # recovered attempts were taken by a runner gone
    assert registry.of_key("exp-1") == ["host-1", "host-2"]
    assert registry.of_key("exp-1", "proj") == ["host-1"]
    assert [entry.attempt_id for entry in registry] == ["host-1", "host-2", "host-3"]
