"""The same key in two projects, end to end (real runner, real ``runner-submit`` and
``runner-results`` processes, ``file://`` storage).

StudioML's layout puts an experiment's files under ``experiments/<key>/`` whatever its
project, so ``runner-submit`` refuses a ``--key`` another project has (``--force`` shares
it knowingly), and ``runner-results`` shows each project's own record and scrape document
and says that the folder is shared instead of handing out the other project's model.
"""
from __future__ import annotations

import json
import subprocess
import sys

from .support import REPO

TRAIN = """
    import json, os, sys
    which = sys.argv[1]
    print(json.dumps({"experiment": {"which": which}}), flush=True)
    with open(os.path.join("..", "modeldir", "model.txt"), "w") as handle:
        handle.write(which)
"""


def submit(runner, workspace, project: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runner.submit", "--queue", runner.queue, "--queue-root",
         str(runner.options["queue-root"]), "--storage", runner.store_root, "--project", project,
         "--key", "same", "--save-frequency", "1s", "--wait", "--wait-timeout", "2m", *extra,
         str(workspace), "train.py", project],
        capture_output=True, text=True, env=runner.env, cwd=REPO, timeout=180)


def results(runner, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.results", "--storage",
                           runner.store_root, *args],
                          capture_output=True, text=True, env=runner.env, cwd=REPO, timeout=120)


def test_a_key_of_another_project_is_refused_and_results_say_the_folder_is_shared(runner,
                                                                                   tmp_path):
    runner.start()
    workspace = runner.workspace({"train.py": TRAIN})
    first = submit(runner, workspace, "pa")
    assert first.returncode == 0 and "status: completed" in first.stdout, first.stderr

    refused = submit(runner, workspace, "pb")
    assert refused.returncode == 2
    assert "--key 'same' is already used by project(s) pa" in refused.stderr
    assert "--force" in refused.stderr
    assert not runner.store_path(f"{runner.store_root}/metadata/pb").exists()
    again = submit(runner, workspace, "pa")  # the same project may run its key again
    assert again.returncode == 0, again.stderr

    forced = submit(runner, workspace, "pb", "--force")
    assert forced.returncode == 0 and "status: completed" in forced.stdout, forced.stderr

    for project in ("pa", "pb"):
        shown = results(runner, "show", "same", "--project", project, "--json")
        assert shown.returncode == 0, shown.stderr
        document = json.loads(shown.stdout)
        assert document["scrape"]["experiment"]["which"] == project  # its own attempt's
        assert document["scrape"]["runner"]["attempt"] == document["record"]["attempt"]
        other = "pb" if project == "pa" else "pa"
        assert f"shares its storage folder with the same key in project(s) {other}" \
            in shown.stderr

    fetched = results(runner, "fetch", "same", str(tmp_path / "a"), "--project", "pa")
    assert fetched.returncode == 1
    assert "not fetched (--shared fetches them anyway)" in fetched.stderr
    assert not (tmp_path / "a").exists()
    anyway = results(runner, "fetch", "same", str(tmp_path / "a"), "--project", "pa",
                     "--shared")
    assert anyway.returncode == 0, anyway.stderr
    assert (tmp_path / "a" / "modeldir" / "model.txt").read_text() == "pb"  # the last run's
