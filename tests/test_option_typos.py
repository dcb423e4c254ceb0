"""Mistyped option names are reported, as a mistyped flag is (real supervisor processes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from runner import config as config_module

REPO = Path(__file__).resolve().parent.parent


def clean_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")
           and k not in {n for o in config_module.OPTIONS for n in o.env_names}}
    return dict(env, XDG_DATA_HOME=str(tmp_path / "data"), PYTHONPATH=str(REPO))


def test_an_options_file_with_mistyped_names_and_bad_lines_lists_every_one(tmp_path: Path) -> None:
    options = tmp_path / "runner.env"
    options.write_text("RUNNER_EXECUTORS=2\nRUNNER_EXECTUORS=3\nnot a line\nRUNNER_NOSUCH=1\n"
                       "AWS_PROFILE=ops\nalso not a line\n")
    proc = subprocess.run([sys.executable, "-m", "runner.supervisor", "--options-file",
                           str(options)], cwd=REPO, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"{options}:3: expected NAME=VALUE" in proc.stderr
    assert f"{options}:6: expected NAME=VALUE" in proc.stderr
    assert "$RUNNER_EXECTUORS is not an option of runner-supervisor: did you mean " \
           "RUNNER_EXECUTORS?" in proc.stderr
    assert "$RUNNER_NOSUCH is not an option of runner-supervisor" in proc.stderr
    assert "AWS_PROFILE" not in proc.stderr  # the process's environment under systemd
    assert not (tmp_path / "data").exists()


def test_a_mistyped_variable_is_warned_about_and_a_reload_reports_every_problem(runner) -> None:
    runner.env["RUNNER_EXECTUORS"] = "3"
    options = runner.root / "runner.env"
    options.write_text("RUNNER_LOG_LEVEL=info\n")
    runner.options["options-file"] = options
    runner.start()
    assert ("$RUNNER_EXECTUORS is not an option of runner-supervisor: did you mean "
            "RUNNER_EXECUTORS? (set in the environment: ignored)") in runner.log()

    options.write_text("RUNNER_LOG_LEVEL=loud\nbroken\nRUNNER_QUEUE_MACH=x\n")
    reply = runner.ctl("reload")
    assert reply.returncode == 1
    assert "options file $RUNNER_LOG_LEVEL='loud'" in reply.stderr
    assert f"{options}:2: expected NAME=VALUE" in reply.stderr
    assert "did you mean RUNNER_QUEUE_MATCH?" in reply.stderr
    assert runner.status()["supervisor"]["log_level"] == "info"  # the old options stay
    assert runner.stop() == 0
