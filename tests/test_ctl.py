"""runner-ctl's rendering of free resources, and what it says when no supervisor runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runner import ctl
from runner.ctl import NoSupervisor, free_lines, render_status

REPO = Path(__file__).resolve().parent.parent


def test_free_resources_are_rendered_with_each_device() -> None:
    free = {"slots": 1, "cpus": 3, "ram": 2 * 10**9, "disk": None, "gpus": 1,
            "gpu_mem": 141 * 2**30,
            "devices": [{"index": 0, "uuid": "GPU-a", "name": "NVIDIA H200",
                         "memory_total": 141 * 2**30, "available": 141 * 2**30, "holders": 0,
                         "ecc_errors": 0},
                        {"index": 1, "uuid": "GPU-b", "name": "NVIDIA L40S",
                         "memory_total": 48 * 10**9, "available": 8 * 10**9, "holders": 2,
                         "ecc_errors": 0},
                        {"index": 2, "uuid": "GPU-c", "name": "NVIDIA L4",
                         "memory_total": 24 * 10**9, "available": 24 * 10**9, "holders": 0,
                         "ecc_errors": 1}]}
    lines = free_lines(free)
    assert lines[0] == ("  1 slots, 3 CPUs, RAM 2 GB, disk not accounted, 1 whole GPUs, "
                        "GPU memory 141 GiB")
    assert lines[1] == "  gpu 0 NVIDIA H200 GPU-a: 141 GiB of 141 GiB available, free"
    assert lines[2] == "  gpu 1 NVIDIA L40S GPU-b: 8 GB of 48 GB available, 2 runs"
    assert lines[3].endswith("ECC errors 1: not given out")


def test_status_shows_free_resources_and_run_devices() -> None:
    data = {"supervisor": {"pid": 1, "state": "running", "uptime": 3, "instance": "i",
                           "hot_path": "compiled", "taking": True},
            "roles": {"fetcher": {"pid": 2, "alive": True, "ready": True, "restarts": 0,
                                  "heartbeat_age": 0.5, "stats": {"held": 1}}},
            "free": {"slots": 0, "cpus": 0, "ram": 0, "disk": 5, "gpus": 0, "gpu_mem": 0,
                     "devices": []},
            "attempts": [{"key": "k", "project": "", "queue": "local_q", "attempt": "h-1",
                      "attempt_number": 1, "phase": "running", "elapsed": 2, "pid": 9,
                      "devices": "GPU-a,GPU-b"}],
            "queues": {}, "finished": {}}
    text = render_status(data)
    assert "free resources:\n  0 slots, 0 CPUs, RAM 0 B, disk 5 B, 0 whole GPUs" in text
    assert "gpus=GPU-a,GPU-b" in text
    assert "free={" not in text


@pytest.mark.parametrize("free", [{}, None, {"slots": None, "cpus": None}])
def test_free_resources_before_the_fetcher_reports(free) -> None:
    lines = free_lines(free)
    assert lines == ["  not known yet: the fetcher has not reported (the runner is starting)"]
    assert "None" not in "\n".join(lines)


def test_no_waiting_when_the_runtime_directory_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-runtime"
    with pytest.raises(NoSupervisor, match="the directory does not exist"):
        ctl.request(str(missing), "status", timeout=3600)
    # A command line that would wait an hour if it waited at all.
    proc = subprocess.run([sys.executable, "-m", "runner.ctl", "--runtime-dir", str(missing),
                           "--timeout", "3600", "status"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert f"no runner-supervisor runs with --runtime-dir {missing}" in proc.stderr
    assert not missing.exists()  # runner-ctl creates nothing


def test_no_waiting_when_no_control_socket_is_there(tmp_path: Path) -> None:
    with pytest.raises(NoSupervisor, match="no control socket"):
        ctl.request(str(tmp_path), "status", timeout=3600)


def test_free_shows_the_environment_store_against_its_cap() -> None:
    def data(stats: dict) -> dict:
        return {"free": {"slots": 1, "cpus": 1, "ram": 1, "disk": 1, "gpus": 0},
                "roles": {"cache_manager": {"stats": stats}}}

    measured = data({"env_store_bytes": 3 * 2**30, "env_store_environments": 2,
                     "env_store_cap": 20 * 2**30, "cache_hits": 0})
    json_part, text = ctl.view(measured, "free")
    assert text.splitlines()[-1] == "  environment store: 3 GiB of 20 GiB (2 environments)"
    assert json_part["environment_store"] == {"bytes": 3 * 2**30, "environments": 2,
                                              "cap": 20 * 2**30}
    assert json_part["slots"] == 1
    assert ctl.view(data({"env_store_cap": 0}), "free")[1].splitlines()[-1] == \
        "  environment store: not measured yet (no cap)"
    assert ctl.view(data({"env_store_bytes": 10, "env_store_environments": 1,
                          "env_store_cap": 0}), "free")[1].endswith(
        "environment store: 10 B (no cap) (1 environment)")
    assert "not known yet" in ctl.view({"free": {}}, "free")[1].splitlines()[-1]
