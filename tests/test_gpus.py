"""GPU discovery (runner.gpus) and GPU/disk allocation in the ledger (runner.resources).

The allocator is tested against devices described as data; discovery is tested against a
stand-in NVML module describing devices as data, and against the real ``pynvml`` on this
host, which has no NVML library (a CPU-only host).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from runner import gpus
from runner.gpus import Device, discover, visible_filter
from runner.resources import Ledger

GB = 10**9
GiB = 2**30
FAKE_NVML = Path(__file__).parent / "fake_nvml" / "pynvml.py"


def dev(index: int, memory_gb: int = 80, free_gb: int | None = None, ecc: int = 0,
        name: str = "NVIDIA H100 80GB HBM3") -> Device:
    free = memory_gb if free_gb is None else free_gb
    return Device(index=index, uuid=f"GPU-{index:04d}-aaaa", name=name,
                  memory_total=memory_gb * GB, memory_free=free * GB, ecc_errors=ecc)


def attempt(gpus: int = 1, gpu_mem: int = 0, cpus: int = 1, ram: int = 0, hdd: int = 0) -> dict:
    return {"cpus": cpus, "gpus": gpus, "ram": ram, "hdd": hdd, "gpuMem": gpu_mem}


def ledger(devices, **kw) -> Ledger:
    kw.setdefault("slots", 16)
    kw.setdefault("cpus", 64)
    kw.setdefault("ram", 0)
    return Ledger(devices=list(devices), **kw)


def uuids(reservation: dict | None) -> list[str]:
    assert reservation is not None
    return [] if reservation["devices"] == "-1" else reservation["devices"].split(",")


# -- allocation ------------------------------------------------------------------------------

def test_whole_devices_are_given_out_disjoint_until_none_is_left() -> None:
    book = ledger([dev(0), dev(1), dev(2)])
    a, b = uuids(book.try_reserve("a", attempt(1))), uuids(book.try_reserve("b", attempt(2)))
    assert len(a) == 1 and len(b) == 2 and not set(a) & set(b)
    assert book.try_reserve("c", attempt(1)) is None            # all three taken
    assert book.free()["gpus"] == 0
    book.release("b")
    c = uuids(book.try_reserve("c", attempt(1)))
    assert not set(c) & set(a)


def test_no_gpu_requested_gets_minus_one() -> None:
    book = ledger([dev(0)])
    assert book.try_reserve("a", attempt(0))["devices"] == "-1"
    assert book.free()["gpus"] == 1


def test_one_gpu_attempt_takes_the_card_that_wastes_least() -> None:
    # Two big cards and a small one: a small one-GPU attempt must leave both big ones free
    # for a later two-GPU attempt that needs big cards.
    book = ledger([dev(0, 80), dev(1, 24, name="NVIDIA L4"), dev(2, 80)])
    assert uuids(book.try_reserve("small", attempt(1, 10 * GB))) == ["GPU-0001-aaaa"]
    assert sorted(uuids(book.try_reserve("big", attempt(2, 70 * GB)))) == ["GPU-0000-aaaa",
                                                                      "GPU-0002-aaaa"]


def test_gpu_memory_must_fit_each_device() -> None:
    book = ledger([dev(0, 24), dev(1, 80)])
    assert uuids(book.try_reserve("a", attempt(1, 40 * GB))) == ["GPU-0001-aaaa"]
    assert book.try_reserve("b", attempt(1, 40 * GB)) is None
    assert book.why_never(attempt(2, 40 * GB)).startswith("needs 2 GPUs")   # only one card is big enough
    assert book.could_ever_fit(attempt(1, 80 * GB))
    assert not book.could_ever_fit(attempt(1, 81 * GB))


def test_nvml_free_memory_is_respected() -> None:
    # Something the runner did not start uses 70 GB of device 0.
    book = ledger([dev(0, 80, free_gb=10), dev(1, 80)])
    assert uuids(book.try_reserve("a", attempt(1, 20 * GB))) == ["GPU-0001-aaaa"]


def test_devices_with_ecc_errors_are_never_given_out() -> None:
    book = ledger([dev(0, ecc=3), dev(1)])
    assert uuids(book.try_reserve("a", attempt(1))) == ["GPU-0001-aaaa"]
    assert book.try_reserve("b", attempt(1)) is None
    assert not book.could_ever_fit(attempt(2))
    assert book.free()["devices"][0]["ecc_errors"] == 3
    book.release("a")
    # a device that gets ECC errors later (NVML refresh) stops being given out
    book.update_devices([dev(0, ecc=3), dev(1, ecc=1)])
    assert book.try_reserve("c", attempt(1)) is None


def test_sharing_by_memory() -> None:
    book = ledger([dev(0, 40), dev(1, 40)], gpu_share=True)
    a = uuids(book.try_reserve("a", attempt(1, 15 * GB)))
    b = uuids(book.try_reserve("b", attempt(1, 15 * GB)))
    assert a == b                                    # the shared card first: least waste
    c = uuids(book.try_reserve("c", attempt(1, 15 * GB)))
    assert c != a                                    # 10 GB left on the first: does not fit
    assert book.free()["gpus"] == 0
    assert book.free()["gpu_mem"] == 10 * GB + 25 * GB
    # no gpuMem given: it gets a card of its own, never a shared one
    assert book.try_reserve("d", attempt(1, 0)) is None
    book.release("c")
    d = uuids(book.try_reserve("d", attempt(1, 0)))
    assert d == c
    assert book.try_reserve("e", attempt(1, 1 * GB)) is not None   # fits beside a and b
    assert uuids(book.held["e"]) == a
    assert book.try_reserve("f", attempt(1, 8 * GB)) is not None   # 1 GB left on a's card
    assert book.try_reserve("g", attempt(1, 2 * GB)) is None       # d holds the other whole


def test_whole_mode_never_shares_even_with_gpu_mem() -> None:
    book = ledger([dev(0, 80)])
    assert book.try_reserve("a", attempt(1, 1 * GB))
    assert book.try_reserve("b", attempt(1, 1 * GB)) is None


def test_cpu_only_refuses_gpu_requests() -> None:
    book = ledger([dev(0)], cpu_only=True)
    assert "cpu-only" in book.why_never(attempt(1))
    assert book.try_reserve("a", attempt(1)) is None
    assert book.try_reserve("b", attempt(0))["devices"] == "-1"
    assert book.free()["gpus"] == 0


def test_cpu_only_host_cannot_ever_fit_a_gpu_request() -> None:
    book = ledger([])
    assert not book.could_ever_fit(attempt(1))
    assert book.could_ever_fit(attempt(0))


def test_adopted_reservation_keeps_its_devices_and_is_released_once() -> None:
    book = ledger([dev(0), dev(1)])
    book.hold("x", dict(attempt(1), devices="GPU-0001-aaaa"))
    assert uuids(book.try_reserve("y", attempt(1))) == ["GPU-0000-aaaa"]
    assert book.try_reserve("z", attempt(1)) is None
    assert book.release("x") and not book.release("x")
    assert uuids(book.try_reserve("z", attempt(1))) == ["GPU-0001-aaaa"]
    assert book.releases == 1


def test_refresh_keeps_reservations() -> None:
    book = ledger([dev(0), dev(1)])
    held = uuids(book.try_reserve("a", attempt(1)))
    book.update_devices([dev(1, free_gb=5), dev(0, free_gb=5)])
    assert [d.index for d in book.devices] == [0, 1]
    assert uuids(book.held["a"]) == held
    assert book.free()["gpus"] == 1


def test_disk_budget_keeps_free_space() -> None:
    space = {"free": 100 * GB}
    book = ledger([], disk_path="/work", disk_keep=20 * GB,
                  disk_probe=lambda path: (space["free"], 500 * GB))
    assert book.free()["disk"] == 80 * GB
    assert book.try_reserve("a", attempt(0, hdd=50 * GB))
    assert book.free()["disk"] == 30 * GB
    assert book.try_reserve("b", attempt(0, hdd=40 * GB)) is None
    space["free"] = 60 * GB                                  # someone else wrote 40 GB
    assert book.try_reserve("c", attempt(0, hdd=1 * GB)) is None
    book.release("a")
    assert book.try_reserve("c", attempt(0, hdd=40 * GB))
    assert not book.could_ever_fit(attempt(0, hdd=481 * GB))
    assert book.could_ever_fit(attempt(0, hdd=480 * GB))


def test_disk_not_accounted_without_a_path() -> None:
    assert ledger([]).free()["disk"] is None


def test_real_disk_probe(tmp_path: Path) -> None:
    book = Ledger(slots=1, cpus=1, ram=0, disk_path=str(tmp_path / "not" / "yet"))
    assert book.free()["disk"] > 0


# -- discovery -------------------------------------------------------------------------------

def fake_nvml(devices):
    spec = importlib.util.spec_from_file_location(f"fake_pynvml_{id(devices)}", FAKE_NVML)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.configure(devices)
    return module


DESCRIBED = [
    {"uuid": "GPU-11111111-aaaa", "name": "NVIDIA H200", "memory_total": 141 * GiB,
     "memory_free": 140 * GiB, "ecc_errors": 0},
    {"uuid": "GPU-22222222-bbbb", "name": "NVIDIA GeForce RTX 4090", "memory_total": 24 * GiB},
    {"uuid": "GPU-33333333-cccc", "name": "NVIDIA L40S", "memory_total": 48 * GiB,
     "ecc_errors": 2},
]


def test_discovery_describes_every_nvidia_device_whatever_its_name() -> None:
    found = discover({}, nvml=fake_nvml(DESCRIBED))
    assert found.reason == "" and found.driver == "fake-1.0"
    assert [(d.index, d.uuid, d.name) for d in found.devices] == [
        (0, "GPU-11111111-aaaa", "NVIDIA H200"), (1, "GPU-22222222-bbbb", "NVIDIA GeForce RTX 4090"),
        (2, "GPU-33333333-cccc", "NVIDIA L40S")]
    assert found.devices[0].memory_free == 140 * GiB
    assert found.devices[1].ecc_errors == 0          # consumer card: ECC not supported
    assert not found.devices[2].healthy
    assert "ECC errors 2" in gpus.describe(found)


@pytest.mark.parametrize("environ, expected", [
    ({}, [0, 1, 2]),
    ({"CUDA_VISIBLE_DEVICES": "all"}, [0, 1, 2]),
    ({"CUDA_VISIBLE_DEVICES": "0,2"}, [0, 2]),
    ({"CUDA_VISIBLE_DEVICES": "GPU-22222222-bbbb"}, [1]),
    ({"CUDA_VISIBLE_DEVICES": "GPU-3333"}, [2]),                 # unique prefix
    ({"NVIDIA_VISIBLE_DEVICES": "22222222-bbbb,0"}, [0, 1]),     # UUID without GPU-
    ({"CUDA_VISIBLE_DEVICES": "0,1", "NVIDIA_VISIBLE_DEVICES": "1,2"}, [1]),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, []),
    ({"CUDA_VISIBLE_DEVICES": ""}, []),
    ({"NVIDIA_VISIBLE_DEVICES": "none"}, []),
    ({"NVIDIA_VISIBLE_DEVICES": "void"}, []),
])
def test_visibility_variables_limit_the_devices(environ, expected) -> None:
    found = discover(environ, nvml=fake_nvml(DESCRIBED))
    assert [d.index for d in found.devices] == expected
    assert found.hidden == 3 - len(expected)
    if not expected:
        assert "exclude them all" in found.reason


def test_visible_filter_on_data() -> None:
    allowed = visible_filter({"CUDA_VISIBLE_DEVICES": " 1 , GPU-0000 "})
    assert [allowed(dev(i)) for i in range(3)] == [True, True, False]


def test_no_devices_is_cpu_only() -> None:
    found = discover({}, nvml=fake_nvml([]))
    assert found.devices == () and found.reason == "NVML reports no devices"


def test_no_library_is_cpu_only_with_a_stand_in() -> None:
    found = discover({}, nvml=fake_nvml(None))
    assert found.devices == () and "Library Not Found" in found.reason
    assert gpus.describe(found).startswith("CPU-only host: NVML unavailable")


def test_real_pynvml_without_a_driver_means_cpu_only() -> None:
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is a dependency: install it")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        pass
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this host has a working NVML: not a CPU-only host")
    found = discover({})
    assert found.devices == ()
    assert found.reason.startswith("NVML unavailable:")
    assert "CPU-only host" in gpus.describe(found)


def test_device_maps_round_trip() -> None:
    device = dev(3, ecc=1)
    assert Device.from_map(device.to_map()) == device


def test_a_run_over_gives_its_gpus_to_the_next_request() -> None:
    led = ledger([dev(0)], slots=2)
    first = led.try_reserve("a", attempt(gpus=1))
    assert first and first["devices"] == "GPU-0000-aaaa"
    assert led.try_reserve("b", attempt(gpus=1)) is None  # whole device held
    led.run_over("a")  # a's process ended; its uploads still run
    second = led.try_reserve("b", attempt(gpus=1))
    assert second and second["devices"] == "GPU-0000-aaaa"
    led.release("a")
    assert led.held.keys() == {"b"}
