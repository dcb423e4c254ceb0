"""Chaos, bounded: SIGKILL the supervisor at several phases of an attempt, start a new one.

For each phase, a real ``runner-supervisor`` takes one request; it is SIGKILLed while the
attempt is being prepared, while it runs (with a helper that left the run's session), and
just after the experiment exited.  Then: no process of the killed attempt is left, and once
a new supervisor has run the request again it has exactly one final scrape document that
says ``completed``, any other is ``cancelled`` (never ``running``), and the attempt files
is empty.  Three kills, each bounded by generous timeouts.
"""
from __future__ import annotations

import time
import uuid

import pytest

from runner import attempt_files

from .support import make_tiny_package, processes_with, tiny_requirement

SCRIPT = """
    import json, pathlib, subprocess, sys, time
    root = pathlib.Path({root!r})
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", {mark!r}],
                     start_new_session=True)
    print(json.dumps({{"experiment": {{"started": True}}}}), flush=True)
    (root / "running.flag").write_text("1")
    time.sleep(2)
    print(json.dumps({{"experiment": {{"finished": True}}}}), flush=True)
    (root / "exit.flag").write_text("1")
"""


def wait(predicate, timeout: float, what: str, runner):
    return runner.wait_for(predicate, timeout=timeout, what=what)


def phase_is(runner, name: str) -> bool:
    try:
        return any(attempt["phase"] == name for attempt in runner.status()["attempts"])
    except (AssertionError, TimeoutError, Exception):  # noqa: BLE001 - status while busy
        return False


@pytest.mark.parametrize("phase", ["preparing", "running", "after-exit"])
def test_sigkilled_supervisor_at_each_phase_gives_one_final_document(runner, phase):
    mark = f"chaos-{uuid.uuid4().hex[:12]}"
    flags = runner.root / "flags"
    flags.mkdir()
    pythonenv = []
    if phase == "preparing":  # a fresh environment to build: the attempt stays in preparing
        package = make_tiny_package(runner.root / "pkgs", version=f"1.0.{time.time_ns()}")
        pythonenv = [tiny_requirement(package)]
    runner.start()
    request = runner.request(
        runner.workspace({"main.py": SCRIPT.format(root=str(flags), mark=mark)}), "main.py",
        args=[mark], pythonenv=pythonenv)
    runner.publish(request)

    if phase == "preparing":
        wait(lambda: phase_is(runner, "preparing"), 90, "the attempt to be prepared", runner)
    elif phase == "running":
        wait((flags / "running.flag").exists, 90, "the run to start", runner)
    else:
        deadline = time.monotonic() + 90
        while not (flags / "exit.flag").exists():
            assert time.monotonic() < deadline, runner.log()
            time.sleep(0.005)
    runner.kill()

    wait(lambda: not processes_with(mark), 30, "no process of the killed attempt", runner)
    for flag in flags.iterdir():
        flag.unlink()
    runner.start()
    assert runner.wait_final(request, timeout=180)["status"] == "completed"

    def settled():
        found = [d["studioml"]["status"] for d in runner.scrape_documents(request)]
        return found.count("completed") == 1 and set(found) <= {"completed", "cancelled"}

    wait(settled, 60, "exactly one completed document and no running one", runner)
    runtime = str(runner.options["runtime-dir"])
    wait(lambda: not attempt_files.attempt_ids(runtime), 60, "no attempt files left", runner)
    wait(lambda: not processes_with(mark), 30, "no process of the re-run left", runner)
