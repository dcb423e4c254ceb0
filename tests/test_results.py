"""``runner-results`` and the metric history, against a real sweep.

A real ``runner-supervisor`` runs an 8-run learning-rate sweep submitted with
``runner-submit``, once on ``file://`` storage and once on S3 (``moto_server``); every
command of ``runner-results`` is then run as a real process against what the runs left
in storage.  The page of ``runner-results serve`` is tested in a real headless Chromium
(Debian's ``chromium`` and ``chromium-driver``) in tests/test_results_web.py.
"""
from __future__ import annotations

import time

import duckdb
import pytest

from runner import history
from runner.results.catalog import stamp_of

from .results_support import EPOCHS, RATES, finished_sweep



@pytest.fixture(scope="module", params=["file", "s3"])
def sweep(request):
    """An 8-run sweep submitted with runner-submit and finished, on file:// and on S3."""
    yield from finished_sweep(request, request.param)


# -- metric history -------------------------------------------------------------------------

def test_every_json_line_is_kept_in_the_history_with_its_time_and_attempt(sweep):
    catalog = sweep.catalog()
    for key, rate in zip(sweep.keys, RATES):
        experiment = catalog.experiment(catalog.find(key))
        lines = catalog.history(experiment.record)
        assert [line["line"]["experiment"]["epoch"] for line in lines] == list(range(1, EPOCHS + 1))
        assert {line["attempt"] for line in lines} == {experiment.record["attempt"]}
        assert all(line["attempt_number"] == 1 for line in lines)
        # Beside the scrape document, not in _metrics: the client reads that as one file.
        assert catalog.history_infos(experiment.record)[0].url == experiment.scrape_url.replace(
            "/scrape-host-", "/metrics-host-").replace(".json", ".jsonl")
        times = [line["time"] for line in lines]
        # The document's times are ISO strings cut to milliseconds.
        assert times == sorted(times)
        assert experiment.start - 0.001 <= times[0] <= times[-1] <= experiment.stop + 0.001
        assert lines[-1]["line"]["experiment"]["loss"] == round(1.0 / (1 + 10 * rate * EPOCHS), 6)
        # The merged scrape document still holds the latest values only.
        assert experiment.metrics["epoch"] == EPOCHS


def test_history_lines_keep_every_json_object_line_split_on_cr_and_lf():
    chunk = (b'{"experiment": {"loss": 1}}\rprogress 50%\r{"experiment": {"loss": 0.5}}\n'
             b'{"bad": NaN}\n[{"op": "add"}]\nplain {text}\n  {"top": {"x": 2}}  \n')
    objects = history.json_object_lines(chunk + b'{"big": 1e400}\n{"utf": "\xff"}\n')
    assert objects == [b'{"experiment": {"loss": 1}}', b'{"experiment": {"loss": 0.5}}',
                       b'{"top": {"x": 2}}']
    data, cut = history.history_lines(objects, time=5.0, room=history.MAX_HISTORY_BYTES)
    assert not cut
    lines = history.parse_history(history.history_header("h-1", 2) + data + b'{"torn')
    assert [line["line"] for line in lines] == [{"experiment": {"loss": 1}},
                                                {"experiment": {"loss": 0.5}}, {"top": {"x": 2}}]
    assert {(line["time"], line["attempt"], line["attempt_number"]) for line in lines} == \
        {(5.0, "h-1", 2)}
    assert dict(history.numeric_leaves({"experiment": {"loss": 0.5, "ok": True, "name": "x",
                                                        "nested": {"a": 1}},
                                        "top": {"x": 2}, "runner": {"start": 1}})) == \
        {"loss": 0.5, "nested.a": 1, "top.x": 2}


def test_the_history_file_is_about_the_size_of_the_lines_it_keeps():
    printed = [b'{"i": %d}' % n for n in range(10000)]
    data = history.history_header("host-1r31eq", 1)
    for start in range(0, len(printed), 100):  # the scraper reads chunks of lines
        data += history.history_lines(printed[start:start + 100], time=1700000000.25 + start,
                                      room=history.MAX_HISTORY_BYTES)[0]
    own = sum(len(line) + 1 for line in printed)
    assert len(data) < 1.25 * own  # the first form took about 6 times
    lines = history.parse_history(data)
    assert [line["line"]["i"] for line in lines] == list(range(10000))
    assert lines[150]["time"] == 1700000100.25 and lines[-1]["attempt"] == "host-1r31eq"


def test_a_full_history_ends_with_a_truncated_line_and_keeps_what_fit():
    printed = [b'{"loss": %d}' % n for n in range(100)]
    cap = 400
    data = history.history_header("h-1", 1)
    data += history.history_lines(printed, time=5.0, room=cap - len(data), cap=cap)[0]
    more, cut = history.history_lines(printed, time=6.0, room=cap - len(data), cap=cap)
    assert cut and more.startswith(b'["truncated"')  # the scraper stops at the first
    assert len(data) <= cap and history.truncated(data)
    assert data.endswith(b'["truncated",5.0,400]\n')
    kept = [line["line"]["loss"] for line in history.parse_history(data)]
    assert kept == list(range(len(kept))) and 0 < len(kept) < 100


def test_history_files_of_the_first_form_are_still_read():
    old = (b'{"time": 5.0, "attempt": "h-1", "attempt_number": 2, "line": {"x": 1}}\n'
           b'{"time": 6.0, "attempt": "h-1", "attempt_number": 2, "line": {"x": 2}}\n')
    assert [(line["time"], line["line"]) for line in history.parse_history(old)] == \
        [(5.0, {"x": 1}), (6.0, {"x": 2})]


@pytest.mark.runner_options(max_history="4kb")
def test_the_runner_caps_the_history_and_says_so(runner):
    runner.start()
    request = runner.request(runner.workspace({"chatty.py": """
        for n in range(2000):
            print('{"experiment": {"step": %d}}' % n, flush=n % 100 == 0)
    """}), "chatty.py")
    runner.publish(request)
    record = runner.wait_final(request)
    assert record["status"] == "completed", runner.log()
    folder = runner.experiment_dir(request) / "_metadata"
    data = (folder / f"metrics-host-{record['attempt']}.jsonl").read_bytes()
    assert len(data) <= 4000 and history.truncated(data)
    kept = [line["line"]["experiment"]["step"] for line in history.parse_history(data)]
    assert kept == list(range(len(kept))) and 0 < len(kept) < 2000  # as many as fit
    runner_log = (folder / f"runner-host-{record['attempt']}.log").read_text()
    assert "metric history reached its cap (--max-history 4000 bytes)" in runner_log
    [document] = runner.scrape_documents(request)
    assert document["experiment"]["step"] == 1999  # the latest value is still kept


def test_attempts_are_ordered_by_their_base62_stamp_not_by_name():
    # "Z" < "a" in ASCII and in the base62 alphabet; a longer stamp is later.
    assert stamp_of("scrape-host-gpu-1-1r31eq.json") == 1700000000
    assert stamp_of("output-host-h-zz.log") < stamp_of("output-host-h-100.log")
    assert stamp_of("scrape-host-h-1r3_eq.json") == -1 == stamp_of("scrape-host-h-.json")


# -- list / compare / show / fetch ------------------------------------------------------------

def test_list_shows_every_run_of_the_sweep_with_its_final_metrics(sweep):
    rows = sweep.results_json("list", "--json", "--project", "sweep")
    assert sorted(row["key"] for row in rows) == sorted(sweep.keys)
    for row in rows:
        rate = RATES[int(row["key"].split("-")[1])]
        assert row["project"] == "sweep" and row["status"] == "completed"
        assert row["attempts"] == 1 and row["host"] and row["duration"] >= 0  # ran once
        assert row["metrics"] == {"epoch": EPOCHS, "accuracy": round(1 - 1.0 / (1 + EPOCHS), 6),
                                  "loss": round(1.0 / (1 + 10 * rate * EPOCHS), 6)}
    every = sweep.results("list", "--project", "sweep").stdout  # metrics without asking
    header = next(line for line in every.splitlines() if "key" in line)
    assert all(name in header for name in ("attempts", "loss", "accuracy", "epoch")), every
    table = sweep.results("list", "--metrics", "loss,accuracy").stdout
    header = next(line for line in table.splitlines() if "key" in line and "loss" in line)
    assert "accuracy" in header and "epoch" not in header
    assert all(key in table for key in sweep.keys)


def test_list_sorts_and_filters(sweep):
    by_loss = sweep.results_json("list", "--json", "--sort", "loss")
    assert [row["key"] for row in by_loss] == list(reversed(sweep.keys))
    descending = sweep.results_json("list", "--json", "--sort=-loss")
    assert [row["key"] for row in descending] == sweep.keys
    assert sweep.results_json("list", "--json", "--status", "failed") == []
    assert len(sweep.results_json("list", "--json", "--status", "completed,failed")) == 8
    assert sweep.results_json("list", "--json", "--project", "other") == []
    assert len(sweep.results_json("list", "--json", "--since", "1h")) == 8
    assert sweep.results_json("list", "--json", "--since", "2999-01-01") == []
    bad = sweep.results("list", "--since", "yesterday-ish", check=False)
    assert bad.returncode == 2 and "--since" in bad.stderr
    bad = sweep.results("list", "--sort", "nope", check=False)
    assert bad.returncode == 2 and "not a column" in bad.stderr


def test_compare_puts_the_named_runs_in_one_table(sweep):
    rows = sweep.results_json("compare", "lr-2", "lr-6", "--json", "--sort", "loss")
    assert [row["key"] for row in rows] == ["lr-6", "lr-2"]
    assert rows[0]["metrics"]["loss"] < rows[1]["metrics"]["loss"]
    missing = sweep.results("compare", "lr-2", "nope", check=False)
    assert missing.returncode == 1 and "nope" in missing.stderr


def test_show_gives_the_record_scrape_output_tail_and_artifacts(sweep):
    shown = sweep.results_json("show", "lr-3", "--json")
    assert shown["record"]["status"] == "completed" and shown["record"]["final"] is True
    assert shown["scrape"]["studioml"]["status"] == "completed"
    assert shown["scrape"]["experiment"]["loss"] == round(1.0 / (1 + 10 * 0.03 * EPOCHS), 6)
    assert shown["scrape_url"].endswith(f"scrape-host-{shown['record']['attempt']}.json")
    assert shown["output_tail"].splitlines()[-1].startswith("secret")
    stored = {item["label"]: item for item in shown["artifacts"]}
    assert stored["modeldir"]["stored"] and stored["_metrics"]["stored"]
    assert stored["_metadata"]["stored"] and stored["workspace"]["stored"]
    text = sweep.results("show", "lr-3").stdout
    assert "sweep/lr-3" in text and "completed" in text and "modeldir" in text
    missing = sweep.results("show", "nope", check=False)
    assert missing.returncode == 1 and "no experiment 'nope'" in missing.stderr


def test_fetch_downloads_and_unpacks_the_artifacts(sweep, tmp_path):
    done = sweep.results("fetch", "lr-4", str(tmp_path / "out"))
    assert (tmp_path / "out" / "modeldir" / "model.txt").read_text() == "lr=0.1"
    # _metrics keeps the one file the StudioML client reads as a file (SPEC section 11).
    assert [p.name for p in (tmp_path / "out" / "_metrics").iterdir()] == ["_metrics"]
    names = [p.name for p in (tmp_path / "out" / "_metadata").iterdir()]
    assert {name.split("-host-")[0] for name in names} == {"scrape", "output", "runner",
                                                           "metrics"}, names
    assert "modeldir" in done.stdout
    only = sweep.results("fetch", "lr-5", str(tmp_path / "one"), "--label", "modeldir")
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["modeldir"], only.stdout
    missing = sweep.results("fetch", "lr-5", str(tmp_path / "none"), "--label", "nothing",
                            check=False)
    assert missing.returncode == 1 and "nothing" in missing.stderr


# -- export / sync ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_export_writes_one_row_per_experiment_and_per_history_point(sweep, tmp_path, fmt):
    out, points = tmp_path / f"runs.{fmt}", tmp_path / f"history.{fmt}"
    sweep.results("export", str(out), "--history", str(points))
    reader = {"parquet": "read_parquet", "csv": "read_csv", "jsonl": "read_json"}[fmt]
    connection = duckdb.connect()
    rows = connection.execute(f"SELECT key, status, loss, epoch FROM {reader}(?) ORDER BY loss",
                              [str(out)]).fetchall()
    assert [row[0] for row in rows] == list(reversed(sweep.keys))
    assert {row[1] for row in rows} == {"completed"} and {row[3] for row in rows} == {EPOCHS}
    count, names = connection.execute(
        f"SELECT count(*), list(DISTINCT name ORDER BY name) FROM {reader}(?)",
        [str(points)]).fetchone()
    assert count == len(RATES) * EPOCHS * 3 and names == ["accuracy", "epoch", "loss"]
    losses = connection.execute(f"SELECT value FROM {reader}(?) WHERE key = 'lr-0' AND "
                                "name = 'loss' ORDER BY point", [str(points)]).fetchall()
    assert [v for (v,) in losses] == [round(1.0 / (1 + 10 * 0.001 * e), 6)
                                      for e in range(1, EPOCHS + 1)]
    unknown = sweep.results("export", str(tmp_path / "runs.xlsx"), check=False)
    assert unknown.returncode == 2 and "--format" in unknown.stderr


def test_sync_is_incremental(sweep, tmp_path):
    database = tmp_path / "results.duckdb"
    first = sweep.results_json("sync", "--into", str(database), "--json")
    assert first["listed"] == 8 and first["refreshed"] == 8 and first["skipped"] == 0
    assert first["reads"] >= 8 * 3  # record, scrape document, history of each
    second = sweep.results_json("sync", "--into", str(database), "--json")
    assert second == {"listed": 8, "skipped": 8, "refreshed": 0, "deleted": 0, "reads": 0,
                      "failed": 0, "problems": []}
    connection = duckdb.connect(str(database), read_only=True)
    assert connection.execute("SELECT count(*) FROM experiments WHERE final").fetchone()[0] == 8
    assert connection.execute("SELECT count(*) FROM history").fetchone()[0] == 8 * EPOCHS * 3
    connection.close()
    # A listing through the synced file reads nothing more than the sync did.
    rows = sweep.results_json("list", "--json", "--db", str(database))
    assert len(rows) == 8


# -- runner-submit ----------------------------------------------------------------------------

def test_runner_submit_passes_everything_after_the_script_untouched(sweep):
    workspace = sweep.runner.workspace({"argv.py": """
        import json, sys
        print(json.dumps({"experiment": {"argv": sys.argv[1:]}}))
    """})
    process = sweep.submit(workspace, "argv.py", "--epochs", "3", "--wait", "-x", "two words",
                           key="argv-untouched", options=["--wait"], project="cli")
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, err
    shown = sweep.results_json("show", "argv-untouched", "--json")
    assert shown["scrape"]["experiment"]["argv"] == ["--epochs", "3", "--wait", "-x", "two words"]


def test_runner_submit_wait_prints_the_failure_and_the_output_tail(sweep):
    workspace = sweep.runner.workspace({"fail.py": """
        import sys
        for n in range(30):
            print("line", n)
        sys.exit("the data set is missing")
    """})
    process = sweep.submit(workspace, "fail.py", key="fails", options=["--wait"], project="cli")
    out, err = process.communicate(timeout=240)
    assert process.returncode == 1, out + err
    lines = out.splitlines()
    failure = [line for line in lines if line.startswith("failed: ")]
    assert failure == ["failed: ExperimentFailed: exited with status 1"], out
    tail = lines[lines.index(failure[0]) + 2:]
    assert tail[-1] == "the data set is missing" and "line 29" in tail
    assert len(tail) == 20 and "line 10" not in tail
    [failed] = sweep.results_json("list", "--json", "--status", "failed", "--project", "cli")
    assert failed["key"] == "fails" and failed["attempts"] == 3


def test_runner_submit_follow_streams_the_output_while_it_runs(sweep):
    flag = sweep.runner.root / "follow.flag"
    workspace = sweep.runner.workspace({"slow.py": """
        import os, sys, time
        print("first part", flush=True)
        deadline = time.time() + 120
        while not os.path.exists(sys.argv[1]) and time.time() < deadline:
            time.sleep(0.05)
        print("second part", flush=True)
    """})
    process = sweep.submit(workspace, "slow.py", str(flag), key="follows", options=["--follow"],
                           project="cli")
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.strip() == "first part":
            break
    assert seen and seen[-1].strip() == "first part", "".join(seen)
    assert process.poll() is None, "the output came while the run was still going"
    flag.write_text("go")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "second part" in out and out.index("second part") < out.index("status: completed")


def test_storage_that_cannot_be_read_is_a_clear_error():
    import socket
    import subprocess
    import sys

    from .support import REPO

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "runner.results", "--storage",
                           f"s3://127.0.0.1:{port}/bucket", "--access-key", "a", "--secret-key",
                           "b", "list"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "cannot list" in done.stderr.splitlines()[-1]
    done = subprocess.run([sys.executable, "-m", "runner.results", "--storage", "/a/path",
                           "list"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2 and "not a storage URL" in done.stderr


def test_list_json_gives_times_as_iso_utc(sweep):
    [row] = sweep.results_json("compare", "lr-1", "--json")
    assert row["start"].endswith("Z") and row["updated"].endswith("Z")
    assert row["start"] <= row["stop"] <= row["updated"]
