"""runner-submit refuses, before uploading anything, what the runner would refuse later.

Each case runs the real ``runner-submit`` against a ``file://`` storage and a local queue
folder, and checks that it exits 2 with a message naming the problem, and that nothing
was uploaded or published.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import requests as requests_module

REPO = Path(__file__).resolve().parent.parent


def submit(tmp_path: Path, *argv: str, workspace: Path | None = None):
    if workspace is None:
        workspace = tmp_path / "project"
        workspace.mkdir(exist_ok=True)
        (workspace / "train.py").write_text("print('hi')\n")
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "runner.submit", "--storage", (tmp_path / "store").as_uri(),
         "--queue-root", str(tmp_path / "queues"), "--queue", "local_checks", *argv,
         str(workspace), "train.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def nothing_sent(tmp_path: Path) -> bool:
    """No object in the storage and no message in the queue folder."""
    return not any((tmp_path / "store").rglob("*.tar")) and not any(
        p.is_file() for p in (tmp_path / "queues").rglob("*"))


@pytest.mark.parametrize("argv, said", [
    (["--cpus", "-1"], "counts cannot be negative"),
    (["--gpus", "-1"], "counts cannot be negative"),
    (["--key", "../x"], "'../x'"),  # worded by the runner's admission check
    pytest.param(["--project", "a/b"], "'a/b'",
                 marks=pytest.mark.skipif(
                     not hasattr(requests_module, "check_name"),
                     reason="the runner's admission accepts '/' in a project here; "
                            "runner-submit refuses exactly what admission refuses")),
    (["--save-frequency", "0"], "--save-frequency 0: must be more than 0"),
    (["--max-duration", "5"], "--max-duration 5: a duration needs a unit: 5s, 5m or 5h"),
    (["--lifetime", "5"], "--lifetime 5: a duration needs a unit"),
    (["--wait-timeout", "5"], "--wait-timeout 5: a duration needs a unit"),
    (["--ram", "lots"], "--ram lots: not a size"),
])
def test_what_the_runner_refuses_is_refused_before_upload(tmp_path: Path, argv, said) -> None:
    proc = submit(tmp_path, *argv)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert said in proc.stderr
    assert "Traceback" not in proc.stderr
    assert nothing_sent(tmp_path)


def test_a_workspace_with_a_symlink_leaving_it_is_refused_naming_the_link(tmp_path: Path) -> None:
    workspace = tmp_path / "project"
    (workspace / "sub").mkdir(parents=True)
    (workspace / "train.py").write_text("print('hi')\n")
    os.symlink("/datasets", workspace / "data")
    os.symlink("../../elsewhere", workspace / "sub" / "up")
    os.symlink("../train.py", workspace / "sub" / "fine")  # inside: kept
    proc = submit(tmp_path, workspace=workspace)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "data -> /datasets: a symlink to an absolute path" in proc.stderr
    assert "sub/up -> ../../elsewhere: a symlink pointing outside" in proc.stderr
    assert "sub/fine" not in proc.stderr
    assert nothing_sent(tmp_path)


def test_durations_with_units_and_links_inside_the_workspace_are_sent(tmp_path: Path) -> None:
    workspace = tmp_path / "project"
    workspace.mkdir()
    (workspace / "train.py").write_text("print('hi')\n")
    os.symlink("train.py", workspace / "main.py")
    proc = submit(tmp_path, "--max-duration", "5m", "--save-frequency", "10s",
                  "--wait-timeout", "0", "--key", "fine", workspace=workspace)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "fine"
    assert not nothing_sent(tmp_path)


def test_follow_prints_the_output_before_the_end_and_no_database_error(runner) -> None:
    """A short run with ``--follow`` (stdout and stderr in one stream, as in a terminal):
    the streamed output comes before ``completed``; runner-submit's own requests name no
    StudioML database, so no ``studio_record`` error is shown or kept."""
    runner.start()
    workspace = runner.workspace({"quick.py": """
        import time
        print("streamed line", flush=True)
        time.sleep(1.5)
        print("last line", flush=True)
    """})
    done = subprocess.run(
        [sys.executable, "-m", "runner.submit", "--queue", runner.queue,
         "--queue-root", str(runner.options["queue-root"]), "--storage", runner.store_root,
         "--project", "cli", "--key", "quick", "--save-frequency", "1s", "--follow",
         "--wait-timeout", "90s", str(workspace), "quick.py"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
        env=runner.env, cwd=REPO)
    out = done.stdout
    assert done.returncode == 0, out + runner.log()
    assert out.index("streamed line") < out.index("last line") < out.index("completed"), out
    assert out.count("status: completed") == 1
    assert "status: completed (attempt 1: " in out
    assert "studio_record" not in out and "not supported" not in out, out
    record = json.loads((runner.store_path(runner.store_root) / "metadata" / "cli"
                         / "quick.json").read_text())
    [document] = runner.scrape_documents(record["request"])
    assert "studio_record" not in document["runner"]
