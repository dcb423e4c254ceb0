"""Wire format of the internal bus (runner.protocol) and a real ZeroMQ Bus exchange."""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from runner import protocol
from runner.bus import Bus, Endpoints
from runner.errors import ProtocolError
from runner.protocol import (Adopt, AttemptEnded, AttemptOpened, Cancel, CtlReply, CtlRequest,
                             Heartbeat, Attempt, AttemptAssigned, AttemptDone, AttemptPhase, AttemptPrepared, Outcome, RunEnded,
                             OutputChunk, QueueStats, Reload, RunnerLog, Shutdown, StartTaking,
                             StopRuns, StopTaking, UploadRequest)


def make_attempt(attempt_id: str = "host-1r31eq") -> Attempt:
    return Attempt(attempt_id=attempt_id, queue="local_q", token="tok-1", attempts=1, key="exp-1",
               project="proj",
               request={"experiment": {"key": "exp-1", "filename": "train.py",
                                       "args": ["'two words'"]}, "config": {"env": {}}},
               workdir="/tmp/work/exp-1", resources={"cpus": 2, "ram": 2 * 10**9},
               taken_at=1700000000.5, deadline=1700003600.0, max_duration=90.0,
               save_frequency=30.0)


OUTCOME = Outcome(status="failed", error="ExperimentFailed", message="exit 3", exit_code=3)

# One sample per message type, every field set to a non-default value where possible.
SAMPLES = {
    "heartbeat": Heartbeat(role="executor", pid=4242, stats={"running": 2}),
    "shutdown": Shutdown(reason="SIGTERM"),
    "stop_taking": StopTaking(),
    "start_taking": StartTaking(),
    "reload": Reload(options={"queue_match": "^local_a$", "limit_tasks": 3,
                              "log_level": "debug"}),
    "stop_runs": StopRuns(reason="limit", attempt_ids=["host-a", "host-b"]),
    "cancel": Cancel(key="exp-1", project="p"),
    "adopt": Adopt(attempts=[protocol.to_map(make_attempt())]),
    "attempt_assigned": AttemptAssigned(attempt=make_attempt()),
    "attempt_opened": AttemptOpened(attempt=make_attempt()),
    "attempt_prepared": AttemptPrepared(attempt=make_attempt(), python="/usr/bin/python3.11", env_path="/envs/x"),
    "output_chunk": OutputChunk(attempt_id="host-1r31eq", data=b"line one\n\xff\x00binary\n"),
    "runner_log": RunnerLog(attempt_id="host-1r31eq", text="downloaded workspace"),
    "attempt_ended": AttemptEnded(attempt=make_attempt(), outcome=OUTCOME, facts={"exit_code": 3}),
    "upload_request": UploadRequest(attempt=make_attempt(), final=True, outcome=OUTCOME),
    "attempt_done": AttemptDone(attempt=make_attempt(), outcome=OUTCOME, upload_error="bucket gone"),
    "run_ended": RunEnded(attempt_id="host-1r31eq"),
    "record_state": protocol.RecordState(attempt_id="host-1r31eq", state={"state": "ok", "tries": 1}),
    "attempt_phase": AttemptPhase(attempt=make_attempt(), phase="running", role="executor", at=1700000001.25,
                          detail={"pid": 99}),
    "queue_stats": QueueStats(queues={"local_q": {"depth": 3, "waiting": [
        {"key": "k1", "project": "p"}]}}, taking=True),
    "ctl_request": CtlRequest(command="status", args={"verbose": True}),
    "ctl_reply": CtlReply(ok=False, data={"x": [1, 2]}, error="no such attempt"),
}


def test_samples_cover_every_message_type() -> None:
    assert set(SAMPLES) == set(protocol.MESSAGE_TYPES)
    for name, message in SAMPLES.items():
        assert type(message) is protocol.MESSAGE_TYPES[name]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_every_type(name: str) -> None:
    message = SAMPLES[name]
    frame = protocol.encode(message)
    assert isinstance(frame, bytes)
    back = protocol.decode(frame)
    assert type(back) is type(message)
    assert back == message
    for f in dataclasses.fields(back):
        value = getattr(back, f.name)
        original = getattr(message, f.name)
        if isinstance(original, (Attempt, Outcome)):
            assert type(value) is type(original), f"{name}.{f.name} came back as {type(value)}"


def test_nested_dataclasses_and_bytes_keep_their_types() -> None:
    done = protocol.decode(protocol.encode(SAMPLES["attempt_done"]))
    assert isinstance(done.attempt, Attempt) and isinstance(done.outcome, Outcome)
    assert done.attempt.request["experiment"]["args"] == ["'two words'"]
    assert done.outcome.exit_code == 3
    chunk = protocol.decode(protocol.encode(SAMPLES["output_chunk"]))
    assert isinstance(chunk.data, bytes)
    assert chunk.data == b"line one\n\xff\x00binary\n"
    upload = protocol.decode(protocol.encode(UploadRequest(attempt=make_attempt(), final=False)))
    assert upload.outcome is None and upload.final is False


def test_adopt_attempts_come_back_as_attempts() -> None:
    adopt = protocol.decode(protocol.encode(SAMPLES["adopt"]))
    assert protocol.attempts_from_maps(adopt.attempts) == [make_attempt()]


def test_frame_layout() -> None:
    frame = msgpack.unpackb(protocol.encode(Shutdown(reason="x")), raw=False)
    assert frame == [protocol.PROTOCOL_VERSION, "shutdown", "x"]
    done = AttemptDone(attempt=make_attempt(), outcome=Outcome(status="completed", exit_code=0))
    frame = msgpack.unpackb(protocol.encode(done), raw=False)
    assert frame[:2] == [protocol.PROTOCOL_VERSION, "attempt_done"]
    assert frame[2] == list(protocol.to_map(make_attempt()).values())  # declaration order
    assert frame[3] == ["completed", "", "", 0, ""] and frame[4:] == ["", ""]


def test_wrong_version_is_a_protocol_error() -> None:
    frame = msgpack.packb([protocol.PROTOCOL_VERSION + 1, "shutdown", {"reason": "x"}],
                          use_bin_type=True)
    with pytest.raises(ProtocolError, match="version"):
        protocol.decode(frame)


def test_unknown_type_is_a_protocol_error() -> None:
    frame = msgpack.packb([protocol.PROTOCOL_VERSION, "no_such_type", {}], use_bin_type=True)
    with pytest.raises(ProtocolError, match="unknown message type"):
        protocol.decode(frame)


@pytest.mark.parametrize("frame", [
    b"",
    b"\xc1",
    b"garbage bytes here",
    bytes(range(256)),
    protocol.encode(Shutdown(reason="x"))[:-1],            # truncated
    msgpack.packb(5),                                        # not an array
    msgpack.packb([protocol.PROTOCOL_VERSION]),              # too short
    msgpack.packb([protocol.PROTOCOL_VERSION, ["x"], {}]),   # unhashable type name
    msgpack.packb([protocol.PROTOCOL_VERSION, {"a": 1}, {}]),
    msgpack.packb({"not": "an array"}),
    msgpack.packb([protocol.PROTOCOL_VERSION, "heartbeat", "x"]),  # missing pid
])
def test_garbage_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(frame)


def test_oversize_frame_is_a_protocol_error() -> None:
    frame = protocol.encode(OutputChunk(attempt_id="j", data=b"x" * protocol.MAX_FRAME_BYTES))
    assert len(frame) > protocol.MAX_FRAME_BYTES
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode(frame)


def test_fields_appended_by_a_newer_sender_are_ignored() -> None:
    attempt = list(protocol.to_map(make_attempt()).values()) + [{"added": "later"}]
    frame = msgpack.packb([protocol.PROTOCOL_VERSION, "attempt_done", attempt,
                           ["completed", "", "", None, "", "a future field"], "", "", [1, 2, 3]],
                          use_bin_type=True)
    done = protocol.decode(frame)
    assert done == AttemptDone(attempt=make_attempt(), outcome=Outcome(status="completed"))


def test_fields_missing_from_an_older_sender_take_their_defaults() -> None:
    frame = msgpack.packb([protocol.PROTOCOL_VERSION, "stop_runs", "drain"], use_bin_type=True)
    assert protocol.decode(frame) == protocol.StopRuns(reason="drain")


# --------------------------------------------------------------------------- real ZeroMQ

@pytest.fixture
def runtime_dir():
    path = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))
    assert len(str(Endpoints(path).inbox("cache_manager"))) < 100
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_for(bus: Bus, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = bus.recv(0.2)
        if message is not None:
            return message
    return None


def test_two_buses_exchange_messages_in_order(runtime_dir: Path, context: zmq.Context) -> None:
    endpoints = Endpoints(runtime_dir)
    fetcher = Bus(endpoints, "fetcher", context)
    scraper = Bus(endpoints, "scraper", context)
    try:
        assert endpoints.inbox_path("scraper").exists()
        sent = [RunnerLog(attempt_id="j", text=f"line {i}") for i in range(50)]
        sent.append(SAMPLES["attempt_done"])
        for message in sent:
            assert fetcher.send("scraper", message) is True
        received = [wait_for(scraper) for _ in sent]
        assert received == sent
        assert isinstance(received[-1].attempt, Attempt)
        # and back the other way
        assert scraper.send("fetcher", Heartbeat(role="scraper", pid=1)) is True
        assert wait_for(fetcher) == Heartbeat(role="scraper", pid=1)
    finally:
        fetcher.close()
        scraper.close()


def test_recv_timeout_returns_none(runtime_dir: Path, context: zmq.Context) -> None:
    bus = Bus(Endpoints(runtime_dir), "executor", context)
    try:
        started = time.monotonic()
        assert bus.recv(0.2) is None
        elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < 2.0
        assert bus.recv_nowait() is None
    finally:
        bus.close()


def test_undecodable_frame_is_dropped(runtime_dir: Path, context: zmq.Context) -> None:
    endpoints = Endpoints(runtime_dir)
    bus = Bus(endpoints, "uploader", context)
    raw = context.socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(endpoints.inbox("uploader"))
    try:
        raw.send(b"this is not msgpack \xc1\xc1")
        raw.send(msgpack.packb([protocol.PROTOCOL_VERSION, ["unhashable"], {}]))
        raw.send(protocol.encode(Shutdown(reason="after garbage")))
        assert wait_for(bus) == Shutdown(reason="after garbage")
        assert bus.recv(0.1) is None
    finally:
        raw.close()
        bus.close()
