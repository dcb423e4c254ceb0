"""End to end through a real ``runner-supervisor`` on the embedded default.

Each test starts the supervisor as a real process (five role processes behind it), with a
real local queue and a real ``file://`` store, and runs real Python experiments in real
virtualenvs built by the environment store.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile

import pytest

from runner import metadata

from .support import make_tiny_package, tiny_requirement


def tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie no one reaped yet counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
METRICS_SCRIPT = """
    import json, os, sys
    print("starting", sys.argv[1:])
    print(json.dumps({"experiment": {"loss": 0.9, "nested": {"a": 1, "deep": {"x": 1}}}}))
    print("a plain line")
    print("   " + json.dumps({"experiment": {"loss": 0.5, "nested": {"b": 2, "deep": {"y": 2}}}}))
    print("{not json}")
    print(json.dumps({"studioml": {"status": "hacked", "extra": "added"}}))
    print(json.dumps([{"op": "add", "path": "/experiment/patched", "value": True}]))
    print("to stderr", file=sys.stderr)
    print("AWS_SECRET_ACCESS_KEY=supersecretvalue")
    with open(os.path.join("..", "modeldir", "weights.txt"), "w") as handle:
        handle.write("w=42")
"""


@pytest.mark.parametrize("hot_path", ["compiled", "pure"])
def test_experiment_completes_with_outputs_metadata_and_merged_scrape(runner, hot_path):
    if hot_path == "pure":
        runner.env["RUNNER_PUREPYTHON"] = "1"
    assert runner.start().status()["supervisor"]["hot_path"] == hot_path
    workspace = runner.workspace({"train.py": METRICS_SCRIPT})
    request = runner.request(workspace, "train.py", args=["'two words'", "plain"])
    runner.publish(request)
    record = runner.wait_final(request)

    assert record["status"] == "completed" and record["final"] is True
    assert "credentials" not in json.dumps(record)
    experiment_dir = runner.experiment_dir(request)
    attempt = record["attempt"]
    files = sorted(p.name for p in (experiment_dir / "_metadata").iterdir())
    # The three files of SPEC section 6, and the metric history (docs/results.md).
    assert files == [metadata.metrics_name(attempt), metadata.output_name(attempt),
                     metadata.runner_log_name(attempt), metadata.scrape_name(attempt)]

    output = (experiment_dir / "_metadata" / metadata.output_name(attempt)).read_text()
    assert "starting ['two words', 'plain']" in output
    assert "a plain line" in output and "to stderr" in output
    assert "supersecretvalue" not in output and "AWS_SECRET_ACCESS_KEY=***" in output
    assert tar_members(experiment_dir / "output.tar")["./output"].decode() == output
    assert tar_members(experiment_dir / "modeldir.tar") == {"weights.txt": b"w=42"}

    runner_log = (experiment_dir / "_metadata" / metadata.runner_log_name(attempt)).read_text()
    assert runner_log.startswith("request (credentials redacted):")
    assert request["experiment"]["key"] in runner_log

    document = json.loads((experiment_dir / "_metadata" / metadata.scrape_name(attempt)).read_text())
    assert document["experiment"] == {"loss": 0.5, "patched": True,
                                      "nested": {"a": 1, "b": 2, "deep": {"x": 1, "y": 2}}}
    assert document["studioml"]["status"] == "completed"  # the runner's key is not changed
    assert document["studioml"]["extra"] == "added"        # new keys may be added
    assert document["runner"]["exit_code"] == 0 and document["runner"]["attempt"] == attempt
    assert document["runner"]["host"] and document["runner"]["stop"] >= document["runner"]["start"]
    for name in ("start", "stop", "first_output"):  # the seed's "2018-10-23T18:25:43.511Z"
        assert re.fullmatch(ISO_UTC, document["runner"][name]), document["runner"][name]
    assert re.fullmatch(ISO_UTC, record["updated"])
    assert len(document["asset"]) == 36

    assert runner.status()["finished"]["completed"] == 1
    assert runner.stop() == 0


@pytest.mark.runner_options(max_attempts=2)
def test_failing_experiment_is_retried_then_failed(runner):
    runner.start()
    workspace = runner.workspace({"fail.py": "import sys; print('boom'); sys.exit(3)"})
    request = runner.request(workspace, "fail.py")
    runner.publish(request)
    record = runner.wait_final(request)

    assert record["status"] == "failed" and record["attempts"] == 2
    documents = runner.scrape_documents(request)
    assert len(documents) == 2, "each attempt leaves its own metadata files"
    assert {d["studioml"]["status"] for d in documents} == {"failed"}
    assert sorted(d["runner"]["exit_code"] for d in documents) == [3, 3]
    assert len({d["runner"]["attempt"] for d in documents}) == 2
    outputs = list((runner.experiment_dir(request) / "_metadata").glob("output-host-*.log"))
    assert len(outputs) == 2
    queue_dir = runner.root / "q" / runner.queue
    assert [p for p in queue_dir.iterdir() if p.is_file()] == [], "acked after the last attempt"


def test_experiment_over_max_duration_is_killed_with_its_children(runner):
    runner.start()
    pid_file = runner.root / "child.pid"
    script = f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("child started", flush=True)
        time.sleep(300)
    """
    request = runner.request(runner.workspace({"slow.py": script}), "slow.py", max_duration="3s")
    runner.publish(request)
    record = runner.wait_final(request)

    assert record["status"] == "expired"
    [document] = runner.scrape_documents(request)
    assert document["studioml"]["status"] == "expired"
    assert "max_duration" in document["runner"]["message"]
    child = int(pid_file.read_text())
    runner.wait_for(lambda: not pid_alive(child), timeout=10, what="the child to be killed")


def test_malformed_request_goes_to_dead_folder_and_runner_keeps_serving(runner):
    runner.start()
    runner.publish(b"{this is not json")
    missing_key = runner.request(runner.workspace({"x.py": "print(1)"}), "x.py")
    del missing_key["experiment"]["key"]
    runner.publish(missing_key)
    good = runner.request(runner.workspace({"ok.py": "print('fine')"}), "ok.py")
    runner.publish(good)

    assert runner.wait_final(good)["status"] == "completed"
    dead = runner.root / "q" / runner.queue / ".dead"
    reasons = sorted(p.read_text() for p in dead.glob("*.reason.txt"))
    assert len(reasons) == 2
    assert any("not JSON" in r for r in reasons) and any("experiment.key" in r for r in reasons)
    assert runner.process.poll() is None


def test_sigterm_hands_running_work_back_and_a_new_supervisor_completes_it(runner):
    """SIGTERM drains; an experiment still running at --drain-timeout (1s) is handed back."""
    runner.start()
    marker = runner.root / "first-run-marker"
    script = f"""
        import os, time
        marker = {str(marker)!r}
        if not os.path.exists(marker):
            open(marker, "w").write("seen")
            print("first run: sleeping", flush=True)
            time.sleep(300)
        print("second run: done")
    """
    request = runner.request(runner.workspace({"job.py": script}), "job.py")
    runner.publish(request)
    runner.wait_for(lambda: marker.exists() and any(
        j["phase"] == "running" for j in runner.status()["attempts"]), what="the run to start")

    assert runner.stop(signal.SIGTERM) == 0
    queue_dir = runner.root / "q" / runner.queue
    waiting = [p.name for p in queue_dir.iterdir() if p.is_file()]
    assert len(waiting) == 1 and waiting[0].endswith(".a0"), "handed back, attempt not counted"
    claims = [p for p in (queue_dir / ".claimed").rglob("*") if p.is_file()]
    assert claims == []
    record = runner.record(request)
    assert record["final"] is False

    runner.start()
    record = runner.wait_final(request)
    assert record["status"] == "completed"
    statuses = sorted(d["studioml"]["status"] for d in runner.scrape_documents(request))
    assert statuses == ["cancelled", "completed"]
    assert runner.stop() == 0


def test_two_experiments_with_the_same_pythonenv_build_one_environment(runner):
    package = make_tiny_package(runner.root / "pkgs")
    requirement = tiny_requirement(package)
    script = """
        import json, tinypkg
        print(json.dumps({"experiment": {"tinypkg": tinypkg.VALUE}}))
    """
    requests = [runner.request(runner.workspace({"use.py": script}), "use.py",
                               pythonenv=[requirement]) for _ in range(2)]
    for request in requests:
        runner.publish(request)
    runner.start()
    for request in requests:
        assert runner.wait_final(request)["status"] == "completed"
        [document] = runner.scrape_documents(request)
        assert document["experiment"] == {"tinypkg": "1.0"}
    environments = [p for p in (runner.root / "c" / "envs").iterdir()
                    if (p / ".studioml-env.json").is_file()]  # spares and holds are no store
    assert len(environments) == 1, sorted(p.name for p in (runner.root / "c" / "envs").iterdir())
    logs = []
    for request in requests:
        folder = runner.experiment_dir(request) / "_metadata"
        logs += [p.read_text() for p in folder.glob("runner-host-*.log")]
    text = "\n".join(logs)
    assert len(re.findall(r"environment [0-9a-f]+ built$", text, re.M)) == 1
    assert len(re.findall(r"environment [0-9a-f]+ reused from the store$", text, re.M)) == 1


def test_runner_ctl_status_lists_running_and_queued(runner):
    runner.options["executors"] = 1
    runner.start()
    script = "import time; print('working', flush=True); time.sleep(300)"
    first = runner.request(runner.workspace({"a.py": script}), "a.py", key="first-exp")
    second = runner.request(runner.workspace({"b.py": script}), "b.py", key="second-exp")
    runner.publish(first)
    runner.wait_for(lambda: any(j["key"] == "first-exp" and j["phase"] == "running"
                                for j in runner.status()["attempts"]), what="first to run")
    runner.publish(second)
    status = runner.wait_for(lambda: (lambda s: s if s["queues"].get(runner.queue, {})
                                      .get("depth") == 1 else None)(runner.status()),
                             what="second to show as queued")
    assert [w["key"] for w in status["queues"][runner.queue]["waiting"]] == ["second-exp"]
    text = subprocess.run([sys.executable, "-m", "runner.ctl", "--runtime-dir",
                           str(runner.options["runtime-dir"]), "status"],
                          capture_output=True, text=True, check=True).stdout
    assert "first-exp" in text and "second-exp" in text and "running" in text
    assert runner.stop() == 0


def test_role_that_cannot_boot_stops_the_runner_with_a_clear_message(runner):
    blocker = runner.root / "not-a-dir"
    blocker.write_text("a file where the queue root should be")
    runner.options["queue-root"] = blocker
    runner.start(wait=False)
    assert runner.process.wait(60) == 3
    assert "fetcher failed to boot" in runner.log()


def test_crashed_role_is_restarted_and_work_continues(runner):
    runner.start()
    status = runner.status()
    old_pid = status["roles"]["scraper"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    runner.wait_for(lambda: (lambda r: r["ready"] and r["pid"] != old_pid)(
        runner.status()["roles"]["scraper"]), what="scraper restart")
    request = runner.request(runner.workspace({"ok.py": "print('after restart')"}), "ok.py")
    runner.publish(request)
    assert runner.wait_final(request)["status"] == "completed"
    assert runner.status()["roles"]["scraper"]["restarts"] == 1


def test_options_are_validated_all_at_once(runner):
    runner.options.update({"executors": 0, "queue-match": "(", "kill-grace": "soon"})
    runner.start(wait=False)
    assert runner.process.wait(30) == 2
    log = runner.log()
    assert "--executors" in log and "--queue-match" in log and "--kill-grace" in log


def test_mutable_artifacts_are_uploaded_periodically_while_running(runner):
    runner.start()
    script = """
        import os, time
        with open(os.path.join("..", "modeldir", "checkpoint.txt"), "w") as handle:
            handle.write("step 1")
        print("checkpoint written", flush=True)
        time.sleep(300)
    """
    request = runner.request(runner.workspace({"long.py": script}), "long.py")
    runner.publish(request)
    modeldir = runner.experiment_dir(request) / "modeldir.tar"
    runner.wait_for(lambda: modeldir.exists() and "checkpoint.txt" in tar_members(modeldir),
                    timeout=30, what="a periodic modeldir upload")
    assert tar_members(modeldir)["checkpoint.txt"] == b"step 1"
    scrape = runner.experiment_dir(request) / "_metadata"
    # The same save uploads the artifacts first, then the _metadata files.
    runner.wait_for(lambda: list(scrape.glob("scrape-host-*.json")), timeout=30,
                    what="the scrape document of that save")
    [document] = [json.loads(p.read_text()) for p in scrape.glob("scrape-host-*.json")]
    assert document["studioml"]["status"] == "running"
    assert runner.record(request)["final"] is False
    assert runner.stop() == 0


def test_qualified_only_artifacts_and_a_per_artifact_save_frequency(runner):
    """Artifacts given only by ``qualified`` (no ``key``) still get their metadata record;
    ``modeldir`` with its own ``saveFrequency`` is uploaded on it while the others wait for
    saveWorkspaceFrequency (1h here) or the end."""
    runner.start()
    gate = runner.root / "gate-save"
    script = f"""
        import os, time
        for label, text in (("modeldir", "epoch 1"), ("tb", "event 1")):
            with open(os.path.join("..", label, "data.txt"), "w") as handle:
                handle.write(text)
        print("written", flush=True)
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.05)
    """
    request = runner.request(runner.workspace({"job.py": script}), "job.py", save_frequency="1h")
    for artifact in request["experiment"]["artifacts"].values():
        del artifact["key"]
    request["experiment"]["artifacts"]["modeldir"]["saveFrequency"] = "1s"
    runner.publish(request)
    experiment_dir = runner.experiment_dir(request)
    modeldir, tb = experiment_dir / "modeldir.tar", experiment_dir / "tb.tar"
    runner.wait_for(lambda: modeldir.exists() and "data.txt" in tar_members(modeldir),
                    timeout=60, what="modeldir uploaded on its own saveFrequency")
    record_file = (runner.store_path(runner.store_root) / "metadata" / "e2e" /
                   f"{request['experiment']['key']}.json")
    runner.wait_for(record_file.exists, what="the running record of a keyless request")
    assert json.loads(record_file.read_text())["status"] == "running"
    assert not tb.exists()  # on saveWorkspaceFrequency: not yet
    gate.write_text("open")
    record = runner.wait_final(request)
    assert record["status"] == "completed" and json.loads(record_file.read_text()) == record
    assert re.fullmatch(ISO_UTC, record["updated"])
    assert tar_members(tb) == {"data.txt": b"event 1"}  # the final upload takes everything
    [document] = runner.scrape_documents(request)
    assert document["runner"]["start"] <= document["runner"]["stop"]
    assert runner.stop() == 0


def test_a_key_too_long_for_the_store_is_dead_lettered_at_admission(runner):
    runner.start()
    never = runner.root / "never-ran"
    script = f"open({str(never)!r}, 'w').close()"
    too_long = runner.request(runner.workspace({"x.py": script}), "x.py", key="k" * 251)
    runner.publish(too_long)
    good = runner.request(runner.workspace({"ok.py": "print('fine')"}), "ok.py")
    runner.publish(good)
    assert runner.wait_final(good)["status"] == "completed"
    dead = runner.root / "q" / runner.queue / ".dead"
    [reason] = [p.read_text() for p in dead.glob("*.reason.txt")]
    assert "metadata record" in reason and "shorter" in reason
    assert "277 bytes" in reason and "temporary suffix" in reason  # 251 + .json + .partial-…
    assert not never.exists()
    assert runner.stop() == 0


def test_experiment_lifetime_stops_a_running_experiment(runner):
    runner.start()
    request = runner.request(runner.workspace({"sleep.py": "import time; time.sleep(300)"}),
                             "sleep.py", lifetime="4s")
    runner.publish(request)
    record = runner.wait_final(request)
    assert record["status"] == "expired"
    [document] = runner.scrape_documents(request)
    assert "experimentLifetime" in document["runner"]["message"]


def test_runner_submit_publishes_a_studioml_request_and_waits(runner):
    runner.start()
    workspace = runner.workspace({"main.py": """
        import json, os, sys
        print(json.dumps({"experiment": {"argv": sys.argv[1:], "env": os.environ["GREETING"]}}))
    """})
    (workspace / "requirements.txt").write_text(
        tiny_requirement(make_tiny_package(runner.root / "pkgs")) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "runner.submit", "--queue", runner.queue,
         "--queue-root", str(runner.options["queue-root"]), "--storage", runner.store_root,
         "--project", "cli", "--key", "cli-exp", "--env", "GREETING=hello", "--wait",
         "--wait-timeout", "90s", str(workspace), "main.py", "--", "--lr", "0.1", "two words"],
        capture_output=True, text=True, timeout=120, env=runner.env)
    assert result.returncode == 0, result.stderr + runner.log()
    assert "status: completed" in result.stdout
    printed = json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])
    assert printed["experiment"] == {"argv": ["--lr", "0.1", "two words"], "env": "hello"}
    record = json.loads((runner.store_path(runner.store_root) / "metadata" / "cli"
                         / "cli-exp.json").read_text())
    experiment = record["request"]["experiment"]
    assert experiment["pythonenv"][0].startswith("tinypkg @ file://")
    assert experiment["artifacts"]["workspace"]["key"].startswith("blobstore/")
    assert experiment["artifacts"]["modeldir"]["key"] == "experiments/cli-exp/modeldir.tar"
