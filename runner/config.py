"""The runner's options: one table, read from flags and environment, validated at once.

Every option is a long flag and an environment variable ``RUNNER_`` + its name in upper
case with ``-`` turned into ``_`` (``--queue-root`` ↔ ``RUNNER_QUEUE_ROOT``).  The options
the go runner (studio-go-runner) also has keep its unprefixed name as a second, older
name (``--cache-dir`` ↔ ``CACHE_DIR``, see :data:`GO_RUNNER_NAMES`); the prefixed name
wins when both are set, and no other unprefixed name is read, so a shell that exports
``HOSTNAME`` or ``LOG_LEVEL`` for another tool does not change the runner.  The flag wins
over the variable, the variable over the default.  :func:`resolve` also says where each
value came from, so that the supervisor logs at start-up which options the environment
set.  The go runner's ``LOGXI``/``LOGXI_FORMAT`` variables are mapped to ``--log-level``/
``--log-format`` where they have an equivalent (:func:`logxi_options`), with one warning.
:func:`load` collects every problem and raises one :class:`~runner.errors.ConfigError`
listing them all.

Durations given to options need a unit (``90s``, ``20m``, ``1h30m``; ``0`` alone is
allowed): a bare ``5`` could mean seconds or minutes, and the go runner's options (Go
durations) never took one either.

Inside the program sizes are bytes and durations are seconds (see :mod:`runner.units`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable, NoReturn

from . import _fast, proctree
from .errors import ConfigError
from .redact import safe_url
from .resources import machine_memory
from .units import UnitError, parse_duration_with_unit, parse_size

DEFAULT_QUEUE_MATCH = r"^(rmq|sqs|local)_.*$"
ENV_PREFIX = "RUNNER_"

# Options the go runner (studio-go-runner) reads from the environment under its unprefixed
# names, and SPEC section 9's set; these names keep working beside ``RUNNER_*``.
# ``AWS_REGION`` is the AWS SDKs' own variable, read on purpose.
GO_RUNNER_NAMES = {name: name.upper().replace("-", "_") for name in (
    "queue-match", "queue-mismatch", "amqp-url", "amqp-mgt-url", "sqs-certs", "google-certs",
    "queue-root", "working-dir", "cache-dir", "cache-size", "cpu-only", "max-cores", "max-mem",
    "max-disk", "max-attempts", "prom-address", "slack-hook", "slack-room", "limit-tasks",
    "limit-idle-duration", "debug", "aws-region")}


def default_data_root() -> Path:
    """Where the embedded default keeps queues, work, cache and environments."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "studioml-runner"


def default_runtime_dir() -> Path:
    """Where the supervisor's sockets live; short, because ipc paths are limited to ~100 bytes."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and len(base) < 60:
        return Path(base) / "studioml-runner"
    return Path(f"/tmp/studioml-runner-{os.getuid()}")


@dataclass(frozen=True)
class Option:
    """One option: its flag name, parser, default (text, parsed like user input) and help."""

    name: str
    parse: Callable[[str], Any]
    default: str | None
    help: str
    flag_only_bool: bool = False

    @property
    def env(self) -> str:
        """The environment variable (the primary name): ``RUNNER_QUEUE_ROOT``."""
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def legacy_env(self) -> str | None:
        """The go runner's (older, unprefixed) variable for this option, or None."""
        return GO_RUNNER_NAMES.get(self.name)

    @property
    def env_names(self) -> tuple[str, ...]:
        """Variables read for this option, the one that wins first."""
        return (self.env,) + ((self.legacy_env,) if self.legacy_env else ())

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")


def _regex(text: str) -> str:
    if text:
        re.compile(text)
    return text


def _path(text: str) -> str:
    if not text:
        raise ValueError("a path is required")
    return str(Path(text).expanduser().absolute())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _duration(text: str) -> float:
    """A duration with its unit (``90s``, ``20m``); a bare number other than 0 is refused."""
    return parse_duration_with_unit(text)


def _size(text: str) -> int:
    return parse_size(text)


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value < 1:
        raise ValueError("must be more than 0 bytes")
    return value


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text
    return parse


def _name_patterns(text: str) -> tuple:
    """Comma-separated shell-style patterns of environment variable names (``*_TOKEN``)."""
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    for pattern in patterns:
        if not re.fullmatch(r"[A-Za-z0-9_*?\[\]!]+", pattern):
            raise ValueError(f"{pattern!r} is not a variable name pattern (letters, digits, _, "
                             "* ? [ ])")
    return patterns


DEFAULT_SCRUB_ENV = ("*_PASSWORD,*_PASSWD,*_SECRET*,*_TOKEN,*_API_KEY,AWS_ACCESS_KEY_ID,"
                     "AWS_SECRET_ACCESS_KEY,AWS_SESSION_TOKEN,AWS_SECURITY_TOKEN,"
                     "GOOGLE_APPLICATION_CREDENTIALS,CLOUDSDK_AUTH_ACCESS_TOKEN")


def _path_list(text: str) -> tuple:
    return tuple(str(Path(p).expanduser().absolute()) for p in text.split(os.pathsep) if p)


def _optional_existing(is_there: Callable[[Path], bool], error: str) -> Callable[[str], str]:
    """A parser of an existing path (made absolute) that passes ``is_there``; empty: not used."""
    def parse(text: str) -> str:
        if not text:
            return ""
        path = Path(text).expanduser().absolute()
        if not is_there(path):
            raise ValueError(error)
        return str(path)
    return parse


_optional_file = _optional_existing(Path.is_file, "no such file")
_optional_dir = _optional_existing(Path.is_dir, "not an existing directory")


def _optional_url(text: str) -> str:
    if text and "://" not in text:
        raise ValueError("expected a URL such as file:///srv/studioml")
    return text


def _optional_http_url(text: str) -> str:
    if text and not re.match(r"^https?://[^/\s]+", text):
        raise ValueError("expected an http(s):// URL")
    return text


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 (no limit) or more")
    return value


def _address(text: str) -> str:
    """``host:port`` (``:port`` = every interface); empty = off.  Port 0 picks a free one."""
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected HOST:PORT or :PORT")
    return f"{host.strip('[]')}:{int(port)}"


def _optional_path(text: str) -> str:
    return str(Path(text).expanduser().absolute()) if text else ""




def _aws_region(text: str) -> str:
    if text and not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d+", text):
        raise ValueError("expected an AWS region such as us-east-1")
    return text


def _sqs_visibility(text: str) -> float:
    value = _duration(text)
    if not 1 <= value <= 12 * 3600:
        raise ValueError("must be between 1s and 12h (SQS's limit)")
    return value


def _ack_deadline(text: str) -> float:
    value = _duration(text)
    if not 10 <= value <= 600:
        raise ValueError("must be between 10s and 600s (Pub/Sub's limits)")
    return value


# Options a running supervisor can change on SIGHUP / ``runner-ctl reload``; the rest need a
# restart.  The reloadable ones reach the roles in a ``Reload`` message.
RELOADABLE = ("queue_match", "queue_mismatch", "limit_tasks", "limit_idle_duration",
              "drain_timeout", "log_level", "slack_hook", "slack_room", "slack_completed",
              "slack_timeout")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_vars(text: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """``text`` with every ``${NAME}`` replaced from ``environ``; also the names missing."""
    missing: list[str] = []

    def one(match: re.Match) -> str:
        name = match.group(1)
        if name not in environ:
            missing.append(name)
            return ""
        return environ[name]
    return _VAR_RE.sub(one, text), missing


def _amqp_url(text: str) -> str:
    """An AMQP URL (``amqp://user:password@host:port/vhost``); empty: no RabbitMQ."""
    if not text:
        return ""
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError("expected amqp://user:password@host:port/vhost (or amqps://)")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    parts.port  # noqa: B018 - raises ValueError for a bad port
    return text


def _http_url(text: str) -> str:
    if not text:
        return ""
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected http(s)://host:port")
    parts.port  # noqa: B018
    return text


EXPANDED = ("amqp-url", "amqp-mgt-url")
"""Options whose ``${NAME}`` references are expanded from the environment before parsing."""


OPTIONS: tuple[Option, ...] = (
    Option("queue-match", _regex, DEFAULT_QUEUE_MATCH, "regex: queues served"),
    Option("queue-mismatch", _regex, "", "regex: queues never served (empty: none)"),
    Option("amqp-url", _amqp_url, "",
           "RabbitMQ broker for rmq_* queues, amqp://user:password@host:5672/vhost "
           "(${VAR} expanded from the environment; empty: no RabbitMQ)"),
    Option("amqp-mgt-url", _http_url, "",
           "RabbitMQ management API used to discover queues (default: http, same host, "
           "AMQP port + 10000, the AMQP URL's credentials)"),
    Option("sqs-certs", _optional_dir, "",
           "directory with one sub-directory per AWS account (credentials file + config "
           "file with region=) for sqs_* queues; rescanned while running (empty: the default "
           "AWS credential chain when --aws-region or --sqs-endpoint is set)"),
    Option("aws-region", _aws_region, "", "AWS region for sqs_* queues without --sqs-certs"),
    Option("sqs-endpoint", _http_url, "",
           "SQS endpoint URL for private clouds and tests (empty: AWS's)"),
    Option("sqs-visibility", _sqs_visibility, "5m",
           "visibility timeout of a taken SQS message, extended every third of it while "
           "the experiment runs (1s..12h)"),
    Option("google-certs", _optional_dir, "",
           "directory of Google service-account files, each naming a project whose Pub/Sub "
           "subscriptions are served (also: $GOOGLE_APPLICATION_CREDENTIALS); rescanned"),
    Option("encrypt-key-dir", _optional_dir, "",
           "directory with the runner's RSA private key (ssh-privatekey, PEM or OpenSSH) for "
           "encrypted request envelopes; rescanned while running (empty: envelopes are "
           "dead-lettered)"),
    Option("encrypt-passphrase-dir", _optional_dir, "",
           "directory with the private key's passphrase (ssh-passphrase; default: "
           "--encrypt-key-dir)"),
    Option("signing-keys-dir", _optional_dir, "",
           "directory of ed25519 public keys (OpenSSH lines), one file per queue-name prefix, "
           "that envelopes must be signed with; rescanned while running"),
    Option("pubsub-ack-deadline", _ack_deadline, "60s",
           "ack deadline a taken Pub/Sub message is held with, extended every third of it "
           "while the experiment runs (10s..600s)"),
    Option("queue-root", _path, None, "directory of local_* queues (default: DATA_ROOT/queues)"),
    Option("working-dir", _path, None, "per-attempt working directories (default: DATA_ROOT/work)"),
    Option("cache-dir", _path, None, "environment store and caches (default: DATA_ROOT/cache)"),
    Option("cache-size", _size, "10GiB",
           "artifact cache size (10GiB, 500mb, bytes); entries in use are never evicted"),
    Option("env-cache-size", _size, "20GiB",
           "environment store size (du-like: hard links counted once); past it the least "
           "recently used environments are removed, never one in use (0: no limit)"),
    Option("s3-ca", _optional_file, "", "CA bundle (PEM) to verify non-AWS S3 hosts; turns on https"),
    Option("s3-cert", _optional_file, "", "client certificate (PEM) for non-AWS S3 hosts; turns on https"),
    Option("s3-key", _optional_file, "", "private key (PEM) of --s3-cert"),
    Option("file-store-roots", _path_list, None,
           "folders (os.pathsep list) that requests' file:// artifacts must lie under, "
           "judged on real paths; any other file:// URL is a bad request (default: "
           "DATA_ROOT/storage, where runner-submit stores by default)"),
    Option("storage-retry", _duration, "5m",
           "how long an upload keeps retrying transient storage errors before the attempt "
           "is handed back"),
    Option("runtime-dir", _path, None, "supervisor sockets and lock (default: /tmp/studioml-runner-UID)"),
    Option("executors", _positive_int, None, "experiments run at once (default: CPU cores)"),
    Option("max-attempts", _positive_int, "3", "attempts of a failing experiment before it ends failed"),
    Option("max-requeues", _positive_int, "10",
           "hand-backs for the host's faults (storage down, cache full) before a request "
           "ends failed; each waits longer (2 s doubling to 5 min)"),
    Option("hostname", str, None, "host name in attempt ids and metadata (default: this host's)"),
    Option("min-save-interval", _duration, "10s",
           "lower clamp of an experiment's saveWorkspaceFrequency"),
    Option("max-history", _size, "64MiB",
           "most bytes of one attempt's metric history (_metadata/metrics-host-*.jsonl); "
           "JSON lines past it are left out and a truncated line says so; 0: no limit"),
    Option("kill-grace", _duration, "10s", "time between SIGTERM and SIGKILL when stopping a run"),
    Option("shutdown-timeout", _duration, "60s",
           "on SIGTERM, how long to wait for running work to be handed back"),
    Option("python-dirs", _path_list, "", "extra directories searched for pythonX.Y (os.pathsep list)"),
    Option("installer", _choice("auto", "uv", "pip"), "auto", "virtualenv builder: uv when installed, else pip"),
    Option("pass-env", _name_patterns, "*",
           "comma-separated patterns of the runner's environment variables an experiment "
           "may see (an allow-list; --scrub-env and the runner's own option variables are "
           "taken out of it)"),
    Option("scrub-env", _name_patterns, DEFAULT_SCRUB_ENV,
           "comma-separated patterns of environment variables never passed to experiments, "
           "besides the runner's option variables and the variables their ${VAR} references "
           "name (a request's config.env may still set them)"),
    Option("metadata-store", _optional_url, "",
           "URL of the metadata store (default: metadata/ in each request's storage)"),
    Option("drain-timeout", _duration, "10m",
           "on SIGTERM or runner-ctl drain, how long running experiments may go on before "
           "they are handed back"),
    Option("limit-tasks", _count, "0",
           "exit (draining) after this many experiment attempts; 0: no limit"),
    Option("limit-idle-duration", _duration, "0s",
           "exit (draining) after being idle this long; 0s: never"),
    Option("prom-address", _address, "",
           "HOST:PORT for Prometheus /metrics and /healthz (empty: off; port 0: any free port)"),
    Option("slack-hook", _optional_http_url, "", "Slack incoming-webhook URL (empty: no notices)"),
    Option("slack-room", str, "", "Slack channel for notices (default: the hook's own)"),
    Option("slack-timeout", _duration, "5s", "how long one Slack post may take (it never "
           "holds up an experiment either way)"),
    Option("slack-completed", _bool, "false", "also post a Slack notice when an experiment "
           "completes", flag_only_bool=True),
    Option("options-file", _optional_path, "",
           "file of NAME=VALUE lines (systemd EnvironmentFile syntax) read at start and again "
           "on SIGHUP; flags win over it, it wins over the environment"),
    Option("log-format", _choice("text", "json"), "text", "log lines: text or JSON lines"),
    Option("max-cores", _positive_int, None, "CPUs given out to experiments (default: CPU cores)"),
    Option("max-mem", _positive_size, None, "RAM given out to experiments (default: the machine's)"),
    Option("max-disk", _size, "0",
           "free space to keep on the working directory's file system (hdd is reserved above it)"),
    Option("cpu-only", _bool, "false", "refuse GPU work (such requests go back for another runner)",
           flag_only_bool=True),
    Option("gpu-share", _bool, "false",
           "let experiments share a GPU while their gpuMem fits it (default: whole devices)",
           flag_only_bool=True),
    Option("gpu-refresh", _duration, "30s", "how often NVML is asked again (free memory, ECC)"),
    Option("cgroups", _choice("auto", "off"), "auto",
           "enforce cpus/ram/process limits with a cgroup per run where writable; off: account only"),
    Option("run-pids", _positive_int, "4096", "most processes and threads one run may have (cgroup)"),
    Option("spare-launcher", _choice("on", "off"), "on",
           "keep one run launcher started ahead of need, so that a run starts without an "
           "interpreter start; off: each run starts its own launcher"),
    Option("sandbox", _choice("auto", "bwrap", "off"), "auto",
           "python-mode runs in a bubblewrap sandbox (read-only host, private /tmp and PIDs, "
           "runner folders hidden); auto: when bwrap is installed and works"),
    Option("sandbox-network", _choice("on", "off"), "on",
           "network inside the sandbox and the OCI runtime; off: loopback only"),
    Option("container-runtime", _choice("auto", "apptainer", "singularity", "bwrap"), "auto",
           "runs container-mode requests (_singularity, config.image); auto: apptainer, "
           "singularity, then bwrap (skopeo+umoci+bubblewrap), whichever is installed"),
    Option("log-level", _choice("debug", "info", "warning", "error"), "info", "log level"),
    Option("debug", _bool, "false", "debug logging and keep working directories", flag_only_bool=True),
)


@dataclass(frozen=True)
class Config:
    """Validated options; paths are absolute strings, durations seconds, sizes bytes."""

    queue_match: str
    queue_mismatch: str
    amqp_url: str
    amqp_mgt_url: str
    queue_root: str
    working_dir: str
    cache_dir: str
    cache_size: int
    s3_ca: str
    s3_cert: str
    s3_key: str
    storage_retry: float
    runtime_dir: str
    executors: int
    max_attempts: int
    max_requeues: int
    hostname: str
    min_save_interval: float
    kill_grace: float
    shutdown_timeout: float
    python_dirs: tuple
    installer: str
    metadata_store: str
    max_cores: int
    max_mem: int
    max_disk: int
    cpu_only: bool
    gpu_share: bool
    gpu_refresh: float
    cgroups: str
    run_pids: int
    log_level: str
    debug: bool
    drain_timeout: float = 600.0
    limit_tasks: int = 0
    limit_idle_duration: float = 0.0
    prom_address: str = ""
    slack_hook: str = ""
    slack_room: str = ""
    slack_completed: bool = False
    slack_timeout: float = 5.0
    options_file: str = ""
    log_format: str = "text"
    instance: str = ""
    sqs_certs: str = ""
    aws_region: str = ""
    sqs_endpoint: str = ""
    sqs_visibility: float = 300.0
    google_certs: str = ""
    pubsub_ack_deadline: float = 60.0
    encrypt_key_dir: str = ""
    encrypt_passphrase_dir: str = ""
    signing_keys_dir: str = ""
    sandbox: str = "auto"
    sandbox_network: str = "on"
    container_runtime: str = "auto"
    spare_launcher: str = "on"
    env_cache_size: int = 20 * 2**30
    pass_env: tuple = ("*",)
    scrub_env: tuple = _name_patterns(DEFAULT_SCRUB_ENV)
    referenced_env: tuple = ()  # variables named by ${VAR} in the EXPANDED options
    max_history: int = 64 * 1024 * 1024
    file_store_roots: tuple = ()

    def file_roots(self) -> tuple:
        """The real folders ``file://`` objects may lie under: ``--file-store-roots`` and the
        folder of a ``file://`` ``--metadata-store`` (the operator's own choice)."""
        from .storage.file import file_url_to_path, real_roots

        roots = list(self.file_store_roots)
        if self.metadata_store.startswith("file://"):
            roots.append(file_url_to_path(self.metadata_store))
        return real_roots(roots)

    @property
    def env_dir(self) -> str:
        """The environment (virtualenv) store, kept across restarts."""
        return os.path.join(self.cache_dir, "envs")

    @property
    def artifact_cache_dir(self) -> str:
        """The artifact cache (objects/, tmp/), owned by the cache manager."""
        return os.path.join(self.cache_dir, "artifacts")

    def passed_environment(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The variables of ``environ`` an experiment may see: those ``pass_env`` names, less
        the runner's option variables, the variables the ``${VAR}`` references of its options
        name, and those ``scrub_env`` names (patterns match names in any case)."""
        kept_out = ({name for option in OPTIONS for name in option.env_names}
                    | set(self.referenced_env))
        allowed = [p.upper() for p in self.pass_env]
        scrubbed = [p.upper() for p in self.scrub_env]
        passed = {}
        for name, value in environ.items():
            upper = name.upper()
            if (upper in kept_out or not any(fnmatchcase(upper, p) for p in allowed)
                    or any(fnmatchcase(upper, p) for p in scrubbed)):
                continue
            passed[name] = value
        return passed

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        data = json.loads(text)
        for name in ("python_dirs", "pass_env", "scrub_env", "referenced_env",
                     "file_store_roots"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)

    def with_instance(self, instance: str) -> Config:
        return dataclasses.replace(self, instance=instance)

    def supervisor_instance(self, pid: int, started: float) -> Config:
        """This config for the supervisor ``pid`` started at ``started`` (epoch seconds):
        its instance is ``<hostname>-<pid>-<base62 start>`` (see :func:`instance_gone`)."""
        return self.with_instance(f"{self.hostname}-{pid}-{_fast.b62encode(int(started))}")

    def reloadable(self) -> dict:
        """The options a running supervisor may change (see :data:`RELOADABLE`)."""
        return {name: getattr(self, name) for name in RELOADABLE}

    def with_reloaded(self, values: Mapping[str, Any]) -> Config:
        """This config with the reloadable options in ``values`` replaced (others ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if k in RELOADABLE})


def env_value(name: str, default: str = "", environ: Mapping[str, str] | None = None) -> str:
    """The value the environment gives option ``name`` (``"queue-root"``): its
    ``RUNNER_*`` variable, else the go runner's name, else ``default``.  For the other
    commands (``runner-ctl``, ``runner-submit``) that share an option with the supervisor."""
    environ = os.environ if environ is None else environ
    option = next(o for o in OPTIONS if o.name == name)
    for variable in option.env_names:
        if variable in environ:
            return environ[variable]
    return default


class OptionParser(argparse.ArgumentParser):
    """An argparse parser whose errors are two lines, not the whole usage block.

    An unknown flag gets the closest known ones (``did you mean --executors?``); every
    error ends with where the full list is (``--help``).  Exit status 2, as argparse's.
    """

    def error(self, message: str) -> NoReturn:  # argparse's hook
        text = f"{self.prog}: error: {message}\n"
        text += "".join(f"{self.prog}: {hint}\n" for hint in self.hints(message))
        text += f"Run '{self.prog} --help' for every option.\n"
        self.exit(2, text)

    def hints(self, message: str) -> list[str]:
        """``did you mean`` lines for the unknown flags or the invalid choice in ``message``."""
        wanted: list[tuple[str, str, list[str]]] = []  # (as typed, looked up as, among)
        if "unrecognized arguments" in message:
            known = [s for action in self._actions for s in action.option_strings
                     if s.startswith("--")]
            for word in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", message.split(":", 1)[1]):
                flag = word.split("=", 1)[0]
                wanted.append((flag, flag if flag.startswith("--") else "-" + flag, known))
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            wanted.append((choice.group(1), choice.group(1),
                           re.findall(r"'([^']*)'", choice.group(2))))
        hints = []
        for typed, word, known in wanted:
            close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{typed}: did you mean {close[0]}?")
        return hints


def build_parser(prog: str = "runner-supervisor", description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with every option; values stay ``None`` unless given as flags."""
    parser = OptionParser(
        prog=prog, description=description,
        epilog=f"Every flag can also be set by its environment variable ({ENV_PREFIX}NAME; the "
               "go runner's unprefixed name where it has the option). Durations need a unit "
               "(90s, 20m, 1h30m; a bare 0 is allowed); sizes are bytes unless given one "
               "(500mb, 2GiB).")
    for option in OPTIONS:
        help_text = f"{option.help} [env {', '.join(option.env_names)}"
        help_text += f", default {option.default!r}]" if option.default not in (None, "") else "]"
        if option.flag_only_bool:
            parser.add_argument(f"--{option.name}", dest=option.attr, action="store_const",
                                const="true", default=None, help=help_text)
        else:
            parser.add_argument(f"--{option.name}", dest=option.attr, default=None, help=help_text)
    return parser


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         parser: argparse.ArgumentParser | None = None) -> Config:
    """Options from ``argv`` and ``environ`` (defaults: this process's), validated at once."""
    environ = os.environ if environ is None else environ
    parser = parser or build_parser()
    namespace = parser.parse_args(argv)
    return from_values(vars(namespace), environ)


def read_options_file(path: str) -> dict[str, str]:
    """The values of :func:`parse_options_file`; raises :class:`ConfigError` listing every
    malformed line, OSError when the file cannot be read."""
    values, problems = parse_options_file(path)
    if problems:
        raise ConfigError(problems)
    return values


def parse_options_file(path: str) -> tuple[dict[str, str], list[str]]:
    """(values, problems) of the ``NAME=VALUE`` lines of a systemd ``EnvironmentFile``:
    ``#``/``;`` comments, blank lines, optional ``export``, values optionally in single
    or double quotes.  ``problems`` has one ``path:N: expected NAME=VALUE`` per malformed
    line; the other lines are read all the same.  Raises OSError when the file cannot
    be read.  Names are not checked here (:func:`unknown_names` does).
    """
    values: dict[str, str] = {}
    problems: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("export "):
                line = line[len("export "):].lstrip()
            name, sep, value = line.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                problems.append(f"{path}:{number}: expected NAME=VALUE")
                continue
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[name] = value
    return values, problems


#: Variables the runner reads besides its options' names (the go runner's logging ones).
OTHER_KNOWN_NAMES = ("LOGXI", "LOGXI_FORMAT")


def unknown_names(names: Sequence[str], referenced: Sequence[str] = ()) -> list[str]:
    """One line per ``RUNNER_*`` name in ``names`` that no option has, with the closest
    known name: ``$RUNNER_EXECTUORS is not an option of runner-supervisor: did you mean
    RUNNER_EXECUTORS?``.  Other names, and ``referenced`` ones (named by a ``${VAR}`` in
    an option's value), are left alone: the environment holds everything else too.
    """
    known = {n for option in OPTIONS for n in option.env_names} | set(OTHER_KNOWN_NAMES)
    lines = []
    for name in sorted(names):
        if name in known or name in referenced:
            continue
        if not name.startswith(ENV_PREFIX):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        lines.append(f"${name} is not an option of runner-supervisor"
                     + (f": did you mean {close[0]}?" if close else ""))
    return lines


_LOGXI_LEVELS = {"all": "debug", "trc": "debug", "dbg": "debug", "inf": "info",
                 "wrn": "warning", "err": "error", "ftl": "error"}


def _logxi_level(text: str) -> str | None:
    entries = dict(part.strip().partition("=")[::2] for part in text.split(",") if part.strip())
    level = entries.get("*") or (next(iter(entries.values())) if len(entries) == 1 else "")
    return _LOGXI_LEVELS.get(level.strip().lower()[:3]) if level else None


def _logxi_format(text: str) -> str | None:
    return {"json": "json", "text": "text", "happy": "text"}.get(text.split(",")[0].strip().lower())


def logxi_options(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The go runner's ``LOGXI``/``LOGXI_FORMAT`` as ``{"log-level"/"log-format": value}``,
    and one note per variable for the start-up log (what it was read as, or why not).

    ``LOGXI`` is ``name=LEVEL`` pairs (``*=DBG``, ``*=WRN,runner=DBG``): the ``*`` entry
    (else the only entry) gives the level; ``DBG``/``TRC``/``ALL`` → debug, ``INF`` → info,
    ``WRN`` → warning, ``ERR``/``FTL`` → error; ``OFF`` has no equivalent.  ``LOGXI_FORMAT``
    ``JSON`` → json, ``text``/``happy`` (with ``,maxcol=…`` and such) → text.
    """
    values: dict[str, str] = {}
    notes: list[str] = []
    for variable, option, mapped, choices in (
            ("LOGXI", "log-level", _logxi_level, "debug, info, warning or error"),
            ("LOGXI_FORMAT", "log-format", _logxi_format, "text or json")):
        text = environ.get(variable, "").strip()
        if not text:
            continue
        value = mapped(text)
        own = ENV_PREFIX + option.upper().replace("-", "_")
        if value:
            values[option] = value
            notes.append(f"${variable}={text!r} is the go runner's variable: read as "
                         f"--{option} {value} (set {own} instead)")
        else:
            notes.append(f"${variable}={text!r} is the go runner's variable and has no "
                         f"equivalent here: ignored (set {own} to {choices})")
    return values, notes


@dataclass(frozen=True)
class Resolved:
    """A validated :class:`Config`, where each option's value came from, and notes.

    ``sources`` maps an option's attribute name to ``--flag``, ``$NAME``,
    ``options file $NAME``, ``$LOGXI`` or ``default``; ``notes`` are warnings for the
    start-up log (the go runner's variables read or ignored).
    """

    config: Config
    sources: dict
    notes: tuple

    def from_environment(self) -> list[str]:
        """``--option from $NAME`` for every option the environment (or options file) set."""
        return [f"--{option.name} from {self.sources[option.attr]}" for option in OPTIONS
                if self.sources.get(option.attr, "default") != "default"
                and not self.sources[option.attr].startswith("--")]


def from_values(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """Build a Config from flag values (None = not given) and an environment.

    With ``--options-file`` (or ``$RUNNER_OPTIONS_FILE``), the file's values stand between
    the flags and the environment.  Raises :class:`ConfigError` listing every problem.
    """
    return resolve(flags, environ).config


def _lookup(option: Option, *layers: tuple[str, Mapping[str, str]]) -> tuple[str | None, str]:
    """(raw value, source) of ``option`` from the first layer that sets one of its names."""
    for where, values in layers:
        for name in option.env_names:
            if name in values:
                return values[name], f"{where}${name}"
    return None, "default"


def resolve(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Resolved:
    """Like :func:`from_values`, also saying where each value came from (:class:`Resolved`)."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    file_values: dict[str, str] = {}
    referenced: list[str] = []
    options_file = next(o for o in OPTIONS if o.name == "options-file")
    file_name = flags.get("options_file") or _lookup(options_file, ("", environ))[0] or ""
    if file_name:
        try:
            file_values, malformed = parse_options_file(_optional_path(file_name))
            problems.extend(f"--options-file {line}" for line in malformed)
        except (OSError, ValueError) as exc:
            problems.append(f"--options-file={file_name!r}: {exc}")
    logxi, notes = logxi_options({**environ, **file_values})
    # A RUNNER_* name no option has is a typo, as an unknown flag is (other names in the
    # file are the process's environment under systemd's EnvironmentFile, and are fine),
    # unless a ${VAR} in an option's value names it.
    named = _VAR_RE.findall(" ".join(str(v) for v in (*flags.values(), *file_values.values(),
                                                       *environ.values())))
    problems.extend(f"--options-file {file_name}: {line}" for line in
                    unknown_names(list(file_values), referenced=named))
    notes = list(notes) + [f"{line} (set in the environment: ignored)" for line in
                           unknown_names([n for n in environ if n not in file_values],
                                         referenced=named)]
    for option in OPTIONS:
        raw = flags.get(option.attr)
        source = f"--{option.name}"
        if raw is None:
            raw, source = _lookup(option, ("options file ", file_values), ("", environ))
        if raw is None and option.name in logxi:
            raw, source = logxi[option.name], ("$LOGXI_FORMAT" if option.name == "log-format"
                                               else "$LOGXI")
        if raw is None:
            raw, source = option.default, "default"
        sources[option.attr] = source
        if raw is None:
            values[option.attr] = None
            continue
        if option.name in EXPANDED:
            referenced.extend(_VAR_RE.findall(str(raw)))
            raw, missing = expand_vars(str(raw), {**environ, **file_values})
            if missing:
                problems.append(f"{source}: ${{{'}, ${'.join(missing)}}} not set in the "
                                "environment")
                continue
        try:
            values[option.attr] = option.parse(raw)
        except (ValueError, UnitError, re.error) as exc:
            shown = safe_url(str(raw)) if option.name in EXPANDED else raw
            problems.append(f"{source}={shown!r}: {exc}")
    # Keep going after parse problems so that the checks below are reported with them.
    root = default_data_root()
    values["queue_root"] = values.get("queue_root") or str(root / "queues")
    values["working_dir"] = values.get("working_dir") or str(root / "work")
    values["cache_dir"] = values.get("cache_dir") or str(root / "cache")
    if values.get("file_store_roots") is None:
        values["file_store_roots"] = (str(root / "storage"),)
    values["runtime_dir"] = values.get("runtime_dir") or str(default_runtime_dir())
    values["executors"] = values.get("executors") or max(1, os.cpu_count() or 1)
    values["hostname"] = values.get("hostname") or socket.gethostname()
    values["max_cores"] = values.get("max_cores") or max(1, os.cpu_count() or 1)
    if values.get("max_mem") is None:
        values["max_mem"] = machine_memory()  # the machine's figure (0 when unknown)
    values["referenced_env"] = tuple(sorted(set(referenced)))
    if values.get("debug"):
        values["log_level"] = "debug"
    if len(values["runtime_dir"]) > 80:
        problems.append(f"--runtime-dir={values['runtime_dir']!r}: longer than 80 characters "
                        "(socket paths are limited to about 100 bytes)")
    if values.get("s3_key") and not values.get("s3_cert"):
        problems.append("--s3-key: given without --s3-cert")
    if not re.fullmatch(r"[A-Za-z0-9.\-]+", values["hostname"]):
        problems.append(f"--hostname={values['hostname']!r}: use letters, digits, '.' and '-' only")
    if problems:
        raise ConfigError(problems)
    return Resolved(Config(**values), sources, tuple(notes))


def options_table() -> list[tuple[str, str, str, str]]:
    """(flag, env, default, help) rows, for the README and ``--help``; env lists every name."""
    return [(f"--{o.name}", ", ".join(o.env_names), o.default or "", o.help) for o in OPTIONS]


def instance_gone(instance: str, hostname: str) -> bool:
    """Whether the supervisor that named ``instance`` (:meth:`Config.supervisor_instance`)
    on the host ``hostname`` has stopped: its pid is gone, or is another process (started
    after the instance was, and no runner by its command line: a wall clock stepped forward
    since the start makes a live supervisor look younger than its instance).  False for
    another host's instance and for names of another form (not ours to judge)."""
    parts = instance.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != hostname or not parts[1].isdigit():
        return False
    try:
        started = _fast.b62decode(parts[2])
    except (ValueError, KeyError, TypeError):
        return False
    pid = int(parts[1])
    if proctree.has_stopped(pid):
        return True
    began = proctree.started_at(pid)
    if began is None or began <= started + 2:  # (ticks and btime round: a margin)
        return False
    return b"runner" not in proctree.command_line(pid)

