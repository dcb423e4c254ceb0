"""``runner-results serve`` in a real headless Chromium (Debian ``chromium`` + ``chromium-driver``
through Selenium), over a real 8-run sweep and a running experiment.

Screenshots of the two pages are saved as test artifacts under ``test-artifacts/`` (or
``$TEST_ARTIFACTS``).  Without Chromium the tests skip locally and fail under ``CI=true``
(``.ci/run`` installs it).
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest

from .results_support import EPOCHS, finished_sweep
from .support import REPO, server_unavailable, stop_process

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts"))

LIVE = """
    import json, os, time
    flag = os.environ["FLAG"]
    deadline = time.time() + 150
    def wait(name):
        while not os.path.exists(name) and time.time() < deadline:
            time.sleep(0.05)
    print(json.dumps({"experiment": {"loss": 1.0}}), flush=True)
    wait(flag)
    print(json.dumps({"experiment": {"loss": 0.5}}), flush=True)
    print(json.dumps({"experiment": {"loss": 0.25}}), flush=True)
    wait(flag + ".end")
"""


@pytest.fixture(scope="module")
def sweep(request):
    yield from finished_sweep(request, "file")


@pytest.fixture(scope="module")
def server(sweep):
    """``runner-results serve`` on a free port, re-reading the store every second."""
    process = subprocess.Popen(
        [sys.executable, "-m", "runner.results", *sweep.storage_args, "serve",
         "--address", "127.0.0.1:0", "--refresh", "1s"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=sweep.env, cwd=REPO)
    first = process.stdout.readline()
    if not first.startswith("serving on "):
        process.kill()
        raise AssertionError(f"serve did not start: {first}{process.stdout.read()}")
    yield first.split()[-1].rstrip("/")
    stop_process(process)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by Selenium through Debian's chromedriver."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        server_unavailable("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options,
                                  service=webdriver.ChromeService(executable_path=driver_path))
    except WebDriverException as exc:
        server_unavailable(f"chromium did not start: {exc}")
    yield driver
    driver.quit()


def wait_until(driver, condition, timeout: float = 60.0, what: str = "condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        lambda d: condition(d), message=f"timed out waiting for {what}")


def shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    return path


def rows(driver) -> dict[str, str]:
    """key → status of the table rows shown."""
    return driver.execute_script(
        "return Object.fromEntries(Array.from(document.querySelectorAll('#experiments tbody tr'))"
        ".map(r => [r.dataset.key, r.dataset.status]))")


def test_the_table_lists_the_sweep_with_status_colours_and_filters(sweep, server, browser):
    flag = sweep.runner.root / "live.flag"
    request = sweep.runner.request(sweep.runner.workspace({"live.py": LIVE}), "live.py",
                                   key="live", env={"FLAG": str(flag)})
    request["experiment"]["project"] = "sweep"
    sweep.runner.publish(request)
    try:
        browser.get(server + "/")
        shown = wait_until(browser, lambda d: (lambda r: r if r.get("live") == "running"
                                               and len(r) == 9 else None)(rows(d)),
                           what="the sweep and the running experiment in the table")
        assert {key: status for key, status in shown.items() if key != "live"} == \
            {key: "completed" for key in sweep.keys}
        colours = browser.execute_script(
            "return Array.from(document.querySelectorAll('#experiments .status'))"
            ".map(s => [s.textContent, getComputedStyle(s).backgroundColor])")
        assert {text: colour for text, colour in colours} == {
            "completed": "rgb(212, 245, 212)", "running": "rgb(255, 241, 194)"}
        header = [th.text for th in browser.find_elements("css selector", "#head th")]
        assert header[:7] == ["key", "project", "status", "attempts", "host", "start",
                              "duration"] and {"loss", "accuracy", "epoch"} <= set(header)
        shot(browser, "results-list.png")
        from selenium.webdriver.support.ui import Select

        # A refresh leaves the filter lists alone while their choices are the same (an open
        # list would close under the user's pointer, its options stale).
        browser.execute_script("document.querySelector('#status option[value=running]')"
                               ".dataset.kept = 'yes'; window.refreshes = 0;"
                               "new MutationObserver(() => window.refreshes++).observe("
                               "document.getElementById('updated'), {childList: true});")
        wait_until(browser, lambda d: d.execute_script("return window.refreshes >= 2"),
                   what="two refreshes of the list")
        assert browser.execute_script(
            "return document.querySelector('#status option[value=running]').dataset.kept") == "yes"
        Select(browser.find_element("id", "status")).select_by_value("running")
        assert rows(browser) == {"live": "running"}
        Select(browser.find_element("id", "status")).select_by_value("")
        browser.find_element("id", "search").send_keys("lr-3")
        assert rows(browser) == {"lr-3": "completed"}
    finally:
        flag.write_text("go")
        Path(f"{flag}.end").write_text("end")


def test_an_experiment_page_charts_every_point_of_its_history(sweep, server, browser):
    browser.get(server + "/experiments/sweep/lr-0")
    wait_until(browser, lambda d: d.execute_script(
        "return window.charts && window.charts.loss && window.charts.accuracy"
        " && window.charts.epoch"), what="the three charts")
    points = browser.execute_script(
        "return Object.fromEntries(Object.entries(window.charts)"
        ".map(([n, c]) => [n, [c.data[0].length, c.data[1].length]]))")
    assert points == {name: [EPOCHS, EPOCHS] for name in ("accuracy", "epoch", "loss")}
    drawn = browser.find_elements("css selector", ".chart[data-metric=loss] canvas")
    assert drawn and drawn[0].size["width"] > 100
    assert browser.find_element("id", "status").text == "completed"
    assert "secret" in browser.find_element("id", "output").text
    link = browser.find_element("link text", "modeldir").get_attribute("href")
    with urllib.request.urlopen(link, timeout=30) as response:
        archive = tarfile.open(fileobj=io.BytesIO(response.read()))
    assert archive.extractfile("./model.txt" if "./model.txt" in archive.getnames()
                               else "model.txt").read() == b"lr=0.001"
    shot(browser, "results-experiment.png")


def test_a_running_experiments_chart_grows(sweep, server, browser):
    flag = sweep.runner.root / "grow.flag"
    request = sweep.runner.request(sweep.runner.workspace({"live.py": LIVE}), "live.py",
                                   key="grows", env={"FLAG": str(flag)})
    sweep.runner.publish(request)
    try:
        browser.get(server + "/experiments/e2e/grows")
        wait_until(browser, lambda d: d.execute_script(
            "return document.body.dataset.status === 'running' && window.charts.loss"
            " && window.charts.loss.data[0].length === 1"), timeout=90,
            what="one point while it runs")
        flag.write_text("go")
        wait_until(browser, lambda d: d.execute_script(
            "return window.charts.loss.data[0].length === 3"), timeout=90,
            what="the chart to grow to three points without a reload")
        assert browser.execute_script("return document.body.dataset.status") == "running"
        assert browser.execute_script("return window.charts.loss.data[1]") == [1.0, 0.5, 0.25]
    finally:
        flag.write_text("go")
        Path(f"{flag}.end").write_text("end")
    wait_until(browser, lambda d: d.execute_script(
        "return document.body.dataset.status === 'completed'"), timeout=90,
        what="the page to show it completed")


def test_the_api_refuses_unknown_experiments_and_files(server):
    for path in ("/api/experiments/sweep/nope", "/artifacts/sweep/nope/modeldir",
                 "/artifacts/sweep/lr-0/nothing", "/artifacts/sweep/lr-0/_metadata/..%2Fx"):
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(server + path, timeout=30)
        assert failure.value.code == 404, path
    with urllib.request.urlopen(server + "/static/uplot/LICENSE", timeout=30) as response:
        assert b"MIT" in response.read()
