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


def test_a_run_over_frees_slot_cpus_ram_and_keeps_disk_until_release() -> None:
    probe = lambda path: (100 * GB, 200 * GB)  # noqa: E731 - free, total of the file system
    ledger = Ledger(slots=1, cpus=4, ram=8 * GB, disk_path="/work", disk_probe=probe)
    assert ledger.try_reserve("a", req(4, 8 * GB, hdd=30 * GB))
    assert not ledger.has_slot() and ledger.try_reserve("b", req(1)) is None
    assert ledger.run_over("a") is True
    assert ledger.run_over("a") is False  # told once
    free = ledger.free()
    assert basic(free) == {"slots": 1, "cpus": 4, "ram": 8 * GB}
    assert free["disk"] == 70 * GB  # the working directory is still there
    assert ledger.try_reserve("b", req(4, 8 * GB, hdd=70 * GB))
    assert ledger.try_reserve("c", req(0, hdd=1)) is None  # no slot, and no disk either
    assert ledger.release("a") is True and ledger.release("a") is False
    assert ledger.releases == 1 and ledger.settling == set()
    assert ledger.free()["disk"] == 30 * GB  # only b's reservation now


def test_attempts_held_in_all_are_bounded_by_twice_the_slots() -> None:
    ledger = Ledger(slots=2, cpus=64, ram=0)
    for name in ("a", "b"):
        assert ledger.try_reserve(name, req(1)) and ledger.run_over(name)
    assert ledger.free()["slots"] == 2
    for name in ("c", "d"):
        assert ledger.try_reserve(name, req(1)) and ledger.run_over(name)
    assert len(ledger.held) == 4 and ledger.free()["slots"] == 2
    assert not ledger.has_slot()  # four settle: slow uploads hold back new work
    assert ledger.free_slots() == 0
    assert ledger.try_reserve("e", req(1)) is None
    ledger.release("a")
    assert ledger.has_slot() and ledger.free_slots() == 1 and ledger.try_reserve("e", req(1))


def test_free_slots_is_how_many_more_may_start_now() -> None:
    ledger = Ledger(slots=3, cpus=64, ram=0)
    assert ledger.free_slots() == 3
    assert ledger.try_reserve("a", req(1)) and ledger.try_reserve("b", req(1))
    assert ledger.free_slots() == 1 and ledger.has_slot()
    assert ledger.run_over("a")            # settling: its slot is free again
    assert ledger.free_slots() == 2
    assert ledger.try_reserve("c", req(1)) and ledger.try_reserve("d", req(1))
    assert ledger.free_slots() == 0 and not ledger.has_slot()


def test_run_over_after_release_changes_nothing() -> None:
    ledger = Ledger(slots=1, cpus=2, ram=0)
    ledger.try_reserve("a", req(2))
    ledger.release("a")
    assert ledger.run_over("a") is False  # a late message: the attempt is settled already
    assert ledger.settling == set() and basic(ledger.free())["cpus"] == 2


def test_a_provisional_reservation_is_renamed_without_a_release() -> None:
    from runner.resources import Ledger

    book = Ledger(slots=1, cpus=2, ram=0, devices=[])
    reservation = book.try_reserve("pending-x", {"cpus": 2})
    assert reservation is not None
    book.rename("pending-x", "host-1")
    assert book.try_reserve("other", {"cpus": 1}) is None
    assert book.release("host-1") and book.releases == 1
    assert not book.release("pending-x")


def test_a_gpu_refresh_keeps_the_last_view_when_empty_and_drops_a_card_gone_bad(caplog):
    import logging

    from runner.gpus import Device

    good = [Device(0, "GPU-a", "A100", 80 * GB, 80 * GB), Device(1, "GPU-b", "A100", 80 * GB,
                                                                  80 * GB)]
    ledger = Ledger(slots=2, cpus=4, ram=8 * GB, devices=good)
    log = logging.getLogger("test.refresh")
    with caplog.at_level(logging.WARNING, logger="test.refresh"):
        ledger.refresh_devices([], "NVML gone", log)
        assert [d.uuid for d in ledger.devices] == ["GPU-a", "GPU-b"]
        bad = [good[0], Device(1, "GPU-b", "A100", 80 * GB, 80 * GB, ecc_errors=3)]
        ledger.refresh_devices(reversed(bad), "", log)
        ledger.refresh_devices(bad, "", log)  # already known bad: not logged again
    assert [(d.index, d.healthy) for d in ledger.devices] == [(0, True), (1, False)]
    messages = [r.getMessage() for r in caplog.records]
    assert any("keeping the last view" in m for m in messages)
    assert sum("uncorrected ECC" in m for m in messages) == 1
