"""Resources end to end, through a real ``runner-supervisor`` (SPEC section 8, issue 5).

GPU tests put a stand-in ``pynvml`` (``tests/fake_nvml``) first on the supervisor's
``PYTHONPATH`` so that the real discovery code sees devices described as data; everything
else is real: role processes, queues, virtualenvs, experiments and, where this host lets
the runner create them, cgroups.  Enforcement tests skip with the reason where cgroups are
not writable; the accounting fallback is tested everywhere.
"""
from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest

from runner import cgroups, ctl, metadata

from .support import Runner

FAKE_NVML = Path(__file__).parent / "fake_nvml"
GiB = 2**30


def cgroups_writable() -> str:
    driver, why = cgroups.detect("auto", f"probe-{uuid.uuid4().hex[:8]}")
    if driver is None:
        return why
    driver.cleanup()
    return ""


_NOT_WRITABLE = cgroups_writable()
needs_cgroups = pytest.mark.skipif(bool(_NOT_WRITABLE),
                                   reason=f"cgroups not writable here: {_NOT_WRITABLE}")


def needing(request: dict, **resources) -> dict:
    request["experiment"]["resources_needed"].update(resources)
    return request


def fetcher_stats(runner: Runner) -> dict:
    return runner.status()["roles"]["fetcher"]["stats"]


def only_document(runner: Runner, request: dict) -> dict:
    [document] = runner.scrape_documents(request)
    return document


def output_of(runner: Runner, request: dict, document: dict) -> str:
    folder = runner.experiment_dir(request) / "_metadata"
    return (folder / metadata.output_name(document["runner"]["attempt"])).read_text()


def fake_gpus(runner: Runner, devices: list[dict]) -> None:
    path = runner.root / "devices.json"
    path.write_text(json.dumps(devices))
    runner.env["PYTHONPATH"] = os.pathsep.join(
        [str(FAKE_NVML)] + [p for p in [runner.env.get("PYTHONPATH")] if p])
    runner.env["FAKE_NVML_DEVICES"] = str(path)
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        runner.env.pop(name, None)


DEVICES = [
    {"uuid": "GPU-aaaaaaaa-0000", "name": "NVIDIA H200", "memory_total": 141 * GiB},
    {"uuid": "GPU-bbbbbbbb-1111", "name": "NVIDIA L40S", "memory_total": 48 * GiB,
     "ecc_errors": 5},
    {"uuid": "GPU-cccccccc-2222", "name": "NVIDIA GeForce RTX 4090", "memory_total": 24 * GiB},
]

SEE_DEVICES = """
    import json, os, sys, time
    marker_dir = sys.argv[1]
    open(os.path.join(marker_dir, os.environ["STUDIOML_EXPERIMENT"]), "w").close()
    deadline = time.time() + 60
    while len(os.listdir(marker_dir)) < 2 and time.time() < deadline:
        time.sleep(0.05)                  # both runs are alive at the same time
    print(json.dumps({"experiment": {"cuda": os.environ["CUDA_VISIBLE_DEVICES"],
                                     "nvidia": os.environ["NVIDIA_VISIBLE_DEVICES"],
                                     "together": len(os.listdir(marker_dir))}}))
    time.sleep(1.5)
"""


@pytest.mark.runner_options(executors=3)
def test_concurrent_experiments_receive_disjoint_devices(runner):
    fake_gpus(runner, DEVICES)
    runner.start()
    free = fetcher_stats(runner)["free"]
    assert free["gpus"] == 2                     # the device with ECC errors is never counted
    assert [d["ecc_errors"] for d in free["devices"]] == [0, 5, 0]
    markers = runner.root / "markers"
    markers.mkdir()
    workspace = runner.workspace({"see.py": SEE_DEVICES})
    requests = [needing(runner.request(workspace, "see.py", args=[str(markers)]),
                        gpus=1, gpuMem="10gb") for _ in range(2)]
    for request in requests:
        runner.publish(request)

    def both_running():  # heartbeats carry the fetcher's figures about once a second
        status = runner.status()
        running = [j for j in status["attempts"] if j["phase"] == "running"]
        free = status["roles"]["fetcher"]["stats"]["free"]
        return status if len(running) == 2 and free["gpus"] == 0 else None

    status = runner.wait_for(both_running, what="two runs at once, no GPU left")
    assert sorted(j["devices"] for j in status["attempts"]) == ["GPU-aaaaaaaa-0000",
                                                            "GPU-cccccccc-2222"]
    text = ctl.render_status(status)
    assert "free resources:" in text and "0 whole GPUs" in text
    assert "gpu 1 NVIDIA L40S GPU-bbbbbbbb-1111" in text and "not given out" in text

    seen = []
    for request in requests:
        assert runner.wait_final(request)["status"] == "completed"
        document = only_document(runner, request)
        experiment = document["experiment"]
        assert experiment["together"] == 2
        assert experiment["cuda"] == experiment["nvidia"] == document["runner"]["devices"]
        seen.append(experiment["cuda"])
    assert sorted(seen) == ["GPU-aaaaaaaa-0000", "GPU-cccccccc-2222"]
    runner.wait_for(lambda: fetcher_stats(runner)["free"]["gpus"] == 2, what="devices back")
    assert "3 GPUs" in runner.log() and "ECC errors 5: not given out" in runner.log()


def test_cpu_only_puts_gpu_requests_back(runner):
    fake_gpus(runner, DEVICES[:1])
    runner.env["CPU_ONLY"] = "true"
    runner.start()
    workspace = runner.workspace({"hi.py": "print('hi')"})
    gpu_request = needing(runner.request(workspace, "hi.py"), gpus=1)
    cpu_request = runner.request(workspace, "hi.py")
    runner.publish(gpu_request)   # first: it must not block the request behind it
    runner.publish(cpu_request)
    assert runner.wait_final(cpu_request)["status"] == "completed"
    runner.wait_for(lambda: "this runner is --cpu-only" in runner.log(), what="the reason")
    record = runner.record(gpu_request)                    # never started here, and why
    assert record["status"] == "waiting" and not record["final"]
    assert "needs 1 GPU; this runner is --cpu-only" in record["reason"]
    folder = runner.root / "q" / runner.queue             # held aside or put back, untouched
    waiting = [p.name for p in folder.rglob("*") if p.is_file() and ".dead" not in p.parts]
    assert len(waiting) == 1 and waiting[0].endswith(".a0")
    assert fetcher_stats(runner)["free"]["gpus"] == 0


MEMORY_HOG = """
    print("allocating", flush=True)
    blocks = []
    while True:
        blocks.append(bytearray(10**6))
"""


@needs_cgroups
@pytest.mark.runner_options(max_attempts=1)
def test_run_over_its_memory_limit_is_killed_and_reported(runner):
    runner.start()
    assert "cgroups v" in runner.status()["roles"]["executor"]["stats"]["enforcement"]
    request = needing(runner.request(runner.workspace({"hog.py": MEMORY_HOG}), "hog.py"),
                      ram="100mb")
    runner.publish(request)
    record = runner.wait_final(request)
    assert record["status"] == "failed"
    document = only_document(runner, request)
    assert document["studioml"]["status"] == "failed"
    assert document["runner"]["error"] == "OutOfMemory"
    assert document["runner"]["message"] == "out of memory: limit 100 MB"
    assert document["runner"]["cgroup"]["oom_kills"] >= 1
    assert document["runner"]["cgroup"]["memory_limit"] == 100 * 10**6
    output = output_of(runner, request, document)
    assert "allocating" in output and "out of memory: limit 100 MB" in output


CPU_SPIN = """
    import json, multiprocessing, os, time

    def spin():
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            pass

    start, before = time.monotonic(), os.times()
    workers = [multiprocessing.Process(target=spin) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    print(json.dumps({"experiment": {"cpu": cpu, "wall": time.monotonic() - start,
                                     "omp": os.environ["OMP_NUM_THREADS"]}}))
"""


@needs_cgroups
def test_run_is_held_to_its_cpu_quota(runner):
    runner.start()
    request = needing(runner.request(runner.workspace({"spin.py": CPU_SPIN}), "spin.py"), cpus=1)
    runner.publish(request)
    assert runner.wait_final(request)["status"] == "completed"
    document = only_document(runner, request)
    measured = document["experiment"]
    # three busy processes, one CPU of quota: CPU time stays near the run's own wall time
    assert measured["cpu"] <= 1.35 * measured["wall"], measured
    assert measured["omp"] == "1"
    assert document["runner"]["cgroup"]["cpu_limit"] == 1


FORK_UNTIL_REFUSED = """
    import os, time
    children = 0
    try:
        while children < 200:
            if os.fork() == 0:
                time.sleep(3)
                os._exit(0)
            children += 1
    except OSError as exc:
        print("refused after", children, "children:", exc, flush=True)
"""


@needs_cgroups
@pytest.mark.runner_options(run_pids=16)
def test_process_count_limit_is_reached(runner):
    runner.start()
    request = runner.request(runner.workspace({"forks.py": FORK_UNTIL_REFUSED}), "forks.py")
    runner.publish(request)
    assert runner.wait_final(request)["status"] == "completed"
    document = only_document(runner, request)
    output = output_of(runner, request, document)
    assert "refused after" in output, output
    assert int(output.split("refused after")[1].split()[0]) < 16
    assert document["runner"]["cgroup"]["pids_limit"] == 16
    assert document["runner"]["cgroup"]["pids_limit_hits"] >= 1


ALLOCATE_150MB = """
    import time
    block = bytearray(150 * 10**6)
    print("holding 150 MB", flush=True)
    time.sleep(2)
"""


@pytest.mark.runner_options(cgroups="off", max_mem="1gb", max_cores=2)
def test_without_cgroups_resources_are_accounted_not_enforced(runner):
    runner.start()
    assert runner.status()["roles"]["executor"]["stats"]["enforcement"] == "accounting"
    request = needing(runner.request(runner.workspace({"big.py": ALLOCATE_150MB}), "big.py"),
                      ram="100mb", cpus=2)
    runner.publish(request)
    free = runner.wait_for(lambda: [s["free"] for s in [fetcher_stats(runner)] if s["held"]],
                           what="the run's reservation")[0]
    assert free["ram"] == 900 * 10**6 and free["cpus"] == 0 and free["slots"] == 1
    assert runner.wait_final(request)["status"] == "completed"   # over its ram, not killed
    document = only_document(runner, request)
    assert "cgroup" not in document["runner"]
    free = runner.wait_for(lambda: [s["free"] for s in [fetcher_stats(runner)] if not s["held"]],
                           what="the release")[0]
    assert free["ram"] == 10**9 and free["cpus"] == 2
    log = runner.log()
    assert log.count("cgroups off (--cgroups off): resources are accounted, not enforced") == 1
    assert log.count("CPU-only host") == 1


SLEEP_FIRST_TIME = """
    import os, time
    marker = {marker!r}
    if not os.path.exists(marker):
        open(marker, "w").write("seen")
        print("first run: sleeping", flush=True)
        time.sleep(300)
    print("second run: done")
"""


@pytest.mark.runner_options(max_attempts=1, executors=3, max_mem="2gb", max_cores=2)
def test_ledger_is_released_after_every_kind_of_ending(runner):
    runner.start()
    src = lambda name, text: runner.workspace({name: text})  # noqa: E731
    cases = {
        "completed": runner.request(src("ok.py", "print('ok')"), "ok.py"),
        "failed": runner.request(src("fail.py", "raise SystemExit(3)"), "fail.py"),
        "expired": runner.request(src("slow.py", "import time; time.sleep(300)"), "slow.py",
                                  max_duration="2s"),
        "no interpreter": runner.request(src("x.py", "print(1)"), "x.py"),
        "over hdd": needing(runner.request(src("y.py", "print(1)"), "y.py"), hdd="5"),
    }
    cases["no interpreter"]["experiment"]["pythonver"] = "2.1"
    if not _NOT_WRITABLE:
        cases["out of memory"] = needing(runner.request(src("hog.py", MEMORY_HOG), "hog.py"),
                                         ram="100mb")
    marker = runner.root / "crash-marker"
    crash = runner.request(src("crash.py", SLEEP_FIRST_TIME.format(marker=str(marker))),
                           "crash.py")
    for request in cases.values():
        runner.publish(request)
    expected = {"completed": "completed", "failed": "failed", "expired": "expired",
                "no interpreter": "failed", "over hdd": "failed", "out of memory": "failed"}
    for name, request in cases.items():
        assert runner.wait_final(request)["status"] == expected[name], name

    # a role crash while the run holds its reservation: handed back, then run again
    runner.publish(crash)
    runner.wait_for(lambda: marker.exists() and any(
        j["phase"] == "running" for j in runner.status()["attempts"]), what="the run to start")
    executor_pid = runner.status()["roles"]["executor"]["pid"]
    os.kill(executor_pid, signal.SIGKILL)
    assert runner.wait_final(crash)["status"] == "completed"
    assert sorted(d["studioml"]["status"] for d in runner.scrape_documents(crash)) == [
        "cancelled", "completed"]

    attempts = sum(len(runner.scrape_documents(r)) for r in list(cases.values()) + [crash])
    assert attempts == len(cases) + 2

    def settled():
        stats = fetcher_stats(runner)
        return stats if stats["released"] == attempts and stats["held"] == 0 else None

    stats = runner.wait_for(settled, what="every reservation released")
    assert stats["reserved"] == 0
    free = stats["free"]
    assert (free["slots"], free["cpus"], free["ram"]) == (3, 2, 2 * 10**9)
    assert "held no reservation" not in runner.log()        # released exactly once each
    assert runner.stop() == 0
