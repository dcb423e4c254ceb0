"""Admission alone (runner/admission.py): a delivery becomes an attempt or meets its fate.

Admission runs with a real config, ledger, delivery book and held-aside list.  What it asks
of the fetcher (settle a delivery, write a record, start an attempt, rest a queue) is
written down by :class:`Asked`, which stands in for the fetcher's side of the
:class:`runner.admission.Effects` contract; the fetcher's own side (the broker calls) is
proven end to end in tests/test_e2e_admission.py and tests/test_e2e_rabbitmq.py.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass

import pytest

from runner import fates
from runner.admission import Admission, describe_needs, waiting_summary
from runner.config import load
from runner.deliveries import DeliveryBook, Settle
from runner.held_aside import BACKOFF, NEVER, NOT_NOW, PARK_MAX, HeldAside
from runner.queues.base import Delivery
from runner.resources import Ledger

from .support import short_tempdir


@dataclass(frozen=True)
class Backend:
    """The handle of a back end as admission passes it on: only ``kind`` is read."""

    kind: str = "local"


LOCAL = Backend()


class Asked:
    """Writes down what admission asks of the fetcher (the Effects contract)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def settle_delivery(self, settle: Settle) -> bool:
        self.calls.append(("settle", settle.delivery.token, settle.action, settle.reason))
        return True

    def record(self, request, status, attempt_id, attempts, final, reason=""):
        self.calls.append(("record", request["experiment"]["key"], status, final, reason))

    def start(self, attempt):
        self.calls.append(("start", attempt.key, attempt.attempt_id))

    def end_client_record(self, key, request):
        self.calls.append(("end_client_record", key))

    def rest(self, queue):
        self.calls.append(("rest", queue))

    def runner_log(self, attempt_id, text):
        self.calls.append(("runner_log", attempt_id))

    def stats_changed(self):
        self.calls.append(("stats_changed",))

    def of(self, kind: str) -> list[tuple]:
        return [call for call in self.calls if call[0] == kind]


@pytest.fixture()
def admission():
    root = short_tempdir()
    config = load(["--queue-root", str(root / "q"), "--working-dir", str(root / "w"),
                   "--cache-dir", str(root / "c"), "--runtime-dir", str(root / "run"),
                   "--executors", "1", "--max-cores", "2", "--hostname", "host1"], environ={})
    (root / "w").mkdir(parents=True)
    ledger = Ledger(slots=1, cpus=2, ram=0, disk_path=None)
    admission = Admission(config, ledger, DeliveryBook(), HeldAside(), Asked(),
                          logging.getLogger("test.admission"))
    yield admission
    shutil.rmtree(root, ignore_errors=True)


WORKSPACE = {"key": "experiments/exp-1/workspace.tar", "bucket": "studioml",
             "qualified": "file:///srv/studioml/experiments/exp-1/workspace.tar"}


def body(key: str = "exp-1", cpus: int = 1, config: dict | None = None, **experiment) -> bytes:
    return json.dumps({"experiment": {"key": key, "filename": "train.py",
                                      "artifacts": {"workspace": WORKSPACE},
                                      "resources_needed": {"cpus": cpus},
                                      "time_added": 1700000000.0, **experiment},
                       "config": config or {}}).encode()


def delivery(token: str = "t1", data: bytes | None = None) -> Delivery:
    return Delivery("local_q", token, body() if data is None else data, 0)


def test_a_request_that_fits_is_reserved_held_and_started(admission):
    admission.accept(LOCAL, delivery())
    [(_, key, attempt_id)] = admission.effects.of("start")
    assert key == "exp-1" and attempt_id in admission.ledger.held
    held = admission.book.held[attempt_id]
    assert held.delivery.token == "t1" and held.attempt.queue_type == "local"
    assert admission.taken == 1 and admission.effects.of("settle") == []


def test_a_bad_body_is_dead_lettered_with_its_reason(admission):
    admission.accept(LOCAL, delivery(data=b"{not json"))
    [(_, token, action, reason)] = admission.effects.of("settle")
    assert (token, action) == ("t1", fates.DEAD) and "JSON" in reason
    assert admission.effects.of("start") == []


def test_an_exception_while_admitting_dead_letters_the_delivery(admission, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(admission.ledger, "try_reserve", broken)
    admission.accept(LOCAL, delivery())
    [(_, _, action, reason)] = admission.effects.of("settle")
    assert action == fates.DEAD and "RuntimeError: a bug" in reason


def test_a_redelivery_of_a_running_request_starts_no_second_copy(admission):
    admission.accept(LOCAL, delivery("t1"))
    admission.accept(LOCAL, delivery("t2"))
    [held] = admission.book.held.values()
    assert [d.token for d in held.deliveries] == ["t1", "t2"]
    assert len(admission.effects.of("start")) == 1 and admission.effects.of("runner_log")


def test_a_request_cancelled_before_it_was_taken_is_acked_cancelled(admission):
    admission.book.cancel("exp-1", "", time.monotonic())
    admission.accept(LOCAL, delivery())
    assert admission.effects.of("record") == [("record", "exp-1", fates.CANCELLED, True, "")]
    assert admission.effects.of("settle") == [("settle", "t1", fates.ACK, "cancelled")]
    assert admission.effects.of("start") == []


def test_a_held_aside_request_that_is_cancelled_is_acked_cancelled_not_started(admission):
    admission.accept(LOCAL, delivery("running"))
    admission.accept(LOCAL, delivery("waiting", body("later")))
    assert admission.book.cancel("later", "", time.monotonic()) == []  # not held: a promise
    [running] = admission.book.held
    admission.ledger.release(running)  # room for it now
    admission.serve_held_aside(taking=True)
    assert [call[1] for call in admission.effects.of("start")] == ["exp-1"]
    assert admission.effects.of("settle") == [("settle", "waiting", fates.ACK, "cancelled")]
    assert len(admission.aside) == 0


def test_a_stale_request_is_acked_expired_and_its_client_record_ended(admission):
    stale = body(time_added=1.0, config={"experimentLifetime": "1m"})
    admission.accept(LOCAL, delivery(data=stale))
    assert admission.effects.of("record") == [("record", "exp-1", fates.EXPIRED, True, "")]
    assert admission.effects.of("end_client_record") == [("end_client_record", "exp-1")]
    assert admission.effects.of("settle") == [("settle", "t1", fates.ACK, "stale")]


def test_requests_that_do_not_fit_are_held_aside_and_the_one_too_many_put_back(admission):
    admission.accept(LOCAL, delivery("running"))
    for n in range(PARK_MAX):
        admission.accept(LOCAL, delivery(f"t{n}", body(f"k{n}")))
    assert len(admission.aside) == PARK_MAX
    assert {item.why for item in admission.aside.items.values()} == {NOT_NOW}
    admission.accept(LOCAL, delivery("extra", body("extra")))
    assert admission.effects.of("settle") == [("settle", "extra", fates.REQUEUE,
                                               "does not fit now")]
    assert admission.effects.of("rest") == [("rest", "local_q")]


def test_a_request_that_never_fits_is_recorded_waiting_once(admission):
    admission.accept(LOCAL, delivery("t1", body("huge", cpus=64)))
    [item] = admission.aside.items.values()
    assert item.why == NEVER
    [record] = admission.effects.of("record")
    assert record[2:] == ("waiting", False, "host1: needs 64 CPUs; this runner has 2")
    admission.put_all_back("the runner takes no new requests")
    admission.accept(LOCAL, delivery("t2", body("huge", cpus=64)))
    assert len(admission.effects.of("record")) == 1  # said once per key


def test_held_aside_requests_start_when_room_frees_and_go_back_when_draining(admission):
    admission.accept(LOCAL, delivery("running"))
    admission.accept(LOCAL, delivery("waiting", body("later")))
    [running] = admission.book.held
    admission.ledger.release(running)
    admission.serve_held_aside(taking=True)
    assert [call[1] for call in admission.effects.of("start")] == ["exp-1", "later"]
    assert len(admission.aside) == 0
    admission.accept(LOCAL, delivery("third", body("third")))
    admission.put_all_back("the runner is stopping")
    assert admission.effects.of("settle") == [("settle", "third", fates.REQUEUE,
                                               "the runner is stopping")]


def test_a_hand_back_is_held_aside_for_its_back_off_with_its_new_count(admission):
    admission.accept(LOCAL, delivery())
    [attempt_id] = admission.book.held
    held = admission.book.end(attempt_id)
    admission.ledger.release(attempt_id)
    decision = fates.decide(fates.outcome_for_exception(fates.RoleCrashed("x")), 0, 3)
    assert admission.back_off(held, decision, 1)
    [item] = admission.aside.items.values()
    assert item.why == BACKOFF and item.delivery.token == "t1"
    admission.serve_held_aside(taking=True)  # resting: not tried before its delay ends
    assert len(admission.effects.of("start")) == 1
    item.until = 0.0
    admission.serve_held_aside(taking=True)
    assert len(admission.effects.of("start")) == 2 and len(admission.aside) == 0


def test_the_queue_view_shows_waiting_bodies_then_the_requests_held_aside(admission):
    """runner-ctl queues (test_runner_submit_wait_says_why_a_request_cannot_run)."""
    admission.accept(LOCAL, delivery("t1", body("huge", cpus=64)))
    never = "cannot run on host1: needs 64 CPUs; this runner has 2"
    waiting, held = admission.queue_view("local_q", [body("huge", cpus=64), body("next"),
                                                     b"\xff"])
    assert held == 1
    assert waiting == [{"key": "huge", "project": "", "reason": never},
                       {"key": "next", "project": ""},
                       {"key": "?", "project": ""},
                       {"key": "huge", "project": "", "held": NEVER, "reason": never}]
    assert admission.queue_view("local_other", []) == ([], 0)


def test_waiting_summaries_never_raise_and_needs_read_as_words():
    assert waiting_summary(body("k", project="p")) == {"key": "k", "project": "p"}
    assert waiting_summary(b"\xff") == {"key": "?", "project": ""}
    assert describe_needs({"cpus": 2, "ram": 10**8, "gpus": 1}) == "2 CPUs, 100 MB RAM, 1 GPUs"
    assert describe_needs({"cpus": 1, "ram": 10**9, "hdd": 10**10}) == \
        "1 CPUs, 1 GB RAM, 10 GB disk"  # a request held back for disk says so


def test_dead_letter_log_lines_name_the_key_when_the_body_gives_one(admission, monkeypatch,
                                                                    caplog):
    refused = json.loads(body())
    refused["experiment"]["filename"] = "../escape.py"  # refused by admission
    with caplog.at_level(logging.ERROR):
        admission.accept(LOCAL, delivery(data=json.dumps(refused).encode()))
        admission.accept(LOCAL, delivery("t2", data=b"{not json"))

        def broken(*args, **kwargs):
            raise RuntimeError("a bug")
        monkeypatch.setattr(admission.ledger, "try_reserve", broken)
        admission.accept(LOCAL, delivery("t3"))
    dead = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(dead) == 3, dead
    assert dead[0].startswith("key=exp-1 ") and dead[1].startswith("key=? ")
    assert dead[2].startswith("key=exp-1 ")
