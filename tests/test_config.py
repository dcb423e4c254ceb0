"""Options: flags, environment, defaults, validation all at once (SPEC section 9)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runner import config as config_module
from runner.config import Config, load
from runner.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fixed_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "testhost")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    config = load([], environ={})
    root = tmp_path / "data" / "studioml-runner"
    assert config.queue_match == config_module.DEFAULT_QUEUE_MATCH
    assert config.queue_mismatch == ""
    assert config.queue_root == str(root / "queues")
    assert config.working_dir == str(root / "work")
    assert config.cache_dir == str(root / "cache")
    assert config.env_dir == str(root / "cache" / "envs")
    assert config.runtime_dir == f"/tmp/studioml-runner-{os.getuid()}"
    assert config.executors == 7
    assert config.max_attempts == 3
    assert config.hostname == "testhost"
    assert config.min_save_interval == 10.0
    assert config.kill_grace == 10.0
    assert config.shutdown_timeout == 60.0
    assert config.installer == "auto"
    assert config.log_level == "info"
    assert config.debug is False
    assert config.python_dirs == ()


def test_executors_default_when_cpu_count_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert load([], environ={}).executors == 1


def test_flags(tmp_path: Path) -> None:
    config = load(["--queue-match", "^local_x$", "--queue-root", str(tmp_path / "q"),
                   "--executors", "3", "--max-attempts", "5", "--kill-grace", "1m30s",
                   "--min-save-interval", "2s", "--installer", "pip", "--hostname", "node-7",
                   "--log-level", "warning",
                   "--python-dirs", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])],
                  environ={})
    assert config.queue_match == "^local_x$"
    assert config.queue_root == str(tmp_path / "q")
    assert config.executors == 3
    assert config.max_attempts == 5
    assert config.kill_grace == 90.0
    assert config.min_save_interval == 2.0
    assert config.installer == "pip"
    assert config.hostname == "node-7"
    assert config.log_level == "warning"
    assert config.python_dirs == (str(tmp_path / "a"), str(tmp_path / "b"))


def test_environment_variables(tmp_path: Path) -> None:
    environ = {"RUNNER_QUEUE_ROOT": str(tmp_path / "envq"), "RUNNER_QUEUE_MISMATCH": "_test$",
               "RUNNER_EXECUTORS": "4", "RUNNER_KILL_GRACE": "5s",
               "RUNNER_WORKING_DIR": str(tmp_path / "w"), "RUNNER_INSTALLER": "uv",
               "RUNNER_MAX_ATTEMPTS": "2"}
    config = load([], environ=environ)
    assert config.queue_root == str(tmp_path / "envq")
    assert config.queue_mismatch == "_test$"
    assert config.executors == 4
    assert config.kill_grace == 5.0
    assert config.working_dir == str(tmp_path / "w")
    assert config.installer == "uv"
    assert config.max_attempts == 2


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load(["--cache-dir", "rel/cache"], environ={"RUNNER_QUEUE_ROOT": "q"})
    assert config.cache_dir == str(tmp_path / "rel" / "cache")
    assert config.queue_root == str(tmp_path / "q")


def test_flag_beats_env_beats_default(tmp_path: Path) -> None:
    environ = {"RUNNER_EXECUTORS": "4", "RUNNER_QUEUE_ROOT": str(tmp_path / "env"),
               "RUNNER_KILL_GRACE": "7s"}
    config = load(["--executors", "2", "--queue-root", str(tmp_path / "flag")], environ=environ)
    assert config.executors == 2                      # flag over env
    assert config.queue_root == str(tmp_path / "flag")
    assert config.kill_grace == 7.0                   # env over default (10s)
    assert config.max_attempts == 3                   # default


def test_flag_wins_even_over_a_bad_env_value() -> None:
    config = load(["--executors", "2"], environ={"RUNNER_EXECUTORS": "zero"})
    assert config.executors == 2


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load(["--queue-match", "(", "--kill-grace", "soon", "--executors", "0",
              "--installer", "conda"], environ={"RUNNER_MIN_SAVE_INTERVAL": "1 parsec"})
    problems = info.value.problems
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    for needle in ("--queue-match='('", "--kill-grace='soon'", "--executors='0'",
                   "--installer='conda'", "$RUNNER_MIN_SAVE_INTERVAL='1 parsec'"):
        assert needle in text, (needle, problems)
    assert "must be 1 or more" in text
    assert "expected one of auto, uv, pip" in text
    assert str(info.value) == "; ".join(problems)


def test_late_checks_are_reported_with_parse_problems(tmp_path: Path) -> None:
    long_dir = "/tmp/" + "r" * 90
    with pytest.raises(ConfigError) as info:
        load(["--executors", "0", "--runtime-dir", long_dir, "--hostname", "bad_host!"],
             environ={})
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 3, info.value.problems
    assert "--executors" in text and "--runtime-dir" in text and "--hostname" in text


def test_debug_forces_log_level() -> None:
    config = load(["--debug", "--log-level", "error"], environ={})
    assert config.debug is True
    assert config.log_level == "debug"
    assert load([], environ={"DEBUG": "true"}).log_level == "debug"
    assert load([], environ={"DEBUG": "0"}).debug is False
    with pytest.raises(ConfigError):
        load([], environ={"DEBUG": "perhaps"})


def test_runtime_dir_too_long_rejected() -> None:
    long_dir = "/tmp/" + "x" * 80
    with pytest.raises(ConfigError) as info:
        load(["--runtime-dir", long_dir], environ={})
    assert any("--runtime-dir" in p and "80" in p for p in info.value.problems)
    ok = "/tmp/" + "x" * 70
    assert load(["--runtime-dir", ok], environ={}).runtime_dir == ok


def test_metadata_store_must_be_a_url() -> None:
    with pytest.raises(ConfigError) as info:
        load(["--metadata-store", "/srv/meta"], environ={})
    assert any("--metadata-store" in p for p in info.value.problems)
    assert load(["--metadata-store", "file:///srv/meta"], environ={}).metadata_store == \
        "file:///srv/meta"


def test_json_round_trip(tmp_path: Path) -> None:
    config = load(["--python-dirs", str(tmp_path / "py"), "--executors", "2",
                   "--kill-grace", "250ms"], environ={}).with_instance("abc123")
    back = Config.from_json(config.to_json())
    assert back == config
    assert isinstance(back.python_dirs, tuple)
    assert back.instance == "abc123"
    assert back.kill_grace == 0.25


def test_every_option_is_a_flag_and_an_env_var() -> None:
    rows = config_module.options_table()
    assert len(rows) == len(config_module.OPTIONS)
    for flag, env, _default, _help in rows:
        names = env.split(", ")
        assert names[0] == "RUNNER_" + flag[2:].upper().replace("-", "_")
        assert names[1:] in ([], [config_module.GO_RUNNER_NAMES.get(flag[2:])])
    parser = config_module.build_parser()
    assert "RUNNER_QUEUE_ROOT, QUEUE_ROOT" in " ".join(parser.format_help().split())


def test_supervisor_exits_2_listing_every_problem(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in {n for o in config_module.OPTIONS for n in o.env_names}}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "runner.supervisor", "--executors", "0", "--kill-grace", "nope",
         "--queue-match", "("],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "--executors='0'" in proc.stderr
    assert "--kill-grace='nope'" in proc.stderr
    assert "--queue-match='('" in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was started or created


def test_resource_options_default_to_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.setattr(config_module, "machine_memory", lambda: 32 * 10**9)
    config = load([], environ={})
    assert (config.max_cores, config.max_mem, config.max_disk) == (6, 32 * 10**9, 0)
    assert config.cpu_only is False and config.gpu_share is False
    assert config.cgroups == "auto" and config.run_pids == 4096 and config.gpu_refresh == 30.0


def test_resource_options_parse_sizes_once() -> None:
    config = load(["--max-cores", "3", "--max-mem", "2gib", "--max-disk", "50gb", "--cpu-only",
                   "--gpu-share", "--cgroups", "off", "--run-pids", "64", "--gpu-refresh", "1m"],
                  environ={})
    assert (config.max_cores, config.max_mem, config.max_disk) == (3, 2 * 2**30, 50 * 10**9)
    assert config.cpu_only and config.gpu_share and config.cgroups == "off"
    assert config.run_pids == 64 and config.gpu_refresh == 60.0
    assert load([], environ={"CPU_ONLY": "yes", "RUNNER_GPU_SHARE": "1"}).cpu_only is True
    assert Config.from_json(config.to_json()) == config


def test_resource_options_are_validated_together() -> None:
    with pytest.raises(ConfigError) as info:
        load(["--max-cores", "0", "--max-mem", "lots", "--max-disk", "-1", "--cgroups", "v3",
              "--run-pids", "x"], environ={"RUNNER_GPU_SHARE": "maybe"})
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 6, info.value.problems
    for needle in ("--max-cores", "--max-mem", "--max-disk", "--cgroups", "--run-pids",
                   "$RUNNER_GPU_SHARE"):
        assert needle in text, needle


def test_cloud_queue_options_are_validated_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(["--sqs-certs", str(tmp_path / "missing"), "--aws-region", "mars",
                     "--sqs-endpoint", "ftp://x", "--sqs-visibility", "13h",
                     "--google-certs", str(tmp_path / "nope"),
                     "--pubsub-ack-deadline", "5s"], environ={})
    text = str(info.value)
    for flag in ("--sqs-certs", "--aws-region", "--sqs-endpoint", "--sqs-visibility",
                 "--google-certs", "--pubsub-ack-deadline"):
        assert flag in text, text


def test_cloud_queue_options_parse(tmp_path: Path) -> None:
    cfg = load(["--sqs-certs", str(tmp_path), "--aws-region", "eu-west-1",
                       "--sqs-endpoint", "http://127.0.0.1:5000", "--sqs-visibility", "2m",
                       "--google-certs", str(tmp_path), "--pubsub-ack-deadline", "30s"],
                      environ={})
    assert (cfg.sqs_certs, cfg.aws_region, cfg.sqs_endpoint) == \
        (str(tmp_path), "eu-west-1", "http://127.0.0.1:5000")
    assert (cfg.sqs_visibility, cfg.google_certs, cfg.pubsub_ack_deadline) == \
        (120.0, str(tmp_path), 30.0)
    assert Config.from_json(cfg.to_json()) == cfg


# -- environment names, LOGXI, typos, units --------------------------------------------------

def test_unprefixed_names_of_other_tools_do_not_change_the_runner(tmp_path: Path) -> None:
    environ = {"HOSTNAME": "not a host!", "LOG_LEVEL": "error", "EXECUTORS": "7",
               "DEBUG_LEVEL": "x", "RUNTIME_DIR": str(tmp_path / "other-tool")}
    resolved = config_module.resolve({}, environ)
    assert resolved.config.hostname == "testhost"  # this host's, not $HOSTNAME's
    assert resolved.config.log_level == "info"
    assert resolved.config.executors != 7
    assert resolved.config.runtime_dir != str(tmp_path / "other-tool")
    assert resolved.from_environment() == []


def test_go_runner_names_still_work_and_the_prefixed_name_wins(tmp_path: Path) -> None:
    environ = {"CACHE_DIR": str(tmp_path / "go"), "WORKING_DIR": str(tmp_path / "w"),
               "DEBUG": "true", "AMQP_URL": "amqp://u:p@rabbit:5672/%2F",
               "RUNNER_WORKING_DIR": str(tmp_path / "runner")}
    resolved = config_module.resolve({}, environ)
    assert resolved.config.cache_dir == str(tmp_path / "go")
    assert resolved.config.working_dir == str(tmp_path / "runner")
    assert resolved.config.debug is True and resolved.config.amqp_url.startswith("amqp://")
    assert resolved.from_environment() == [
        "--amqp-url from $AMQP_URL", "--working-dir from $RUNNER_WORKING_DIR",
        "--cache-dir from $CACHE_DIR", "--debug from $DEBUG"]
    assert "p@" not in " ".join(resolved.from_environment())  # names only, never values


def test_sources_name_flags_options_file_and_defaults(tmp_path: Path) -> None:
    options = tmp_path / "runner.env"
    options.write_text("RUNNER_EXECUTORS=3\n")
    resolved = config_module.resolve({"kill_grace": "2s", "options_file": str(options)},
                                     {"MAX_ATTEMPTS": "4"})
    assert resolved.sources["kill_grace"] == "--kill-grace"
    assert resolved.sources["executors"] == "options file $RUNNER_EXECUTORS"
    assert resolved.sources["max_attempts"] == "$MAX_ATTEMPTS"
    assert resolved.sources["queue_match"] == "default"
    assert resolved.from_environment() == ["--executors from options file $RUNNER_EXECUTORS",
                                           "--max-attempts from $MAX_ATTEMPTS"]


@pytest.mark.parametrize("logxi, level", [("*=DBG", "debug"), ("*=INF", "info"),
                                          ("*=WRN,runner=DBG", "warning"), ("*=ERR", "error"),
                                          ("runner=TRC", "debug")])
def test_logxi_maps_to_the_log_level_with_one_note(logxi: str, level: str) -> None:
    resolved = config_module.resolve({}, {"LOGXI": logxi, "LOGXI_FORMAT": "happy,maxcol=1024"})
    assert resolved.config.log_level == level
    assert resolved.config.log_format == "text"
    assert resolved.sources["log_level"] == "$LOGXI"
    assert len(resolved.notes) == 2
    assert "LOGXI" in resolved.notes[0] and f"--log-level {level}" in resolved.notes[0]
    assert "RUNNER_LOG_LEVEL" in resolved.notes[0]


def test_logxi_without_an_equivalent_is_ignored_with_a_note() -> None:
    resolved = config_module.resolve({}, {"LOGXI": "*=OFF", "LOGXI_FORMAT": "fancy"})
    assert resolved.config.log_level == "info" and resolved.config.log_format == "text"
    assert len(resolved.notes) == 2 and all("no equivalent" in n for n in resolved.notes)


def test_logxi_loses_to_the_runners_own_option() -> None:
    resolved = config_module.resolve({}, {"LOGXI": "*=DBG", "LOGXI_FORMAT": "JSON",
                                          "RUNNER_LOG_LEVEL": "warning"})
    assert resolved.config.log_level == "warning"
    assert resolved.config.log_format == "json"


@pytest.mark.parametrize("option", ["drain_timeout", "kill_grace", "storage_retry",
                                    "limit_idle_duration", "sqs_visibility"])
def test_durations_of_options_need_a_unit(option: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_module.from_values({option: "5"}, {})
    assert "needs a unit: 5s, 5m or 5h" in info.value.problems[0]
    assert getattr(config_module.from_values({option: "30s"}, {}), option) == 30.0


def test_a_bare_zero_duration_is_fine_and_help_says_units_are_needed() -> None:
    assert config_module.from_values({"limit_idle_duration": "0"}, {}).limit_idle_duration == 0
    text = " ".join(config_module.build_parser().format_help().split())
    assert "Durations need a unit" in text


def test_a_typoed_flag_gets_a_suggestion_not_the_usage_block() -> None:
    proc = subprocess.run([sys.executable, "-m", "runner.supervisor", "--exectors", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "did you mean --executors?" in proc.stderr
    assert len(proc.stderr.splitlines()) <= 3, proc.stderr
    assert "--queue-mismatch" not in proc.stderr  # no option list


@pytest.mark.parametrize("command, argv, meant", [
    ("runner.ctl", ["--jsn", "status"], "--json"),
    ("runner.ctl", ["stauts"], "status"),
    ("runner.supervisor", ["-executors", "2"], "--executors"),
    ("runner.submit", ["--queeu", "local_x", "folder", "train.py"], "--queue")])
def test_other_commands_suggest_too(command: str, argv: list, meant: str) -> None:
    proc = subprocess.run([sys.executable, "-m", command, *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"did you mean {meant}?" in proc.stderr


def test_experiments_never_see_option_variables_or_secrets() -> None:
    environ = {"AMQP_URL": "amqp://u:${RMQ_PASS}@h:5672/", "RMQ_PASS": "pw", "SLACK_HOOK":
               "https://hooks.example.invalid/x", "QUEUE_MATCH": ".*", "DB_PASSWORD": "p",
               "GITHUB_TOKEN": "t", "MY_SECRET_THING": "s", "OPENAI_API_KEY": "k",
               "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_SESSION_TOKEN": "c",
               "GOOGLE_APPLICATION_CREDENTIALS": "/k.json", "PATH": "/usr/bin", "HOME": "/h",
               "AWS_REGION_HINT": "kept", "db_password": "lower case too"}
    config = load([], environ=environ)
    assert config.referenced_env == ("RMQ_PASS",)
    assert config.passed_environment(environ) == {"PATH": "/usr/bin", "HOME": "/h",
                                                  "AWS_REGION_HINT": "kept"}
    only = load(["--pass-env", "PATH,AWS_*", "--scrub-env", "AWS_SECRET*"], environ={})
    assert only.passed_environment(environ) == {
        "PATH": "/usr/bin", "AWS_ACCESS_KEY_ID": "a", "AWS_SESSION_TOKEN": "c",
        "AWS_REGION_HINT": "kept"}
    with pytest.raises(ConfigError) as exc:
        load(["--scrub-env", "GOOD,bad name"], environ={})
    assert "--scrub-env" in str(exc.value)


def test_file_store_roots_default_to_where_runner_submit_stores(tmp_path: Path) -> None:
    """``runner-submit``'s default ``--storage`` lies under the runner's default roots, so
    the README's examples run as written; the roots are real paths, and a ``file://``
    metadata store is the operator's own choice, so it is allowed too."""
    from runner.submit import build_parser

    config = load([], environ={})
    root = tmp_path / "data" / "studioml-runner"
    assert config.file_store_roots == (str(root / "storage"),)
    submit_default = build_parser().parse_args(["ws", "main.py"]).storage
    assert submit_default == (root / "storage").as_uri()
    assert config.file_roots() == (os.path.realpath(root / "storage"),)
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    config = load(["--file-store-roots", os.pathsep.join([str(tmp_path / "alias"), "/srv/s"]),
                   "--metadata-store", f"file://{tmp_path}/meta"], environ={})
    assert config.file_roots() == (str((tmp_path / "real").resolve()), "/srv/s",
                                   str((tmp_path / "meta").resolve()))
    assert load([], environ={"RUNNER_FILE_STORE_ROOTS": ""}).file_roots() == ()


def test_max_history_zero_means_no_limit_like_the_other_caps() -> None:
    assert load(["--max-history", "0"], environ={}).max_history == 0
    assert load(["--env-cache-size", "0"], environ={}).env_cache_size == 0
    with pytest.raises(ConfigError):
        load(["--max-history", "-1"], environ={})
