"""Shared helpers for the tests: a real runner-supervisor process, requests, a tiny package,
and real storage servers.

Nothing here fakes a component: the harness starts ``python -m runner.supervisor`` as a
real process on a private data root, requests are built from SPEC section 2's field table
and published to a real local queue, and artifacts live in a real store: ``file://`` by
default, or an S3 server (``moto_server``) or the GCS emulator (``gcp-storage-emulator``)
started on a free loopback port and stopped by PID (:class:`MotoServer`,
:class:`GcsEmulator`).  A server that cannot start skips the test locally and fails it
under ``CI=true`` (:func:`server_unavailable`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from runner import ctl, metadata
from runner.archive import pack
from runner.queues import LocalQueue
from runner.storage import open_store

# Never let a test reach for a cloud metadata server (instance roles, GCE credentials).
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("NO_GCE_CHECK", "true")

REPO = Path(__file__).resolve().parent.parent
# An experiment that blocks until the flag file named by $FLAG exists (or 120 s pass), so
# that a test can look at a queue or broker while it runs and decide when it ends.
BLOCKING = """
    import os, sys, time
    print("started", os.getpid(), flush=True)
    deadline = time.time() + 120
    while not os.path.exists(os.environ["FLAG"]):
        if time.time() > deadline:
            sys.exit(3)
        time.sleep(0.05)
    print("finished", flush=True)
"""
MUTABLE = ("modeldir", "output", "retval", "tb", "_metrics", "_metadata")

# ---------------------------------------------------------------------------------------------
# A tiny local package with an in-tree build backend (no build dependencies to download)
# ---------------------------------------------------------------------------------------------

_BACKEND = r'''
"""Minimal PEP 517 backend: builds a pure-Python wheel with zipfile."""
import base64, hashlib, os, zipfile

NAME, VERSION = {name!r}, {version!r}
HERE = os.path.dirname(os.path.abspath(__file__))

def get_requires_for_build_wheel(config_settings=None):
    return []

def _dist_info():
    return "%s-%s.dist-info" % (NAME, VERSION)

def _meta():
    return "Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (NAME, VERSION)

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    d = os.path.join(metadata_directory, _dist_info())
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "METADATA"), "w") as f:
        f.write(_meta())
    return _dist_info()

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    counter = os.environ.get("TINY_BUILD_COUNTER")
    if counter:
        with open(counter, "a") as f:
            f.write("built\n")
    files = {{
        "%s/__init__.py" % NAME: open(os.path.join(HERE, NAME, "__init__.py"), "rb").read(),
        _dist_info() + "/METADATA": _meta().encode(),
        _dist_info() + "/WHEEL": b"Wheel-Version: 1.0\nGenerator: tiny\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }}
    record = []
    for arc, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append("%s,sha256=%s,%d" % (arc, digest, len(data)))
    record.append(_dist_info() + "/RECORD,,")
    wheel = "%s-%s-py3-none-any.whl" % (NAME, VERSION)
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as zf:
        for arc, data in files.items():
            zf.writestr(arc, data)
        zf.writestr(_dist_info() + "/RECORD", "\n".join(record) + "\n")
    return wheel
'''


def make_tiny_package(where: Path, name: str = "tinypkg", version: str = "1.0") -> Path:
    """Create a buildable local project ``name`` in ``where/name`` and return its directory."""
    proj = where / name
    (proj / name).mkdir(parents=True)
    (proj / name / "__init__.py").write_text(f"VALUE = {version!r}\n")
    (proj / "tiny_backend.py").write_text(_BACKEND.format(name=name, version=version))
    (proj / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = []
        build-backend = "tiny_backend"
        backend-path = ["."]
        """))
    return proj



def tiny_requirement(project: Path) -> str:
    """A requirement line installing the tiny package from its directory."""
    return f"{project.name} @ {project.as_uri()}"


def short_tempdir(prefix: str = "rt") -> Path:
    """A temporary directory with a short path (ipc socket paths are limited to ~100 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# ---------------------------------------------------------------------------------------------
# Real storage servers on loopback
# ---------------------------------------------------------------------------------------------

TEST_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def server_unavailable(reason: str):
    """Skip (locally) or fail (under CI=true) a test whose server cannot start."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # it answered
        except OSError:
            time.sleep(0.1)
    return False


class _Server:
    """A server process on 127.0.0.1:<port>, stopped by its PID."""

    name = "server"

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = self.root / f"{self.name}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 30.0) -> _Server:
        with open(self.log_path, "ab") as log:
            try:
                self.process = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                                env=dict(os.environ, **TEST_AWS))
            except OSError as exc:
                server_unavailable(f"cannot start {self.name}: {exc}")
        if not _wait_http(self.ready_url(), self.process, timeout):
            self.stop()
            server_unavailable(f"{self.name} did not start on port {self.port}: "
                               f"{self.log_path.read_text(errors='replace')[-2000:]}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def restart(self) -> _Server:
        self.stop()
        return self.start()


class MotoServer(_Server):
    """``moto_server``: a real HTTP S3 endpoint (state lives in its memory)."""

    name = "moto_server"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/moto-api/"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}"

    url = endpoint

    def sqs_client(self, key: str = "testing", region: str = "us-east-1"):
        """An SQS client of the account that ``key`` stands for."""
        import boto3
        return boto3.client("sqs", endpoint_url=self.endpoint, region_name=region,
                            aws_access_key_id=key, aws_secret_access_key="secret")

    def client(self, **credentials):
        import boto3
        from botocore.config import Config as BotoConfig

        keys = {"aws_access_key_id": TEST_AWS["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": TEST_AWS["AWS_SECRET_ACCESS_KEY"]}
        keys.update(credentials)
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            config=BotoConfig(s3={"addressing_style": "path"}), **keys)

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"b-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def root_url(self, bucket: str) -> str:
        return f"s3://{self.host}/{bucket}"

    def set_auth(self, enforced: bool) -> None:
        """Have moto check signatures and IAM policies (True) or accept anything (False)."""
        data = b"0" if enforced else b"inf"
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=data,
                                         method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=5).read()


class GcsEmulator(_Server):
    """``gcp-storage-emulator``: a real HTTP GCS JSON API (state kept under ``root``)."""

    name = "gcp-storage-emulator"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "gcp_storage_emulator", "-d", str(self.root / "data"), "start", "--host", "127.0.0.1",
                       "--port", str(self.port), "-q"]

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/storage/v1/b"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = self.endpoint
        try:
            return storage.Client(project="test", credentials=AnonymousCredentials())
        finally:
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"b-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(name)
        return name

    def root_url(self, bucket: str) -> str:
        return f"gs://{bucket}"


class Runner:
    """A real ``runner-supervisor`` process on a private root, plus its queue and store.

    ``store_root`` (default a ``file://`` folder under ``root``) is where requests put
    their artifacts; ``storage`` is the request's ``config.storage``; ``credentials`` the
    artifacts' credentials map.  ``file://`` storage is confined to ``root`` (the
    runner's ``--file-store-roots``) unless a test passes its own ``file_store_roots``.
    """

    def __init__(self, root: Path, queue: str = "local_test", *, store_root: str | None = None,
                 storage: dict | None = None, credentials: dict | None = None, **options):
        self.root = root
        self.queue = queue
        self.store_root = store_root or (root / "store").as_uri()
        self.storage = storage
        self.credentials = credentials
        self.options = {"queue-root": root / "q", "working-dir": root / "w",
                        "cache-dir": root / "c", "runtime-dir": root / "run",
                        "executors": 2, "kill-grace": "1s", "min-save-interval": "1s",
                        # Stopping a test runner hands long experiments back soon; drain
                        # tests set their own.
                        "drain-timeout": "1s",
                        # Tests coordinate with experiments through files in the test's
                        # root, which the sandbox hides by design; tests/test_sandbox.py
                        # runs the runner with it on.
                        "sandbox": "off",
                        "file-store-roots": self.default_file_store_roots()}
        self.options.update({k.replace("_", "-"): v for k, v in options.items()})
        self.process: subprocess.Popen | None = None
        self.log_path = root / "supervisor.log"
        environ = {k: v for k, v in os.environ.items() if k != "RUNNER_PUREPYTHON"}
        self.env = dict(environ, UV_OFFLINE="1", PIP_NO_INDEX="1",
                        UV_CACHE_DIR=str(root / "uv-cache"))
        if self.store_root.startswith("s3://"):
            self.env.update(TEST_AWS)
        elif self.store_root.startswith("gs://") and "STORAGE_EMULATOR_HOST" not in self.env:
            raise ValueError("a gs:// store needs STORAGE_EMULATOR_HOST in Runner.env")

    def default_file_store_roots(self) -> str:
        """``root``, and the folder of a ``file://`` ``store_root`` given (another runner's
        store, say), as one ``--file-store-roots`` path list."""
        roots = [str(self.root)]
        if self.store_root.startswith("file://"):
            roots.append(urllib.parse.unquote(urllib.parse.urlsplit(self.store_root).path))
        return os.pathsep.join(roots)

    # -- storage --------------------------------------------------------------------------
    def store(self, url: str):
        return open_store(url, credentials=self.credentials, storage_config=self.storage,
                          env=self.env)

    def read(self, url: str) -> bytes | None:
        """The bytes of the object at ``url`` in the test's store, or None."""
        saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST",)}
        if "STORAGE_EMULATOR_HOST" in self.env:
            os.environ["STORAGE_EMULATOR_HOST"] = self.env["STORAGE_EMULATOR_HOST"]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                store = self.store(url)
                if store.stat(url) is None:
                    return None
                store.get(url, Path(tmp) / "object")
                return (Path(tmp) / "object").read_bytes()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def list(self, prefix_url: str) -> list[str]:
        return self.store(prefix_url).list(prefix_url)

    def experiment_url(self, request: dict, name: str = "") -> str:
        return f"{self.store_root}/experiments/{request['experiment']['key']}/{name}".rstrip("/")

    # -- the process ------------------------------------------------------------------
    def start(self, wait: bool = True, *, cwd: Path | None = None, new_session: bool = False,
              console_script: bool = False) -> Runner:
        """Start the supervisor (``python -m runner.supervisor`` in the repository, or the
        installed ``runner-supervisor`` script); ``new_session`` puts it in a session and
        process group of its own (for tests that signal that group)."""
        if console_script:
            argv = [str(Path(sys.executable).parent / "runner-supervisor")]
        else:
            argv = [sys.executable, "-m", "runner.supervisor"]
        for name, value in self.options.items():
            argv += [f"--{name}"] if value is True else [f"--{name}", str(value)]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=self.env, cwd=cwd or REPO,
                                        start_new_session=new_session)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"supervisor exited {self.process.returncode}:\n{self.log()}")
            try:
                status = self.status()
            except (TimeoutError, Exception):
                time.sleep(0.2)
                continue
            if all(r["ready"] for r in status["roles"].values()):
                return status
            time.sleep(0.1)
        raise AssertionError(f"supervisor not ready within {timeout}s:\n{self.log()}")

    def status(self) -> dict:
        reply = ctl.request(str(self.options["runtime-dir"]), "status", timeout=2.0)
        assert reply.ok, reply.error
        return reply.data

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the supervisor did not stop within {timeout:.0f}s of "
                                 f"{signal.Signals(signum).name}:\n{self.log()[-8000:]}") from None
        finally:
            self._log.close()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the supervisor without waiting."""
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def ctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        """``runner-ctl --runtime-dir … ARGS`` as a real process."""
        return subprocess.run([sys.executable, "-m", "runner.ctl", "--runtime-dir",
                               str(self.options["runtime-dir"]), *args],
                              capture_output=True, text=True, check=check, env=self.env,
                              cwd=REPO, timeout=60)

    def http_get(self, path: str) -> tuple[int, str]:
        """GET ``path`` from the supervisor's --prom-address (as reported by its status)."""
        address = self.status()["supervisor"]["prom_address"]
        assert address, "the runner was started without --prom-address"
        host, _, port = address.rpartition(":")
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- requests -----------------------------------------------------------------------
    def workspace(self, files: dict[str, str]) -> Path:
        """A workspace directory with ``files`` (name -> text)."""
        folder = self.root / "src" / uuid.uuid4().hex[:8]
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(textwrap.dedent(text))
        return folder

    def request(self, workspace: Path, filename: str, *, args: list[str] | None = None,
                key: str | None = None, pythonenv: list[str] | None = None,
                max_duration: str | None = None, lifetime: str | None = None,
                env: dict | None = None, time_added: float | None = None,
                blob: str | None = None, save_frequency: str = "1s") -> dict:
        """Upload ``workspace`` and build a request from SPEC section 2's field table.

        With ``blob`` (a key already in the store) the workspace is not uploaded again.
        """
        key = key or f"e2e-{uuid.uuid4().hex[:10]}"
        if blob is None:
            blob = f"blobstore/{uuid.uuid4().hex}.tar"
            self.upload_folder(workspace, f"{self.store_root}/{blob}")
        bucket = self.store_root.rstrip("/").rsplit("/", 1)[-1]

        def artifact(object_key: str, mutable: bool) -> dict:
            found = {"key": object_key, "bucket": bucket, "unpack": True, "mutable": mutable,
                     "qualified": f"{self.store_root}/{object_key}", "local": "/nonexistent"}
            if self.credentials:
                found["credentials"] = self.credentials
            return found

        artifacts = {"workspace": artifact(blob, False)}
        artifacts.update({label: artifact(f"experiments/{key}/{label}.tar", True)
                          for label in MUTABLE})
        return {
            "experiment": {
                "key": key, "project": "e2e", "filename": filename, "args": args or [],
                "pythonver": f"{sys.version_info[0]}.{sys.version_info[1]}",
                "pythonenv": pythonenv or [], "max_duration": max_duration,
                "time_added": time.time() if time_added is None else time_added,
                "resources_needed": {"cpus": 1, "gpus": 0, "ram": "100mb", "hdd": "1gb"},
                "artifacts": artifacts, "an_unknown_field": {"kept": True},
            },
            "config": {"env": env or {}, "saveWorkspaceFrequency": save_frequency,
                       "experimentLifetime": lifetime,
                       **({"storage": self.storage} if self.storage else {})},
        }

    def upload_folder(self, folder: Path, url: str) -> None:
        """Pack ``folder`` as a plain tar (as the StudioML client does) and upload it."""
        if url.startswith("file://"):
            target = self.store_path(url)
            target.parent.mkdir(parents=True, exist_ok=True)
            pack(folder, target, "none")
            return
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "a.tar"
            pack(folder, archive, "none")
            self.store(url).put(url, archive)

    def publish(self, request: dict | bytes) -> str:
        body = request if isinstance(request, bytes) else json.dumps(request).encode()
        with LocalQueue(self.options["queue-root"], owner=f"test-{uuid.uuid4().hex[:8]}",
                        durable=False) as queue:
            return queue.publish(self.queue, body)

    def record(self, request: dict) -> dict | None:
        url = metadata.record_url(request)
        if url.startswith("file://"):
            path = self.store_path(url)
            return json.loads(path.read_text()) if path.exists() else None
        data = self.read(url)
        return json.loads(data) if data else None

    def wait_final(self, request: dict, timeout: float = 90.0) -> dict:
        """The metadata record once its fate is final."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.record(request)
            if record and record.get("final"):
                return record
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.1 if self.store_root.startswith("file://") else 0.3)
        raise AssertionError(f"no final record for {request['experiment']['key']}:\n{self.log()}")

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")

    @staticmethod
    def store_path(url: str) -> Path:
        assert url.startswith("file://"), url
        return Path(url[len("file://"):])

    def experiment_dir(self, request: dict) -> Path:
        return self.store_path(self.store_root) / "experiments" / request["experiment"]["key"]

    def scrape_documents(self, request: dict) -> list[dict]:
        if self.store_root.startswith("file://"):
            folder = self.experiment_dir(request) / "_metadata"
            return [json.loads(p.read_text()) for p in sorted(folder.glob("scrape-host-*.json"))]
        urls = self.list(self.experiment_url(request, "_metadata/scrape-host-"))
        return [json.loads(self.read(url)) for url in urls]

    def role_pids(self) -> dict[str, int]:
        return {name: role["pid"] for name, role in self.status()["roles"].items()}

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Local stand-ins for the outside world: a Slack webhook, and one that never answers
# ---------------------------------------------------------------------------------------------

class SlackServer:
    """A real HTTP server on a free loopback port that records Slack webhook posts."""

    def __init__(self):
        self.posts: list[dict] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                posts.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/B000"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts(self) -> list[str]:
        return [p.get("text", "") for p in self.posts]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SilentServer:
    """Accepts TCP connections on a free loopback port and never answers, until closed:
    a Slack that hangs.  ``connections`` counts the posts that reached it."""

    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hooks/dead"
        self.held: list[socket.socket] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(connection)

    @property
    def connections(self) -> int:
        return len(self.held)

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for connection in self.held:
            connection.close()


def take_soon(backend, queue: str, timeout: float = 10.0, *, read_pushes: bool = False):
    """A delivery taken from ``queue`` within ``timeout`` seconds, or None; with
    ``read_pushes``, the back end's connection is read between tries (``changes()``:
    a consumed RabbitMQ queue's pushes arrive that way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        delivery = backend.take(queue)
        if delivery is not None:
            return delivery
        if read_pushes:
            backend.changes()
        time.sleep(0.02 if read_pushes else 0.05)
    return None


def stop_process(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM ``process``; SIGKILL it when it has not exited after ``grace`` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def processes_with(marker: str) -> list[int]:
    """Pids of the live (not zombie) processes whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
            with open(f"/proc/{entry}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[-1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != b"Z":
            found.append(int(entry))
    return found


def running_attempt(runner: Runner, timeout: float = 90.0) -> dict:
    """The first attempt ``runner-ctl status`` shows in the ``running`` phase."""
    def find():
        attempts = [j for j in runner.status()["attempts"] if j["phase"] == "running" and j["pid"]]
        return attempts[0] if attempts else None
    return runner.wait_for(find, timeout=timeout, what="a running attempt")
