"""The cache manager alone: hosted in a thread on the in-memory bus, reading artifacts from
the stub store (runner.storage.memory).  It really unpacks, and really finds (or builds)
the environment for this interpreter with no requirements."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from runner import metadata, protocol
from runner.archive import tree_digest

from .roles_support import RoleRig


@pytest.fixture()
def rig():
    rig = RoleRig("--python-dirs", str(Path(sys.executable).parent))
    rig.host("cache_manager")
    yield rig
    rig.close()


def test_an_assigned_attempt_is_opened_placed_and_handed_to_the_executor(rig) -> None:
    request = rig.request(workspace={"train.py": "print('hi')\n"})
    key = request["experiment"]["key"]
    rig.put_folder({"model.txt": "from the last attempt\n"}, f"experiments/{key}/output.tar")
    attempt = rig.attempt(request)
    rig.probe("fetcher").send("cache_manager", protocol.AttemptAssigned(attempt=attempt))

    opened = rig.probe("scraper").expect(protocol.AttemptOpened)
    assert opened.attempt.attempt_id == attempt.attempt_id
    prepared = rig.probe("executor").expect(protocol.AttemptPrepared, timeout=300)
    assert prepared.attempt.attempt_id == attempt.attempt_id
    assert Path(prepared.python).exists() and prepared.container == ""
    workdir = Path(attempt.workdir)
    assert (workdir / "workspace" / "train.py").read_text() == "print('hi')\n"
    assert (workdir / "output" / "model.txt").read_text() == "from the last attempt\n"
    # the hand-over to the uploader: the mutable artifact's digest as it was downloaded
    assert metadata.read_downloaded_digests(workdir) == {"output": tree_digest(workdir / "output")}
    for step in (protocol.STEP_DOWNLOAD, protocol.STEP_ENVIRONMENT):
        rig.probe("supervisor").expect(protocol.AttemptPhase, lambda m, step=step: m.phase
                                       == protocol.PHASE_PREPARING and m.detail.get("step") == step)


def test_a_missing_input_ends_the_attempt_without_reaching_the_executor(rig) -> None:
    request = rig.request(workspace={"train.py": "print('hi')\n"})
    request["experiment"]["artifacts"]["workspace"]["qualified"] += ".gone"
    attempt = rig.attempt(request)
    rig.probe("fetcher").send("cache_manager", protocol.AttemptAssigned(attempt=attempt))

    ended = rig.probe("scraper").expect(protocol.AttemptEnded)
    assert ended.attempt.attempt_id == attempt.attempt_id
    assert ended.outcome.status != "completed" and ended.outcome.error
    assert rig.probe("executor").quiet(protocol.AttemptPrepared, 0.3) == []
    assert metadata.read_downloaded_digests(attempt.workdir) is None  # inputs never placed


def test_the_environment_is_held_for_the_attempt_until_its_run_ends(rig) -> None:
    from .roles_support import eventually
    request = rig.request(workspace={"train.py": "print('hi')\n"})
    attempt = rig.attempt(request)
    rig.probe("fetcher").send("cache_manager", protocol.AttemptAssigned(attempt=attempt))
    prepared = rig.probe("executor").expect(protocol.AttemptPrepared, timeout=300)
    store = Path(rig.config.env_dir)
    key = Path(prepared.env_path).name
    assert (store / f"{key}.holds" / attempt.attempt_id).is_file()
    rig.probe("executor").send("cache_manager", protocol.RunEnded(attempt_id=attempt.attempt_id))
    assert eventually(lambda: not (store / f"{key}.holds" / attempt.attempt_id).exists())


def test_the_environment_is_looked_up_while_the_artifacts_download(rig, monkeypatch) -> None:
    """The workspace's download waits until the attempt holds its environment: it can
    only end when the lookup runs beside it (the old order, download then lookup, would
    hold the download the whole wait and see no hold)."""
    request = rig.request(workspace={"train.py": "print('hi')\n"})
    attempt = rig.attempt(request)
    holds = Path(rig.config.env_dir).glob
    read, seen = rig.objects.read, []
    workspace = request["experiment"]["artifacts"]["workspace"]["qualified"]

    def slow_read(url):
        if url == workspace:
            deadline = time.monotonic() + 60
            while not list(holds(f"*.holds/{attempt.attempt_id}")) and time.monotonic() < deadline:
                time.sleep(0.05)
            seen.append(bool(list(holds(f"*.holds/{attempt.attempt_id}"))))
        return read(url)

    monkeypatch.setattr(rig.objects, "read", slow_read)
    rig.probe("fetcher").send("cache_manager", protocol.AttemptAssigned(attempt=attempt))
    prepared = rig.probe("executor").expect(protocol.AttemptPrepared, timeout=300)
    assert prepared.attempt.attempt_id == attempt.attempt_id
    assert seen == [True], "the environment was held before the workspace had downloaded"
    assert (Path(attempt.workdir) / "workspace" / "train.py").read_text() == "print('hi')\n"
