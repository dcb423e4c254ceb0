"""Pub/Sub against the real Google emulator (skipped with the reason where it is missing).

One emulator per module, on a free port, stopped by PID; every test uses its own project,
named by a service-account file in its own ``--google-certs`` directory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid

import pytest

from .cloud_support import PubSubEmulator, service_account_file
from .support import BLOCKING, Runner, short_tempdir, take_soon

pytestmark = [pytest.mark.integration]



@pytest.fixture(scope="module")
def emulator():
    server = PubSubEmulator().start()
    yield server
    server.stop()


class Project:
    def __init__(self, emulator: PubSubEmulator) -> None:
        self.name = f"p{uuid.uuid4().hex[:8]}"
        self.certs = short_tempdir("gcc")
        service_account_file(self.certs, self.name)
        self.publisher, self.subscriber = emulator.clients()

    def topic(self, name: str) -> str:
        return f"projects/{self.name}/topics/{name}"

    def sub(self, name: str) -> str:
        return f"projects/{self.name}/subscriptions/{name}"

    def queue(self, name: str, **extra) -> None:
        """A topic and a subscription of the same name (10 s ack deadline by default)."""
        self.publisher.create_topic(request={"name": self.topic(name)})
        self.subscriber.create_subscription(request={
            "name": self.sub(name), "topic": self.topic(name), **extra})

    def send(self, name: str, body) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.publisher.publish(self.topic(name), data).result(30)

    def pull(self, name: str, n: int = 10):
        from google.api_core import exceptions
        try:
            return list(self.subscriber.pull(request={"subscription": self.sub(name),
                                                      "max_messages": n},
                                             timeout=3, retry=None).received_messages)
        except exceptions.DeadlineExceeded:
            return []


@pytest.fixture()
def project(emulator, monkeypatch):
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)
    p = Project(emulator)
    yield p
    shutil.rmtree(p.certs, ignore_errors=True)


# ---------------------------------------------------------------------------- back end
def test_backend_discovery_hot_projects_attempts_and_dead_letter(project, emulator, tmp_path):
    from runner.queues.pubsub import PubSubQueue

    project.queue("ps_work")
    backend = PubSubQueue([], str(project.certs), book_path=str(tmp_path / "book.json"),
                          discover_every=0.2)
    try:
        assert "ps_work" in backend.discover()
        other = Project(emulator)  # a second project's file appears: served at once
        other.queue("ps_other")
        shutil.copy(next(other.certs.glob("*.json")), project.certs)
        deadline = time.monotonic() + 10
        while "ps_other" not in backend.discover() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "ps_other" in backend.discover()
        project.send("ps_work", b"{}")
        d = take_soon(backend, "ps_work")
        assert d is not None and d.attempts == 0
        backend.requeue(d, attempts=1)            # counted by the runner (no DLQ policy)
        d = take_soon(backend, "ps_work")
        assert d.attempts == 1
        backend.requeue(d, attempts=1)            # an uncounted put-back
        d = take_soon(backend, "ps_work")
        assert d.attempts == 1
        backend.dead_letter(d, "bad request")
        [dead] = project.pull("ps_work_dead")
        assert dead.message.attributes["studioml-dead-reason"] == "bad request"
        assert project.pull("ps_work") == []
        os.remove(project.certs / f"{other.name}.json")  # removed: no new work
        deadline = time.monotonic() + 10
        while "ps_other" in backend.discover() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "ps_other" not in backend.discover()
    finally:
        backend.close()


# ---------------------------------------------------------------------------- end to end
def make_runner(project, emulator, stem, **options) -> Runner:
    options = {"google-certs": project.certs, "queue-match": f"^{stem}", **options}
    runner = Runner(short_tempdir(), queue=stem + "q", **options)
    runner.env["PUBSUB_EMULATOR_HOST"] = emulator.host
    return runner


def running_attempts(runner):
    return [j for j in runner.status()["attempts"] if j["phase"] == "running"]


def log_lines(runner, pattern):
    return [line for line in runner.log().splitlines() if re.search(pattern, line)]


@pytest.mark.slow
def test_e2e_ack_deadline_extended_past_10s_without_redelivery(project, emulator, runners):
    stem = f"ps{uuid.uuid4().hex[:6]}_"
    runner = make_runner(project, emulator, stem, pubsub_ack_deadline="10s",
                         prom_address="127.0.0.1:0")
    runners.append(runner)
    project.queue(runner.queue, ack_deadline_seconds=10)
    runner.start()
    flag = runner.root / "flag"
    request = runner.request(runner.workspace({"job.py": BLOCKING}), "job.py",
                             env={"FLAG": str(flag)})
    project.send(runner.queue, request)
    runner.wait_for(lambda: running_attempts(runner), what="the run to start")
    time.sleep(16)  # beyond the subscription's 10 s deadline, and one extension more
    assert project.pull(runner.queue) == []  # not redelivered
    assert not log_lines(runner, "redelivered")
    status, text = runner.http_get("/metrics")
    assert re.search(r'runner_project_running\{[^}]*queue_type="pubsub"', text), text
    flag.write_text("go")
    record = runner.wait_final(request)
    assert record["status"] == "completed"
    key = request["experiment"]["key"]
    uploaded = log_lines(runner, rf"uploader: key={key} .*final uploads done")
    acked = log_lines(runner, rf"fetcher: key={key} .* ack: completed")
    text = runner.log()
    assert uploaded and acked and text.index(uploaded[-1]) < text.index(acked[0])
    time.sleep(1)
    assert project.pull(runner.queue) == []  # acked for good
    [output] = (runner.experiment_dir(request) / "_metadata").glob("output-host-*.log")
    assert output.read_text().count("started") == 1
    assert runner.stop() == 0


@pytest.mark.slow
def test_e2e_shortfall_retry_bound_dead_letter_and_deletion(project, emulator, runners):
    stem = f"ps{uuid.uuid4().hex[:6]}_"
    cpus = os.cpu_count() or 1
    runner = make_runner(project, emulator, stem, executors=4, max_attempts=2)
    runners.append(runner)
    for suffix in ("q", "fail", "bad", "gone"):
        project.queue(stem + suffix)
    runner.start()
    flag = runner.root / "flag"
    big = runner.request(runner.workspace({"job.py": BLOCKING}), "job.py",
                         env={"FLAG": str(flag)})
    big["experiment"]["resources_needed"]["cpus"] = cpus
    project.send(runner.queue, big)
    runner.wait_for(lambda: running_attempts(runner), what="the big run to start")
    small = runner.request(runner.workspace({"s.py": "print('small')"}), "s.py")
    project.send(runner.queue, small)
    runner.wait_for(lambda: log_lines(runner, "not free now; held aside"), what="holding")
    assert runner.record(small) is None
    flag.write_text("go")
    assert runner.wait_final(big)["status"] == "completed"
    assert runner.wait_final(small)["status"] == "completed"
    assert runner.wait_final(small)["attempts"] == 0  # put-backs are no attempts

    failing = runner.request(runner.workspace({"f.py": "import sys; sys.exit(4)"}), "f.py")
    project.send(stem + "fail", failing)
    project.send(stem + "bad", b"{not json")
    record = runner.wait_final(failing, timeout=120)
    assert record["status"] == "failed" and record["attempts"] == 2
    assert len(runner.scrape_documents(failing)) == 2
    runner.wait_for(lambda: log_lines(runner, "dead-lettered"), what="the dead letter")
    [dead] = project.pull(stem + "bad_dead")
    assert dead.message.data == b"{not json"
    assert "JSON" in dead.message.attributes["studioml-dead-reason"]

    doomed = runner.request(runner.workspace({"job.py": BLOCKING}), "job.py",
                            env={"FLAG": str(runner.root / "never")})
    project.send(stem + "gone", doomed)
    runner.wait_for(lambda: running_attempts(runner), what="the doomed run to start")
    project.subscriber.delete_subscription(request={"subscription": project.sub(stem + "gone")})
    assert runner.wait_final(doomed, timeout=60)["status"] == "cancelled"
    assert runner.stop() == 0


@pytest.mark.slow
def test_runner_submit_publishes_to_pubsub_topics(project, emulator, runners):
    import subprocess
    import sys

    stem = f"ps{uuid.uuid4().hex[:6]}_"
    runner = make_runner(project, emulator, stem)
    runners.append(runner)
    project.queue(runner.queue)
    runner.start()
    workspace = runner.workspace({"main.py": "print('hello')"})
    result = subprocess.run(
        [sys.executable, "-m", "runner.submit", "--queue", project.topic(runner.queue),
         "--google-certs", str(project.certs), "--storage", runner.store_root,
         "--project", "cli", "--key", f"{stem}cli", "--wait", "--wait-timeout", "90s",
         str(workspace), "main.py"],
        capture_output=True, text=True, timeout=120, env=runner.env)
    assert result.returncode == 0, result.stderr + runner.log()
    assert "status: completed" in result.stdout
    assert runner.stop() == 0
