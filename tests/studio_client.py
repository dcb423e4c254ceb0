"""The real StudioML client (``studioml==0.0.49``, the last release on PyPI) for interop tests.

:func:`client_python` builds, once and cached under the test data directory
(``$RUNNER_TEST_DATA``, default ``tests/.data``), a virtualenv holding the client; a test
that cannot have it (the package cannot be installed) is skipped with the reason.
:class:`StudioClient` runs the client's own code in that virtualenv as a separate process
(``studio-run``, ``studio stop``, its database provider, its CompletionService).

The 0.0.49 release needs help that belongs to the test side only, never to the runner:

* ``urllib3<2`` and ``requests-toolbelt<1`` so that it imports at all;
* its CompletionService imports ``rsync_cp`` and ``parse_verbosity`` from ``studio.util``,
  which that release moved, and ``create_experiment`` from the stale ``studio.experiment``
  (the live one is ``studio.experiments.experiment`` and wants a dependency policy), and
  ``studio.logs.get_logger`` (moved to ``studio.util.logs``): :data:`SHIMS` puts them back;
* the task script it ships, ``completion_service_client.py``, fails on every worker of
  that release (stale imports of ``studio.model``/``studio.util`` names): the shims copy a
  working equivalent (:data:`TASK_SCRIPT`, standard library only) over it in each task's
  workspace as CompletionService assembles it.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest

from .support import REPO, Runner

CLIENT_VERSION = "0.0.49"
CLIENT_REQUIREMENTS = [f"studioml=={CLIENT_VERSION}", "urllib3<2", "requests-toolbelt<1"]
DATA_DIR = Path(os.environ.get("RUNNER_TEST_DATA") or REPO / "tests" / ".data")
INSTALL_TIMEOUT = 1800
# 0.0.49's RMQueue.enqueue publishes, then records the delivery its confirm callback (on
# the I/O loop's thread) removes: a confirm that comes first fails inside pika's loop, the
# client's connection drops and enqueue gives up (docs/studioml-client.md, known limits).
CLIENT_CONFIRM_RACE = "Stream connection lost: ValueError('list.remove(x): x not in list')"
CREDENTIALS = {"aws": {"access_key": "testing", "secret_access_key": "testing",
                       "region": "us-east-1"}}

# What CompletionService's task does on a worker, standard library only: the artifacts
# are folders beside the workspace (the runner's layout); ``clientscript`` and ``args``
# each hold one file; the pickled return value goes to ``retval/retval``.
TASK_SCRIPT = r'''
import importlib.util, os, pickle, sys

root = os.path.dirname(os.getcwd())
files = {}
for tag in os.listdir(root):
    path = os.path.join(root, tag)
    if tag in ("workspace", "modeldir", "tb", "_runner", "_metadata", "output", "retval",
               "_metrics") or not os.path.isdir(path):
        continue
    names = sorted(os.listdir(path))
    if names:
        files[tag] = os.path.join(path, names[0])
spec = importlib.util.spec_from_file_location("_clientscript", files["clientscript"])
module = importlib.util.module_from_spec(spec)
sys.path.insert(0, os.path.dirname(files["clientscript"]))
spec.loader.exec_module(module)
with open(files["args"], "rb") as handle:
    args = pickle.load(handle)
print("calling clientFunction", flush=True)
value = module.clientFunction(args, files)
os.makedirs(os.path.join(root, "retval"), exist_ok=True)
with open(os.path.join(root, "retval", "retval"), "wb") as handle:
    handle.write(pickle.dumps(value, protocol=2))
print("retval saved", flush=True)
'''

SHIMS = r'''
import os, shutil
import studio.util, studio.util.util, studio.extra_util

def rsync_cp(source, dest, ignore_arg="", logger=None):
    """The workspace copy CompletionService makes (no rsync binary needed), with the
    working task script copied over the release's broken one."""
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    task = os.environ.get("STUDIO_TEST_TASK_SCRIPT")
    if task and os.path.exists(os.path.join(dest, "completion_service_client.py")):
        shutil.copyfile(task, os.path.join(dest, "completion_service_client.py"))

studio.util.rsync_cp = rsync_cp
studio.util.parse_verbosity = studio.util.util.parse_verbosity

# ``studio.experiment`` of 0.0.49 is a stale copy that no longer imports; the live one is
# ``studio.experiments.experiment``, whose create_experiment wants a dependency policy.
import sys, types
import studio.experiments.experiment as _live
from studio.dependencies_policies.studio_dependencies_policy import StudioDependencyPolicy

def create_experiment(*args, dependency_policy=None, **kwargs):
    kwargs.setdefault("from_compl_service", True)
    return _live.create_experiment(
        *args, dependency_policy=dependency_policy or StudioDependencyPolicy(), **kwargs)

_shim = types.ModuleType("studio.experiment")
_shim.__dict__.update(_live.__dict__)
_shim.create_experiment = create_experiment
sys.modules["studio.experiment"] = _shim
studio.experiment = _shim

# ``studio.logs`` is stale as well: its logger factory moved to ``studio.util.logs``.
import studio.logs, studio.util.logs
studio.logs.get_logger = studio.util.logs.get_logger
'''


def _install(target: Path, requirements: list[str], check: str) -> str:
    """Build a virtualenv at ``target`` holding ``requirements`` whose interpreter runs
    ``check``; "" when done, else why it failed."""
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(target)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"cannot make a virtualenv with pip at {target}: {exc}"
    python = target / "bin" / "python"
    wanted = " ".join(requirements) if len(requirements) < 8 else f"{len(requirements)} packages"
    try:
        proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                               "--disable-pip-version-check", *requirements],
                              capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"pip install {wanted} took over {INSTALL_TIMEOUT}s"
    if proc.returncode != 0:
        return f"pip install {wanted} failed:\n{proc.stderr[-3000:]}"
    proc = subprocess.run([str(python), "-c", check], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        return f"{wanted} installed but `{check}` fails:\n{proc.stderr[-3000:]}"
    return ""


def cached_venv(name: str, requirements: list[str], check: str) -> Path:
    """The interpreter of the virtualenv ``DATA_DIR/name`` holding ``requirements`` (from
    the package index), built once (under a file lock) and kept; ``check`` is Python code
    that must run in it.  A test that cannot have it is skipped with the reason."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    target = DATA_DIR / name
    ready = target / ".ready"
    with open(DATA_DIR / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready.exists():
            why = _install(target, requirements, check)
            if why:
                pytest.skip(f"the virtualenv {name} cannot be built here: {why}")
            ready.write_text("\n".join(requirements) + "\n")
    return target / "bin" / "python"


def client_python() -> Path:
    """The client virtualenv's interpreter, built once and cached."""
    return cached_venv(f"studioml-{CLIENT_VERSION}", CLIENT_REQUIREMENTS,
                       "import studio.runner, nacl, Crypto")


class StudioClient:
    """The StudioML client with its own configuration and home, run as real processes.

    ``config`` is the client's configuration (written as its ``config.yaml``; JSON is
    YAML); ``home`` holds ``~/.studioml`` (the client's artifact cache).
    """

    def __init__(self, home: Path, config: dict):
        self.python = client_python()
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.config_path = home / "config.yaml"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.config = config
        (home / "studio_test_shims.py").write_text(SHIMS)
        (home / "task_script.py").write_text(TASK_SCRIPT)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("STUDIOML_", "VIRTUAL_ENV", "PYTHON"))}
        self.env.update(HOME=str(home), PYTHONPATH=str(home),
                        STUDIO_TEST_TASK_SCRIPT=str(home / "task_script.py"),
                        PATH=f"{self.python.parent}{os.pathsep}{os.environ.get('PATH', '')}")

    def python_code(self, code: str, *, cwd: Path | None = None, timeout: float = 600,
                    check: bool = True) -> subprocess.CompletedProcess:
        """Run ``code`` with the client's interpreter (the shims imported first)."""
        script = "import studio_test_shims\n" + textwrap.dedent(code)
        proc = subprocess.run([str(self.python), "-c", script], cwd=cwd or self.home,
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"client code failed ({proc.returncode}):\n{proc.stdout}\n"
                                 f"{proc.stderr}")
        return proc

    def run(self, workspace: Path, script: str, *args: str, queue: str, key: str,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """``studio-run --config … --queue QUEUE -e KEY SCRIPT ARGS`` in ``workspace``."""
        argv = [str(self.python.parent / "studio-run"), "--config", str(self.config_path),
                "--queue", queue, "--experiment", key, "--verbose", "debug", "--force-git",
                script, *args]
        proc = subprocess.run(argv, cwd=workspace, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"studio-run failed ({proc.returncode}):\n{proc.stdout}\n"
                                 f"{proc.stderr}")
        return proc

    def experiment(self, key: str) -> dict | None:
        """The experiment as the client sees it (its database provider), or None."""
        proc = self.python_code(f"""
            import json
            from studio.db_providers import db_provider_setup
            config = db_provider_setup.get_config({str(self.config_path)!r})
            with db_provider_setup.get_db_provider(config) as db:
                e = db.get_experiment({key!r}, getinfo=False)
                print("RESULT" + json.dumps(None if e is None else {{
                    "status": e.status, "time_started": e.time_started,
                    "time_finished": e.time_finished, "time_added": e.time_added,
                    "time_last_checkpoint": e.time_last_checkpoint, "owner": e.owner,
                    "pythonenv": len(e.pythonenv or [])}}))
        """)
        return json.loads(proc.stdout.split("RESULT", 1)[1])

    def artifact(self, key: str, label: str) -> dict:
        """Download artifact ``label`` with the client's ``get_artifact``: whether it came
        back as a file or a folder, and its content (bytes as latin-1 text, folder names)."""
        proc = self.python_code(f"""
            import json, os
            from studio.db_providers import db_provider_setup
            config = db_provider_setup.get_config({str(self.config_path)!r})
            with db_provider_setup.get_db_provider(config) as db:
                e = db.get_experiment({key!r}, getinfo=False)
                # 0.0.49 unpacks a single-file tar into its cache folder without making
                # the folder first: made here, as an earlier download would have.
                from studio.artifacts import artifacts_tracker
                os.makedirs(os.path.dirname(artifacts_tracker.get_artifact_cache(
                    e.artifacts[{label!r}].key)), exist_ok=True)
                path = db.get_artifact(e.artifacts[{label!r}], only_newer=False)
            if path and os.path.isfile(path):
                found = {{"kind": "file", "data": open(path, "rb").read().decode("latin-1")}}
            elif path and os.path.isdir(path):
                found = {{"kind": "folder", "names": sorted(os.listdir(path))}}
            else:
                found = {{"kind": "missing", "path": path}}
            print("RESULT" + json.dumps(found))
        """)
        found = json.loads(proc.stdout.split("RESULT", 1)[1])
        if found["kind"] == "missing":
            found["log"] = proc.stderr[-3000:]
        return found

    def stop(self, key: str) -> None:
        """Mark the experiment stopped, as ``studio stop`` does (the db provider's
        ``stop_experiment``)."""
        self.python_code(f"""
            from studio.db_providers import db_provider_setup
            config = db_provider_setup.get_config({str(self.config_path)!r})
            with db_provider_setup.get_db_provider(config) as db:
                db.stop_experiment({key!r})
        """)

    def completion_service(self, queue: str, clientscript: Path, tasks: list, *,
                           timeout: float = 900) -> dict:
        """Fan ``tasks`` (pickled arguments) out with the client's CompletionService and
        wait with ``getResultsWithTimeout`` until as many results as tasks came back or
        ``timeout`` passed: ``{"submitted": [keys], "results": {key: value}}``.

        Made again once, on the queue ``queue`` + ``-again``, when the client lost its
        connection to its own publisher-confirm race (:data:`CLIENT_CONFIRM_RACE`)."""
        try:
            return self._completion_service(queue, clientscript, tasks, timeout)
        except AssertionError as failed:
            if CLIENT_CONFIRM_RACE not in str(failed):
                raise
        return self._completion_service(queue + "-again", clientscript, tasks, timeout)

    def _completion_service(self, queue: str, clientscript: Path, tasks: list,
                            timeout: float) -> dict:
        proc = self.python_code(f"""
            import json, time
            from studio.completion_service.completion_service import CompletionService
            cs_config = {{"queue": {queue!r}, "num_workers": 1, "timeout": {timeout!r},
                          "sleep_time": 1,
                          "resources_needed": {{"cpus": 1, "ram": "100m", "hdd": "1g",
                                                "gpus": 0}}}}
            tasks = json.loads({json.dumps(tasks)!r})
            found = {{"submitted": [], "results": {{}}}}
            with CompletionService("cs", cs_config,
                                   studio_config_file={str(self.config_path)!r}) as cs:
                for number, args in enumerate(tasks):
                    found["submitted"].append(cs.submitTask({str(clientscript)!r}, args,
                                                            job_id=number))
                deadline = time.time() + {timeout!r}
                while len(found["results"]) < len(tasks) and time.time() < deadline:
                    got = cs.getResultsWithTimeout(10)
                    if got is not None:
                        found["results"][got[0]] = got[1]
            print("RESULT" + json.dumps(found))
        """, timeout=timeout + 300)
        return json.loads(proc.stdout.split("RESULT", 1)[1])

    def envelope(self, key: str) -> dict:
        """An envelope made by the client's own EncryptedPayloadBuilder (configured with
        ``public_key_path`` and ``signing_key_path``) around a small experiment."""
        proc = self.python_code(f"""
            import json
            from studio.encrypted_payload_builder import EncryptedPayloadBuilder
            from studio.experiments.experiment import Experiment
            config = json.load(open({str(self.config_path)!r}))
            builder = EncryptedPayloadBuilder("test", config["public_key_path"],
                                              config["signing_key_path"])
            experiment = Experiment({key!r}, "train.py", [], [], project="p", artifacts={{}})
            print("RESULT" + json.dumps(builder.construct(experiment, config, [])))
        """)
        return json.loads(proc.stdout.split("RESULT", 1)[1])


def client_config(moto, broker, meta: str, artifacts: str, **extra) -> dict:
    """The client's configuration: database in bucket ``meta`` and artifacts in bucket
    ``artifacts`` on ``moto``, queues on ``broker``; ``extra`` replaces top-level keys."""
    config = {
        "database": {"type": "s3", "endpoint": moto.endpoint, "bucket": meta,
                     "authentication": "none", "credentials": CREDENTIALS},
        "storage": {"type": "s3", "endpoint": moto.endpoint, "bucket": artifacts,
                    "credentials": CREDENTIALS},
        "cloud": {"queue": {"rmq": broker.url}},
        "saveWorkspaceFrequency": "2s", "experimentLifetime": "30m", "verbose": "debug",
        "resources_needed": {"cpus": 1, "ram": "100m", "hdd": "1g", "gpus": 0},
        "sleep_time": 1, "env": {},
    }
    config.update(extra)
    return config


def interop_runner(root: Path, broker, stem: str, **options) -> Runner:
    """A runner serving the test's ``rmq_`` queues (not started)."""
    root.mkdir(parents=True, exist_ok=True)
    runner = Runner(root, queue=stem + "q", amqp_url=broker.url, amqp_mgt_url=broker.mgt_url,
                    queue_match=f"^{stem}", **options)
    # The experiment's pythonenv is the client's pip freeze: installed from the index,
    # through a uv cache kept with the test data so that it is downloaded once.
    for name in ("UV_OFFLINE", "PIP_NO_INDEX"):
        runner.env.pop(name, None)
    runner.env["UV_CACHE_DIR"] = str(DATA_DIR / "uv-cache")
    return runner
