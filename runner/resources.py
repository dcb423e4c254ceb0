"""The resource ledger: what the runner has given out and what is left.

One ledger, owned by the fetcher, decides whether a request fits before the fetcher takes
it for good, and picks the GPUs it gets.  A reservation is keyed by attempt id and
released exactly once (a second release is a no-op), whatever ended the attempt.  It
holds executor slots, CPUs, RAM, disk (``hdd``) and GPUs; the executor enforces what the
reservation says (``devices``, ``cpus``, ``ram``; see :mod:`runner.cgroups`).

When the attempt's process has ended (:meth:`Ledger.run_over`) its slot, CPUs, RAM and GPUs
count no more: the next request may run while this one's uploads finish.  Its disk stays
reserved (the working directory is still there) until the release.  At most twice
``slots`` attempts are held in all, so slow uploads hold back new work instead of piling
up working directories.

GPUs are :class:`~runner.gpus.Device` values (NVML's view, refreshed by the fetcher); the
allocator never talks to NVML, so it is tested against devices described as data.

* ``gpus`` is a device count, ``gpuMem`` the memory needed on *each* device.
* By default devices are whole-allocated: a device with any holder is not given out.
* With ``gpu_share`` several attempts may share a device while the sum of their
  ``gpuMem`` fits it; an attempt that gives no ``gpuMem`` still gets its devices whole.
* A device's available memory is ``min(total - gpuMem reserved on it, NVML's free)``, so
  memory used by processes the runner did not start is respected too.
* Devices with ECC errors are never given out.
* Choice wastes least: the devices that fit with the least memory left over (in sharing
  mode that means devices already shared come first), so a one-GPU attempt does not take a
  card that a later bigger attempt needs while a smaller one fits.

Disk: ``disk_keep`` bytes of the working directory's file system are kept free; a request
fits when its ``hdd`` fits in ``free space - disk_keep - hdd reserved by running
attempts``.  What running attempts already wrote is counted twice (once in the file
system's free space, once as their reservation): conservative on purpose.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable

from .gpus import Device
from .units import describe_size


def machine_memory() -> int:
    """Total RAM in bytes (``/proc/meminfo``), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def disk_space(path: str) -> tuple[int, int]:
    """(free bytes for unprivileged writers, total bytes) of the file system of ``path``.

    The nearest existing parent is used when ``path`` does not exist yet.
    """
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    stat = os.statvfs(probe)
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize


def device_list(devices: str | Iterable[str] | None) -> list[str]:
    """The UUIDs of a reservation's ``devices`` field (``"uuid,uuid"``, a list, or empty)."""
    if not devices or devices == "-1":
        return []
    if isinstance(devices, str):
        return [d for d in devices.split(",") if d]
    return [str(d) for d in devices]


@dataclass
class Ledger:
    """Capacity and the reservations held against it."""

    slots: int
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    ram: int = field(default_factory=machine_memory)
    devices: list = field(default_factory=list)     # list[Device]
    gpu_share: bool = False
    cpu_only: bool = False
    disk_path: str | None = None                    # None: disk not accounted
    disk_keep: int = 0
    disk_probe: Callable[[str], tuple] = disk_space
    held: dict = field(default_factory=dict)        # attempt id -> reservation dict
    releases: int = 0                               # reservations released (each once)
    settling: set = field(default_factory=set)      # attempt ids whose run is over

    # -- what is used ----------------------------------------------------------------
    def _running(self) -> list[dict]:
        """Reservations of attempts whose process may still run (all but the settling)."""
        if not self.settling:
            return list(self.held.values())
        return [r for a, r in self.held.items() if a not in self.settling]

    def _used(self, name: str) -> int:
        held = self.held.values() if name == "hdd" else self._running()
        return sum(int(r.get(name, 0) or 0) for r in held)

    def _holds_on(self, uuid: str) -> list[dict]:
        return [r for r in self._running() if uuid in device_list(r.get("devices"))]

    def _exclusive(self, reservation: dict) -> bool:
        return not self.gpu_share or not int(reservation.get("gpuMem", 0) or 0)

    def device_available(self, device: Device) -> int:
        """Bytes of ``device``'s memory that may still be promised."""
        holds = self._holds_on(device.uuid)
        reserved = sum(int(r.get("gpuMem", 0) or 0) for r in holds)
        return max(0, min(device.memory_total - reserved, device.memory_free))

    def _disk_free(self) -> int | None:
        if self.disk_path is None:
            return None
        free, _total = self.disk_probe(self.disk_path)
        return max(0, free - self.disk_keep - self._used("hdd"))

    # -- reporting -------------------------------------------------------------------
    def free(self) -> dict:
        """What is left: slots, CPUs, RAM and disk bytes, whole GPUs, GPU memory, devices.

        ``ram``/``disk`` are None when not accounted; ``gpus`` counts healthy devices
        nobody holds; ``gpu_mem`` sums the memory still promisable on healthy devices;
        ``devices`` describes each device (``available`` bytes, ``holders``, ECC errors).
        """
        devices = []
        whole, memory = 0, 0
        for device in self.devices:
            holders = len(self._holds_on(device.uuid))
            available = self.device_available(device)
            if device.healthy and not self.cpu_only:
                whole += 1 if holders == 0 else 0
                shareable = not any(self._exclusive(r) for r in self._holds_on(device.uuid))
                memory += available if (holders == 0 or shareable) else 0
            devices.append({"index": device.index, "uuid": device.uuid, "name": device.name,
                            "memory_total": device.memory_total, "available": available,
                            "holders": holders, "ecc_errors": device.ecc_errors})
        return {"slots": self.slots - len(self.held) + len(self.settling),
                "cpus": self.cpus - self._used("cpus"),
                "ram": (self.ram - self._used("ram")) if self.ram else None,
                "disk": self._disk_free(), "gpus": whole, "gpu_mem": memory,
                "devices": devices}

    def free_slots(self) -> int:
        """How many more runs may start now (see :meth:`has_slot`); 0 when none."""
        running = len(self.held) - len(self.settling)
        return max(0, min(self.slots - running, 2 * self.slots - len(self.held)))

    def has_slot(self) -> bool:
        """A run may start: fewer than ``slots`` run, and fewer than twice ``slots`` attempts
        are held in all (running or settling)."""
        running = len(self.held) - len(self.settling)
        return running < self.slots and len(self.held) < 2 * self.slots

    # -- decisions -------------------------------------------------------------------
    def could_ever_fit(self, resources: dict) -> bool:
        """Whether an empty ledger could hold ``resources`` (else another host must run it)."""
        return not self.why_never(resources)

    def why_never(self, resources: dict) -> str:
        """Why an empty ledger could never hold ``resources`` ('' when it could).

        Worded for a person who reads ``runner-ctl queues``: "needs 1 GPU; this runner
        has 0"."""
        cpus, ram = int(resources.get("cpus", 0) or 0), int(resources.get("ram", 0) or 0)
        if cpus > self.cpus:
            return f"needs {_count(cpus, 'CPU')}; this runner has {self.cpus}"
        if self.ram and ram > self.ram:
            return (f"needs {describe_size(ram)} of RAM; this runner has "
                    f"{describe_size(self.ram)}")
        gpus, gpu_mem = int(resources.get("gpus", 0) or 0), int(resources.get("gpuMem", 0) or 0)
        if gpus:
            if self.cpu_only:
                return f"needs {_count(gpus, 'GPU')}; this runner is --cpu-only"
            fitting = [d for d in self.devices if d.healthy and d.memory_total >= gpu_mem]
            if len(fitting) < gpus:
                each = f" with {describe_size(gpu_mem)} each" if gpu_mem else ""
                return f"needs {_count(gpus, 'GPU')}{each}; this runner has {len(fitting)}"
        hdd = int(resources.get("hdd", 0) or 0)
        if hdd and self.disk_path is not None:
            _free, total = self.disk_probe(self.disk_path)
            if hdd > total - self.disk_keep:
                return (f"needs {describe_size(hdd)} of disk; the working file system has "
                        f"{describe_size(total)}")
        return ""

    def choose_devices(self, gpus: int, gpu_mem: int, exclusive: bool) -> list[Device] | None:
        """The ``gpus`` devices that fit ``gpu_mem`` wasting least, or None when too few fit."""
        if gpus <= 0:
            return []
        if self.cpu_only:
            return None
        candidates = []
        for device in self.devices:
            if not device.healthy:
                continue
            holds = self._holds_on(device.uuid)
            if holds and (exclusive or any(self._exclusive(r) for r in holds)):
                continue
            available = self.device_available(device)
            if gpu_mem > available:
                continue
            # whole allocation wastes the device's total; sharing wastes what is left
            waste = device.memory_total - gpu_mem if exclusive else available - gpu_mem
            candidates.append((waste, device.index, device))
        if len(candidates) < gpus:
            return None
        return [device for _waste, _index, device in sorted(candidates)[:gpus]]

    def try_reserve(self, attempt_id: str, resources: dict) -> dict | None:
        """Reserve ``resources`` for ``attempt_id`` if they fit now.

        Returns the reservation (a copy of ``resources`` with ``devices`` set to the chosen
        GPU UUIDs, comma-joined, or ``-1``), or None when it does not fit now.
        """
        if attempt_id in self.held:
            return self.held[attempt_id]
        if self.why_never(resources):
            return None
        free = self.free()
        if not self.has_slot() or int(resources.get("cpus", 0) or 0) > free["cpus"]:
            return None
        if free["ram"] is not None and int(resources.get("ram", 0) or 0) > free["ram"]:
            return None
        if free["disk"] is not None and int(resources.get("hdd", 0) or 0) > free["disk"]:
            return None
        gpu_mem = int(resources.get("gpuMem", 0) or 0)
        chosen = self.choose_devices(int(resources.get("gpus", 0) or 0), gpu_mem,
                                     exclusive=self._exclusive(resources))
        if chosen is None:
            return None
        reservation = dict(resources)
        reservation["devices"] = ",".join(d.uuid for d in chosen) or "-1"
        self.held[attempt_id] = reservation
        return reservation

    def hold(self, attempt_id: str, reservation: dict) -> None:
        """Record a reservation made earlier (a restarted fetcher adopting running work).

        Unconditional: the attempt already runs with these resources and devices.
        """
        self.held.setdefault(attempt_id, dict(reservation))

    def run_over(self, attempt_id: str) -> bool:
        """``attempt_id``'s process has ended: its slot, CPUs, RAM and GPUs are free, its disk
        stays reserved until :meth:`release`.  False when it holds nothing (already released)
        or was already over."""
        if attempt_id not in self.held or attempt_id in self.settling:
            return False
        self.settling.add(attempt_id)
        return True

    def release(self, attempt_id: str) -> bool:
        """Give back what ``attempt_id`` held; False when it held nothing (already released)."""
        self.settling.discard(attempt_id)
        released = self.held.pop(attempt_id, None) is not None
        self.releases += 1 if released else 0
        return released

    def rename(self, old: str, new: str) -> None:
        """Hold ``old``'s reservation under ``new`` (a provisional id made final)."""
        self.held[new] = self.held.pop(old)

    def update_devices(self, devices: Iterable[Device]) -> None:
        """NVML's latest view (free memory, ECC state); reservations are kept."""
        self.devices = sorted(devices, key=lambda d: d.index)

    def refresh_devices(self, found: Iterable[Device], why_none: str, log) -> None:
        """Take a new NVML discovery (``found``; ``why_none`` says why it is empty): an empty
        one keeps the last view; a device that turned unhealthy (uncorrected ECC errors) is
        logged once and no longer given out."""
        found = list(found)
        if not found:
            log.warning("GPU refresh found none (%s); keeping the last view", why_none)
            return
        before = {d.uuid: d.healthy for d in self.devices}
        for device in found:
            if before.get(device.uuid, True) and not device.healthy:
                log.error("GPU %d %s has %d uncorrected ECC errors; no longer given out",
                          device.index, device.uuid, device.ecc_errors)
        self.update_devices(found)


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" + ("" if n == 1 else "s")
