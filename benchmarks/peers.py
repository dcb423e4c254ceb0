"""The runner's peers for ``benchmarks/test_bench_peers.py``, each a real process.

* :class:`ClientRequests` makes requests with the real StudioML client (``studioml==0.0.49``,
  the virtualenv of ``tests/studio_client.py``): its ``studio run`` code path
  (``studio.runner.main``) adds the experiment to the database and uploads the workspace to
  S3 (moto), builds the payload, and hands it to a queue that here keeps it instead of
  sending it (the client's own queue waits a second for a publisher confirm per message).
  The benchmark publishes the payload itself the way the client does (:class:`Publisher`),
  at a moment it knows.
* :class:`ReferenceWorker` is the StudioML reference worker: the 0.0.49 package's
  ``worker_loop`` on its RabbitMQ queue (``studio.queues.rabbit_queue.RMQueue``), run from a
  virtualenv of its own that holds the client's ``pip freeze``.  Its ``studio-remote-worker``
  entry point does not import in that release (``studio.remote_worker`` imports names
  ``studio.util`` no longer has); :data:`REFERENCE_WORKER` calls what it would call, with
  ``tests/studio_client.py``'s shims.  It installs a request's missing packages into that
  one interpreter (``pip install``), as the release does.
* :class:`CeleryPeer` is a bare Celery worker on the same broker (its own virtualenv): one
  task, ``subprocess.run(argv)``, no artifacts; a driver process in the same virtualenv
  sends tasks and collects results (``rpc://`` backend).

Every experiment is :data:`EXPERIMENT`: it writes ``time.time()`` into the file named by
its first argument (its start mark) and exits.  Virtualenvs are built once and kept with the
test data (``$RUNNER_TEST_DATA``, default ``tests/.data``), like the client's.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.rabbitmq_support import EXCHANGE, pika
from tests.studio_client import (CLIENT_VERSION, DATA_DIR, SHIMS, TASK_SCRIPT, cached_venv,
                                 client_python)

EXPERIMENT = """import sys, time
with open(sys.argv[1], "w") as handle:
    handle.write(repr(time.time()))
"""

# The client's ``studio run`` in one long-lived process: one JSON command a line on stdin
# ({"queue", "key", "script", "args", "pythonenv"?}), one JSON reply a line on stdout
# ({"key", "payload"} or {"key", "error"}).  The client's own output goes to stderr.  Each
# request is made from a copy of the workspace (argv[2]) that is removed once it is stored:
# the 0.0.49 worker downloads a workspace into the client's folder when that path exists on
# its machine, which on one machine would be the client's own folder.
SUBMITTER = r'''
import json, os, shutil, sys, tempfile, traceback
import studio_test_shims  # noqa: F401
import studio.runner as studio_runner
from studio.dependencies_policies.studio_dependencies_policy import StudioDependencyPolicy

class KeptQueue:
    """Stands in for the client's RMQueue: keeps the payload the client enqueues."""
    def __init__(self, name):
        self.name, self.sent = name, []
    def get_name(self):
        return self.name
    def enqueue(self, msg, retries=10):
        self.sent.append(msg)

queues = {}
def get_queue(queue_name=None, **_):
    return queues.setdefault(queue_name, KeptQueue(queue_name))

studio_runner.model.get_queue = get_queue
freeze = StudioDependencyPolicy.generate
config_path, workspace, replies = sys.argv[1], sys.argv[2], sys.stdout
sys.stdout = sys.stderr
for line in sys.stdin:
    command = json.loads(line)
    pythonenv = command.get("pythonenv")
    StudioDependencyPolicy.generate = (lambda self, r: list(pythonenv)) if pythonenv else freeze
    copy = os.path.join(tempfile.mkdtemp(prefix="ws"), "workspace")
    shutil.copytree(workspace, copy)
    os.chdir(copy)
    try:
        studio_runner.main(["--config", config_path, "--queue", command["queue"],
                            "--experiment", command["key"], "--force-git", command["script"],
                            *command["args"]])
        reply = {"key": command["key"], "payload": get_queue(command["queue"]).sent.pop()}
    except BaseException:
        reply = {"key": command["key"], "error": traceback.format_exc()}
    os.chdir(workspace)
    shutil.rmtree(os.path.dirname(copy))
    replies.write(json.dumps(reply) + "\n")
    replies.flush()
'''

# What ``studio-remote-worker --queue rmq_…`` would run, were it importable.
REFERENCE_WORKER = r'''
import argparse, sys
import studio_test_shims  # noqa: F401
from studio.local_worker import worker_loop
from studio.queues.qclient_cache import get_cached_queue
from studio.util import logs

name, url = sys.argv[1], sys.argv[2]
logger = logs.get_logger("studio-remote-worker")
queue = get_cached_queue(name=name, route="StudioML." + name,
                         config={"cloud": {"queue": {"rmq": url}}}, logger=logger)
args = argparse.Namespace(config=None, guest=False, single_run=False, queue=name,
                          verbose=None, timeout=0)
print("waiting for work", flush=True)
worker_loop(queue, args, single_experiment=False, timeout=24 * 3600)
'''

CELERY_APP = r'''
"""A bare Celery worker's one task: run argv, nothing else."""
import os, subprocess
from celery import Celery

app = Celery("peers", broker=os.environ["PEER_BROKER"], backend="rpc://")
app.conf.update(task_default_queue=os.environ["PEER_QUEUE"], task_serializer="json",
                result_serializer="json", accept_content=["json"],
                broker_connection_retry_on_startup=True)

@app.task(name="peers.run")
def run(argv):
    return subprocess.run(argv).returncode
'''

# Sends one batch of tasks per stdin line ({"argvs": [[...], ...]}) and replies
# {"sent": [unix seconds before each send], "done": unix seconds of the last result,
#  "codes": [exit statuses]} or {"error": text} once every result is in.
CELERY_DRIVER = r'''
import json, sys, time, traceback
from peer_celery import run

for line in sys.stdin:
    command = json.loads(line)
    try:
        sent, results = [], []
        for argv in command["argvs"]:
            sent.append(time.time())
            results.append(run.apply_async(args=[argv]))
        codes = [r.get(timeout=command.get("timeout", 120)) for r in results]
        reply = {"sent": sent, "done": time.time(), "codes": codes}
    except BaseException:
        reply = {"error": traceback.format_exc()}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
'''

CELERY_REQUIREMENTS = ["celery>=5.3,<6"]
PY_SPY_REQUIREMENTS = ["py-spy>=0.3.14"]


class PeerError(RuntimeError):
    """A peer process failed or did not answer in time (the message says which, and why)."""


def reference_worker_python(freeze: list[str]) -> Path:
    """The reference worker's interpreter: a virtualenv holding the client's ``freeze``
    (``pip freeze`` lines), so that a request the client makes finds its set installed."""
    return cached_venv(f"bench-studioml-{CLIENT_VERSION}-worker", freeze,
                       "import studio.local_worker, studio.queues.qclient_cache")


def celery_python() -> Path:
    return cached_venv("bench-celery", CELERY_REQUIREMENTS, "import celery")


def py_spy() -> Path:
    """The ``py-spy`` sampling profiler (from the package index, in a virtualenv of its own)."""
    return cached_venv("bench-py-spy", PY_SPY_REQUIREMENTS, "pass").parent / "py-spy"


def pip_freeze(python: Path) -> list[str]:
    proc = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True,
                          timeout=300, check=True)
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def pip_install(python: Path, requirements: list[str], env: dict | None = None) -> None:
    """Install ``requirements`` into ``python``'s environment; PeerError with pip's tail."""
    if not requirements:
        return
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", *requirements],
                          capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        raise PeerError(f"pip install {requirements} failed:\n{proc.stderr[-2000:]}")


class LineProcess:
    """A process spoken to in JSON lines: one command on stdin, one reply on stdout."""

    def __init__(self, argv: list[str], *, env: dict, cwd: Path, log: Path):
        self._log = open(log, "ab")
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._log, env=env, cwd=cwd, text=True,
                                        bufsize=1)
        self.log_path = log
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def ask(self, command: dict, timeout: float) -> dict:
        """Send ``command`` and wait up to ``timeout`` s for the reply; PeerError otherwise."""
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise PeerError(f"no reply within {timeout:.0f}s; log {self.log_path}") from None
        if line is None:
            raise PeerError(f"exited {self.process.wait()}:\n{self.tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(reply["error"])
        return reply

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        stop_process(self.process)
        self._log.close()


def stop_process(process: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM the process group ``process`` leads (or the process), then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except OSError:
        process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            process.kill()
        process.wait()


def client_env(home: Path, python: Path) -> dict:
    """The environment the 0.0.49 code runs in: its own HOME, the shims importable, the
    virtualenv first on PATH (the reference worker runs ``python3`` from PATH)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "studio_test_shims.py").write_text(SHIMS)
    (home / "task_script.py").write_text(TASK_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STUDIOML_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(HOME=str(home), PYTHONPATH=str(home), PYTHONUNBUFFERED="1",
               PIP_CACHE_DIR=str(DATA_DIR / "bench-pip-cache"),
               STUDIO_TEST_TASK_SCRIPT=str(home / "task_script.py"),
               PATH=f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


class ClientRequests:
    """Requests made by the real client (``studio.runner.main``), payloads kept (see the
    module's docstring).  ``workspace`` holds ``start.py`` (:data:`EXPERIMENT`)."""

    def __init__(self, root: Path, config: dict):
        self.python = client_python()
        home = root / "client"
        self.env = client_env(home, self.python)
        self.config_path = home / "config.yaml"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.workspace = root / "workspace"
        self.workspace.mkdir(parents=True, exist_ok=True)
        (self.workspace / "start.py").write_text(EXPERIMENT)
        self.pythonenv: list[str] = []  # the last request's, as the client sent it
        (home / "submitter.py").write_text(SUBMITTER)
        self.process = LineProcess([str(self.python), str(home / "submitter.py"),
                                    str(self.config_path), str(self.workspace)],
                                   env=self.env, cwd=self.workspace,
                                   log=root / "client.log")

    def make(self, queue_name: str, key: str, mark: Path,
             pythonenv: list[str] | None = None) -> bytes:
        """The payload of experiment ``key`` (``start.py MARK``) for ``queue_name``, its
        record and workspace already stored; ``pythonenv`` replaces the client's freeze."""
        command = {"queue": queue_name, "key": key, "script": "start.py", "args": [str(mark)]}
        if pythonenv is not None:
            command["pythonenv"] = pythonenv
        payload = self.process.ask(command, timeout=300)["payload"]
        self.pythonenv = json.loads(payload)["experiment"]["pythonenv"]
        return payload.encode()

    def close(self) -> None:
        self.process.close()


class Publisher:
    """Publishes payloads as the client's RMQueue does (topic exchange ``StudioML.topic``,
    routing key ``StudioML.<queue>``, ``app_id=studioml``, JSON, confirmed)."""

    def __init__(self, broker):
        self.connection = broker.connection()
        self.channel = self.connection.channel()
        self.channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True,
                                      auto_delete=True)
        self.channel.confirm_delivery()

    def publish(self, queue_name: str, body: bytes) -> float:
        """Publish ``body``; the unix time just before it was sent."""
        at = time.time()
        self.channel.basic_publish(EXCHANGE, f"StudioML.{queue_name}", body,
                                   pika.BasicProperties(app_id="studioml",
                                                        content_type="application/json"),
                                   mandatory=True)
        return at

    def purge(self, queue_name: str) -> None:
        self.channel.queue_purge(queue_name)

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:  # noqa: BLE001 - a broker already gone
            pass


class ReferenceWorker:
    """The StudioML 0.0.49 worker loop on RabbitMQ queue ``queue_name`` (see the module's
    docstring); :meth:`restart` gives a fresh one (after a stall)."""

    def __init__(self, root: Path, python: Path, queue_name: str, broker_url: str):
        self.root, self.python, self.queue_name, self.url = root, python, queue_name, broker_url
        self.env = client_env(root / "home", python)
        (root / "home" / "reference_worker.py").write_text(REFERENCE_WORKER)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120.0) -> None:
        self.starts += 1
        log = self.root / f"worker-{self.starts}.log"
        self._log = open(log, "ab")
        self.log_path = log
        self.process = subprocess.Popen(
            [str(self.python), str(self.root / "home" / "reference_worker.py"),
             self.queue_name, self.url], stdout=self._log, stderr=subprocess.STDOUT,
            env=self.env, cwd=self.root / "home", start_new_session=True)
        deadline = time.monotonic() + timeout
        while b"waiting for work" not in log.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise PeerError(f"the reference worker did not start:\n{self.tail()}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        stop_process(self.process)
        if self.process is not None:
            self._log.close()


class CeleryPeer:
    """A bare Celery worker (``concurrency`` processes, prefork pool, defaults otherwise)
    on queue ``queue_name`` of ``broker_url``, and its driver."""

    def __init__(self, root: Path, queue_name: str, broker_url: str, concurrency: int):
        self.python = celery_python()
        root.mkdir(parents=True, exist_ok=True)
        (root / "peer_celery.py").write_text(CELERY_APP)
        (root / "driver.py").write_text(CELERY_DRIVER)
        amqp = broker_url.replace("%2F", "")  # Celery names the default vhost "/" as ""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        env.update(PEER_BROKER=amqp, PEER_QUEUE=queue_name, PYTHONPATH=str(root))
        self._log = open(root / "worker.log", "ab")
        self.worker = subprocess.Popen(
            [str(self.python), "-m", "celery", "-A", "peer_celery", "worker", "-Q", queue_name,
             "-c", str(concurrency), "--pool", "prefork", "--without-gossip",
             "--without-mingle", "--without-heartbeat", "-l", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=root,
            start_new_session=True)
        self.driver = LineProcess([str(self.python), str(root / "driver.py")], env=env,
                                  cwd=root, log=root / "driver.log")
        self.queue_name = queue_name

    def run(self, argvs: list[list[str]], timeout: float) -> dict:
        """Send one task per argv at once and wait for all: the driver's reply."""
        return self.driver.ask({"argvs": argvs, "timeout": timeout}, timeout=timeout + 10)

    def close(self) -> None:
        self.driver.close()
        stop_process(self.worker)
        self._log.close()


class Records:
    """The client's database records (``experiments/<key>`` in bucket ``bucket``) as
    written by whichever worker ran them."""

    def __init__(self, s3, bucket: str):
        self.s3, self.bucket = s3, bucket

    def status(self, key: str) -> str | None:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=f"experiments/{key}")["Body"]
            return json.loads(body.read()).get("status")
        except Exception:  # noqa: BLE001 - not there yet, or being rewritten
            return None


def read_mark(path: Path) -> float | None:
    """The start time an experiment wrote into its mark, or None while there is none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return float(text) if text.strip() else None
