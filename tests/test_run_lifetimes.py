"""Runs die with their runner, restarted roles keep their attempts, ``hdd`` is enforced,
roles run the installed package and a group signal means one drain.

Every test drives a real ``runner-supervisor`` (real role processes, real local queue, real
``file://`` store, real experiments); processes are found by a marker in their command line.
"""
from __future__ import annotations

import json
import os
import signal
import uuid

import pytest

from runner import attempt_files, cgroups
from runner.role_processes import RoleProcesses

from .support import processes_with, running_attempt


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return False


def marker() -> str:
    return f"mark-{uuid.uuid4().hex[:12]}"


def helper_code(mark: str, ignore_term: bool = False) -> str:
    """Experiment code that starts a helper in a session of its own (``setsid``), holding
    the run's output open, marked with ``mark``."""
    body = "import signal, time; " + (
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore_term else "") + \
        "time.sleep(300)"
    return (f"subprocess.Popen([sys.executable, '-c', {body!r}, {mark!r}], "
            f"start_new_session=True)")


def statuses(runner, request) -> list[str]:
    return sorted(d["studioml"]["status"] for d in runner.scrape_documents(request))


@pytest.mark.runner_options(cgroups="off")
def test_a_helper_that_left_the_session_does_not_keep_a_finished_run_running(runner):
    mark = marker()
    script = f"""
        import subprocess, sys
        {helper_code(mark)}
        print("helper started", flush=True)
    """
    runner.start()
    request = runner.request(runner.workspace({"main.py": script}), "main.py")
    runner.publish(request)
    assert runner.wait_final(request, timeout=60)["status"] == "completed"
    runner.wait_for(lambda: not processes_with(mark), timeout=15, what="the helper to be killed")


@pytest.mark.runner_options(cgroups="off")
def test_max_duration_reaches_a_helper_that_left_the_session_and_ignores_sigterm(runner):
    mark = marker()
    script = f"""
        import subprocess, sys, time
        {helper_code(mark, ignore_term=True)}
        print("helper started", flush=True)
        time.sleep(300)
    """
    runner.start()
    request = runner.request(runner.workspace({"main.py": script}), "main.py",
                             max_duration="3s")
    runner.publish(request)
    assert runner.wait_final(request, timeout=60)["status"] == "expired"
    runner.wait_for(lambda: not processes_with(mark), timeout=15, what="the helper to be killed")


def two_attempt_script(flag, mark: str) -> str:
    """First attempt: a metric, a helper outside the session, then sleep; later attempts
    finish at once."""
    return f"""
        import json, pathlib, subprocess, sys, time
        flag = pathlib.Path({str(flag)!r})
        print(json.dumps({{"experiment": {{"attempt_flag": flag.exists()}}}}), flush=True)
        if not flag.exists():
            {helper_code(mark)}
            flag.write_text("started")
            time.sleep(300)
        print("done", flush=True)
    """


def start_two_attempt_run(runner) -> tuple[str, dict, dict]:
    """A started runner running the first attempt of a two-attempt request, its helper
    started: (mark, request, the running attempt as ``runner-ctl status`` shows it)."""
    mark = marker()
    flag = runner.root / "started.flag"
    runner.start()
    request = runner.request(runner.workspace({"main.py": two_attempt_script(flag, mark)}),
                             "main.py", args=[mark])
    runner.publish(request)
    attempt = running_attempt(runner)
    runner.wait_for(flag.exists, what="the first attempt to start its helper")
    return mark, request, attempt


def test_sigkilled_supervisor_leaves_no_process_and_the_restart_finishes_its_document(runner):
    mark, request, attempt = start_two_attempt_run(runner)
    attempt_id = attempt["attempt"]
    runtime = str(runner.options["runtime-dir"])
    runner.wait_for(lambda: (attempt_files.read(runtime, attempt_id, "scraped") or {}).get("offset"),
                    what="a save after the first line")
    assert len(processes_with(mark)) >= 2  # the experiment and its helper
    runner.kill()  # SIGKILL: no drain, no clean-up of its own

    runner.wait_for(lambda: not processes_with(mark), timeout=20,
                    what="the killed runner's run to die with it")
    runner.start()
    record = runner.wait_final(request, timeout=90)
    assert record["status"] == "completed"
    runner.wait_for(lambda: statuses(runner, request) == ["cancelled", "completed"],
                    timeout=30, what="the old attempt's document to be ended cancelled")
    [old] = [d for d in runner.scrape_documents(request)
             if d["studioml"]["status"] == "cancelled"]
    assert old["runner"]["recovered"] is True
    assert old["experiment"] == {"attempt_flag": False}  # its scraped lines were kept
    runner.wait_for(lambda: not attempt_files.attempt_ids(runtime), what="no attempt files left")


def test_a_sigkilled_supervisors_cgroups_are_removed_by_the_next_one(runner):
    """A runner killed with SIGKILL leaves its base folder (``studioml-runs-<instance>``)
    with its spare launchers' cgroups in it; the next runner's executors remove them."""
    probe, _ = cgroups.detect("auto", f"probe-{uuid.uuid4().hex[:8]}")
    if probe is None:
        pytest.skip("cgroups are not writable on this host")
    parents = {base.parent for base in probe.bases.values()}
    probe.cleanup()

    def bases_of(pid: int) -> list:
        return [base for parent in parents
                for base in parent.glob(f"{cgroups.BASE_NAME}-*-{pid}-*")]

    start_two_attempt_run(runner)
    supervisor = runner.process.pid
    runner.wait_for(lambda: any(base.glob("spare-*") for base in bases_of(supervisor)),
                    what="the spare launcher's cgroup")
    runner.kill()
    left = bases_of(supervisor)
    assert left
    runner.start()
    runner.wait_for(lambda: not any(base.exists() for base in left), timeout=30,
                    what=f"the killed runner's cgroups {left} to be removed")
    assert bases_of(runner.process.pid)  # the new runner's own are kept


def test_a_run_whose_launcher_could_not_act_is_killed_from_the_attempt_files(runner):
    mark, request, attempt = start_two_attempt_run(runner)
    launcher = attempt["pid"]
    roles = runner.role_pids()
    # Neither the executor nor the launcher can act: the attempt files are all that is left.
    os.kill(roles["executor"], signal.SIGSTOP)
    os.kill(launcher, signal.SIGSTOP)
    try:
        runner.kill()
        os.kill(roles["executor"], signal.SIGKILL)
        roles = list(roles.values())
        runner.wait_for(lambda: not any(map(alive, roles)), timeout=20,
                        what="the roles to exit with the supervisor")
        assert processes_with(mark), "the run should still be alive before the restart"
        runner.start()
        runner.wait_for(lambda: not processes_with(mark), timeout=20,
                        what="the restarted runner to kill the leftover run")
    finally:
        try:
            os.kill(launcher, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert runner.wait_final(request, timeout=90)["status"] == "completed"
    runner.wait_for(lambda: statuses(runner, request) == ["cancelled", "completed"],
                    timeout=30, what="the old attempt's document to be ended cancelled")


@pytest.mark.runner_options(max_attempts=1)
def test_hdd_is_enforced_while_the_run_writes(runner):
    script = """
        import os, time
        with open("big.bin", "wb") as handle:
            for _ in range(400):  # 400 MB, 1 MB every 20 ms
                handle.write(b"x" * (1 << 20))
                handle.flush()
                os.fsync(handle.fileno())
                time.sleep(0.02)
        print("wrote everything")
    """
    runner.start()
    request = runner.request(runner.workspace({"fill.py": script}), "fill.py")
    request["experiment"]["resources_needed"]["hdd"] = "40mb"
    runner.publish(request)
    record = runner.wait_final(request, timeout=90)
    assert record["status"] == "failed"
    [document] = runner.scrape_documents(request)
    assert document["studioml"]["status"] == "failed"
    assert document["runner"]["error"] == "DiskLimitExceeded"
    assert "disk limit exceeded" in document["runner"]["message"]
    assert "hdd of 40 MB" in document["runner"]["message"]
    [log] = (runner.experiment_dir(request) / "_metadata").glob("output-host-*.log")
    assert "wrote everything" not in log.read_text()
    assert "disk limit exceeded" in log.read_text()


def go_script(go, first: str, second: str) -> str:
    return f"""
        import json, pathlib, time
        print(json.dumps({{"experiment": {{{first!r}: 1}}}}), flush=True)
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.05)
        print(json.dumps({{"experiment": {{{second!r}: 2}}}}), flush=True)
    """


def restart_role(runner, name: str, signum: int = signal.SIGKILL) -> None:
    old = runner.status()["roles"][name]["pid"]
    os.kill(old, signum)
    runner.wait_for(lambda: (lambda r: r["ready"] and r["pid"] != old)(
        runner.status()["roles"][name]), what=f"{name} restart")


def start_go_run(runner, save_frequency: str = "1s") -> tuple:
    """A started runner running a ``go_script`` attempt: (go file, request, attempt id)."""
    go = runner.root / "go"
    runner.start()
    request = runner.request(runner.workspace({"main.py": go_script(go, "before", "after")}),
                             "main.py", save_frequency=save_frequency)
    runner.publish(request)
    return go, request, running_attempt(runner)["attempt"]


def test_restarted_scraper_keeps_the_attempt_it_had_saved(runner):
    go, request, attempt_id = start_go_run(runner)
    runtime = str(runner.options["runtime-dir"])
    runner.wait_for(lambda: (attempt_files.read(runtime, attempt_id, "scraped") or {}).get("offset"),
                    what="a save after the first line")
    restart_role(runner, "scraper")
    go.write_text("go")
    assert runner.wait_final(request)["status"] == "completed"
    [document] = runner.scrape_documents(request)
    assert document["studioml"]["status"] == "completed"
    assert document["experiment"] == {"before": 1, "after": 2}
    assert "output_lost" not in document["runner"]
    [log] = (runner.experiment_dir(request) / "_metadata").glob("output-host-*.log")
    lines = log.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"experiment": {"before": 1}},
                                                    {"experiment": {"after": 2}}]


def test_an_attempt_whose_output_was_lost_with_the_scraper_is_not_completed(runner):
    go, request, first = start_go_run(runner, save_frequency="60s")
    runner.wait_for(lambda: "before" in (runner.status()["attempts"] or [{}])[0]
                    .get("last_metric", ""), what="the scraper to see the first line")
    restart_role(runner, "scraper")  # before any save: that line is gone with it
    go.write_text("go")
    record = runner.wait_final(request)
    assert record["status"] == "completed"
    assert record["attempt"] != first  # the request ran again
    documents = runner.scrape_documents(request)
    assert statuses(runner, request) == ["cancelled", "completed"]
    [lost] = [d for d in documents if d["studioml"]["status"] == "cancelled"]
    assert lost["runner"]["output_lost"] > 0
    assert "lost" in lost["runner"]["message"]
    [done] = [d for d in documents if d["studioml"]["status"] == "completed"]
    assert done["experiment"] == {"before": 1, "after": 2}


def test_restarted_uploader_finishes_the_final_upload_without_a_rerun(runner):
    go, request, attempt_id = start_go_run(runner)
    uploader = runner.status()["roles"]["uploader"]["pid"]
    os.kill(uploader, signal.SIGSTOP)
    try:
        go.write_text("go")
        runner.wait_for(lambda: any(j["phase"] == "uploading" and j["attempt"] == attempt_id
                                    for j in runner.status()["attempts"]),
                        what="the attempt to wait on the stopped uploader")
    finally:
        try:
            os.kill(uploader, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already killed by the supervisor (no heartbeat): the log says why
    record = runner.wait_final(request)
    assert record["status"] == "completed"
    assert record["attempt"] == attempt_id  # finished by the new uploader, not run again
    [document] = runner.scrape_documents(request)
    assert document["studioml"]["status"] == "completed"
    assert document["experiment"] == {"before": 1, "after": 2}
    assert runner.status()["roles"]["uploader"]["restarts"] == 1


def test_sigterm_to_the_whole_process_group_is_one_orderly_drain(runner):
    runner.start(new_session=True)
    request = runner.request(runner.workspace({"main.py": "import time; time.sleep(300)"}),
                             "main.py")
    runner.publish(request)
    running_attempt(runner)
    os.killpg(runner.process.pid, signal.SIGTERM)
    assert runner.wait_exit(90) == 0
    log = runner.log()
    assert log.count("draining") == 1, log
    assert "exited with status" not in log, log
    assert "crashed" not in log, log
    record = runner.record(request)
    assert record["status"] == "cancelled" and not record.get("final"), record


def test_roles_import_the_installed_package_whatever_the_working_directory(runner, tmp_path):
    shadow = tmp_path / "runner"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise SystemExit('a checkout runner was imported')\n")
    status = runner.start(cwd=tmp_path, console_script=True).status()
    roles = status["roles"]
    assert all(r["alive"] for r in roles.values())
    assert {r["hot_path"] for r in roles.values()} == {"compiled"}
    assert status["supervisor"]["hot_path"] == "compiled"
    request = runner.request(runner.workspace({"ok.py": "print('ok')"}), "ok.py")
    runner.publish(request)
    assert runner.wait_final(request)["status"] == "completed"


def test_status_names_each_role_when_their_hot_paths_differ(tmp_path):
    roles = RoleProcesses(str(tmp_path))
    roles["fetcher"].stats = {"hot_path": "compiled"}
    roles["scraper"].stats = {"hot_path": "pure"}
    assert roles.hot_path() == "mixed: fetcher=compiled, scraper=pure"
    roles["scraper"].stats["hot_path"] = "compiled"
    assert roles.hot_path() == "compiled"
