"""Tests of the local (directory) queue back end and the queue-name filter."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runner.errors import QueueError
from runner.queues import QUEUE_KINDS, Delivery, LocalQueue, kind_of, matches
from runner.queues.local import CLAIMED, DEAD, OWNERS

REPO = Path(__file__).resolve().parents[1]
Q = "local_attempts"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "queues"


@pytest.fixture
def q(root: Path):
    lq = LocalQueue(root, "A", durable=False)
    yield lq
    lq.close()


def test_registry_and_kind_of() -> None:
    assert QUEUE_KINDS["local"] is LocalQueue
    assert LocalQueue.kind == "local"
    assert kind_of("local_attempts") == "local"
    assert kind_of("rmq_a_b") == "rmq"
    assert kind_of("plainname") == ""


def test_creates_root_and_owner_lock(root: Path) -> None:
    assert not root.exists()
    lq = LocalQueue(root, "A")
    assert (root / OWNERS / "A.lock").exists()
    lq.close()
    assert not (root / OWNERS / "A.lock").exists()
    with pytest.raises(QueueError):
        lq.take(Q)


def test_same_owner_twice_is_refused(root: Path) -> None:
    a = LocalQueue(root, "A")
    with pytest.raises(QueueError):
        LocalQueue(root, "A", lock_timeout_s=0.2)
    a.close()
    LocalQueue(root, "A").close()


def test_publish_take_ack(q: LocalQueue) -> None:
    assert q.take(Q) is None
    q.publish(Q, b"hello")
    assert q.depth(Q) == 1
    d = q.take(Q)
    assert isinstance(d, Delivery)
    assert (d.queue, d.body, d.attempts) == (Q, b"hello", 0)
    assert d.token.startswith(f"{Q}/{CLAIMED}/A/")
    assert q.depth(Q) == 0
    assert q.take(Q) is None
    q.keep_alive(d)
    q.ack(d)
    assert not (q.root / d.token).exists()
    with pytest.raises(QueueError):
        q.ack(d)
    with pytest.raises(QueueError):
        q.keep_alive(d)


def test_publish_with_attempts(q: LocalQueue) -> None:
    q.publish(Q, b"x", attempts=2)
    d = q.take(Q)
    assert d is not None and d.attempts == 2


def test_fifo(q: LocalQueue) -> None:
    bodies = [f"m{i}".encode() for i in range(50)]
    for b in bodies:
        q.publish(Q, b)
    got = []
    while (d := q.take(Q)) is not None:
        got.append(d.body)
        q.ack(d)
    assert got == bodies


def test_requeue_keeps_attempts_and_order(q: LocalQueue, root: Path) -> None:
    for b in (b"first", b"second", b"third"):
        q.publish(Q, b)
    d = q.take(Q)
    assert d is not None and d.body == b"first"
    q.requeue(d, attempts=1)
    with pytest.raises(QueueError):
        q.requeue(d, attempts=1)  # already settled
    # Survives a new instance (a different runner): attempts are on disk.
    other = LocalQueue(root, "B", durable=False)
    d2 = other.take(Q)
    assert d2 is not None and (d2.body, d2.attempts) == (b"first", 1)
    other.requeue(d2, attempts=3)
    d3 = q.take(Q)
    assert d3 is not None and (d3.body, d3.attempts) == (b"first", 3)
    q.ack(d3)
    assert [q.take(Q).body for _ in range(2)] == [b"second", b"third"]  # type: ignore[union-attr]
    other.close()


def test_dead_letter_with_reason(q: LocalQueue, root: Path) -> None:
    q.publish(Q, b"not json")
    d = q.take(Q)
    assert d is not None
    q.dead_letter(d, "bad request: not JSON")
    name = d.token.rsplit("/", 1)[1]
    dead = root / Q / DEAD
    assert (dead / name).read_bytes() == b"not json"
    assert (dead / f"{name}.reason.txt").read_text() == "bad request: not JSON"
    assert q.depth(Q) == 0 and q.take(Q) is None
    with pytest.raises(QueueError):
        q.dead_letter(d, "again")
    assert Q in q.discover() and f"{Q}_dead" not in q.discover()


def test_unknown_tokens(q: LocalQueue) -> None:
    bad = [
        Delivery(Q, "nonsense", b"", 0),
        Delivery(Q, f"{Q}/{CLAIMED}/A/00000000000000000001-0123456789abcdef.a0", b"", 0),
        Delivery(Q, f"{Q}/{CLAIMED}/../../etc/passwd", b"", 0),
        Delivery(Q, f"../{CLAIMED}/A/00000000000000000001-0123456789abcdef.a0", b"", 0),
    ]
    for d in bad:
        for op in (q.ack, q.keep_alive, lambda d: q.requeue(d, attempts=1),
                   lambda d: q.dead_letter(d, "x")):
            with pytest.raises(QueueError):
                op(d)
    q.publish(Q, b"x")
    d = q.take(Q)
    assert d is not None
    with pytest.raises(QueueError):  # token of another queue
        q.ack(Delivery("local_other", d.token, d.body, d.attempts))
    q.ack(d)


def test_token_settled_by_another_instance(q: LocalQueue, root: Path) -> None:
    q.publish(Q, b"x")
    d = q.take(Q)
    assert d is not None
    other = LocalQueue(root, "B")
    other.ack(Delivery(d.queue, d.token, d.body, d.attempts))
    other.close()
    assert q.take(Q) is None


def test_discover(q: LocalQueue, root: Path) -> None:
    for name in ("local_a", "local_b", "local_a_response", "local_b_dead"):
        q.publish(name, b"x")
    (root / "rmq_other").mkdir()
    (root / "notes").mkdir()
    (root / "local_file").write_text("a file, not a queue")
    assert q.discover() == ["local_a", "local_b"]


def test_bad_queue_names(q: LocalQueue) -> None:
    for name in ("rmq_x", "../local_x", "local_x/y", ".claimed"):
        with pytest.raises(QueueError):
            q.publish(name, b"x")
        with pytest.raises(QueueError):
            q.take(name)


@pytest.mark.parametrize("name, match, mismatch, expected", [
    ("local_attempts", None, None, True),
    ("rmq_attempts", None, None, True),
    ("sqs_attempts", None, None, True),
    ("pubsub_attempts", None, None, False),
    ("attempts", None, None, False),
    ("local_attempts_response", None, None, False),
    ("local_attempts_dead", None, None, False),
    ("rmq_attempts", "", "", True),
    ("local_attempts", None, "^local_", False),
    ("local_attempts", r"^local_", r"_test$", True),
    ("local_attempts_test", r"^local_", r"_test$", False),
    ("my-subscription", r"^my-", None, True),
    ("my-subscription_response", r".*", None, False),
])
def test_matches(name: str, match: str | None, mismatch: str | None, expected: bool) -> None:
    assert matches(name, match, mismatch) is expected


def test_matches_default_args() -> None:
    assert matches("local_x") and not matches("foo_x")


def test_peek_and_depth(q: LocalQueue) -> None:
    assert q.depth("local_missing") == 0 and q.peek("local_missing", 5) == []
    for i in range(5):
        q.publish(Q, f"{i}".encode())
    assert q.depth(Q) == 5
    assert q.peek(Q, 3) == [b"0", b"1", b"2"]
    assert q.peek(Q, 0) == []
    assert q.peek(Q, 100) == [b"0", b"1", b"2", b"3", b"4"]
    d = q.take(Q)
    assert q.depth(Q) == 4 and q.peek(Q, 1) == [b"1"]
    assert d is not None


def test_two_instances_race(root: Path) -> None:
    n = 600
    pub = LocalQueue(root, "P", durable=False)
    for i in range(n):
        pub.publish(Q, str(i).encode())
    instances = [LocalQueue(root, f"R{k}", durable=False) for k in range(2)]
    taken: list[list[bytes]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def worker(idx: int) -> None:
        lq = instances[idx % 2]
        start.wait()
        while (d := lq.take(Q)) is not None:
            taken[idx].append(d.body)
            lq.ack(d)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [b for part in taken for b in part]
    assert sorted(everything) == sorted(str(i).encode() for i in range(n))
    assert len(everything) == len(set(everything)) == n
    for lq in [pub, *instances]:
        lq.close()


_CHILD_TAKE_ALL = """
import sys
from runner.queues import LocalQueue
q = LocalQueue(sys.argv[1], sys.argv[2], durable=False)
while (d := q.take(sys.argv[3])) is not None:
    print(d.body.decode(), flush=True)
    q.ack(d)
"""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_two_processes_race(root: Path) -> None:
    n = 400
    pub = LocalQueue(root, "P", durable=False)
    for i in range(n):
        pub.publish(Q, str(i).encode())
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD_TAKE_ALL, str(root), f"C{k}", Q],
                              stdout=subprocess.PIPE, env=_child_env(), cwd=REPO)
             for k in range(3)]
    outs = [p.communicate(timeout=60)[0].decode().split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    everything = [x for out in outs for x in out]
    assert sorted(everything, key=int) == [str(i) for i in range(n)]
    pub.close()


_CHILD_TAKE_AND_HANG = """
import sys, time
from runner.queues import LocalQueue
q = LocalQueue(sys.argv[1], sys.argv[2])
d = q.take(sys.argv[3])
print(d.token, flush=True)
time.sleep(600)
"""


def _kill_child_holding_claim(root: Path, owner: str) -> str:
    p = subprocess.Popen([sys.executable, "-c", _CHILD_TAKE_AND_HANG, str(root), owner, Q],
                         stdout=subprocess.PIPE, env=_child_env(), cwd=REPO)
    try:
        assert p.stdout is not None
        token = p.stdout.readline().decode().strip()
        assert token.startswith(f"{Q}/{CLAIMED}/{owner}/")
        # While the child lives its claim is not recoverable by others.
        with LocalQueue(root, "probe") as probe:
            assert probe.recover() == 0
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    return token


def test_crash_safety_recover_by_other_owner(root: Path) -> None:
    with LocalQueue(root, "pub") as pub:
        pub.publish(Q, b"precious")
    token = _kill_child_holding_claim(root, "X")
    assert (root / token).exists()
    with LocalQueue(root, "Y") as y:
        assert y.take(Q) is None
        assert y.recover() == 1
        assert not (root / token).exists()
        d = y.take(Q)
        assert d is not None and (d.body, d.attempts) == (b"precious", 0)
        y.ack(d)
        assert y.recover() == 0


def test_crash_recovery_keeps_order_and_attempts(root: Path) -> None:
    with LocalQueue(root, "pub") as pub:
        pub.publish(Q, b"one", attempts=2)
        pub.publish(Q, b"two")
    _kill_child_holding_claim(root, "X")  # holds "one"
    with LocalQueue(root, "Y") as y:
        assert y.peek(Q, 10) == [b"two"]
        assert y.recover() == 1
        assert y.peek(Q, 10) == [b"one", b"two"]
        d = y.take(Q)
        assert d is not None and (d.body, d.attempts) == (b"one", 2)


def test_restarted_same_owner_recovers_own_only_when_asked(root: Path) -> None:
    with LocalQueue(root, "pub") as pub:
        pub.publish(Q, b"mine")
    _kill_child_holding_claim(root, "X")
    with LocalQueue(root, "X") as x:  # the same runner, restarted
        assert x.recover() == 0
        assert x.take(Q) is None
        assert x.recover(include_own=True) == 1
        d = x.take(Q)
        assert d is not None and d.body == b"mine"


def test_live_owner_claims_not_recovered(root: Path) -> None:
    a = LocalQueue(root, "A")
    a.publish(Q, b"busy")
    d = a.take(Q)
    assert d is not None
    b = LocalQueue(root, "B")
    assert b.recover() == 0
    assert b.take(Q) is None
    assert (root / d.token).exists()
    a.ack(d)
    a.close()
    b.close()


def test_closed_owner_claims_are_recoverable(root: Path) -> None:
    a = LocalQueue(root, "A")
    a.publish(Q, b"left behind")
    assert a.take(Q) is not None
    a.close()
    with LocalQueue(root, "B") as b:
        assert b.recover() == 1
        d = b.take(Q)
        assert d is not None and d.body == b"left behind"


def test_publish_is_atomic(root: Path) -> None:
    """A reader never sees a message file without its full content."""
    size = 256 * 1024
    pub = LocalQueue(root, "P", durable=False)
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        qdir = root / Q
        while not stop.is_set():
            try:
                entries = list(os.scandir(qdir))
            except FileNotFoundError:
                continue
            for e in entries:
                if not e.is_file():
                    continue
                try:
                    data = Path(e.path).read_bytes()
                except FileNotFoundError:
                    continue
                if len(data) != size or data[:1] != data[-1:]:
                    problems.append(f"{e.name}: {len(data)} bytes")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(60):
            pub.publish(Q, bytes([i % 256]) * size)
    finally:
        stop.set()
        t.join()
    assert problems == []
    assert pub.depth(Q) == 60
    assert list((root / ".incoming").iterdir()) == []
    assert pub.discover() == [Q]
    pub.close()


def test_take_is_cheap_with_many_messages(q: LocalQueue) -> None:
    for _i in range(2000):
        q.publish(Q, b"x")
    t0 = time.perf_counter()
    for _ in range(20):
        d = q.take(Q)
        assert d is not None
        q.ack(d)
    assert (time.perf_counter() - t0) / 20 < 0.05


# -- files other tools put into a queue folder ----------------------------------------------

def test_a_file_renamed_in_under_its_own_name_is_taken_in_at_the_back(
        q: LocalQueue, root: Path) -> None:
    q.publish(Q, b"first")
    staging = root / "elsewhere.json"
    staging.write_bytes(b"from another tool")
    os.rename(staging, root / Q / "tool-message.json")
    (root / Q / ".hidden-in-progress").write_bytes(b"not yet")
    assert q.depth(Q) == 2
    assert q.take(Q).body == b"first"
    foreign = q.take(Q)
    assert foreign.body == b"from another tool" and foreign.attempts == 0
    assert q.take(Q) is None
    q.ack(foreign)
    assert sorted(p.name for p in (root / Q).iterdir()) == [".claimed", ".hidden-in-progress"]


def test_entries_that_cannot_be_messages_are_dead_lettered_not_skipped(
        q: LocalQueue, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="runner.queues.local")
    q.publish(Q, b"placeholder")
    os.mkfifo(root / Q / "a-pipe")
    os.symlink("/etc/hostname", root / Q / "a-link")
    (root / Q / "a-folder").mkdir()
    claimed = q.take(Q)
    assert claimed.body == b"placeholder"
    assert q.take(Q) is None  # the pipe and the link are gone, the folder left alone
    reasons = sorted(p.read_text() for p in (root / Q / DEAD).glob("*.reason.txt"))
    assert len(reasons) == 2 and all("not a regular file" in r for r in reasons)
    assert (root / Q / "a-folder").is_dir()
    assert q.take(Q) is None and q.depth(Q) == 0  # looked at again: warned about once
    folder_lines = [r.getMessage() for r in caplog.records if "a-folder" in r.getMessage()]
    assert len(folder_lines) == 1 and "is a folder in queue local_" in folder_lines[0]


def test_a_message_that_cannot_be_read_is_dead_lettered_and_the_next_is_taken(
        q: LocalQueue, root: Path) -> None:
    first = q.publish(Q, b"unreadable")
    q.publish(Q, b"readable")
    (root / Q / first).unlink()
    os.mkfifo(root / Q / first)  # a message name, but not a file: reading it would block
    delivery = q.take(Q)
    assert delivery.body == b"readable"
    reason = (root / Q / DEAD / (first + ".reason.txt")).read_text()
    assert "cannot be read" in reason


def test_a_queue_listed_by_two_back_ends_is_served_by_the_first(caplog) -> None:
    from runner.queues import owners

    found = owners({"local": ["local_a", "shared"], "pubsub": ["shared", "topic-b"]})
    assert found == {"local_a": "local", "shared": "local", "topic-b": "pubsub"}
    assert any("listed by both local and pubsub" in r.getMessage() for r in caplog.records)
