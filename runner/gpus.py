"""GPU discovery through NVML, kept apart from allocation.

:func:`discover` asks NVML (``pynvml`` from the ``nvidia-ml-py`` package) what devices
the host has and returns them as plain :class:`Device` values; the allocator in
:mod:`runner.resources` only ever sees those values, so it is tested against devices
described as data.  No NVML library, no driver or no device is not an error: it is a
CPU-only host, and :class:`Discovery` says why in ``reason`` (logged once by the caller).

The runner's own ``CUDA_VISIBLE_DEVICES`` / ``NVIDIA_VISIBLE_DEVICES`` limit the devices it
may give out (:func:`visible_filter`).  Indexes in them are NVML indexes (PCI bus order,
which is CUDA's order under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``); UUIDs, or unique prefixes
of them, are matched against NVML's UUIDs; ``all`` means every device; ``none``, ``void``,
``-1`` or an empty value mean none.  When both are set a device must pass both.
Every NVIDIA device NVML reports is usable: no table of card names decides anything.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Callable

log = logging.getLogger("runner.gpus")

VISIBLE_VARIABLES = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")


@dataclass(frozen=True)
class Device:
    """One GPU as NVML last described it; memory in bytes."""

    index: int
    uuid: str
    name: str
    memory_total: int
    memory_free: int
    ecc_errors: int = 0  # uncorrected, volatile; > 0 keeps the device out of allocation

    @property
    def healthy(self) -> bool:
        return self.ecc_errors == 0

    def to_map(self) -> dict:
        return asdict(self)

    @classmethod
    def from_map(cls, data: Mapping[str, Any]) -> Device:
        return cls(index=int(data["index"]), uuid=str(data["uuid"]), name=str(data["name"]),
                   memory_total=int(data["memory_total"]),
                   memory_free=int(data.get("memory_free", data["memory_total"])),
                   ecc_errors=int(data.get("ecc_errors", 0)))


@dataclass(frozen=True)
class Discovery:
    """What NVML reported: the usable devices, or none and why (``reason``)."""

    devices: tuple
    reason: str = ""          # why the host is CPU-only (empty when devices were found)
    hidden: int = 0           # devices NVML reported that the visibility variables exclude
    driver: str = ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_filter(environ: Mapping[str, str]) -> Callable[[Device], bool]:
    """A predicate: may the runner use this device under its own visibility variables?"""
    rules = [environ[name].strip() for name in VISIBLE_VARIABLES if name in environ]

    def allowed_by(rule: str, device: Device) -> bool:
        if rule.lower() == "all":
            return True
        if rule.lower() in ("", "none", "void", "-1", "nodevfiles"):
            return False
        for item in (part.strip() for part in rule.split(",")):
            if not item:
                continue
            if item.isdigit():
                if int(item) == device.index:
                    return True
            elif device.uuid.startswith(item) or device.uuid.startswith(f"GPU-{item}"):
                return True
        return False

    return lambda device: all(allowed_by(rule, device) for rule in rules)


def _ecc_errors(nvml, handle) -> int:
    """Uncorrected volatile ECC errors; 0 where the card has no ECC or cannot say."""
    try:
        return int(nvml.nvmlDeviceGetTotalEccErrors(
            handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC))
    except nvml.NVMLError:
        return 0


def discover(environ: Mapping[str, str], nvml: Any = None) -> Discovery:
    """The devices this runner may use, from NVML.

    ``nvml`` is the ``pynvml`` module (imported here when None).  Never raises for a
    missing library, driver or device: those give ``Discovery((), reason)``.
    """
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError as exc:
            return Discovery((), f"pynvml is not installed ({exc})")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return Discovery((), f"NVML unavailable: {exc}")
    try:
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            driver = ""
        count = nvml.nvmlDeviceGetCount()
        found = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                found.append(Device(index=index, uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                                    name=_text(nvml.nvmlDeviceGetName(handle)),
                                    memory_total=int(memory.total),
                                    memory_free=int(memory.free),
                                    ecc_errors=_ecc_errors(nvml, handle)))
            except nvml.NVMLError as exc:
                log.warning("GPU %d: NVML cannot describe it (%s); left out", index, exc)
    except nvml.NVMLError as exc:
        return Discovery((), f"NVML failed: {exc}")
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    allowed = visible_filter(environ)
    usable = tuple(d for d in found if allowed(d))
    if not found:
        return Discovery((), "NVML reports no devices", driver=driver)
    if not usable:
        return Discovery((), f"NVML reports {len(found)} devices but "
                             "CUDA_VISIBLE_DEVICES/NVIDIA_VISIBLE_DEVICES exclude them all",
                         hidden=len(found), driver=driver)
    return Discovery(usable, "", hidden=len(found) - len(usable), driver=driver)


def describe(discovery: Discovery) -> str:
    """One log line about a discovery."""
    if not discovery.devices:
        return f"CPU-only host: {discovery.reason}"
    parts = [f"{d.index}:{d.name} {d.uuid} {d.memory_total // 2**20} MiB"
             + ("" if d.healthy else f" ECC errors {d.ecc_errors}: not given out")
             for d in discovery.devices]
    hidden = f" ({discovery.hidden} hidden by the visibility variables)" if discovery.hidden else ""
    driver = f", driver {discovery.driver}" if discovery.driver else ""
    return f"{len(discovery.devices)} GPUs{hidden}{driver}: " + "; ".join(parts)
