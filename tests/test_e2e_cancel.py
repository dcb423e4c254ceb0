"""Stopping experiments on purpose, and failures no retry can fix, through a real supervisor.

* ``runner-ctl cancel KEY``: a running experiment is stopped, ends ``cancelled``, is not
  retried and its request is acked; a queued one is acked as ``cancelled`` without running;
* deleting a ``local_*`` queue folder stops the runs taken from it (as deleting a RabbitMQ
  queue does);
* requirements that cannot be met, or a script missing from the workspace, end ``failed``
  after one attempt whatever ``--max-attempts`` says.
"""
from __future__ import annotations

import shutil

import pytest

from runner import fates
from runner.environments import unsatisfiable
from runner.errors import EnvironmentBuildError, RequirementsUnsatisfiable
from runner.fates import ACK, CANCELLED, COMPLETED, FAILED, decide, outcome_for_exception
from runner.protocol import Outcome

from .support import BLOCKING, make_tiny_package, tiny_requirement


def queue_files(runner) -> list:
    """Message files left in the test queue (waiting or claimed)."""
    folder = runner.root / "q" / runner.queue
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def start_blocking(runner, key: str):
    flag = runner.root / f"{key}.flag"
    request = runner.request(runner.workspace({"block.py": BLOCKING}), "block.py", key=key,
                             env={"FLAG": str(flag)})
    runner.publish(request)
    runner.wait_for(lambda: any(attempt["key"] == key and attempt["phase"] == "running"
                                for attempt in runner.status()["attempts"]), timeout=90,
                    what=f"{key} running")
    return request, flag


def test_cancel_stops_a_running_experiment_which_ends_cancelled_and_acked(runner):
    runner.start()
    request, flag = start_blocking(runner, "to-cancel")
    done = runner.ctl("cancel", "to-cancel", check=True)
    assert "stopping to-cancel" in done.stdout
    record = runner.wait_final(request)
    assert record["status"] == "cancelled" and record["attempts"] == 0
    [document] = runner.scrape_documents(request)
    assert document["studioml"]["status"] == "cancelled"
    assert document["runner"]["error"] == "Cancelled"
    assert not flag.exists()
    runner.wait_for(lambda: queue_files(runner) == [], timeout=30, what="the request acked")
    assert "started" in (runner.experiment_dir(request) / "_metadata").joinpath(
        f"output-host-{record['attempt']}.log").read_text()


def test_cancel_of_a_queued_experiment_acks_it_without_running(runner):
    runner.options["executors"] = 1
    runner.start()
    _, flag = start_blocking(runner, "busy")
    waiting = runner.request(runner.workspace({"never.py": "print('ran')"}), "never.py",
                             key="queued")
    runner.publish(waiting)
    done = runner.ctl("cancel", "queued", "--project", "e2e", check=True)
    assert "not running here" in done.stdout
    flag.write_text("go")
    record = runner.wait_final(waiting)
    assert record["status"] == "cancelled" and record["attempt"] == ""
    assert runner.scrape_documents(waiting) == [], "it never ran"
    runner.wait_for(lambda: queue_files(runner) == [], timeout=30, what="both requests acked")


def test_cancel_needs_a_key(runner):
    runner.start()
    done = runner.ctl("cancel")
    assert done.returncode != 0 and "KEY" in done.stderr


def test_deleting_a_local_queue_folder_stops_its_runs(runner):
    runner.start()
    request, flag = start_blocking(runner, "in-deleted-queue")
    shutil.rmtree(runner.root / "q" / runner.queue)
    record = runner.wait_final(request)
    assert record["status"] == "cancelled"
    [document] = runner.scrape_documents(request)
    assert document["runner"]["error"] == "QueueDeleted"
    assert not flag.exists(), "stopped by the runner, not by its flag"


@pytest.mark.runner_options(max_attempts=3)
def test_requirements_that_cannot_be_met_are_not_retried(runner):
    runner.start()
    tiny = make_tiny_package(runner.root / "pkgs")
    workspace = runner.workspace({"main.py": "print('never')"})
    requests = [
        runner.request(workspace, "main.py", key="conflicting",
                       pythonenv=[tiny_requirement(tiny), "tinypkg==2.0"]),
        runner.request(workspace, "main.py", key="missing-requirement",
                       pythonenv=["tinypkg @ file:///nonexistent/tinypkg"]),
        runner.request(workspace, "nothere.py", key="missing-script"),
    ]
    for request in requests:
        runner.publish(request)
    for request, error in zip(requests, ("RequirementsUnsatisfiable", "RequirementsUnsatisfiable",
                                         "ScriptMissing")):
        record = runner.wait_final(request)
        assert (record["status"], record["attempts"]) == ("failed", 1), request["experiment"]["key"]
        [document] = runner.scrape_documents(request)
        assert document["runner"]["error"] == error
    runner.wait_for(lambda: queue_files(runner) == [], timeout=30, what="all acked")


def test_fates_of_cancel_and_of_failures_no_retry_can_fix():
    stopped = outcome_for_exception(fates.stop_exception("cancelled", "runner-ctl cancel"))
    assert (stopped.status, stopped.error) == (CANCELLED, "Cancelled")
    assert decide(stopped, 1, 3) == fates.Decision(ACK, 1, CANCELLED,
                                                   "cancelled by runner-ctl cancel")
    failed = Outcome(status=FAILED, error="ExperimentFailed", exit_code=1)
    assert decide(failed, 0, 3, cancelled=True).final_status == CANCELLED
    assert decide(Outcome(status=COMPLETED, exit_code=0), 0, 3, cancelled=True).final_status \
        == COMPLETED
    for exc in (RequirementsUnsatisfiable("no such package"), fates.ScriptMissing("nope.py")):
        decision = decide(outcome_for_exception(exc), 0, 3)
        assert (decision.action, decision.attempts, decision.final_status) == (ACK, 1, FAILED)
    assert decide(outcome_for_exception(EnvironmentBuildError("pip failed")), 0, 3).action == \
        fates.REQUEUE


@pytest.mark.parametrize("output, expected", [
    (["error: No solution found when resolving dependencies",
      "  cause: ... we can conclude that your requirements are unsatisfiable."], True),
    (["error: Distribution not found at: file:///nonexistent/tinypkg"], True),
    (["ERROR: Could not find a version that satisfies the requirement nope==1",
      "ERROR: No matching distribution found for nope==1"], True),
    (["error: No solution found when resolving dependencies", "hint: Packages were "
      "unavailable because the network was disabled."], False),
    (["WARNING: Retrying ... NewConnectionError", "ERROR: No matching distribution found"], False),
    (["error: failed to build tinypkg", "exit status 1"], False),
])
def test_installer_output_that_says_the_requirements_cannot_be_met(output, expected):
    assert unsatisfiable(output) is expected


@pytest.mark.integration
def test_cancel_on_a_rabbitmq_queue_acks_both_the_running_and_the_queued_request(broker, runners):
    from .rabbitmq_support import unique
    from .support import Runner, short_tempdir

    stem = unique()
    runner = Runner(short_tempdir(), queue=stem + "q", executors=1, **{
        "amqp-url": broker.url, "amqp-mgt-url": broker.mgt_url, "queue-match": f"^{stem}"})
    runners.append(runner)
    runner.start()
    try:
        flag = runner.root / "never"
        running = runner.request(runner.workspace({"block.py": BLOCKING}), "block.py",
                                 key="rmq-running", env={"FLAG": str(flag)})
        queued = runner.request(runner.workspace({"never.py": "print('ran')"}), "never.py",
                                key="rmq-queued")
        broker.publish(runner.queue, running)
        runner.wait_for(lambda: any(attempt["key"] == "rmq-running" and attempt["phase"] == "running"
                                    for attempt in runner.status()["attempts"]), timeout=90,
                        what="the run to start")
        broker.publish(runner.queue, queued)
        assert "not running here" in runner.ctl("cancel", "rmq-queued", check=True).stdout
        assert "stopping rmq-running" in runner.ctl("cancel", "rmq-running", check=True).stdout
        assert runner.wait_final(running)["status"] == "cancelled"
        record = runner.wait_final(queued)
        assert record["status"] == "cancelled" and runner.scrape_documents(queued) == []
        broker.wait_counts(runner.queue, ready=0, unacked=0)
    finally:
        broker.delete(runner.queue)
