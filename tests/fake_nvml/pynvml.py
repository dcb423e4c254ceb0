"""A stand-in for ``pynvml`` that describes devices as data, for tests on hosts without GPUs.

Put this folder first on ``PYTHONPATH`` and name a JSON file in ``FAKE_NVML_DEVICES``: a list
of ``{"uuid", "name", "memory_total", "memory_free"?, "ecc_errors"?}``.  Only the calls that
:mod:`runner.gpus` makes exist.  Without ``FAKE_NVML_DEVICES`` it behaves like a host whose
NVML library is missing.  Tests may also call :func:`configure` directly.
"""
import json
import os
from types import SimpleNamespace

NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
_devices = None


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


def configure(devices):
    global _devices
    _devices = None if devices is None else [dict(d) for d in devices]


if os.environ.get("FAKE_NVML_DEVICES"):
    with open(os.environ["FAKE_NVML_DEVICES"]) as handle:
        configure(json.load(handle))


def nvmlInit():
    if _devices is None:
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")


def nvmlShutdown():
    pass


def nvmlSystemGetDriverVersion():
    return "fake-1.0"


def nvmlDeviceGetCount():
    return len(_devices)


def nvmlDeviceGetHandleByIndex(index):
    return _devices[index]


def nvmlDeviceGetHandleByUUID(uuid):
    for device in _devices:
        if device["uuid"] == (uuid.decode() if isinstance(uuid, bytes) else uuid):
            return device
    raise NVMLError("Not Found")


def nvmlDeviceGetIndex(handle):
    return _devices.index(handle)


def nvmlDeviceGetUUID(handle):
    return handle["uuid"]


def nvmlDeviceGetName(handle):
    return handle["name"].encode()  # older bindings return bytes


def nvmlDeviceGetMemoryInfo(handle):
    total = handle["memory_total"]
    free = handle.get("memory_free", total)
    return SimpleNamespace(total=total, free=free, used=total - free)


def nvmlDeviceGetTotalEccErrors(handle, error_type, counter_type):
    if "ecc_errors" not in handle:
        raise NVMLError_NotSupported("Not Supported")
    return handle["ecc_errors"]
