"""Errors that name what a person must fix, without tracebacks (real processes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import config as config_module

REPO = Path(__file__).resolve().parent.parent


def test_a_queue_root_that_cannot_be_made_is_one_clear_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in {n for o in config_module.OPTIONS for n in o.env_names}}
    env.update(XDG_DATA_HOME=str(tmp_path / "data"), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "runner.supervisor", "--queue-root", "/proc/nope",
         "--runtime-dir", str(tmp_path / "run"), "--executors", "1", "--sandbox", "off"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "cannot create local queue root /proc/nope" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.runner_options(max_attempts=1)
def test_a_corrupt_archive_is_named_by_its_artifact_not_its_cache_file(runner) -> None:
    runner.start()
    blob = "blobstore/corrupt.tar"
    path = runner.store_path(runner.store_root) / blob
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a tar archive at all" * 40)
    request = runner.request(runner.workspace({"x.py": ""}), "x.py", blob=blob)
    runner.publish(request)
    record = runner.wait_final(request)
    assert record["status"] == "failed", runner.log()
    [document] = runner.scrape_documents(request)
    message = document["runner"]["message"]
    assert f"artifact 'workspace' ({runner.store_root}/{blob})" in message, message
