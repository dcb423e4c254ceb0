"""Running it for real: drain and stop, reload, limits, systemd notify, metrics, Slack, ctl.

Every test starts a real ``runner-supervisor`` (five role processes) on a private root with
a real local queue and ``file://`` store (:mod:`tests.support`).  Nothing asserts wall-clock
durations: "did not delay" is shown by order of events instead.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest

from .support import Runner, SilentServer, SlackServer


def running(runner: Runner, key: str) -> bool:
    return any(j["key"] == key and j["phase"] == "running" for j in runner.status()["attempts"])


def waiting_files(runner: Runner, queue: str | None = None) -> list[str]:
    folder = runner.root / "q" / (queue or runner.queue)
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


GATED = """
    import os, sys, time
    gate = {gate!r}
    print("waiting for the gate", flush=True)
    while not os.path.exists(gate):
        time.sleep(0.05)
    print("gate open: done", flush=True)
"""


def gated_script(runner: Runner, name: str = "gate") -> tuple[str, object]:
    """A script that runs until the test creates its gate file (no sleeps to tune)."""
    gate = runner.root / name
    return GATED.format(gate=str(gate)), gate


# -- drain and stop --------------------------------------------------------------------------

@pytest.mark.runner_options(drain_timeout="10m", executors=1)
def test_sigterm_drain_lets_a_running_experiment_finish_and_takes_no_new_one(runner):
    runner.start()
    script, gate = gated_script(runner)
    first = runner.request(runner.workspace({"job.py": script}), "job.py", key="drain-first")
    second = runner.request(runner.workspace({"job.py": "print('never')"}), "job.py",
                            key="drain-second")
    runner.publish(first)
    runner.wait_for(lambda: running(runner, "drain-first"), what="the first to run")

    runner.signal(signal.SIGTERM)
    runner.wait_for(lambda: runner.status()["supervisor"]["state"] == "draining",
                    what="draining")
    runner.publish(second)
    status = runner.wait_for(lambda: (lambda s: s if s["queues"].get(runner.queue, {})
                                      .get("depth") == 1 else None)(runner.status()),
                             what="the second request to be seen waiting")
    assert status["supervisor"]["taking"] is False
    assert status["supervisor"]["drain"]["resumable"] is False
    assert [j["key"] for j in status["attempts"]] == ["drain-first"]
    assert runner.ctl("resume").returncode == 1, "a drain started by SIGTERM is not resumable"

    gate.write_text("open")
    assert runner.wait_exit() == 0
    assert runner.record(first)["status"] == "completed"
    assert runner.record(first)["final"] is True
    assert len(waiting_files(runner)) == 1, "the second request is still waiting in its queue"
    assert runner.record(second) is None
    assert "drained (signal SIGTERM)" in runner.log()


@pytest.mark.runner_options(drain_timeout="10m")
def test_second_sigterm_stops_now_and_still_hands_work_back(runner):
    runner.start()
    script, _gate = gated_script(runner)
    request = runner.request(runner.workspace({"job.py": script}), "job.py", key="stop-now")
    runner.publish(request)
    runner.wait_for(lambda: running(runner, "stop-now"), what="the run to start")
    runner.signal(signal.SIGTERM)
    runner.wait_for(lambda: runner.status()["supervisor"]["state"] == "draining",
                    what="draining")
    runner.signal(signal.SIGTERM)
    assert runner.wait_exit() == 0
    waiting = waiting_files(runner)
    assert len(waiting) == 1 and waiting[0].endswith(".a0"), "handed back, not counted"
    assert [p for p in (runner.root / "q" / runner.queue / ".claimed").rglob("*")
            if p.is_file()] == []
    [document] = runner.scrape_documents(request)
    assert document["studioml"]["status"] == "cancelled"
    assert runner.record(request)["final"] is False


@pytest.mark.runner_options(drain_timeout="10m", executors=1)
def test_runner_ctl_drain_stay_then_resume_takes_work_again(runner):
    runner.start()
    result = runner.ctl("drain", "--stay")
    assert result.returncode == 0, result.stderr
    runner.wait_for(lambda: runner.status()["supervisor"]["state"] == "drained",
                    what="drained")
    request = runner.request(runner.workspace({"ok.py": "print('after resume')"}), "ok.py")
    runner.publish(request)
    runner.wait_for(lambda: runner.status()["queues"].get(runner.queue, {}).get("depth") == 1,
                    what="the request to be seen waiting")
    assert runner.record(request) is None and runner.process.poll() is None
    drain = runner.status()["supervisor"]["drain"]
    assert drain["resumable"] is True and drain["exit"] is False

    result = runner.ctl("resume")
    assert result.returncode == 0 and "resumed" in result.stdout
    assert runner.wait_final(request)["status"] == "completed"
    assert runner.status()["supervisor"]["drain"] is None
    assert runner.ctl("resume").returncode == 1  # nothing to resume
    assert runner.stop() == 0


# -- reload ----------------------------------------------------------------------------------

def test_sighup_changes_the_queue_match_live(runner):
    options = runner.root / "runner.env"
    options.write_text("# served queues\nQUEUE_MATCH=^local_first$\n")
    runner.options["options-file"] = options
    runner.queue = "local_first"
    runner.start()
    runner.queue = "local_second"
    request = runner.request(runner.workspace({"ok.py": "print('served after reload')"}),
                             "ok.py")
    runner.publish(request)
    # The fetcher lists queues every 2 s: wait until it has seen local_second and left it.
    runner.wait_for(lambda: "local_second" in runner.status()["roles"]["fetcher"]["stats"]
                    .get("queue_ignored", {}), what="local_second to be ignored")
    assert runner.record(request) is None
    assert waiting_files(runner, "local_second")

    options.write_text("QUEUE_MATCH='^local_(first|second)$'\nRUNNER_LOG_LEVEL=debug\n"
                       "MAX_ATTEMPTS=5\n")
    runner.signal(signal.SIGHUP)
    assert runner.wait_final(request)["status"] == "completed"
    supervisor = runner.status()["supervisor"]
    assert supervisor["queue_match"] == "^local_(first|second)$"
    assert supervisor["log_level"] == "debug" and supervisor["reloads"] == 1
    log = runner.log()
    assert "max_attempts changed but only takes effect after a restart" in log
    assert "reloaded options" in log, "the roles got the new log level (a debug line)"

    options.write_text("QUEUE_MATCH=(\n")  # invalid: refused, the old options stay
    result = runner.ctl("reload")
    assert result.returncode == 1 and "reload refused" in result.stderr
    assert runner.status()["supervisor"]["queue_match"] == "^local_(first|second)$"
    assert runner.stop() == 0


# -- limits ----------------------------------------------------------------------------------

@pytest.mark.runner_options(limit_tasks=1, executors=2)
def test_limit_tasks_exits_after_n_experiments_and_leaves_the_rest_queued(runner):
    requests = [runner.request(runner.workspace({"ok.py": f"print({i})"}), "ok.py")
                for i in range(3)]
    for request in requests:
        runner.publish(request)
    runner.start(wait=False)
    assert runner.wait_exit() == 0
    records = [runner.record(r) for r in requests]
    assert sum(1 for r in records if r and r["status"] == "completed") == 1
    assert len(waiting_files(runner)) == 2, "only one was taken"
    assert "--limit-tasks 1 reached" in runner.log()
    status = runner.ctl("status")  # an ended supervisor is not reported as a killed one
    assert status.returncode != 0 and "killed" not in status.stderr, status.stderr
    assert "no control socket" in status.stderr, status.stderr


@pytest.mark.runner_options(limit_idle_duration="2s")
def test_limit_idle_duration_exits_once_idle_but_not_while_busy(runner):
    script, gate = gated_script(runner)
    request = runner.request(runner.workspace({"job.py": script}), "job.py", key="busy")
    runner.publish(request)
    runner.start()
    runner.wait_for(lambda: running(runner, "busy"), what="the run to start")
    # Busy past the idle limit: still up (the gate opens only after the limit has passed).
    runner.wait_for(lambda: runner.status()["supervisor"]["uptime"] > 4, what="uptime")
    assert runner.process.poll() is None
    gate.write_text("open")
    assert runner.wait_exit() == 0
    assert runner.record(request)["status"] == "completed"
    assert "(--limit-idle-duration)" in runner.log()


# -- systemd ---------------------------------------------------------------------------------

def test_notify_protocol_ready_watchdog_stopping_in_order(runner):
    path = runner.root / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(30)
    runner.env.update(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="400000")
    try:
        runner.start()
        notices = []

        def receive_until(field: str) -> None:
            while True:
                text = listener.recv(4096).decode()
                notices.append(text)
                if field in text.split("\n"):
                    return

        receive_until("READY=1")
        role_environments = [
            pid for pid in (r["pid"] for r in runner.status()["roles"].values())
            if b"NOTIFY_SOCKET=" in Path(f"/proc/{pid}/environ").read_bytes()]
        receive_until("WATCHDOG=1")
        receive_until("WATCHDOG=1")
        runner.signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert runner.wait_exit() == 0
    finally:
        listener.close()
    fields = [line.split("=", 1)[0] for text in notices for line in text.split("\n")]
    ready, stopping = fields.index("READY"), fields.index("STOPPING")
    watchdogs = [i for i, f in enumerate(fields) if f == "WATCHDOG"]
    assert ready < watchdogs[0] and watchdogs[-1] < stopping
    assert any(t.startswith("READY=1\nSTATUS=serving") for t in notices)
    assert any("STATUS=draining" in t for t in notices)
    assert not role_environments, "roles (and so experiments) never see NOTIFY_SOCKET"


def test_watchdog_is_withheld_while_a_role_is_down(runner):
    path = runner.root / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(30)
    runner.env.update(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="200000")
    try:
        runner.start()
        while "WATCHDOG=1" not in listener.recv(4096).decode():
            pass
        # Stop (not kill) the uploader: alive but silent, so it is not restarted for 30 s.
        uploader = runner.status()["roles"]["uploader"]["pid"]
        os.kill(uploader, signal.SIGSTOP)
        try:
            runner.wait_for(lambda: not runner.status()["supervisor"]["healthy"], timeout=30,
                            what="the runner to see the silent role")
            listener.settimeout(0.01)
            try:  # drain what was sent before it turned unhealthy
                while True:
                    listener.recv(4096)
            except (socket.timeout, BlockingIOError):
                pass
            listener.settimeout(1.0)
            seen = []
            for _ in range(3):  # ~15 watchdog intervals: none may come
                try:
                    seen.append(listener.recv(4096).decode())
                except socket.timeout:
                    pass
            assert not any("WATCHDOG=1" in t for t in seen), seen
            assert runner.ctl("health").returncode == 1
        finally:
            os.kill(uploader, signal.SIGCONT)
        runner.wait_for(lambda: runner.status()["supervisor"]["healthy"], what="healthy again")
        assert runner.ctl("health").returncode == 0
    finally:
        listener.close()
    assert runner.stop() == 0


# -- boot ------------------------------------------------------------------------------------

SLOW_BOOT = """
import os, sys, time
if "runner.rolehost" in sys.orig_argv:
    open(os.path.join(os.environ["SLOW_BOOT_DIR"], str(os.getpid())), "w").close()
    time.sleep(600)  # a role that takes long to boot (killed by the test's signal)
"""


def test_a_stop_while_the_roles_boot_is_reported_as_a_stop(runner):
    """The whole process group gets SIGTERM (Ctrl-C, systemd, docker stop) while every role
    is still booting: the runner says it was stopped, not that a role failed to boot."""
    hooks = runner.root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_BOOT)
    booting = runner.root / "booting"
    booting.mkdir()
    runner.env.update(PYTHONPATH=str(hooks), SLOW_BOOT_DIR=str(booting),
                      LOGXI="*=DBG", LOGXI_FORMAT="happy,maxcol=1024", RUNNER_MAX_ATTEMPTS="4")
    runner.start(wait=False, new_session=True)
    runner.wait_for(lambda: len(list(booting.iterdir())) == 5, what="the five roles to start")
    os.killpg(runner.process.pid, signal.SIGTERM)
    assert runner.wait_exit() == 0, runner.log()
    log = runner.log()
    assert "stopped by SIGTERM while the roles were booting" in log
    assert "failed to boot" not in log and "exit status -15" not in log
    # Start-up: which options the environment set (names, not values), LOGXI read once.
    assert re.search(r"options from the environment: .*--max-attempts from "
                     r"\$RUNNER_MAX_ATTEMPTS", log), log
    assert "--log-level from $LOGXI" in log
    assert log.count("$LOGXI='*=DBG' is the go runner's variable: read as --log-level debug") == 1
    assert log.count("$LOGXI_FORMAT=") == 1
    assert " DEBUG " in log  # the level LOGXI asked for


def test_a_role_killed_while_booting_is_named_with_its_signal(runner):
    hooks = runner.root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_BOOT)
    booting = runner.root / "booting"
    booting.mkdir()
    runner.env.update(PYTHONPATH=str(hooks), SLOW_BOOT_DIR=str(booting))
    runner.start(wait=False, new_session=True)
    pids = runner.wait_for(lambda: (lambda found: found if len(found) == 5 else None)(
        [int(p.name) for p in booting.iterdir()]), what="the five roles to start")
    os.kill(pids[0], signal.SIGKILL)  # one role dies alone: that is a boot failure
    assert runner.wait_exit() == 3
    assert re.search(r"role \w+ was killed by SIGKILL while booting", runner.log())


# -- metrics ---------------------------------------------------------------------------------

def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


@pytest.mark.runner_options(prom_address="127.0.0.1:0")
def test_metrics_move_during_and_after_a_run_and_healthz_follows_the_roles(runner):
    runner.start()
    status, health = runner.http_get("/healthz")
    assert (status, health.strip()) == (200, "ok")
    script, gate = gated_script(runner)
    request = runner.request(runner.workspace({"job.py": script}), "job.py", key="metered")
    runner.publish(request)
    runner.wait_for(lambda: running(runner, "metered"), what="the run to start")

    # Role stats reach the supervisor with each heartbeat (every second): wait for the one
    # sent after the take.
    during = runner.wait_for(lambda: (lambda t: t if metric(
        t, "runner_resource_executor_free_slots") == 1 else None)(runner.http_get("/metrics")[1]),
        what="the fetcher's stats after the take")
    assert metric(during, "runner_project_running",
                  queue_name=runner.queue, queue_type="local", project="e2e") == 1
    assert "metered" not in during and "experiment=" not in during  # no series per experiment
    assert metric(during, "runner_phase_seconds_count", phase="queue_wait") == 1
    assert metric(during, "runner_phase_seconds_count", phase="download") == 1
    assert metric(during, "runner_phase_seconds_count", phase="environment") == 1
    assert metric(during, "runner_phase_seconds_count", phase="run") == 0
    assert metric(during, "runner_queue_checked", queue_name=runner.queue) >= 1
    assert 'runner_resource_cpu_free_slots{host="' in during
    assert "# TYPE runner_project_completed counter" in during
    assert metric(during, "runner_project_completed") == 0

    gate.write_text("open")
    runner.wait_final(request)
    after = runner.wait_for(lambda: (lambda t: t if metric(t, "runner_experiments_total",
                                                           status="completed") == 1 and metric(
        t, "runner_resource_executor_free_slots") == 2 and "runner_queue_depth{" in t
        else None)(runner.http_get("/metrics")[1]),
        what="the completion and the queue's depth in /metrics")
    assert metric(after, "runner_project_running", project="e2e") == 0
    assert metric(after, "runner_project_completed", project="e2e") == 1
    assert "metered" not in after
    # The queue's depth as the fetcher last counted it: nothing waits any more.
    assert metric(after, "runner_queue_depth", queue_name=runner.queue, queue_type="local") == 0
    for phase in ("queue_wait", "download", "environment", "run", "upload"):
        assert metric(after, "runner_phase_seconds_count", phase=phase) == 1, phase
    assert metric(after, "runner_phase_seconds_sum", phase="run") > 0
    assert metric(after, "runner_healthy") == 1
    assert metric(after, "runner_role_up", role="executor") == 1

    executor = runner.status()["roles"]["executor"]["pid"]
    os.kill(executor, signal.SIGKILL)
    # Right after the kill /healthz says so, until the restarted executor is ready again.
    runner.wait_for(lambda: runner.http_get("/healthz")[0] == 503 or
                    runner.status()["roles"]["executor"]["restarts"] == 1,
                    what="/healthz to notice the dead role")
    runner.wait_for(lambda: runner.http_get("/healthz")[0] == 200, what="healthy again")
    assert runner.stop() == 0


# -- Slack -----------------------------------------------------------------------------------

def test_slack_notices_for_start_failure_and_completion(runner):
    slack = SlackServer()
    try:
        runner.options.update({"slack-hook": slack.url, "slack-room": "#runners",
                               "slack-completed": True, "max-attempts": 1})
        runner.start()
        runner.wait_for(lambda: any("started on" in t for t in slack.texts()),
                        what="the start notice")
        failing = runner.request(runner.workspace({"fail.py": """
            import sys
            print("step 1 ok")
            print("API_TOKEN=hunter2hunter2")
            print("Traceback: something broke", file=sys.stderr)
            sys.exit(3)
        """}), "fail.py", key="slack-fail", env={"MY_SECRET": "s3cr3t-value-xyz"})
        good = runner.request(runner.workspace({"ok.py": "print('fine')"}), "ok.py",
                              key="slack-ok")
        runner.publish(failing)
        runner.publish(good)
        assert runner.wait_final(failing)["status"] == "failed"
        assert runner.wait_final(good)["status"] == "completed"
        runner.wait_for(lambda: len(slack.posts) >= 3, what="three notices")
        assert runner.stop() == 0
    finally:
        slack.close()
    assert all(p.get("channel") == "#runners" for p in slack.posts)
    [failed] = [t for t in slack.texts() if "slack-fail" in t]
    assert "failed" in failed and "Traceback: something broke" in failed
    assert "hunter2hunter2" not in failed and "API_TOKEN=***" in failed
    [completed] = [t for t in slack.texts() if "slack-ok" in t]
    assert "completed" in completed


def test_dead_slack_endpoint_does_not_delay_an_experiment(runner):
    silent = SilentServer()
    try:
        runner.options.update({"slack-hook": silent.url, "slack-timeout": "10m",
                               "slack-completed": True})
        runner.start()
        runner.wait_for(lambda: silent.connections >= 1, what="the start notice to hang")
        request = runner.request(runner.workspace({"ok.py": "print('fine')"}), "ok.py")
        runner.publish(request)
        # The experiment completes while the first post is still hanging (10 minute timeout).
        assert runner.wait_final(request)["status"] == "completed"
        slack = runner.wait_for(lambda: (lambda s: s if s["pending"] >= 1 else None)(
            runner.status()["supervisor"]["slack"]), what="the completion notice to queue")
        assert slack["sent"] == 0 and slack["failed"] == 0
        assert silent.connections == 1, "posts are sent one at a time, in the background"
        assert runner.stop() == 0, "a hanging Slack does not hold up the exit either"
    finally:
        silent.close()


# -- runner-ctl ------------------------------------------------------------------------------

def test_runner_ctl_views_and_status_json_during_a_run(runner):
    runner.start()
    script = """
        import json, os, time
        print(json.dumps({{"experiment": {{"loss": 0.25, "step": 7}}}}), flush=True)
        gate = {!r}
        while not os.path.exists(gate):
            time.sleep(0.05)
    """.format(str(runner.root / "gate"))
    request = runner.request(runner.workspace({"job.py": script}), "job.py", key="ctl-json")
    runner.publish(request)
    runner.wait_for(lambda: any(j["last_metric"] for j in runner.status()["attempts"]),
                    what="the first metric line")
    result = runner.ctl("--json", "status", check=True)
    data = json.loads(result.stdout)
    [attempt] = data["attempts"]
    assert attempt["key"] == "ctl-json" and attempt["phase"] == "running" and attempt["project"] == "e2e"
    # Times are ISO-8601 UTC with milliseconds, as in the metadata documents.
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(iso, attempt["started"]) and re.fullmatch(iso, data["supervisor"]["started"])
    assert attempt["started"] >= data["supervisor"]["started"]
    assert attempt["queue"] == runner.queue and attempt["attempt_number"] == 1
    assert json.loads(attempt["last_metric"]) == {"experiment": {"loss": 0.25, "step": 7}}
    assert attempt["devices"] == "-1" and attempt["elapsed"] >= 0
    assert set(data["roles"]) == {"fetcher", "cache_manager", "executor", "scraper", "uploader"}
    assert data["supervisor"]["healthy"] is True and data["free"]["slots"] == 1

    running_json = json.loads(runner.ctl("--json", "running", check=True).stdout)
    assert [j["key"] for j in running_json] == ["ctl-json"]
    assert json.loads(runner.ctl("--json", "free", check=True).stdout)["slots"] == 1
    assert runner.queue in json.loads(runner.ctl("--json", "queues", check=True).stdout)
    text = runner.ctl("running", check=True).stdout
    assert "ctl-json" in text and 'last metric: {"experiment"' in text
    assert "fetcher" in runner.ctl("roles", check=True).stdout
    assert runner.ctl("health", check=True).stdout.startswith("healthy")
    watched = runner.ctl("watch", "running", "--interval", "0.1", "--count", "2", check=True)
    assert watched.stdout.count("runner-ctl running at") == 2
    (runner.root / "gate").write_text("open")
    assert runner.wait_final(request)["status"] == "completed"
    assert runner.stop() == 0


@pytest.mark.runner_options(log_format="json")
def test_json_logs_carry_key_and_attempt_on_experiment_lines(runner):
    runner.start()
    request = runner.request(runner.workspace({"ok.py": "print('hi')"}), "ok.py", key="logged")
    runner.publish(request)
    attempt = runner.wait_final(request)["attempt"]
    assert runner.stop() == 0
    entries = [json.loads(line) for line in runner.log().splitlines() if line.startswith("{")]
    assert entries and all({"time", "level", "host", "role", "message"} <= set(e)
                           for e in entries)
    about = [e for e in entries if "logged" in e["message"]]
    assert len(about) >= 3 and {e["role"] for e in about} >= {"fetcher", "executor"}
    assert all(e["key"] == "logged" and e["attempt"] == attempt for e in about)
