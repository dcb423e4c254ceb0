"""An attempt never leaks: a fault in any role while it handles one attempt ends that
attempt with a fate (item 2 of the admission/fates work).

Each role is built as the supervisor builds it (a real config, a real ZeroMQ bus on a
private runtime directory) and driven directly, on this thread; the fault is injected by
replacing one function the role calls with one that raises (a fault, not a fake
component).  What the role posts is read from its outbox, where the loop would take it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from runner import fates, protocol
from runner.bus import Bus, Endpoints
from runner.config import load
from runner.roles import cache_manager as cache_manager_module
from runner.roles import executor as executor_module
from runner.roles import scraper as scraper_module
from runner.roles import uploader as uploader_module

from .support import short_tempdir


class InjectedFault(RuntimeError):
    """The fault the tests inject."""


def boom(*args, **kwargs):
    raise InjectedFault("injected fault")


@pytest.fixture()
def root():
    folder = short_tempdir()
    yield folder
    import shutil
    shutil.rmtree(folder, ignore_errors=True)


def make_role(cls, root: Path):
    config = load(["--queue-root", str(root / "q"), "--working-dir", str(root / "w"),
                   "--cache-dir", str(root / "c"), "--runtime-dir", str(root / "run"),
                   "--executors", "1"], environ={})
    (root / "run").mkdir(parents=True, exist_ok=True)
    role = cls(config, Bus(Endpoints(root / "run"), cls.name))
    role.initialize()
    return role


def posted(role) -> list[tuple[str, protocol.Message]]:
    out = []
    while not role._outbox.empty():
        out.append(role._outbox.get_nowait())
    return out


def new_attempt(root: Path) -> protocol.Attempt:
    workdir = root / "w" / "attempt"
    (workdir / "workspace").mkdir(parents=True, exist_ok=True)
    (workdir / "workspace" / "train.py").write_text("print('hi')\n")
    request = {"experiment": {"key": "k1", "filename": "train.py", "artifacts": {}},
               "config": {}}
    return protocol.Attempt(attempt_id="host-1", queue="local_q", token="t", attempts=0, key="k1",
                        project="", request=request, workdir=str(workdir),
                        resources={"cpus": 1, "devices": "-1"}, taken_at=0.0)


def ended(messages, kind=protocol.AttemptEnded, to=None):
    """The one message of ``kind`` posted (to the role ``to``, when given)."""
    found = [m for dest, m in messages if isinstance(m, kind) and to in (None, dest)]
    assert len(found) == 1, messages
    return found[0]


def test_a_fault_while_preparing_ends_the_attempt(root, monkeypatch) -> None:
    role = make_role(cache_manager_module.CacheManager, root)
    try:
        monkeypatch.setattr(cache_manager_module, "find_interpreter", boom)
        role.prepare(new_attempt(root))
        outcome = ended(posted(role)).outcome
        assert outcome.status == fates.FAILED and "injected fault" in outcome.message
        assert not role.preparing
    finally:
        role.shutdown()


def test_a_fault_while_starting_the_run_ends_the_attempt_and_frees_its_slot(
        root, monkeypatch) -> None:
    role = make_role(executor_module.Executor, root)
    try:
        monkeypatch.setattr(executor_module, "experiment_environment", boom)
        role.start(protocol.AttemptPrepared(attempt=new_attempt(root), python=sys.executable,
                                        env_path=str(Path(sys.executable).parent.parent)))
        messages = posted(role)
        outcome = ended(messages).outcome
        assert outcome.status == fates.FAILED and "injected fault" in outcome.message
        assert ended(messages, protocol.RunEnded, to="fetcher").attempt_id == "host-1"  # slot freed
        assert not role.runs
    finally:
        role.shutdown()


def test_a_script_outside_the_workspace_is_refused_at_the_start(root) -> None:
    role = make_role(executor_module.Executor, root)
    try:
        attempt = new_attempt(root)
        (Path(attempt.workdir) / "workspace" / "link.py").symlink_to("/bin/true")
        request = dict(attempt.request, experiment=dict(attempt.request["experiment"],
                                                        filename="link.py"))
        attempt = protocol.Attempt(**{**attempt.__dict__, "request": request})
        role.start(protocol.AttemptPrepared(attempt=attempt, python=sys.executable,
                                        env_path=str(Path(sys.executable).parent.parent)))
        messages = posted(role)
        outcome = ended(messages).outcome
        assert (outcome.error, fates.decide(outcome, 0, 3).action) == ("BadRequest", fates.DEAD)
        assert "inside the workspace" in outcome.message
        assert ended(messages, protocol.RunEnded, to="fetcher")
    finally:
        role.shutdown()


def test_a_fault_while_closing_the_metadata_still_asks_for_the_final_upload(
        root, monkeypatch) -> None:
    role = make_role(scraper_module.Scraper, root)
    try:
        attempt = new_attempt(root)
        role.open(attempt)
        posted(role)
        monkeypatch.setattr(scraper_module, "disk_use", boom)
        outcome = protocol.Outcome(status=fates.COMPLETED, exit_code=0)
        role.close(protocol.AttemptEnded(attempt=attempt, outcome=outcome, facts={"pid": 1}))
        final = ended(posted(role), protocol.UploadRequest)
        assert final.final and final.outcome == outcome and final.metadata
        assert not role.attempts
    finally:
        role.shutdown()


def test_a_hand_back_before_the_run_started_uploads_no_metadata_files(root) -> None:
    role = make_role(scraper_module.Scraper, root)
    try:
        attempt = new_attempt(root)
        role.open(attempt)
        posted(role)
        outcome = fates.outcome_for_exception(fates.errors.StorageError("store unreachable"))
        role.close(protocol.AttemptEnded(attempt=attempt, outcome=outcome, facts={}))
        final = ended(posted(role), protocol.UploadRequest)
        assert final.final and not final.metadata
    finally:
        role.shutdown()


def test_a_fault_while_uploading_still_reports_the_attempt_done(root, monkeypatch) -> None:
    role = make_role(uploader_module.Uploader, root)
    try:
        monkeypatch.setattr(role, "upload_artifacts", boom)
        attempt = new_attempt(root)
        outcome = protocol.Outcome(status=fates.COMPLETED, exit_code=0)
        role.upload(protocol.UploadRequest(attempt=attempt, final=True, outcome=outcome),
                    __import__("threading").Lock())
        done = ended(posted(role), protocol.AttemptDone)
        assert "injected fault" in done.upload_error
        assert fates.decide(done.outcome, 0, 3, done.upload_error).action == fates.REQUEUE
    finally:
        role.shutdown()
