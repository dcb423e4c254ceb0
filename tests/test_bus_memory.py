"""The in-memory bus (runner.bus_memory), the thread host (runner.rolehost.run_in_thread)
and the parent check inside Role."""
from __future__ import annotations

import os
import threading
import time

import pytest

from runner import protocol
from runner.bus import BATCH_MESSAGES
from runner.bus_memory import MemoryHub
from runner.config import load
from runner.protocol import Heartbeat, RunnerLog, Shutdown
from runner.rolehost import run_in_thread
from runner.roles.base import Role

from .support import short_tempdir


def lines(count: int) -> list[protocol.Message]:
    return [RunnerLog(attempt_id="j", text=f"line {i}") for i in range(count)]


@pytest.fixture()
def hub():
    hub = MemoryHub()
    yield hub
    hub.close()


@pytest.fixture()
def patient_hub(hub, monkeypatch):
    """A hub whose buses never send a batch for its age (a loaded machine could take the
    2 ms of BATCH_DELAY between two posts): only the size rules apply."""
    from runner import bus as bus_module
    from runner import bus_memory

    monkeypatch.setattr(bus_module, "BATCH_DELAY", 3600.0)
    monkeypatch.setattr(bus_memory, "BATCH_DELAY", 3600.0)
    return hub


def test_posted_messages_travel_as_one_batch_frame_in_order(patient_hub) -> None:
    hub = patient_hub
    sender, receiver = hub.bus("a"), hub.bus("b")
    for message in lines(5):
        sender.post("b", message)
    assert sender.pending == 5 and hub.waiting("b") == 0
    assert sender.flush() and hub.waiting("b") == 1  # one frame holds the five
    assert [receiver.recv_nowait() for _ in range(6)] == lines(5) + [None]


def test_a_full_batch_goes_without_a_flush(patient_hub) -> None:
    hub = patient_hub
    sender, receiver = hub.bus("a"), hub.bus("b")
    for message in lines(BATCH_MESSAGES):
        sender.post("b", message)
    assert hub.waiting("b") == 1 and sender.pending == 0
    assert receiver.recv(1.0) == lines(1)[0]


def test_send_keeps_the_order_with_what_was_posted(hub) -> None:
    sender, receiver = hub.bus("a"), hub.bus("b")
    sender.post("b", lines(1)[0])
    sender.send("b", Shutdown(reason="now"))
    assert receiver.recv(1.0) == lines(1)[0] and receiver.recv(1.0) == Shutdown(reason="now")


def test_frames_sent_before_the_inbox_is_read_are_kept(hub) -> None:
    hub.bus("a").send("late", Shutdown(reason="x"))
    assert hub.bus("late").recv(1.0) == Shutdown(reason="x")


def test_recv_waits_for_a_message_from_another_thread_and_times_out(hub) -> None:
    receiver = hub.bus("b")
    assert receiver.recv(0.05) is None
    timer = threading.Timer(0.05, lambda: hub.bus("a").send("b", Shutdown(reason="x")))
    timer.start()
    assert receiver.recv(30.0) == Shutdown(reason="x")
    timer.join()


def test_a_message_that_cannot_be_encoded_is_refused_at_post(hub) -> None:
    with pytest.raises(TypeError):
        hub.bus("a").post("b", RunnerLog(attempt_id="j", text=object()))  # type: ignore[arg-type]


class Echo(Role):
    """Answers every RunnerLog to the supervisor; counts ticks."""

    name = "echo"
    TICK = 0.01
    ticks = 0

    def handle(self, message):
        self.post("supervisor", message)

    def tick(self):
        self.ticks += 1


class BrokenBoot(Role):
    name = "broken"

    def initialize(self):
        raise RuntimeError("no such thing")


@pytest.fixture()
def config():
    root = short_tempdir()
    return load(["--working-dir", str(root / "w"), "--runtime-dir", str(root / "run")],
                environ={})


def test_a_role_in_a_thread_answers_messages_and_stops_cleanly(hub, config) -> None:
    host = run_in_thread(Echo, config, hub)
    supervisor = hub.bus("supervisor")
    assert isinstance(supervisor.recv(30.0), Heartbeat)  # the first beat: booted
    supervisor.send("echo", lines(1)[0])
    answer = supervisor.recv(30.0)
    while isinstance(answer, Heartbeat):
        answer = supervisor.recv(30.0)
    assert answer == lines(1)[0]
    host.stop()
    assert not host.alive


def test_a_role_that_fails_to_boot_raises_in_the_caller(hub, config) -> None:
    with pytest.raises(RuntimeError, match="no such thing"):
        run_in_thread(BrokenBoot, config, hub)


def test_the_parent_check_calls_orphaned_before_a_tick(hub, config) -> None:
    role = Echo(config, hub.bus("echo"))
    gone = threading.Event()

    def orphaned():
        gone.set()
        role.request_stop()

    role.die_with(os.getpid(), orphaned)  # this process is not its own parent
    assert role.parent_gone()
    thread = threading.Thread(target=role.loop, daemon=True)
    thread.start()
    assert gone.wait(30.0)
    thread.join(30.0)
    assert not thread.is_alive()


def test_a_role_whose_parent_lives_ticks_on(hub, config) -> None:
    role = Echo(config, hub.bus("echo"))
    orphaned = threading.Event()
    role.die_with(os.getppid(), orphaned.set)
    assert not role.parent_gone()
    thread = threading.Thread(target=role.loop, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while role.ticks < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    role.request_stop()
    thread.join(30.0)
    assert role.ticks >= 3 and not orphaned.is_set()
