"""SQS against a real ``moto_server``: the back end on its own and a real runner-supervisor.

Every test gets its own moto_server on a free port (stopped by PID) and its own
``--sqs-certs`` directory with one sub-directory per account, as operators mount them.
moto keeps one account for unknown access keys, so the "accounts" here differ by region
(each sub-directory's own ``region=``), which is what keeps their queues apart.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid

import pytest

from runner.errors import QueueError
from runner.queues.sqs import SQSQueue

from .cloud_support import account_dir
from .support import BLOCKING, MotoServer, Runner, short_tempdir, take_soon

pytestmark = [pytest.mark.integration]



@pytest.fixture()
def moto():
    server = MotoServer(short_tempdir("moto")).start()
    yield server
    server.stop()


@pytest.fixture()
def certs():
    root = short_tempdir("sqsc")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def url_of(client, name: str) -> str:
    return client.get_queue_url(QueueName=name)["QueueUrl"]


def counts(client, name: str) -> tuple[int, int]:
    attrs = client.get_queue_attributes(
        QueueUrl=url_of(client, name),
        AttributeNames=["ApproximateNumberOfMessages",
                        "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), \
        int(attrs["ApproximateNumberOfMessagesNotVisible"])


def wait_counts(client, name, visible, invisible, timeout=30.0):
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = counts(client, name)
        if seen == (visible, invisible):
            return
        time.sleep(0.1)
    raise AssertionError(f"{name}: (visible, in flight) stayed {seen}")


def wait_until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


# ---------------------------------------------------------------------------- back end
def test_discovery_per_account_directory_and_hot_add_remove(moto, certs):
    alice = moto.sqs_client("111111111111")
    bob = moto.sqs_client("222222222222", region="eu-west-1")
    alice.create_queue(QueueName="sqs_alice")
    alice.create_queue(QueueName="sqs_alice_dead")
    bob.create_queue(QueueName="sqs_bob")
    account_dir(certs, "alice", "111111111111")
    backend = SQSQueue(str(certs), endpoint=moto.url, discover_every=0.2)
    try:
        assert backend.discover() == ["sqs_alice"]  # _dead is never served
        account_dir(certs, "bob", "222222222222", "eu-west-1")  # added while running: no restart
        assert wait_until(lambda: backend.discover() == ["sqs_alice", "sqs_bob"])
        alice.send_message(QueueUrl=url_of(alice, "sqs_alice"), MessageBody="{}")
        held = take_soon(backend, "sqs_alice")
        assert held is not None
        shutil.rmtree(certs / "alice")              # removed: no new work from it ...
        assert wait_until(lambda: backend.discover() == ["sqs_bob"])
        with pytest.raises(QueueError, match="not served"):
            backend.take("sqs_alice")
        assert backend.queue_deleted(held) is False  # ... which is no user's abort
        backend.keep_alive(held)                    # ... and running work finishes
        backend.ack(held)
        assert counts(alice, "sqs_alice") == (0, 0)
    finally:
        backend.close()


def test_default_chain_without_certs_and_visibility_extension(moto, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "333333333333")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    client = moto.sqs_client("333333333333", region="us-west-2")
    client.create_queue(QueueName="sqs_vis")
    backend = SQSQueue(region="us-west-2", endpoint=moto.url, visibility=2)
    try:
        assert backend.discover() == ["sqs_vis"]
        assert backend.keep_alive_every < 2
        client.send_message(QueueUrl=url_of(client, "sqs_vis"), MessageBody="{}")
        d = take_soon(backend, "sqs_vis")
        for _ in range(5):  # 5 s held with a 2 s visibility: never visible again
            time.sleep(backend.keep_alive_every)
            backend.keep_alive(d)
            assert counts(client, "sqs_vis") == (0, 1)
        backend.requeue(d, attempts=d.attempts)  # visibility 0: back at once
        wait_counts(client, "sqs_vis", 1, 0, timeout=1.0)
    finally:
        backend.close()


def test_received_but_unwanted_message_is_made_visible_at_once(moto, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "444444444444")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    client = moto.sqs_client("444444444444", region="ap-south-1")
    client.create_queue(QueueName="sqs_unwanted")
    backend = SQSQueue(region="ap-south-1", endpoint=moto.url, visibility=300)
    try:
        backend.discover()
        assert backend.take("sqs_unwanted") is None  # demand: the thread starts polling
        client.send_message(QueueUrl=url_of(client, "sqs_unwanted"), MessageBody="{}")
        time.sleep(2.0)  # nobody asks any more: what it received goes back
        assert wait_until(lambda: counts(client, "sqs_unwanted") == (1, 0), timeout=5)
    finally:
        backend.close()


def test_dead_letter_uses_the_redrive_policy_when_the_queue_has_one(moto, certs):
    client = moto.sqs_client("555555555555")
    dlq = client.create_queue(QueueName="sqs_custom_dlq_dead")["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    client.create_queue(QueueName="sqs_redrive", Attributes={"RedrivePolicy": json.dumps(
        {"deadLetterTargetArn": arn, "maxReceiveCount": "50"})})
    account_dir(certs, "acct", "555555555555")
    backend = SQSQueue(str(certs), endpoint=moto.url)
    try:
        backend.discover()
        client.send_message(QueueUrl=url_of(client, "sqs_redrive"), MessageBody="nope")
        d = take_soon(backend, "sqs_redrive")
        backend.dead_letter(d, "not JSON")
        answer = client.receive_message(QueueUrl=dlq, MessageAttributeNames=["All"])
        [message] = answer["Messages"]
        assert message["Body"] == "nope"
        assert message["MessageAttributes"]["studioml-dead-reason"]["StringValue"] == "not JSON"
        assert counts(client, "sqs_redrive") == (0, 0)
    finally:
        backend.close()


# ---------------------------------------------------------------------------- end to end
def make_runner(moto, certs, stem, **options) -> Runner:
    options = {"sqs-certs": certs, "sqs-endpoint": moto.url, "queue-match": f"^{stem}",
               **options}
    return Runner(short_tempdir(), queue=stem + "q", **options)


def running_attempts(runner):
    return [j for j in runner.status()["attempts"] if j["phase"] == "running"]


def log_lines(runner, pattern):
    return [line for line in runner.log().splitlines() if re.search(pattern, line)]


@pytest.fixture()
def sqs_env(moto, certs):
    client = moto.sqs_client("666666666666")
    account_dir(certs, "main", "666666666666")
    stem = f"sqs_{uuid.uuid4().hex[:6]}_"
    return client, stem


def send(client, queue, request):
    body = request if isinstance(request, (bytes, str)) else json.dumps(request)
    client.send_message(QueueUrl=url_of(client, queue),
                        MessageBody=body.decode() if isinstance(body, bytes) else body)


@pytest.mark.slow
def test_e2e_runs_extends_visibility_and_deletes_only_after_uploads(moto, certs, sqs_env,
                                                                    runners):
    client, stem = sqs_env
    runner = make_runner(moto, certs, stem, sqs_visibility="2s", prom_address="127.0.0.1:0")
    runners.append(runner)
    client.create_queue(QueueName=runner.queue)
    runner.start()
    flag = runner.root / "flag"
    request = runner.request(runner.workspace({"job.py": BLOCKING}), "job.py",
                             env={"FLAG": str(flag)})
    send(client, runner.queue, request)
    runner.wait_for(lambda: log_lines(runner, "taken from"), what="the request to be taken")
    runner.wait_for(lambda: running_attempts(runner), what="the run to start")
    # Held well past the 2 s visibility: never visible again, never delivered twice.
    for _ in range(12):
        assert counts(client, runner.queue) == (0, 1)
        time.sleep(0.5)
    status, text = runner.http_get("/metrics")
    assert re.search(r'runner_project_running\{[^}]*queue_type="sqs"', text), text
    flag.write_text("go")
    record = runner.wait_final(request)
    assert record["status"] == "completed" and record["attempts"] == 0
    wait_counts(client, runner.queue, 0, 0)
    key = request["experiment"]["key"]
    uploaded = log_lines(runner, rf"uploader: key={key} .*final uploads done")
    acked = log_lines(runner, rf"fetcher: key={key} .* ack: completed")
    text = runner.log()
    assert uploaded and acked and text.index(uploaded[-1]) < text.index(acked[0])
    assert not log_lines(runner, "redelivered")
    [output] = (runner.experiment_dir(request) / "_metadata").glob("output-host-*.log")
    assert output.read_text().count("started") == 1
    assert runner.stop() == 0


@pytest.mark.slow
def test_e2e_resource_shortfall_retry_bound_dead_letter_and_hot_account(moto, certs, sqs_env,
                                                                        runners):
    client, stem = sqs_env
    cpus = os.cpu_count() or 1
    runner = make_runner(moto, certs, stem, executors=4, max_attempts=2)
    runners.append(runner)
    for suffix in ("q", "fail", "bad"):
        client.create_queue(QueueName=stem + suffix)
    runner.start()
    # Resource shortfall: the small request is held aside, untouched, while the big runs.
    flag = runner.root / "flag"
    big = runner.request(runner.workspace({"job.py": BLOCKING}), "job.py",
                         env={"FLAG": str(flag)})
    big["experiment"]["resources_needed"]["cpus"] = cpus
    send(client, runner.queue, big)
    runner.wait_for(lambda: running_attempts(runner), what="the big run to start")
    small = runner.request(runner.workspace({"s.py": "print('small')"}), "s.py")
    send(client, runner.queue, small)
    runner.wait_for(lambda: log_lines(runner, "not free now; held aside"), what="holding")
    assert runner.record(small) is None
    # Held aside (in flight, its visibility kept up) so that nothing behind it waits; it
    # starts as soon as the big run's CPUs are free (docs/fates.md).
    wait_counts(client, runner.queue, 0, 2, timeout=10)
    assert runner.record(small) is None
    flag.write_text("go")
    assert runner.wait_final(big)["status"] == "completed"
    assert runner.wait_final(small)["status"] == "completed"
    # Retry bound: a failing request runs max-attempts times, then is acked failed.
    failing = runner.request(runner.workspace({"f.py": "import sys; sys.exit(4)"}), "f.py")
    send(client, stem + "fail", failing)
    # Dead letter: a malformed body goes to <queue>_dead with its reason.
    send(client, stem + "bad", "{not json")
    record = runner.wait_final(failing, timeout=120)
    assert record["status"] == "failed" and record["attempts"] == 2
    assert len(runner.scrape_documents(failing)) == 2
    wait_counts(client, stem + "fail", 0, 0)
    runner.wait_for(lambda: log_lines(runner, "dead-lettered"), what="the dead letter")
    answer = client.receive_message(QueueUrl=url_of(client, stem + "bad_dead"),
                                    MessageAttributeNames=["All"])
    [dead] = answer["Messages"]
    assert dead["Body"] == "{not json"
    assert "JSON" in dead["MessageAttributes"]["studioml-dead-reason"]["StringValue"]
    wait_counts(client, stem + "bad", 0, 0)
    # A second account mounted while running is served without a restart.
    other = moto.sqs_client("777777777777", region="eu-central-1")
    other.create_queue(QueueName=stem + "other")
    account_dir(certs, "other", "777777777777", "eu-central-1")
    late = runner.request(runner.workspace({"l.py": "print('late')"}), "l.py")
    send(other, stem + "other", late)
    assert runner.wait_final(late, timeout=60)["status"] == "completed"
    assert runner.stop() == 0


@pytest.mark.slow
def test_e2e_deleting_the_queue_stops_the_run(moto, certs, sqs_env, runners):
    client, stem = sqs_env
    runner = make_runner(moto, certs, stem)
    runners.append(runner)
    client.create_queue(QueueName=runner.queue)
    runner.start()
    request = runner.request(runner.workspace({"job.py": BLOCKING}), "job.py",
                             env={"FLAG": str(runner.root / "never")})
    send(client, runner.queue, request)
    runner.wait_for(lambda: running_attempts(runner), what="the run to start")
    client.delete_queue(QueueUrl=url_of(client, runner.queue))
    record = runner.wait_final(request, timeout=60)
    assert record["status"] == "cancelled"
    assert log_lines(runner, "was deleted while its request was held")
    assert runner.stop() == 0


@pytest.mark.slow
def test_runner_submit_publishes_to_sqs_queues(moto, certs, sqs_env, runners):
    import subprocess
    import sys

    client, stem = sqs_env
    runner = make_runner(moto, certs, stem)
    runners.append(runner)
    client.create_queue(QueueName=runner.queue)
    runner.start()
    workspace = runner.workspace({"main.py": "import sys; print('args', sys.argv[1:])"})
    result = subprocess.run(
        [sys.executable, "-m", "runner.submit", "--queue", runner.queue, "--sqs-certs",
         str(certs), "--sqs-endpoint", moto.url, "--storage", runner.store_root,
         "--project", "cli", "--key", f"{stem}cli", "--wait", "--wait-timeout", "90s",
         str(workspace), "main.py", "x"],
        capture_output=True, text=True, timeout=120, env=runner.env)
    assert result.returncode == 0, result.stderr + runner.log()
    assert "status: completed" in result.stdout
    assert runner.stop() == 0
