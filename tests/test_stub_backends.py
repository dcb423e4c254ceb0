"""The stub back ends for tests (runner.queues.memory, runner.storage.memory) keep the
contracts of the Queue and Store interfaces the roles rely on."""
from __future__ import annotations

import pytest

from runner import storage
from runner.config import load
from runner.errors import BadRequest, DeliveryLost, QueueError, StorageError
from runner.queues import QUEUE_KINDS, build_backends
from runner.queues import memory as memory_queues
from runner.queues.memory import MemoryBroker, MemoryQueue
from runner.storage import ObjectMissing
from runner.storage import memory as memory_storage


@pytest.fixture()
def queue():
    return MemoryQueue(MemoryBroker())


def test_fifo_requeue_to_its_place_with_attempts(queue) -> None:
    for body in (b"1", b"2", b"3"):
        queue.publish("memory_q", body)
    first = queue.take("memory_q")
    second = queue.take("memory_q")
    queue.requeue(first, attempts=2)
    assert queue.depth("memory_q") == 2 and queue.peek("memory_q", 5) == [b"1", b"3"]
    again = queue.take("memory_q")
    assert (again.body, again.attempts) == (b"1", 2)
    queue.ack(second)
    with pytest.raises(DeliveryLost):
        queue.ack(second)  # settled once only
    with pytest.raises(DeliveryLost):
        queue.keep_alive(second)
    queue.keep_alive(again)


def test_dead_letters_keep_body_reason_and_attempts(queue) -> None:
    queue.publish("memory_q", b"bad", attempts=1)
    queue.dead_letter(queue.take("memory_q"), "bad request: no key")
    dead = queue.broker.dead("memory_q")
    assert [(d.body, d.reason, d.attempts) for d in dead] == [(b"bad", "bad request: no key", 1)]
    assert queue.discover() == ["memory_q"] and queue.take("memory_q") is None


def test_a_queue_deleted_while_its_message_is_held(queue) -> None:
    queue.publish("memory_q", b"x")
    queue.publish("memory_other", b"y")
    held = queue.take("memory_q")
    queue.broker.delete_queue("memory_q")
    assert queue.discover() == ["memory_other"] and queue.queue_deleted(held)
    queue.requeue(held, attempts=1)  # nothing to go back to
    assert queue.broker.messages("memory_q") == [] and queue.broker.held() == []
    with pytest.raises(QueueError):
        queue.broker.delete_queue("memory_q")


def test_names_outside_the_kind_are_refused(queue) -> None:
    for name in ("local_q", "memory_q_dead", "memory_q_response"):
        with pytest.raises(QueueError):
            queue.publish(name, b"x")


def test_the_memory_kind_is_built_only_while_installed(tmp_path) -> None:
    config = load(["--queue-root", str(tmp_path / "q"), "--working-dir", str(tmp_path / "w"),
                   "--runtime-dir", str(tmp_path / "r")], environ={}).with_instance("t-1")
    assert QUEUE_KINDS["memory"] is MemoryQueue
    backends = build_backends(config)
    try:
        assert "memory" not in backends
    finally:
        for backend in backends.values():
            backend.close()
    broker = memory_queues.install()
    try:
        backends = build_backends(config)
        assert backends["memory"].broker is broker
        for backend in backends.values():
            backend.close()
    finally:
        memory_queues.uninstall()


def test_memory_urls_are_refused_unless_installed(tmp_path) -> None:
    with pytest.raises(BadRequest):
        storage.open_store("memory://b/k")
    objects = memory_storage.install()
    try:
        store = storage.open_store("memory://b/dir/k")
        assert store.stat("memory://b/dir/k") is None
        with pytest.raises(ObjectMissing):
            store.get("memory://b/dir/k", tmp_path / "out")
        assert not (tmp_path / "out").exists()
        source = tmp_path / "src"
        source.write_bytes(b"data")
        info = store.put("memory://b/dir/k", source)
        assert info.size == 4 and store.stat("memory://b/dir/k") == info
        store.put_bytes("memory://b/dir/l", b"more")
        assert store.list("memory://b/dir/") == ["memory://b/dir/k", "memory://b/dir/l"]
        assert store.list("") == []
        got = store.get("memory://b/dir/k", tmp_path / "deep" / "out")
        assert (tmp_path / "deep" / "out").read_bytes() == b"data" and got.etag == info.etag
        assert [p.name for p in (tmp_path / "deep").iterdir()] == ["out"]  # no partials
        assert objects.puts() == ["memory://b/dir/k", "memory://b/dir/l"]
        with pytest.raises(StorageError):
            store.put_bytes("memory://no-key", b"")
    finally:
        memory_storage.uninstall()
    assert "memory" not in storage.STORES
