"""Batching on the bus: batch frames (runner.protocol) and Bus.post / flush / recv (runner.bus)."""
from __future__ import annotations

import logging
import shutil
import threading
import time

import msgpack
import pytest
import zmq

from runner import bus as bus_module
from runner import protocol
from runner.bus import BATCH_BYTES, BATCH_MESSAGES, Bus, Endpoints
from runner.errors import ProtocolError
from runner.protocol import Heartbeat, OutputChunk, RunnerLog, Shutdown
from runner.roles.base import Role
from runner.supervisor import Supervisor

from .support import short_tempdir


def lines(count: int, attempt_id: str = "j") -> list[protocol.Message]:
    return [RunnerLog(attempt_id=attempt_id, text=f"line {i}") for i in range(count)]


# --------------------------------------------------------------------------- frames

def test_batch_frame_round_trips_in_order() -> None:
    sent = lines(5) + [OutputChunk(attempt_id="j", data=b"out\n"), Heartbeat(role="x", pid=7)]
    frame = protocol.batch([protocol.encode(m) for m in sent])
    values = msgpack.unpackb(frame, raw=False)
    assert values[:2] == [protocol.PROTOCOL_VERSION, protocol.BATCH]
    assert values[2] == [protocol.PROTOCOL_VERSION, "runner_log", "j", "line 0"]
    assert protocol.decode_many(frame) == (sent, [])


def test_an_ordinary_frame_decodes_as_one_message() -> None:
    message = Shutdown(reason="x")
    assert protocol.decode_many(protocol.encode(message)) == ([message], [])


def test_decode_refuses_a_batch() -> None:
    with pytest.raises(ProtocolError, match="batch"):
        protocol.decode(protocol.batch([protocol.encode(m) for m in lines(2)]))


def test_a_bad_entry_is_left_out_and_the_rest_delivered() -> None:
    good = lines(2)
    frame = msgpack.packb([protocol.PROTOCOL_VERSION, protocol.BATCH,
                           [protocol.PROTOCOL_VERSION, "runner_log", "j", "line 0"],
                           [protocol.PROTOCOL_VERSION, "no_such_type"],
                           "not an array",
                           [protocol.PROTOCOL_VERSION, protocol.BATCH],  # no nesting
                           [protocol.PROTOCOL_VERSION, "runner_log", "j", "line 1"]],
                          use_bin_type=True)
    messages, problems = protocol.decode_many(frame)
    assert messages == good
    assert len(problems) == 3 and "entry 1" in problems[0] and "entry 3" in problems[2]


@pytest.mark.parametrize("frame", [
    b"\xc1 not msgpack",
    msgpack.packb([protocol.PROTOCOL_VERSION + 1, protocol.BATCH, []]),  # another version
    protocol.batch([protocol.encode(m) for m in lines(3)])[:-4],  # cut short
])
def test_a_bad_batch_frame_raises(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_many(frame)


# --------------------------------------------------------------------------- the bus

@pytest.fixture
def endpoints():
    root = short_tempdir("rbb")
    yield Endpoints(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def raw_inbox(endpoints: Endpoints, context: zmq.Context):
    """A bare PULL socket bound as ``scraper``'s inbox: shows the frames as they travel."""
    socket = context.socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(endpoints.inbox("scraper"))
    yield socket
    socket.close()


def frames_in(socket: zmq.Socket, wait: float = 0.5) -> list[bytes]:
    """Every frame that arrives within ``wait`` seconds of the last one."""
    frames = []
    while socket.poll(int(wait * 1000)):
        frames.append(socket.recv())
        wait = 0.1
    return frames


def test_posted_messages_go_in_one_frame_in_order(endpoints, context, raw_inbox) -> None:
    sender = Bus(endpoints, "executor", context)
    try:
        sent = lines(10)
        for message in sent:
            sender.post("scraper", message)
        assert sender.pending == 10
        assert raw_inbox.poll(100) == 0  # nothing goes before a flush
        assert sender.flush() is True
        assert sender.pending == 0
        frames = frames_in(raw_inbox)
        assert len(frames) == 1
        assert protocol.decode_many(frames[0]) == (sent, [])
    finally:
        sender.close()


def test_a_lone_posted_message_is_an_ordinary_frame(endpoints, context, raw_inbox) -> None:
    sender = Bus(endpoints, "executor", context)
    try:
        sender.post("scraper", Shutdown(reason="alone"))
        sender.flush()
        assert [protocol.decode(f) for f in frames_in(raw_inbox)] == [Shutdown(reason="alone")]
    finally:
        sender.close()


def test_order_is_kept_per_destination(endpoints, context) -> None:
    sender = Bus(endpoints, "executor", context)
    scraper = Bus(endpoints, "scraper", context)
    supervisor = Bus(endpoints, "supervisor", context)
    try:
        to_scraper, to_supervisor = [], []
        for i in range(300):  # crosses the cap several times, interleaved with send()
            message = RunnerLog(attempt_id="j", text=f"{i}")
            if i % 7 == 0:
                sender.send("scraper", message)
            else:
                sender.post("scraper", message)
            to_scraper.append(message)
            beat = Heartbeat(role="executor", pid=i)
            sender.post("supervisor", beat)
            to_supervisor.append(beat)
        sender.flush()
        assert [scraper.recv(1.0) for _ in to_scraper] == to_scraper
        assert [supervisor.recv(1.0) for _ in to_supervisor] == to_supervisor
        assert scraper.recv(0.05) is None and supervisor.recv(0.05) is None
    finally:
        for bus in (sender, scraper, supervisor):
            bus.close()


def test_pending_messages_go_before_recv_waits(endpoints, context, raw_inbox) -> None:
    sender = Bus(endpoints, "executor", context)
    try:
        sender.post("scraper", RunnerLog(attempt_id="j", text="before the wait"))
        started = time.monotonic()
        assert sender.recv(0.3, drained=True) is None  # drained: no look at the inbox first
        assert time.monotonic() - started >= 0.2
        frames = frames_in(raw_inbox, 0.1)
        assert [protocol.decode(f) for f in frames] == [RunnerLog(attempt_id="j",
                                                                  text="before the wait")]
        sender.post("scraper", RunnerLog(attempt_id="j", text="inbox empty"))
        assert sender.recv_nowait() is None  # the inbox was seen empty: sent
        assert len(frames_in(raw_inbox, 0.2)) == 1
    finally:
        sender.close()


def test_close_sends_what_is_pending(endpoints, context, raw_inbox) -> None:
    sender = Bus(endpoints, "executor", context)
    sent = lines(3)
    for message in sent:
        sender.post("scraper", message)
    sender.close()
    frames = frames_in(raw_inbox)
    assert [m for f in frames for m in protocol.decode_many(f)[0]] == sent


def test_the_caps_send_without_a_flush(endpoints, context, raw_inbox, monkeypatch) -> None:
    monkeypatch.setattr(bus_module, "BATCH_DELAY", 3600.0)  # only the caps can send
    sender = Bus(endpoints, "executor", context)
    try:
        sent = lines(BATCH_MESSAGES + 1)
        for message in sent:
            sender.post("scraper", message)
        frames = frames_in(raw_inbox)
        assert len(frames) == 1 and protocol.decode_many(frames[0])[0] == sent[:-1]
        assert sender.pending == 1
        sender.flush()
        frames_in(raw_inbox)

        big = OutputChunk(attempt_id="j", data=b"x" * (BATCH_BYTES // 3))
        for _ in range(3):
            sender.post("scraper", big)
        frames = frames_in(raw_inbox)
        assert len(frames) == 1 and len(protocol.decode_many(frames[0])[0]) == 3
        assert sender.pending == 0

        sender.post("scraper", lines(1)[0])
        huge = OutputChunk(attempt_id="j", data=b"y" * BATCH_BYTES)
        sender.post("scraper", huge)  # goes alone, after what waited before it
        frames = frames_in(raw_inbox)
        assert [protocol.decode(f) for f in frames] == [lines(1)[0], huge]
    finally:
        sender.close()


def test_a_message_waits_at_most_the_batch_delay(endpoints, context, raw_inbox) -> None:
    sender = Bus(endpoints, "executor", context)
    other = Bus(endpoints, "fetcher", context)
    try:
        sender.post("scraper", lines(1)[0])
        time.sleep(bus_module.BATCH_DELAY * 2)
        sender.post("scraper", lines(2)[1])  # a busy loop posting more: both go now
        assert len(frames_in(raw_inbox, 0.2)) == 1

        for i in range(5):  # a busy loop receiving only: the next recv sends it
            other.send("executor", Heartbeat(role="fetcher", pid=i))
        assert sender.recv(1.0) is not None
        sender.post("scraper", lines(1)[0])
        time.sleep(bus_module.BATCH_DELAY * 2)
        assert sender.recv_nowait() is not None  # the inbox is not empty, yet it went
        assert sender.pending == 0
        assert len(frames_in(raw_inbox, 0.2)) == 1
    finally:
        sender.close()
        other.close()


def test_a_corrupt_batch_is_dropped_with_a_log(endpoints, context, caplog) -> None:
    receiver = Bus(endpoints, "uploader", context)
    raw = context.socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(endpoints.inbox("uploader"))
    good = lines(3)
    try:
        with caplog.at_level(logging.ERROR, logger="runner.bus"):
            raw.send(protocol.batch([protocol.encode(m) for m in good])[:-3])  # cut short
            raw.send(msgpack.packb([protocol.PROTOCOL_VERSION, protocol.BATCH,
                                    [protocol.PROTOCOL_VERSION, "no_such_type"]]))
            raw.send(msgpack.packb([protocol.PROTOCOL_VERSION, protocol.BATCH,
                                    [protocol.PROTOCOL_VERSION, "runner_log", "j", "kept"],
                                    [protocol.PROTOCOL_VERSION, "no_such_type"]]))
            raw.send(protocol.batch([protocol.encode(m) for m in good]))
            received = []
            deadline = time.monotonic() + 5
            while len(received) < 4 and time.monotonic() < deadline:
                message = receiver.recv(0.2)  # None also after a dropped frame
                if message is not None:
                    received.append(message)
            assert receiver.recv(0.05) is None
        assert received == [RunnerLog(attempt_id="j", text="kept")] + good
        text = caplog.text
        assert "dropped a frame" in text and text.count("dropped a message") == 2
    finally:
        raw.close()
        receiver.close()


def test_supervisor_drain_receives_every_batched_message(endpoints, context) -> None:
    """The supervisor polls ``bus.inbox`` itself, then drains with ``recv_nowait``."""
    sender = Bus(endpoints, "fetcher", context)
    supervisor = Supervisor.__new__(Supervisor)  # only what serve_once uses
    supervisor.bus = Bus(endpoints, "supervisor", context)
    supervisor.control = context.socket(zmq.ROUTER)
    supervisor.poller = zmq.Poller()
    supervisor.poller.register(supervisor.bus.inbox, zmq.POLLIN)
    received: list[protocol.Message] = []
    supervisor.handle = received.append
    try:
        sent = [Heartbeat(role="fetcher", pid=i) for i in range(3 * BATCH_MESSAGES + 5)]
        for message in sent:
            sender.post("supervisor", message)
        sender.flush()
        deadline = time.monotonic() + 5
        while len(received) < len(sent) and time.monotonic() < deadline:
            supervisor.serve_once(0.2)
        assert received == sent
        supervisor.serve_once(0.05)
        assert received == sent
    finally:
        supervisor.control.close()
        supervisor.bus.close()
        sender.close()


class Relay(Role):
    """Answers each message twice: once from the loop, once from a worker thread."""

    name = "relay"

    def handle(self, message: protocol.Message) -> None:
        self.post("scraper", RunnerLog(attempt_id="loop", text=message.text))
        worker = threading.Thread(target=self.post, args=(
            "scraper", RunnerLog(attempt_id="worker", text=message.text)))
        worker.start()
        worker.join()


def test_a_roles_posted_messages_arrive(endpoints, context) -> None:
    scraper = Bus(endpoints, "scraper", context)
    supervisor = Bus(endpoints, "supervisor", context)
    role = Relay(None, Bus(endpoints, "relay", context))  # type: ignore[arg-type]
    thread = threading.Thread(target=role.loop)
    thread.start()
    try:
        for i in range(200):
            scraper.send("relay", RunnerLog(attempt_id="in", text=str(i)))
        got = [scraper.recv(2.0) for _ in range(400)]
        assert [m.text for m in got if m.attempt_id == "loop"] == [str(i) for i in range(200)]
        assert [m.text for m in got if m.attempt_id == "worker"] == [str(i) for i in range(200)]
        # one at a time, nothing is held back while the role waits
        for i in range(3):
            started = time.monotonic()
            scraper.send("relay", RunnerLog(attempt_id="in", text=f"single {i}"))
            assert scraper.recv(2.0).text == f"single {i}"
            assert scraper.recv(2.0).text == f"single {i}"
            assert time.monotonic() - started < 0.5
        beat = supervisor.recv(2.0)
        assert isinstance(beat, Heartbeat) and beat.role == "relay"
    finally:
        scraper.send("relay", Shutdown(reason="test over"))
        thread.join(5)
        assert not thread.is_alive()
        role.bus.close()
        scraper.close()
        supervisor.close()


def test_a_post_racing_the_wake_drain_never_leaves_later_posts_silent(endpoints, context,
                                                                        monkeypatch) -> None:
    """A worker's post that lands while the loop empties its wake-up pipe must not leave the
    role believing a wake-up byte is waiting when the pipe is empty: every later post would
    then wait for the next heartbeat (up to a second) instead of waking the loop."""
    import os
    import select

    from runner.roles import base as base_module
    role = Relay(None, Bus(endpoints, "relay", context))  # type: ignore[arg-type]
    real_read = os.read
    raced = []

    def read_with_a_racing_post(fd, n):
        if not raced:  # another thread posts just as the loop reads the pipe
            raced.append(True)
            worker = threading.Thread(target=role.post, args=(
                "scraper", RunnerLog(attempt_id="worker", text="raced")))
            worker.start()
            worker.join()
        return real_read(fd, n)

    try:
        role.wake()  # a first post's byte is waiting
        monkeypatch.setattr(base_module.os, "read", read_with_a_racing_post)
        role._drain_wake()
        monkeypatch.setattr(base_module.os, "read", real_read)
        readable = bool(select.select([role._wake_r], [], [], 0)[0])
        assert raced and (readable or not role._wake_pending)
        role._drain_wake()
        role.wake()  # the next post must wake the loop
        assert select.select([role._wake_r], [], [], 0)[0]
    finally:
        role.bus.close()
        os.close(role._wake_r)
        os.close(role._wake_w)


def test_poll_ms_rounds_up() -> None:
    assert [bus_module.poll_ms(t) for t in (0.0, 0.0001, 0.001, 0.0015, 0.15)] == [0, 1, 1, 2, 150]


class Ticking(Role):
    name = "ticking"
    TICK = 0.05

    def tick(self) -> None:
        pass


def test_an_idle_role_loop_sleeps_until_its_deadlines(endpoints, context) -> None:
    """Each wake-up of an idle loop is a tick or a heartbeat: a deadline under a millisecond
    away must not turn into polls of 0 ms repeated until it passes (a spin)."""
    role = Ticking(None, Bus(endpoints, "ticking", context))  # type: ignore[arg-type]
    polls = []
    real_poll = role.bus.poller.poll

    def counting_poll(timeout=None):
        polls.append(timeout)
        return real_poll(timeout)

    role.bus.poller.poll = counting_poll
    thread = threading.Thread(target=role.loop)
    thread.start()
    time.sleep(0.5)  # about 10 ticks and a heartbeat
    role.request_stop()
    role.wake()
    thread.join(5)
    role.bus.close()
    assert not thread.is_alive()
    assert 5 <= len(polls) <= 30, f"{len(polls)} polls in 0.5 s"
    assert polls.count(0) <= 2
