"""The experiment's environment and its build, end to end through a real supervisor: what
the runner's environment passes on (an allow-list less the scrubbed names), ``%NAME%`` in
``config.env``, a ``pip freeze`` placeholder line, and what a failed build leaves behind."""
from __future__ import annotations

import json
import time

import pytest

from runner import metadata

from .support import make_tiny_package, tiny_requirement

ENV_SCRIPT = """
    import json, os
    names = ["DB_PASSWORD", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MY_SECRET_X", "SLACK_ROOM",
             "CUSTOM_PRIVATE", "PLAIN_VAR", "UNLISTED_VAR", "UNLISTED_ONE"]
    print(json.dumps({"experiment": {
        "seen": sorted(n for n in names if n in os.environ),
        "date": os.environ["DATE_FMT"], "sale": os.environ["SALE"],
        "plain_copy": os.environ["PLAIN_COPY"], "hidden_copy": os.environ["HIDDEN_COPY"],
        "request_value_given": os.environ.get("HF_TOKEN") == "from-the-request"}}))
"""


@pytest.mark.runner_options(scrub_env="*_PASSWORD,*_SECRET*,*_TOKEN,AWS_*,CUSTOM_PRIVATE",
                            pass_env="*_VAR,*_PASSWORD,*_SECRET*,*_TOKEN,AWS_*,CUSTOM_*,"
                                     "SLACK_*,PATH,HOME,LANG,UV_*,PIP_*")
def test_experiment_sees_only_the_allowed_environment(runner, tmp_path):
    runner.env.update(DB_PASSWORD="db-pw-value", HF_TOKEN="runner-token",
                      AWS_SECRET_ACCESS_KEY="runner-aws-key", MY_SECRET_X="x-value",
                      SLACK_ROOM="#ops", CUSTOM_PRIVATE="c", PLAIN_VAR="plain",
                      UNLISTED_ONE="not on the allow-list")
    runner.env["UNLISTED_VAR"] = "on the allow-list"
    runner.start()
    tiny = make_tiny_package(tmp_path / "src")
    request = runner.request(
        runner.workspace({"env.py": ENV_SCRIPT}), "env.py",
        pythonenv=["pkg-resources==0.0.0", tiny_requirement(tiny)],
        env={"DATE_FMT": "%Y%m%d", "SALE": "50%off%sale", "PLAIN_COPY": "%PLAIN_VAR%",
             "HIDDEN_COPY": "%DB_PASSWORD%", "HF_TOKEN": "from-the-request"})
    runner.publish(request)
    record = runner.wait_final(request, timeout=180)
    assert record["status"] == "completed", runner.log()
    [document] = runner.scrape_documents(request)
    experiment = document["experiment"]
    assert experiment["seen"] == ["HF_TOKEN", "PLAIN_VAR", "UNLISTED_VAR"], \
        "secrets, option variables and names off the allow-list are not passed"
    assert experiment["request_value_given"] is True, "config.env may set a scrubbed name"
    assert experiment["date"] == "%Y%m%d" and experiment["sale"] == "50%off%sale"
    assert experiment["plain_copy"] == "plain"
    assert experiment["hidden_copy"] == "%DB_PASSWORD%", "a scrubbed name does not expand"
    runner_log = (runner.experiment_dir(request) / "_metadata"
                  / metadata.runner_log_name(record["attempt"])).read_text()
    assert "left out 'pkg-resources==0.0.0'" in runner_log
    assert runner.stop() == 0


@pytest.mark.runner_options(max_attempts=1)
def test_a_failed_build_leaves_the_installer_tail_in_output_and_scrape(runner, tmp_path):
    runner.start()
    missing = (tmp_path / "no-such-project-dir").as_uri()
    request = runner.request(runner.workspace({"x.py": "print('never runs')"}), "x.py",
                             pythonenv=[f"nosuchpkg @ {missing}"])
    runner.publish(request)
    record = runner.wait_final(request, timeout=180)
    assert record["status"] == "failed"
    folder = runner.experiment_dir(request) / "_metadata"
    output = (folder / metadata.output_name(record["attempt"])).read_text()
    assert "environment build failed" in output and "no-such-project-dir" in output
    document = json.loads((folder / metadata.scrape_name(record["attempt"])).read_text())
    assert "no-such-project-dir" in document["runner"]["build_log_tail"]
    assert document["studioml"]["status"] == "failed"
    assert runner.stop() == 0


HOLD_SCRIPT = """
    import time
    time.sleep(3)
    print('{"experiment": {"done": true}}')
"""


@pytest.mark.runner_options(env_cache_size="1")
def test_environments_are_held_while_used_and_evicted_least_recently_used(runner, tmp_path):
    """A one-byte cap: every environment not in use goes at the next build, the one a run
    uses stays until its run ends; ``runner-ctl free`` shows the store against its cap."""
    runner.start()
    store = runner.root / "c" / "envs"
    first = runner.request(runner.workspace({"hold.py": HOLD_SCRIPT}), "hold.py",
                           pythonenv=[tiny_requirement(make_tiny_package(tmp_path / "a"))])
    runner.publish(first)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(store.glob("*.holds/*")):
        time.sleep(0.1)
    [hold] = list(store.glob("*.holds/*"))
    first_key = hold.parent.name.split(".")[0]
    assert runner.wait_final(first, timeout=180)["status"] == "completed", runner.log()
    assert list(store.glob("*.holds/*")) == [], "the run ended: its hold is released"
    assert (store / first_key).is_dir(), "nothing built since: nothing evicted"

    second = runner.request(runner.workspace({"hold.py": HOLD_SCRIPT}), "hold.py",
                            pythonenv=[tiny_requirement(make_tiny_package(tmp_path / "b",
                                                                          name="tinytwo"))])
    runner.publish(second)
    assert runner.wait_final(second, timeout=180)["status"] == "completed", runner.log()
    assert not (store / first_key).exists(), "the least recently used one went past the cap"
    [kept] = [p for p in store.iterdir() if p.is_dir() and len(p.name) == 32]
    assert "evicted environment " + first_key in runner.log()

    deadline = time.monotonic() + 30
    while True:
        shown = runner.ctl("free")
        line = shown.stdout.strip().splitlines()[-1]
        if "1 environment)" in line or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert shown.returncode == 0 and line.startswith("  environment store: ")
    assert line.endswith("of 1 B (1 environment)"), shown.stdout
    as_json = json.loads(runner.ctl("--json", "free").stdout)
    assert as_json["environment_store"]["cap"] == 1
    assert as_json["environment_store"]["environments"] == 1
    assert kept.name != first_key
    assert runner.stop() == 0
