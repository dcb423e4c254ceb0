"""The drain state machine, driven by hand: a fake clock (plain numbers passed in as
``now``) and the counts a registry would give; its actions are what is checked."""
from __future__ import annotations

from runner.drain import (CTL, LIMIT, SIGNAL, STOP_RUNS_EVERY, Drain, Exit, Settings,
                          StartTaking, Stopping, StopRuns, StopTaking)

T0 = 1000.0


def make_drain(drain_timeout=10.0, shutdown_timeout=5.0, limit_tasks=0, limit_idle=0.0):
    drain = Drain(Settings(drain_timeout=drain_timeout, shutdown_timeout=shutdown_timeout,
                           limit_tasks=limit_tasks, limit_idle_duration=limit_idle), T0)
    drain.started(T0)
    return drain


def kinds(actions: list) -> list[type]:
    return [type(action) for action in actions]


def test_a_signal_drain_lets_work_finish_then_exits():
    drain = make_drain()
    actions = drain.terminate("SIGTERM", T0 + 1, in_flight=2)
    assert actions == [StopTaking(), Stopping("draining (signal SIGTERM): 2 in flight")]
    assert drain.state == "draining" and drain.current.origin == SIGNAL
    # Work still running, within --drain-timeout: nothing to do.
    assert drain.step(T0 + 5, ["a", "b"], fetcher_taking=False, taken=2) == []
    # The fetcher has not yet confirmed it stopped taking: not drained yet.
    assert drain.step(T0 + 6, [], fetcher_taking=True, taken=2) == []
    assert drain.step(T0 + 7, [], fetcher_taking=False, taken=2) == [
        Exit("drained (signal SIGTERM)")]


def test_after_the_drain_timeout_the_attempts_left_are_named_again_and_again():
    drain = make_drain(drain_timeout=10.0, shutdown_timeout=5.0)
    drain.terminate("SIGTERM", T0, in_flight=2)
    assert drain.step(T0 + 9.9, ["b", "a"], False, 2) == []
    first = drain.step(T0 + 10, ["b", "a"], False, 2)
    assert first == [StopRuns(reason="drain: signal SIGTERM", attempt_ids=("a", "b"))]
    assert drain.state == "handing back" and drain.current.handing_back_since == T0 + 10
    assert drain.step(T0 + 10 + STOP_RUNS_EVERY / 2, ["a"], False, 2) == []  # not yet again
    again = drain.step(T0 + 10 + STOP_RUNS_EVERY, ["a"], False, 2)
    assert again == [StopRuns(reason="drain: signal SIGTERM", attempt_ids=("a",))]
    # --shutdown-timeout after the hand-back began: exit with work still in flight.
    late = drain.step(T0 + 15.5, ["a"], False, 2)
    assert kinds(late) == [StopRuns, Exit]


def test_a_second_signal_stops_now_and_a_third_exits():
    drain = make_drain()
    drain.terminate("SIGINT", T0, in_flight=1)
    stop = drain.terminate("SIGINT", T0 + 1, in_flight=1)
    assert stop == [StopRuns(reason="second signal SIGINT")]  # every run; STOPPING was sent
    assert drain.state == "stopping" and drain.current.stop_now
    assert drain.current.handing_back_since == T0 + 1
    # Stop-now names nothing again: every run was already told.
    assert drain.step(T0 + 3, ["a"], False, 1) == []
    assert drain.terminate("SIGINT", T0 + 4, in_flight=1) == [Exit("signal SIGINT again")]


def test_stop_now_without_a_drain_starts_one_and_sends_stopping_once():
    drain = make_drain()
    message, actions = drain.stop_now("runner-ctl stop", T0, in_flight=3)
    assert message == "stopping now: handing 3 attempts back"
    assert actions == [StopTaking(), Stopping("draining (runner-ctl stop): 3 in flight"),
                       StopRuns(reason="runner-ctl stop")]
    assert drain.stop_now("runner-ctl stop", T0 + 1, 3)[1] == []  # nothing twice
    assert drain.stopping_sent()


def test_a_ctl_drain_can_stay_up_drained_and_be_resumed():
    drain = make_drain()
    message, actions = drain.request("runner-ctl drain", CTL, T0, in_flight=1, exit=False)
    assert message == "draining: 1 attempts in flight"
    assert actions == [StopTaking()]  # no STOPPING: it may be resumed
    assert drain.step(T0 + 1, [], False, 1) == []
    assert drain.state == "drained"
    ok, message, actions = drain.resume("runner-ctl resume", T0 + 2)
    assert (ok, message, actions) == (True, "resumed: taking work", [StartTaking()])
    assert drain.state == "running" and drain.current is None
    assert drain.resume("runner-ctl resume", T0 + 3) == (False, "not draining", [])


def test_a_signal_turns_a_ctl_drain_into_one_that_exits_and_cannot_be_resumed():
    drain = make_drain()
    drain.request("runner-ctl drain", CTL, T0, in_flight=0, exit=False)
    actions = drain.terminate("SIGTERM", T0 + 1, in_flight=0)
    assert actions == [Stopping("draining (signal SIGTERM): 0 in flight")]
    assert drain.current.exit and drain.current.origin == SIGNAL
    ok, message, actions = drain.resume("runner-ctl resume", T0 + 2)
    assert not ok and "cannot be resumed" in message and actions == []
    assert drain.step(T0 + 3, [], False, 0) == [Exit("drained (signal SIGTERM)")]


def test_a_stop_now_cannot_be_resumed():
    drain = make_drain()
    drain.request("runner-ctl drain", CTL, T0, in_flight=1)
    drain.stop_now("runner-ctl stop", T0 + 1, 1)
    assert not drain.resume("runner-ctl resume", T0 + 2)[0]


def test_limit_tasks_stops_taking_then_drains_once_the_work_is_done():
    drain = make_drain(limit_tasks=2)
    assert drain.taken(1) == []
    assert drain.taken(2) == [StopTaking()] and drain.limit_stopped
    assert drain.taken(3) == []  # told once
    assert drain.step(T0 + 1, ["a"], False, 2) == []  # still running: no drain yet
    actions = drain.step(T0 + 2, [], False, 2)
    assert actions == [StopTaking(), Stopping("draining (--limit-tasks 2 reached): 0 in flight")]
    assert drain.current.origin == LIMIT
    assert drain.step(T0 + 3, [], False, 2) == [Exit("drained (--limit-tasks 2 reached)")]


def test_a_reload_that_raises_the_task_limit_takes_work_again():
    drain = make_drain(limit_tasks=1)
    drain.taken(1)
    assert drain.fetcher_ready() == [StopTaking()]  # a restarted fetcher is told again
    raised = Settings(drain_timeout=10.0, shutdown_timeout=5.0, limit_tasks=5)
    assert drain.reconfigure(raised, taken=1) == [StartTaking()]
    assert not drain.limit_stopped and drain.fetcher_ready() == []
    assert drain.reconfigure(raised, taken=1) == []


def test_limit_idle_duration_drains_an_idle_runner():
    drain = make_drain(limit_idle=30.0)
    assert drain.step(T0 + 20, ["a"], True, 1) == []  # busy: the idle time restarts
    assert drain.idle_for(T0 + 25, in_flight=1) == 0.0
    assert drain.step(T0 + 49, [], True, 1) == []
    assert drain.idle_for(T0 + 49, in_flight=0) == 29.0
    actions = drain.step(T0 + 50, [], True, 1)
    assert kinds(actions) == [StopTaking, Stopping]
    assert drain.current.why == "idle for 30s (--limit-idle-duration)"


def test_a_new_drain_timeout_applies_to_the_drain_in_progress():
    drain = make_drain(drain_timeout=100.0)
    drain.terminate("SIGTERM", T0, in_flight=1)
    drain.reconfigure(Settings(drain_timeout=1.0, shutdown_timeout=5.0), taken=1)
    assert kinds(drain.step(T0 + 1, ["a"], False, 1)) == [StopRuns]
