"""The held-aside list alone (runner/held_aside.py): what the end-to-end tests of
tests/test_e2e_admission.py and tests/test_e2e_rabbitmq.py prove about requests that do not
fit, checked here as plain state.  The list never calls its back end (``backend`` is an
opaque handle here)."""
from __future__ import annotations

from runner.held_aside import (BACKOFF, NEVER, NEVER_HOLD, NOT_NOW, NOT_NOW_HOLD, PARK_MAX,
                               PUT_BACK, SAID_KEPT, TRY, WAIT, HeldAside, Parked)
from runner.queues.base import Delivery
from runner.requests import RequestFacts

NOW = 1000.0


def parked(token: str = "t1", key: str = "exp-1", queue: str = "local_q") -> Parked:
    facts = RequestFacts(key=key, project="proj", filename="a.py", resources={"cpus": 2},
                         max_duration=None, lifetime=None, time_added=None, save_frequency=60.0)
    return Parked("backend", Delivery(queue, token, b"{}", 0), {"experiment": {"key": key}},
                  facts, (queue, "proj", key, "None"))


def test_a_request_that_does_not_fit_now_is_tried_while_room_may_free_then_put_back():
    """test_a_request_that_does_not_fit_now_lets_smaller_ones_pass_then_runs and
    test_request_that_does_not_fit_now_is_held_aside_untouched."""
    aside = HeldAside()
    item = parked()
    assert aside.hold(item, never=False, reason="does not fit now", now=NOW)
    assert (item.why, item.until, len(aside)) == (NOT_NOW, NOW + NOT_NOW_HOLD, 1)
    assert aside.step(item, NOW + 1, may_start=True) == TRY
    assert aside.step(item, NOW + 1, may_start=False) == WAIT  # draining, or no free slot
    assert aside.step(item, NOW + NOT_NOW_HOLD, may_start=True) == PUT_BACK
    assert aside.remove("t1") is item and len(aside) == 0


def test_a_request_that_never_fits_is_never_tried_and_put_back_after_its_hold():
    """test_a_request_that_never_fits_does_not_block_a_rabbitmq_queue."""
    aside = HeldAside()
    item = parked()
    assert aside.hold(item, never=True, reason="needs 1 GPU; this runner has 0", now=NOW)
    assert (item.why, item.until) == (NEVER, NOW + NEVER_HOLD)
    assert aside.step(item, NOW + NEVER_HOLD - 1, may_start=True) == WAIT
    assert aside.step(item, NOW + NEVER_HOLD, may_start=True) == PUT_BACK


def test_why_a_request_never_fits_is_said_once_per_key_until_it_is_taken():
    """test_request_that_does_not_fit_now_is_held_aside_untouched: one log line, however
    often the request comes back."""
    aside = HeldAside()
    assert aside.never_said("local_q", "exp-1", "needs 9 CPUs")
    assert not aside.never_said("local_q", "exp-1", "needs 9 CPUs")
    assert aside.never_said("local_other", "exp-1", "needs 9 CPUs")
    aside.forget("local_q", "exp-1")
    assert aside.never_said("local_q", "exp-1", "needs 9 CPUs")
    for n in range(SAID_KEPT):
        aside.never_said("local_q", f"k{n}", "why")
    assert len(aside.said_never) == SAID_KEPT


def test_at_most_park_max_are_held_and_the_next_is_to_be_put_back():
    aside = HeldAside()
    for n in range(PARK_MAX):
        assert aside.hold(parked(f"t{n}"), never=False, reason="does not fit now", now=NOW)
    assert not aside.has_room()
    extra = parked("t-extra")
    assert not aside.hold(extra, never=False, reason="does not fit now", now=NOW)
    assert not aside.back_off(parked("t-back"), NOW + 5, "handed back")
    assert "t-extra" not in aside.items and len(aside) == PARK_MAX


def test_a_hand_back_rests_for_its_back_off_then_is_tried_here_then_waits_for_room():
    """test_host_faults_back_off_are_bounded_and_leave_no_metadata_files: a request handed
    back for the host's fault waits out its delay, then is tried here whatever the slots
    say; if it does not fit then, it waits for room like any other."""
    aside = HeldAside()
    item = parked()
    assert aside.back_off(item, NOW + 4, "handed back (RoleCrashed): x")
    assert item.why == BACKOFF and aside.resting(item, NOW + 3)
    assert not aside.resting(item, NOW + 4)
    assert aside.step(item, NOW + 4, may_start=False) == TRY
    aside.wait_for_room(item, never=False, reason="does not fit now", now=NOW + 4)
    assert (item.why, item.until) == (NOT_NOW, NOW + 4 + NOT_NOW_HOLD)


def test_a_drain_takes_every_request_back_oldest_first():
    """StopTaking and shutdown put every held-aside request back at once."""
    aside = HeldAside()
    items = [parked(f"t{n}") for n in range(3)]
    for item in items:
        aside.hold(item, never=False, reason="does not fit now", now=NOW)
    assert aside.take_all() == items
    assert len(aside) == 0 and aside.take_all() == []


def test_queue_figures_say_why_each_request_is_held():
    """test_runner_submit_wait_says_why_a_request_cannot_run: runner-ctl queues shows the
    held-aside requests of a queue with their reasons."""
    aside = HeldAside()
    aside.hold(parked("t1", "small"), never=False, reason="does not fit now", now=NOW)
    aside.hold(parked("t2", "huge"), never=True, reason="needs 99 CPUs", now=NOW)
    aside.back_off(parked("t3", "crashed"), NOW + 5, "handed back (RoleCrashed): x")
    aside.hold(parked("t4", "elsewhere", queue="local_other"), never=False, reason="r", now=NOW)
    assert aside.waiting("local_q", "host1", lambda identity: 3) == [
        {"key": "small", "project": "proj", "held": NOT_NOW},
        {"key": "huge", "project": "proj", "held": NEVER,
         "reason": "cannot run on host1: needs 99 CPUs"},
        {"key": "crashed", "project": "proj", "held": BACKOFF,
         "reason": "backing off after hand-back 3: handed back (RoleCrashed): x"}]
