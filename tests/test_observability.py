"""Unit tests for the operations pieces: sd_notify, packaging, metrics, Slack, options file,
JSON logs and the scraper's helpers for runner-ctl and notices."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import uuid

import pytest

from runner import config, metrics, slack, systemd
from runner.logs import JsonFormatter
from runner.protocol import Attempt
from runner.queues import sqs
from runner.roles.scraper import last_json_line, output_tail

from .support import REPO, SilentServer, SlackServer, short_tempdir


@pytest.fixture()
def tmp(request):
    folder = short_tempdir("ob")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def make_attempt(**changes) -> Attempt:
    fields = dict(attempt_id="vm-1a2b3c", queue="local_q", token="t", attempts=0, key="exp-1",
                  project="proj", request={"experiment": {"key": "exp-1"}, "config": {
                      "env": {"HF_TOKEN": "tok-abcdefgh-1234"}}},
                  workdir="/nonexistent", resources={}, taken_at=1.0)
    fields.update(changes)
    return Attempt(**fields)


# -- sd_notify -------------------------------------------------------------------------------

def datagram_listener(address: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(5)
    return listener


def test_notifier_sends_to_a_path_socket(tmp):
    path = str(tmp / "notify")
    listener = datagram_listener(path)
    notifier = systemd.Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled and notifier.watchdog_interval is None
    assert notifier.ready("serving: 0 in flight")
    assert listener.recv(1024) == b"READY=1\nSTATUS=serving: 0 in flight"
    assert notifier.status("two\nlines")
    assert listener.recv(1024) == b"STATUS=two lines"
    assert notifier.stopping("draining")
    assert listener.recv(1024) == b"STOPPING=1\nSTATUS=draining"
    assert notifier.watchdog(True) is False, "no WATCHDOG_USEC: no keep-alives"
    notifier.close()
    listener.close()


def test_notifier_abstract_socket_and_watchdog_only_while_healthy():
    name = f"runner-test-{uuid.uuid4().hex}"
    listener = datagram_listener("\0" + name)
    notifier = systemd.Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000",
                                 "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval == 1.0
    assert notifier.watchdog(False, now=100.0) is False
    assert notifier.watchdog(True, now=100.0) is True
    assert listener.recv(64) == b"WATCHDOG=1"
    assert notifier.watchdog(True, now=100.5) is False, "not due yet"
    assert notifier.watchdog(True, now=101.0) is True
    assert listener.recv(64) == b"WATCHDOG=1"
    notifier.close()
    listener.close()


def test_notifier_ignores_a_watchdog_meant_for_another_process_and_no_socket():
    other = systemd.Notifier({"NOTIFY_SOCKET": "/nonexistent/x", "WATCHDOG_USEC": "1000000",
                              "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None
    assert other.ready("x") is False, "a missing socket is not an error"
    assert systemd.Notifier({}).enabled is False
    assert systemd.Notifier({}).ready("x") is False


def test_notifier_never_blocks_on_a_full_socket(tmp):
    path = str(tmp / "notify")
    listener = datagram_listener(path)  # never read
    notifier = systemd.Notifier({"NOTIFY_SOCKET": path})
    results = [notifier.status("x" * 512) for _ in range(5000)]
    assert results[0] is True and results[-1] is False, "dropped once full, never blocked"
    listener.close()


# -- packaging -------------------------------------------------------------------------------

def test_unit_file_has_what_operations_need():
    unit = (REPO / "packaging" / "studioml-runner.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=studioml-runner",
                 "StateDirectory=", "CacheDirectory=", "RuntimeDirectory=",
                 "EnvironmentFile=-/etc/studioml-runner/runner.env", "ExecReload=",
                 "TimeoutStopSec=", "--options-file /etc/studioml-runner/runner.env",
                 "Delegate=yes"):  # runs get cgroups of their own on v2 hosts
        assert line in unit, line
    options = config.read_options_file(str(REPO / "packaging" / "runner.env"))
    names = {o.env for o in config.OPTIONS}
    assert set(options) <= names, set(options) - names
    config.from_values({}, options)  # the shipped options are valid


def test_unit_file_passes_systemd_analyze_verify(tmp):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = (REPO / "packaging" / "studioml-runner.service").read_text()
    # verify checks that ExecStart exists: point it at this interpreter instead.
    unit = unit.replace("/opt/studioml-runner/bin/runner-supervisor",
                        f"{sys.executable} -m runner.supervisor")
    path = tmp / "studioml-runner.service"
    path.write_text(unit)
    result = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True,
                            timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "studioml-runner.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_build_installs_the_packaging_files_as_package_data(tmp):
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp / "lib")],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    installed = tmp / "lib" / "runner" / "_packaging"
    for name in systemd.PACKAGING_FILES:
        assert (installed / name).read_text() == (REPO / "packaging" / name).read_text()
    assert (tmp / "lib" / "runner" / "py.typed").is_file(), "the PEP 561 marker is shipped"
    printed = subprocess.run([sys.executable, "-m", "runner.systemd", "unit"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    assert "Type=notify" in printed


# -- metrics ---------------------------------------------------------------------------------

def test_cache_counts_accepts_the_shapes_a_cache_manager_may_report():
    assert metrics.cache_counts({"preparing": 1}) == {}
    assert metrics.cache_counts({"hits": 3, "misses": 1}) == {"cache": {"hits": 3, "misses": 1}}
    assert metrics.cache_counts({"cache_hits": 2, "cache_misses": 5}) == {
        "cache": {"hits": 2, "misses": 5}}
    assert metrics.cache_counts({"artifact_hits": 4, "env_misses": 1}) == {
        "artifact": {"hits": 4}, "env": {"misses": 1}}
    assert metrics.cache_counts({"cache": {"hits": 1, "misses": 2, "bytes": 9}}) == {
        "cache": {"hits": 1, "misses": 2}}


def test_free_resources_names_and_devices():
    found = metrics.free_resources({"slots": 2, "cpus": 7, "ram": 1024, "gpus": 1,
                                    "gpu_mem": {"0": 80, "1": 40}, "taking": True,
                                    "hdd": None, "widgets": 3})
    assert ("runner_resource_executor_free_slots", {}, 2.0) in found
    assert ("runner_resource_cpu_free_slots", {}, 7.0) in found
    assert ("runner_resource_cpu_free_mem", {}, 1024.0) in found
    assert ("runner_resource_gpu_free_slots", {}, 1.0) in found
    assert ("runner_resource_gpu_free_mem", {"device": "1"}, 40.0) in found
    assert ("runner_resource_widgets_free", {}, 3.0) in found
    assert not any(name.endswith("taking") for name, _, _ in found)


def test_exposition_keeps_the_classic_names_and_escapes_labels():
    stats = {"fetcher": {"queue_checked": {"local_a": 3}, "queue_ignored": {"rmq_x": 2},
                         "free": {"slots": 1}},
             "cache_manager": {"hits": 5, "misses": 2}}
    m = metrics.Metrics('host"1', lambda: stats)
    attempt = make_attempt(project='p\\"q')
    m.attempt_started(attempt)
    m.observe("run", 1.5)
    text = m.exposition().decode()
    assert ('runner_project_running{host="host\\"1",project="p\\\\\\"q",'
            'queue_name="local_q",queue_type="local"} 1.0') in text
    assert 'runner_queue_checked{host="host\\"1",queue_type="local",queue_name="local_a"} 3.0' in text
    assert 'runner_queue_ignored{host="host\\"1",queue_type="rmq",queue_name="rmq_x"} 2.0' in text
    assert 'runner_cache_hits{host="host\\"1",cache="cache"} 5.0' in text
    assert 'runner_cache_misses{host="host\\"1",cache="cache"} 2.0' in text
    assert "# TYPE runner_project_completed counter" in text
    assert 'runner_phase_seconds_count{phase="run"} 1.0' in text
    m.attempt_finished(attempt, "completed")
    text = m.exposition().decode()
    assert 'queue_name="local_q",project="p\\\\\\"q"} 1.0' in text  # runner_project_completed
    assert 'runner_experiments_total{status="completed"} 1.0' in text
    assert 'runner_project_running{host="host\\"1",project="p\\\\\\"q"' in text
    assert "queue_type=\"local\"} 0.0" in text


def test_metrics_carry_no_experiment_label_and_count_per_project():
    m = metrics.Metrics("vm", dict)
    attempts = [make_attempt(attempt_id=f"vm-{n}", key=f"exp-{n}") for n in range(3)]
    for attempt in attempts:
        m.attempt_started(attempt)
    text = m.exposition().decode()
    assert "experiment=" not in text and "exp-0" not in text
    assert 'runner_project_running{host="vm",project="proj",queue_name="local_q",' \
           'queue_type="local"} 3.0' in text
    for attempt in attempts:
        m.attempt_finished(attempt, "completed")
    m.attempt_finished(make_attempt(attempt_id="vm-9", key="exp-9"), "dead", started=False)
    text = m.exposition().decode()
    assert "experiment=" not in text
    completed = [line for line in text.splitlines() if line.startswith("runner_project_completed{")]
    assert completed == ['runner_project_completed{host="vm",queue_type="local",'
                         'queue_name="local_q",project="proj"} 4.0']
    assert 'queue_type="local"} 0.0' in text  # running back to 0, never below


def test_queue_depth_gauge_per_queue():
    queues = {"local_a": {"depth": 4, "waiting": []}, "rmq_b": {"depth": 0, "waiting": []},
              "sqs_c": {"depth": -1, "waiting": [], "error": "unreachable"}}
    stats = {"fetcher": {"queue_types": {"rmq_b": "rmq"}}}
    m = metrics.Metrics("vm", lambda: stats, lambda: queues)
    text = m.exposition().decode()
    assert "# TYPE runner_queue_depth gauge" in text
    assert 'runner_queue_depth{host="vm",queue_type="local",queue_name="local_a"} 4' in text
    assert 'runner_queue_depth{host="vm",queue_type="rmq",queue_name="rmq_b"} 0' in text
    assert "sqs_c" not in text  # not counted: left out rather than shown as -1


def test_metrics_server_serves_metrics_and_health():
    import urllib.error
    import urllib.request
    health = [(True, "ok")]
    m = metrics.Metrics("h", lambda: {})
    server = metrics.MetricsServer("127.0.0.1:0", m, lambda: health[0]).start()
    base = f"http://{server.address}"
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
            assert "runner_phase_seconds_bucket" in response.read().decode()
        with urllib.request.urlopen(base + "/healthz", timeout=10) as response:
            assert response.read() == b"ok\n"
        health[0] = (False, "executor down")
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(base + "/healthz", timeout=10)
        assert failed.value.code == 503 and failed.value.read() == b"executor down\n"
    finally:
        server.close()


# -- Slack -----------------------------------------------------------------------------------

def test_slack_posts_in_the_background_to_a_local_server():
    server = SlackServer()
    poster = slack.Slack(server.url, "#room")
    try:
        assert poster.post("hello")
        poster.close(wait=10)
    finally:
        server.close()
    assert server.posts == [{"text": "hello", "username": "studioml-runner", "channel": "#room"}]
    assert poster.sent == 1


def test_slack_post_returns_at_once_when_slack_hangs_and_drops_when_full():
    silent = SilentServer()
    poster = slack.Slack(silent.url, timeout=600, max_pending=2)
    try:
        results = [poster.post(f"n{i}") for i in range(5)]
        # One may be in flight (hanging), two queued; the rest are dropped, never waited for.
        assert results[:2] == [True, True] and results[-1] is False
        assert poster.dropped >= 2
    finally:
        poster.close(wait=0)
        silent.close()


def test_experiment_notice_masks_secrets_and_cuts_the_tail():
    attempt = make_attempt()
    tail = "x" * 5000 + "\ntoken tok-abcdefgh-1234 leaked\nPASSWORD=pw123456\n"
    text = slack.experiment_notice("vm", attempt, "failed", "exit 3", tail)
    assert "tok-abcdefgh-1234" not in text and "pw123456" not in text
    assert "exp-1" in text and "vm-1a2b3c" in text and "exit 3" in text
    assert len(text) < slack.TAIL_LIMIT + 500


# -- options file, JSON logs, scraper helpers ------------------------------------------------

def test_options_file_sits_between_flags_and_environment(tmp):
    path = tmp / "runner.env"
    path.write_text("# comment\n; also a comment\n\nexport QUEUE_MATCH='^local_a$'\n"
                    "LIMIT_TASKS=\"4\"\nRUNNER_LOG_LEVEL=warning\n")
    environ = {"RUNNER_OPTIONS_FILE": str(path), "LIMIT_TASKS": "9", "RUNNER_KILL_GRACE": "3s"}
    loaded = config.from_values({"log_level": "error"}, environ)
    assert loaded.queue_match == "^local_a$" and loaded.limit_tasks == 4
    assert loaded.log_level == "error" and loaded.kill_grace == 3.0
    assert set(loaded.reloadable()) == set(config.RELOADABLE)
    path.write_text("not an assignment\n")
    with pytest.raises(config.ConfigError) as failed:
        config.from_values({}, environ)
    assert "expected NAME=VALUE" in str(failed.value.problems)


def test_new_options_are_validated():
    with pytest.raises(config.ConfigError) as failed:
        config.from_values({"prom_address": "nowhere", "slack_hook": "ftp://x",
                            "limit_tasks": "-1", "drain_timeout": "soon",
                            "log_format": "xml"}, {})
    text = " ".join(failed.value.problems)
    for flag in ("--prom-address", "--slack-hook", "--limit-tasks", "--drain-timeout",
                 "--log-format"):
        assert flag in text
    loaded = config.from_values({"prom_address": ":9090"}, {})
    assert loaded.prom_address == ":9090" and loaded.drain_timeout == 600.0


def test_json_log_lines_lift_key_and_attempt():
    formatter = JsonFormatter("vm", "executor")
    record = logging.LogRecord("runner.executor", logging.INFO, __file__, 1,
                               "key=%s attempt=%s started pid %d", ("exp-1", "vm-1a", 42), None)
    entry = json.loads(formatter.format(record))
    assert entry["key"] == "exp-1" and entry["attempt"] == "vm-1a"
    assert entry["host"] == "vm" and entry["role"] == "executor" and entry["level"] == "info"
    assert entry["message"] == "key=exp-1 attempt=vm-1a started pid 42"
    plain = json.loads(formatter.format(logging.LogRecord(
        "runner.fetcher", logging.WARNING, __file__, 1, "no queues", (), None)))
    assert "key" not in plain and plain["level"] == "warning"


def test_last_json_line_and_output_tail(tmp):
    data = b'{"a": 1}\nplain\n   {"experiment": {"loss": 0.5}}  \nmore text\n'
    assert last_json_line(data) == '{"experiment": {"loss": 0.5}}'
    assert last_json_line(b"no json here\n") == ""
    assert last_json_line(b'{"x": "' + b"y" * 1000 + b'"}\n', width=20) == '{"x": "' + "y" * 13
    log = tmp / "out.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(2000)))
    tail = output_tail(str(log), size=100)
    assert tail.endswith("line 1999\n") and tail.startswith("line ")
    assert output_tail(str(tmp / "missing")) == ""


# -- Docker and Kubernetes examples ----------------------------------------------------------

def test_dockerfile_runs_runner_supervisor_with_options_from_the_environment():
    text = (REPO / "Dockerfile").read_text()
    assert '"runner-supervisor"]' in text.split("ENTRYPOINT", 1)[1]
    assert "COPY packaging ./packaging" in text and "PROM_ADDRESS=" in text
    assert "/healthz" in text and "STOPSIGNAL SIGTERM" in text


def test_kubernetes_examples_use_real_option_names(tmp_path):
    yaml = pytest.importorskip("yaml")
    folder = REPO / "examples" / "kubernetes"
    files = {p.name: list(yaml.safe_load_all(p.read_text())) for p in folder.glob("*.yaml")}
    documents = {name: docs[0] for name, docs in files.items()}
    assert {d["kind"] for docs in files.values() for d in docs} == {"ConfigMap", "Secret",
                                                                    "Deployment"}
    names = {o.env for o in config.OPTIONS}
    data = documents["configmap.yaml"]["data"]
    assert set(data) <= names, set(data) - names
    pod = documents["deployment.yaml"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    # RUNNER_AMQP_URL's ${RMQ_PASSWORD} comes from the Secret through the pod's environment
    assert "${RMQ_PASSWORD}" in data["RUNNER_AMQP_URL"]
    assert env["RMQ_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "RMQ_PASSWORD"
    options = config.from_values({}, {**data, "RMQ_PASSWORD": "pw"})  # the example is valid
    assert options.amqp_url == "amqp://runner:pw@rabbitmq:5672/%2F"
    assert pod["terminationGracePeriodSeconds"] > options.drain_timeout + 60
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # --sqs-certs: each account a sub-directory of its own, with a credentials and a config file
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "credentials"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "credentials"]
    paths = {f"{mount['mountPath']}/{item['path']}" for source in volume["projected"]["sources"]
             for item in source["secret"]["items"]}
    certs = env["RUNNER_SQS_CERTS"]["value"]
    accounts = {p[len(certs) + 1:].split("/")[0] for p in paths if p.startswith(certs + "/")}
    assert accounts and all(p.count("/") == certs.count("/") + 2
                            for p in paths if p.startswith(certs + "/"))
    for account in accounts:
        assert {f"{certs}/{account}/credentials", f"{certs}/{account}/config"} <= paths
    secrets = {d["metadata"]["name"]: d for d in files["secret.yaml"]}
    for source in volume["projected"]["sources"]:  # lay the volume out as the kubelet does
        stored = secrets[source["secret"]["name"]]["stringData"]
        for item in source["secret"]["items"]:
            path = tmp_path / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(stored[item["key"]])
    for account in accounts:  # each account directory reads as the SQS back end reads it
        assert sqs.read_account_dir(str(tmp_path / certs[len(mount["mountPath"]) + 1:] / account))
