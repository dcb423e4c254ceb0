"""End to end through a real ``runner-supervisor`` serving ``rmq_*`` queues.

Requests are published the way the StudioML client publishes them (topic exchange
``StudioML.topic``, routing key ``StudioML.<queue>``, the client's own queue declaration)
and run as real experiments in real virtualenvs.  Each test serves only its own queue
names (``--queue-match ^rmq_<hex>_``) on the shared broker; the broker-restart test runs a
private RabbitMQ node of its own.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from .rabbitmq_support import PrivateBroker, unique
from .support import BLOCKING, Runner, short_tempdir

pytestmark = [pytest.mark.integration, pytest.mark.slow]



def make_runner(broker, stem: str, **options) -> Runner:
    options = {"amqp-url": broker.url, "amqp-mgt-url": broker.mgt_url,
               "queue-match": f"^{stem}", **options}
    return Runner(short_tempdir(), queue=stem + "q", **options)


@pytest.fixture()
def stem(broker):
    stem = unique()
    yield stem
    names = [q["name"] for q in broker.api("queues/%2F?columns=name") or []
             if q["name"].startswith(stem)]
    broker.delete(*names)


def blocking_request(runner: Runner, flag, **kw) -> dict:
    return runner.request(runner.workspace({"job.py": BLOCKING}), "job.py",
                          env={"FLAG": str(flag)}, **kw)


def running_attempts(runner: Runner) -> list[dict]:
    return [j for j in runner.status()["attempts"] if j["phase"] == "running"]


def log_lines(runner: Runner, pattern: str) -> list[str]:
    return [line for line in runner.log().splitlines() if re.search(pattern, line)]


def blocked_run_on(node: PrivateBroker, stem: str, runners: list, **options):
    """A runner on ``node`` running one blocking request published durably: (runner, flag
    that lets it finish, request, the running attempt's status entry)."""
    runner = make_runner(node, stem, **options)
    runners.append(runner)
    runner.start()
    flag = runner.root / "flag"
    request = blocking_request(runner, flag)
    node.publish(runner.queue, request, durable=True)
    [attempt] = runner.wait_for(lambda: running_attempts(runner), what="the run to start")
    return runner, flag, request, attempt


def test_studioml_request_runs_and_is_acked_only_after_its_uploads(broker, stem, runners):
    runner = make_runner(broker, stem)
    runners.append(runner)
    runner.start()
    flag = runner.root / "flag"
    request = blocking_request(runner, flag)
    broker.publish(runner.queue, request)  # exactly as the StudioML client publishes

    runner.wait_for(lambda: running_attempts(runner), what="the run to start")
    broker.wait_counts(runner.queue, ready=0, unacked=1)  # held, unacked, while it runs
    time.sleep(1.0)
    assert broker.counts(runner.queue) == (0, 1)
    flag.write_text("go")
    record = runner.wait_final(request)
    assert record["status"] == "completed"
    broker.wait_counts(runner.queue, ready=0, unacked=0)

    # Ack only after the uploads: the uploader's final upload is logged before the ack.
    key = request["experiment"]["key"]
    uploaded = log_lines(runner, rf"uploader: key={key} .*final uploads done")
    acked = log_lines(runner, rf"fetcher: key={key} .* ack: completed")
    assert uploaded and acked, runner.log()
    text = runner.log()
    assert text.index(uploaded[-1]) < text.index(acked[0])
    output = (runner.experiment_dir(request) / "_metadata")
    assert any("finished" in p.read_text() for p in output.glob("output-host-*.log"))
    assert runner.stop() == 0


def consumers_on(broker, queue: str) -> int:
    """Consumers on ``queue`` now (a passive declare: no statistics lag)."""
    with broker.connection() as conn:
        return conn.channel().queue_declare(queue, passive=True).method.consumer_count


def test_the_runner_is_pushed_no_more_than_its_free_slots(broker, stem, runners):
    runner = make_runner(broker, stem, executors=2)
    runners.append(runner)
    runner.start()
    broker.declare(runner.queue)
    runner.wait_for(lambda: consumers_on(broker, runner.queue) == 2,
                    what="one consumer per free slot")
    flag = runner.root / "flag"
    requests = [blocking_request(runner, flag) for _ in range(5)]
    for request in requests:
        broker.publish(runner.queue, request)
    runner.wait_for(lambda: len(running_attempts(runner)) == 2, what="two runs")
    broker.wait_counts(runner.queue, ready=3, unacked=2)  # prefetch = free slots, never more
    assert consumers_on(broker, runner.queue) == 0, "full: no consumer is left"
    time.sleep(1.0)
    assert broker.counts(runner.queue) == (3, 2)
    flag.write_text("go")
    for request in requests:
        assert runner.wait_final(request)["status"] == "completed"
    broker.wait_counts(runner.queue, ready=0, unacked=0)
    runner.wait_for(lambda: consumers_on(broker, runner.queue) == 2, what="consuming again")
    assert runner.stop() == 0


def test_only_matching_queues_are_served_and_new_queues_are_picked_up(broker, stem, runners):
    runner = make_runner(broker, stem, queue_mismatch="skip")
    runners.append(runner)
    trivial = runner.workspace({"t.py": "print('ok')"})
    skipped = runner.request(trivial, "t.py")
    broker.publish(stem + "skip", skipped)
    runner.start()
    late = runner.request(trivial, "t.py")
    broker.publish(stem + "late", late)  # a queue created after the runner started
    assert runner.wait_final(late, timeout=60)["status"] == "completed"
    assert broker.ready(stem + "skip") == 1 and runner.record(skipped) is None
    served = log_lines(runner, r"serving queues")
    assert any(stem + "late" in line for line in served)
    assert not any(stem + "skip" in line for line in served)
    assert runner.stop() == 0


def test_request_that_does_not_fit_now_is_held_aside_untouched(broker, stem, runners):
    cpus = os.cpu_count() or 1
    runner = make_runner(broker, stem, executors=4)
    runners.append(runner)
    runner.start()
    flag = runner.root / "flag"
    big = blocking_request(runner, flag)
    big["experiment"]["resources_needed"]["cpus"] = cpus  # takes every CPU
    broker.publish(runner.queue, big)
    runner.wait_for(lambda: running_attempts(runner), what="the big run to start")
    small = runner.request(runner.workspace({"s.py": "print('small')"}), "s.py")
    broker.publish(runner.queue, small)
    huge = runner.request(runner.workspace({"h.py": "print('never')"}), "h.py")
    huge["experiment"]["resources_needed"]["cpus"] = cpus + 8  # never fits this host
    broker.publish(stem + "huge", huge)

    # The small one is held aside (unacked, untouched) while the big one runs, so that
    # nothing behind it waits; the huge one is held aside too, and said why, once.
    runner.wait_for(lambda: log_lines(runner, "not free now; held aside"), what="holding")
    broker.wait_counts(runner.queue, ready=0, unacked=2)
    assert runner.record(small) is None
    runner.wait_for(lambda: log_lines(runner, "cannot run on this runner"), what="the reason")
    assert f"needs {cpus + 8} CPUs" in runner.record(huge)["reason"]
    flag.write_text("go")
    assert runner.wait_final(big)["status"] == "completed"
    assert runner.wait_final(small)["status"] == "completed"
    assert runner.wait_final(small)["attempts"] == 0  # holding aside is no attempt
    assert sum(broker.counts(stem + "huge")) == 1 and not runner.record(huge)["final"]
    assert len(log_lines(runner, "cannot run on this runner")) == 1
    assert runner.stop() == 0


def test_failed_runs_are_retried_then_acked_failed_and_the_count_survives_runners(
        broker, stem, runners):
    runner = make_runner(broker, stem, max_attempts=3)
    runners.append(runner)
    runner.start()
    failing = runner.workspace({"fail.py": "import sys; print('failing'); sys.exit(4)"})
    fresh = runner.request(failing, "fail.py")
    broker.publish(runner.queue, fresh)
    # Two attempts were already made elsewhere: the header says so, one attempt is left.
    elsewhere = runner.request(failing, "fail.py")
    broker.publish(runner.queue, elsewhere, headers={"x-studioml-attempts": 2})

    record = runner.wait_final(fresh, timeout=120)
    assert record["status"] == "failed" and record["attempts"] == 3
    assert len(runner.scrape_documents(fresh)) == 3
    record = runner.wait_final(elsewhere, timeout=120)
    assert record["status"] == "failed" and record["attempts"] == 3
    assert len(runner.scrape_documents(elsewhere)) == 1
    broker.wait_counts(runner.queue, ready=0, unacked=0)
    assert broker.ready(runner.queue + "_dead") == -1, "failures are acked, not dead-lettered"
    assert runner.stop() == 0


def test_malformed_body_goes_to_queue_dead_with_its_reason(broker, stem, runners):
    runner = make_runner(broker, stem)
    runners.append(runner)
    runner.start()
    broker.publish(runner.queue, b"{this is not json")
    good = runner.request(runner.workspace({"g.py": "print('fine')"}), "g.py")
    broker.publish(runner.queue, good)
    assert runner.wait_final(good)["status"] == "completed"
    runner.wait_for(lambda: broker.ready(runner.queue + "_dead") == 1, what="a dead letter")
    props, body = broker.get(runner.queue + "_dead")
    assert body == b"{this is not json"
    assert "not JSON" in props.headers["x-studioml-dead-reason"] or \
        "JSON" in props.headers["x-studioml-dead-reason"]
    assert props.app_id == "studioml"
    assert broker.ready(runner.queue) == 0
    assert runner.stop() == 0


def test_deleting_the_queue_during_a_run_stops_the_run(broker, stem, runners):
    runner = make_runner(broker, stem)
    runners.append(runner)
    runner.start()
    request = blocking_request(runner, runner.root / "never")
    broker.publish(runner.queue, request)
    [attempt] = runner.wait_for(lambda: running_attempts(runner), what="the run to start")
    pid = attempt["pid"]
    broker.delete(runner.queue)  # the user's way to abort

    record = runner.wait_final(request, timeout=60)
    assert record["status"] == "cancelled" and record["final"] is True
    [document] = runner.scrape_documents(request)
    assert document["studioml"]["status"] == "cancelled"
    assert not os.path.exists(f"/proc/{pid}") or \
        open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"
    assert log_lines(runner, "was deleted while its request was held")
    assert runner.status()["finished"]["cancelled"] == 1
    assert runner.stop() == 0


def test_runner_killed_during_a_run_its_request_is_redelivered_to_a_second_runner(
        broker, stem, runners):
    first = make_runner(broker, stem)
    second = make_runner(broker, stem, file_store_roots=first.root)  # first's requests
    runners += [first, second]
    first.start()
    flag = first.root / "flag"
    request = blocking_request(first, flag)
    broker.publish(first.queue, request)
    [attempt] = first.wait_for(lambda: running_attempts(first), what="the first run to start")
    broker.wait_counts(first.queue, ready=0, unacked=1)

    first.process.send_signal(signal.SIGKILL)  # the supervisor dies without a word
    first.process.wait()
    orphan = attempt["pid"]
    second.start()
    second.wait_for(lambda: running_attempts(second), what="the redelivered request to run")
    flag.write_text("go")
    record = second.wait_final(request)
    assert record["status"] == "completed"
    assert record["attempt"] != attempt["attempt"]
    documents = first.scrape_documents(request)  # the request names the first store
    assert [d["studioml"]["status"] for d in documents if d["studioml"]["status"]
            == "completed"] == ["completed"]
    broker.wait_counts(first.queue, ready=0, unacked=0)
    try:  # the first runner's experiment process, if it outlived its roles
        os.killpg(orphan, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    assert second.stop() == 0


def test_broker_restart_during_a_run_completes_the_experiment_once(runners):
    node = PrivateBroker().start()
    try:
        runner, flag, request, attempt = blocked_run_on(node, "rmq_restart_", runners)

        node.restart()
        runner.wait_for(lambda: log_lines(runner, "reconnected to RabbitMQ"), timeout=60,
                        what="the runner to reconnect")
        # The broker redelivers the request; the runner holds it with the running attempt.
        runner.wait_for(lambda: log_lines(runner, "redelivered by .* while it runs here"),
                        timeout=30, what="the redelivery to be attached")
        assert [j["attempt"] for j in running_attempts(runner)] == [attempt["attempt"]]
        flag.write_text("go")
        record = runner.wait_final(request)
        assert record["status"] == "completed" and record["attempts"] == 0
        [document] = runner.scrape_documents(request)
        assert document["studioml"]["status"] == "completed"
        [output] = (runner.experiment_dir(request) / "_metadata").glob("output-host-*.log")
        assert output.read_text().count("started") == 1
        node.wait_counts(runner.queue, ready=0, unacked=0)
        assert runner.stop() == 0
    finally:
        node.stop()


def test_broker_restart_while_the_runner_is_full_settles_the_redelivered_copy(runners):
    node = PrivateBroker().start()
    try:
        runner, flag, request, _attempt = blocked_run_on(node, "rmq_full_", runners, executors=1)
        node.restart()
        runner.wait_for(lambda: log_lines(runner, "reconnected to RabbitMQ"), timeout=60,
                        what="the runner to reconnect")
        assert node.ready(runner.queue) == 1  # back in the queue: no slot to look at it
        flag.write_text("go")
        record = runner.wait_final(request)
        assert record["status"] == "completed"
        # The copy is taken either once the run's slot is free (the run ended, its uploads
        # still going: it is held with the attempt and acked with it) or after the settle
        # (then the decision kept for the lost delivery is applied to it): acked either way.
        runner.wait_for(lambda: log_lines(runner, "settling it as decided then: ack")
                        or log_lines(runner, "redelivered by .* while it runs here"),
                        what="the redelivered copy to be taken without a second run")
        node.wait_counts(runner.queue, ready=0, unacked=0)
        assert len(runner.scrape_documents(request)) == 1
        assert runner.stop() == 0
    finally:
        node.stop()


def test_delivery_ack_timeout_closing_the_channel_loses_no_result_and_runs_once(runners):
    # consumer_timeout of 3 s, checked every second: the broker takes the delivery back
    # (closing its channel) several times while the experiment runs for about 8 s.
    node = PrivateBroker(conf="consumer_timeout = 3000\n",
                         advanced="[{rabbit, [{channel_tick_interval, 1000}]}].\n").start()
    try:
        runner, flag, request, attempt = blocked_run_on(node, "rmq_acktimeout_", runners)
        runner.wait_for(lambda: log_lines(runner, "delivery acknowledgement .* timed out"),
                        timeout=30, what="the broker to time the delivery out")
        runner.wait_for(lambda: log_lines(runner, "redelivered by .* while it runs here"),
                        timeout=30, what="the redelivery to be attached")
        time.sleep(3)
        assert [j["attempt"] for j in running_attempts(runner)] == [attempt["attempt"]]
        flag.write_text("go")
        record = runner.wait_final(request)
        assert record["status"] == "completed"
        [document] = runner.scrape_documents(request)
        assert document["studioml"]["status"] == "completed"
        # Whatever delivery was current at the end is acked now or when it comes back.
        node.wait_counts(runner.queue, ready=0, unacked=0, timeout=30)
        assert runner.stop() == 0
    finally:
        node.stop()


def test_runner_submit_publishes_to_rmq_queues_like_the_client(broker, stem, runners):
    runner = make_runner(broker, stem)
    runners.append(runner)
    runner.start()
    workspace = runner.workspace({"main.py": "import sys; print('args', sys.argv[1:])"})
    result = subprocess.run(
        [sys.executable, "-m", "runner.submit", "--queue", runner.queue,
         "--amqp-url", "amqp://guest:${TEST_RMQ_PASSWORD}@127.0.0.1:5672/%2F",
         "--storage", runner.store_root, "--project", "cli", "--key", f"{stem}cli", "--wait",
         "--wait-timeout", "90s", str(workspace), "main.py", "x"],
        capture_output=True, text=True, timeout=120,
        env=dict(runner.env, TEST_RMQ_PASSWORD="guest"))
    assert result.returncode == 0, result.stderr + runner.log()
    assert "status: completed" in result.stdout
    record = json.loads((runner.store_path(runner.store_root) / "metadata" / "cli"
                         / f"{stem}cli.json").read_text())
    assert "127.0.0.1:5672" in record["request"]["config"]["cloud"]["queue"]["rmq"]
    assert runner.stop() == 0


def test_a_request_that_never_fits_does_not_block_a_rabbitmq_queue(broker, stem, runners):
    """basic.reject(requeue) would put it back at the head: it is held aside instead."""
    runner = make_runner(broker, stem)
    runners.append(runner)
    runner.start()
    workspace = runner.workspace({"ok.py": "print('fine')"})
    gpu = runner.request(workspace, "ok.py", key=f"{stem}gpu")
    gpu["experiment"]["resources_needed"]["gpus"] = 1
    good = runner.request(workspace, "ok.py")
    broker.publish(runner.queue, gpu)
    broker.publish(runner.queue, good)
    assert runner.wait_final(good, timeout=120)["status"] == "completed"
    assert "needs 1 GPU; this runner has 0" in runner.record(gpu)["reason"]
    broker.wait_counts(runner.queue, ready=0, unacked=1)  # held, untouched
    assert len(log_lines(runner, rf"key={stem}gpu cannot run on this runner")) == 1
    assert runner.stop() == 0
    broker.wait_counts(runner.queue, ready=1, unacked=0)  # put back for another runner
