"""The resource ledger (runner.resources.Ledger)."""
from __future__ import annotations

import os

from runner.resources import Ledger, machine_memory

GB = 10**9


def req(cpus: int = 1, ram: int = 0, **extra) -> dict:
    return {"cpus": cpus, "gpus": 0, "ram": ram, "hdd": 0, "gpuMem": 0, **extra}


def basic(free: dict) -> dict:
    return {k: free[k] for k in ("slots", "cpus", "ram")}


def test_reserve_and_release_exactly_once() -> None:
    ledger = Ledger(slots=2, cpus=4, ram=8 * GB)
    assert ledger.try_reserve("a", req(2, 3 * GB)) is not None
    assert basic(ledger.free()) == {"slots": 1, "cpus": 2, "ram": 5 * GB}
    assert ledger.release("a") is True
    assert basic(ledger.free()) == {"slots": 2, "cpus": 4, "ram": 8 * GB}
    assert ledger.release("a") is False           # second release is a no-op
    assert ledger.release("never-held") is False
    assert ledger.releases == 1
    assert basic(ledger.free()) == {"slots": 2, "cpus": 4, "ram": 8 * GB}


def test_reserving_the_same_attempt_twice_holds_once() -> None:
    ledger = Ledger(slots=3, cpus=4, ram=8 * GB)
    assert ledger.try_reserve("a", req(2, 2 * GB))
    assert ledger.try_reserve("a", req(2, 2 * GB))
    assert basic(ledger.free()) == {"slots": 2, "cpus": 2, "ram": 6 * GB}
    assert ledger.release("a") and not ledger.release("a")
    assert ledger.free()["cpus"] == 4


def test_reservation_is_a_copy() -> None:
    ledger = Ledger(slots=1, cpus=4, ram=0)
    resources = req(2)
    ledger.try_reserve("a", resources)
    resources["cpus"] = 0
    assert ledger.free()["cpus"] == 2


def test_slots_limit() -> None:
    ledger = Ledger(slots=2, cpus=64, ram=0)
    assert ledger.has_slot()
    assert ledger.try_reserve("a", req(1))
    assert ledger.try_reserve("b", req(1))
    assert not ledger.has_slot()
    assert ledger.try_reserve("c", req(1)) is None
    assert "c" not in ledger.held
    ledger.release("a")
    assert ledger.has_slot()
    assert ledger.try_reserve("c", req(1))


def test_cpu_limit() -> None:
    ledger = Ledger(slots=10, cpus=4, ram=0)
    assert ledger.try_reserve("a", req(3))
    assert ledger.try_reserve("b", req(2)) is None
    assert ledger.try_reserve("c", req(1))
    assert ledger.free()["cpus"] == 0
    assert ledger.try_reserve("d", req(1)) is None
    assert ledger.try_reserve("e", req(0))  # a zero-cpu request still fits while slots remain
    ledger.release("a")
    assert ledger.try_reserve("b", req(2))


def test_ram_limit() -> None:
    ledger = Ledger(slots=10, cpus=64, ram=8 * GB)
    assert ledger.try_reserve("a", req(1, 6 * GB))
    assert ledger.try_reserve("b", req(1, 3 * GB)) is None
    assert ledger.try_reserve("c", req(1, 2 * GB))       # exactly the rest
    assert ledger.free()["ram"] == 0
    assert ledger.try_reserve("d", req(1, 1)) is None
    ledger.release("c")
    assert ledger.try_reserve("d", req(1, 1))


def test_unknown_ram_is_not_limited() -> None:
    ledger = Ledger(slots=2, cpus=4, ram=0)
    assert ledger.free()["ram"] is None
    assert ledger.try_reserve("a", req(1, 10**15))
    assert ledger.could_ever_fit(req(1, 10**15))


def test_missing_fields_count_as_zero() -> None:
    ledger = Ledger(slots=1, cpus=1, ram=GB)
    assert ledger.could_ever_fit({})
    assert ledger.try_reserve("a", {})
    assert basic(ledger.free()) == {"slots": 0, "cpus": 1, "ram": GB}


def test_could_ever_fit() -> None:
    ledger = Ledger(slots=1, cpus=4, ram=8 * GB)
    assert ledger.could_ever_fit(req(4, 8 * GB))
    assert not ledger.could_ever_fit(req(5))
    assert not ledger.could_ever_fit(req(1, 8 * GB + 1))
    # capacity, not what is free now
    assert ledger.try_reserve("a", req(4, 8 * GB))
    assert ledger.try_reserve("b", req(1)) is None
    assert ledger.could_ever_fit(req(4, 8 * GB))


def test_defaults_come_from_the_machine() -> None:
    ledger = Ledger(slots=1)
    assert ledger.cpus == (os.cpu_count() or 1)
    assert ledger.ram == machine_memory()
    if os.path.exists("/proc/meminfo"):
        assert machine_memory() > 0
