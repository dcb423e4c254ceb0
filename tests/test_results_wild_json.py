"""``runner-results`` over experiments that printed any JSON at all, end to end.

A real runner runs experiments printing an integer beyond 64 bits, deep nesting and
``"NaN"`` text; the store also holds a record no reader can parse.  ``list``, ``export``,
``sync`` and ``serve`` must show every readable experiment, and name the unreadable one
instead of failing or answering with an empty table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from .support import REPO, Runner, short_tempdir, stop_process

BIG = 123456789012345678901234567890
PRINTS = {
    "big": f'print(\'{{"experiment": {{"big": {BIG}, "loss": 0.5}}}}\')',
    "deep": 'print(\'{"experiment": {"deep": ' + "[" * 5000 + "]" * 5000 + ', "loss": 0.25}}\')\n'
            'print(\'{"experiment": {"nan": "NaN", "inf": "Infinity", "loss": 0.125}}\')',
    "plain": 'print(\'{"experiment": {"loss": 0.1}}\')',
}


@pytest.fixture(scope="module")
def wild():
    """A runner that has finished the three experiments of :data:`PRINTS` (project
    ``wild``), plus an unreadable record ``wild/broken``; the storage arguments."""
    runner = Runner(short_tempdir())
    try:
        runner.start()
        requests = []
        for key, code in PRINTS.items():
            request = runner.request(runner.workspace({"main.py": code}), "main.py", key=key)
            request["experiment"]["project"] = "wild"
            runner.publish(request)
            requests.append(request)
        for request in requests:
            assert runner.wait_final(request, timeout=120)["status"] == "completed", runner.log()
        broken = runner.store_path(f"{runner.store_root}/metadata/wild/broken.json")
        broken.write_text("[" * 100_000 + "]" * 100_000)
        yield runner, ["--storage", runner.store_root]
    finally:
        runner.cleanup()


def results(runner, storage, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.results", *storage, *args],
                          capture_output=True, text=True, env=runner.env, cwd=REPO, timeout=120)


def test_list_shows_every_readable_experiment_and_names_the_unreadable_one(wild):
    runner, storage = wild
    done = results(runner, storage, "list", "--json", "--project", "wild")
    assert done.returncode == 0, done.stderr
    rows = {row["key"]: row for row in json.loads(done.stdout)}
    assert set(rows) == set(PRINTS)
    assert rows["big"]["metrics"]["big"] == float(BIG)
    assert rows["deep"]["metrics"]["loss"] == 0.125
    assert "skipped wild/broken" in done.stderr and "nested too deeply" in done.stderr
    table = results(runner, storage, "list", "--project", "wild", "--metrics", "loss,big")
    assert table.returncode == 0, table.stderr
    assert "plain" in table.stdout and "1.23457e+29" in table.stdout


def test_export_and_sync_keep_going_past_a_bad_experiment(wild, tmp_path):
    runner, storage = wild
    out = tmp_path / "all.csv"
    done = results(runner, storage, "export", str(out))
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 1 + len(PRINTS)
    done = results(runner, storage, "sync", "--into", str(tmp_path / "r.duckdb"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["refreshed"], report["failed"]) == (len(PRINTS), 1)
    assert report["problems"][0][:2] == ["wild", "broken"]


def test_serve_lists_the_readable_ones_and_says_which_it_could_not_read(wild):
    runner, storage = wild
    process = subprocess.Popen(
        [sys.executable, "-m", "runner.results", *storage, "serve", "--address", "127.0.0.1:0",
         "--refresh", "1s"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=runner.env, cwd=REPO)
    try:
        first = process.stdout.readline()
        assert first.startswith("serving on "), first
        base = first.split()[-1].rstrip("/")
        with urllib.request.urlopen(base + "/api/experiments", timeout=60) as response:
            assert response.status == 200
            reply = json.loads(response.read())
        assert {row["key"] for row in reply["experiments"]} == set(PRINTS)
        assert [p[:2] for p in reply["unreadable"]] == [["wild", "broken"]]
        with urllib.request.urlopen(base + "/api/experiments/wild/big", timeout=60) as response:
            assert json.loads(response.read())["experiment"]["metrics"]["big"] == float(BIG)
    finally:
        stop_process(process)


def test_serve_answers_503_with_the_reason_when_the_store_cannot_be_read():
    """No data is not an empty table: until a sync succeeds the API says why (here: an S3
    endpoint where nothing listens)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "runner.results", "--storage", "s3://127.0.0.1:1/nobucket",
         "--access-key", "x", "--secret-key", "y", "serve", "--address", "127.0.0.1:0",
         "--refresh", "1s"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ), cwd=REPO)
    try:
        first = process.stdout.readline()
        assert first.startswith("serving on "), first
        base = first.split()[-1].rstrip("/")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/api/experiments", timeout=120)
        assert refused.value.code == 503
        assert "cannot read the store" in json.loads(refused.value.read())["error"]
    finally:
        stop_process(process)
