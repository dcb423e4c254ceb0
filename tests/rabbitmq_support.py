"""RabbitMQ for the tests: the shared broker on 127.0.0.1:5672, or a private node.

Nothing is faked.  The shared broker (guest/guest, management API on 15672) serves the
tests that do not disturb the broker; every test there uses its own queue names and a
``--queue-match`` of its own, so tests and other users of the broker never meet.  The
fault tests start a private node (:class:`PrivateBroker`) on free ports, with its own node
name, epmd port, cookie, mnesia and log directories under a temporary directory, and stop,
restart or kill it by PID.  Neither is ever touched by name.

When the broker (or ``rabbitmq-server`` for a private node) is missing the tests skip,
except under ``CI=true`` where they fail.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

pika = pytest.importorskip("pika") if os.environ.get("CI") != "true" else __import__("pika")

SHARED_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
SHARED_MGT = os.environ.get("TEST_AMQP_MGT_URL", "http://127.0.0.1:15672")
RABBITMQ_BIN = Path(os.environ.get("RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
EXCHANGE = "StudioML.topic"


def unavailable(reason: str) -> None:
    """Skip locally, fail under CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"RabbitMQ needed under CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


class Broker:
    """One broker reachable at ``url`` (AMQP) and ``mgt_url`` (management API)."""

    def __init__(self, url: str, mgt_url: str) -> None:
        self.url, self.mgt_url = url, mgt_url

    # -- AMQP as a StudioML client does it ---------------------------------------------
    def connection(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.url))

    def declare(self, queue: str, durable: bool = False) -> None:
        """Declare and bind ``queue`` exactly as the StudioML client does."""
        with self.connection() as conn:
            ch = conn.channel()
            ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True, auto_delete=True)
            ch.queue_declare(queue, durable=durable)
            ch.queue_bind(queue, EXCHANGE, routing_key=f"StudioML.{queue}")

    def publish(self, queue: str, body: bytes | dict, *, durable: bool = False,
                headers: dict | None = None, declare: bool = True) -> None:
        """Publish like the StudioML client: topic exchange, routing key, app_id, JSON."""
        if declare:
            self.declare(queue, durable)
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        with self.connection() as conn:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish(EXCHANGE, f"StudioML.{queue}", body,
                             pika.BasicProperties(app_id="studioml",
                                                  content_type="application/json",
                                                  delivery_mode=2 if durable else None,
                                                  headers=headers),
                             mandatory=True)

    def get(self, queue: str):
        """Take one message with auto-ack: (properties, body) or None."""
        with self.connection() as conn:
            method, properties, body = conn.channel().basic_get(queue, auto_ack=True)
            return None if method is None else (properties, body)

    def delete(self, *queues: str) -> None:
        try:
            with self.connection() as conn:
                ch = conn.channel()
                for queue in queues:
                    ch.queue_delete(queue)
        except Exception:  # noqa: BLE001 - cleanup of a broker that may be down
            pass

    def ready(self, queue: str) -> int:
        """Messages ready in ``queue`` (real time, from a passive declare); -1 if missing."""
        try:
            with self.connection() as conn:
                return conn.channel().queue_declare(queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            return -1

    # -- management API ------------------------------------------------------------------
    def api(self, path: str):
        auth = base64.b64encode(b"guest:guest").decode()
        request = urllib.request.Request(f"{self.mgt_url}/api/{path}",
                                         headers={"Authorization": f"Basic {auth}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def counts(self, queue: str) -> tuple[int, int]:
        """(ready, unacked) from the management API; they lag by its statistics interval."""
        info = self.api(f"queues/%2F/{quote(queue, safe='')}") or {}
        return int(info.get("messages_ready", 0)), int(info.get("messages_unacknowledged", 0))

    def wait_counts(self, queue: str, ready: int, unacked: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = self.counts(queue)
            if seen == (ready, unacked):
                return
            time.sleep(0.25)
        raise AssertionError(f"{queue}: (ready, unacked) stayed {seen}, expected "
                             f"{(ready, unacked)}")


def shared_broker() -> Broker:
    if not port_open(5672):
        unavailable("no RabbitMQ on 127.0.0.1:5672")
    broker = Broker(SHARED_URL, SHARED_MGT)
    try:
        broker.api("overview")
    except Exception as exc:  # noqa: BLE001
        unavailable(f"RabbitMQ management API not answering on {SHARED_MGT}: {exc} "
                    "(rabbitmq-plugins enable rabbitmq_management)")
    return broker


def unique(prefix: str = "t") -> str:
    """A queue-name stem no other test (or runner) uses: ``rmq_<prefix><hex>_``."""
    return f"rmq_{prefix}{uuid.uuid4().hex[:8]}_"


class PrivateBroker(Broker):
    """A RabbitMQ node of our own: free ports, own node name, epmd, cookie and directories.

    ``start()`` boots it (management plugin on, statistics every 500 ms), ``stop()``
    stops it by PID (SIGTERM, then SIGKILL), ``kill()`` SIGKILLs it, ``restart()`` stops
    and starts it again on the same ports and data (durable queues survive).
    """

    def __init__(self, conf: str = "", advanced: str = "") -> None:
        """``conf``: extra rabbitmq.conf lines; ``advanced``: an advanced.config body."""
        self.dir = Path(tempfile.mkdtemp(prefix="rmqnode", dir="/tmp"))
        self.port, self.mgt_port = free_port(), free_port()
        self.dist_port, self.epmd_port = free_port(), free_port()
        self.node = f"rt{uuid.uuid4().hex[:8]}@localhost"
        super().__init__(f"amqp://guest:guest@127.0.0.1:{self.port}/%2F",
                         f"http://127.0.0.1:{self.mgt_port}")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"management.tcp.port = {self.mgt_port}\n"
            "management.tcp.ip = 127.0.0.1\n"
            "collect_statistics_interval = 500\n"
            "log.console = false\n" + conf)
        if advanced:
            (self.dir / "advanced.config").write_text(advanced)
        (self.dir / "enabled_plugins").write_text("[rabbitmq_management].\n")
        (self.dir / "home").mkdir()
        cookie = self.dir / "home" / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        self.env = dict(os.environ, HOME=str(self.dir / "home"),
                        RABBITMQ_NODENAME=self.node, RABBITMQ_NODE_PORT=str(self.port),
                        RABBITMQ_DIST_PORT=str(self.dist_port),
                        ERL_EPMD_PORT=str(self.epmd_port),
                        RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
                        RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
                        RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
                        RABBITMQ_LOG_BASE=str(self.dir / "log"),
                        RABBITMQ_PID_FILE=str(self.dir / "node.pid"),
                        RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
                        RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"))
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.epmd: subprocess.Popen | None = None
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> PrivateBroker:
        server = RABBITMQ_BIN / "rabbitmq-server"
        if not server.exists() or shutil.which("epmd") is None:
            unavailable(f"{server} or epmd not installed")
        if self.epmd is None or self.epmd.poll() is not None:
            self.epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = open(self.dir / "server.out", "ab")
        self.process = subprocess.Popen([str(server)], env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                unavailable(f"private RabbitMQ exited {self.process.returncode}: "
                            f"{(self.dir / 'server.out').read_text()[-2000:]}")
            if port_open(self.port) and port_open(self.mgt_port):
                try:
                    self.api("overview")
                    return self
                except Exception:  # noqa: BLE001 - still booting
                    pass
            time.sleep(0.3)
        self.stop()
        unavailable(f"private RabbitMQ did not start within {timeout}s")
        return self

    def _beam_pids(self) -> list[int]:
        """The node's processes: our server process and its descendants (by PID only)."""
        if self.process is None:
            return []
        pids, frontier = [self.process.pid], [self.process.pid]
        while frontier:
            parent = frontier.pop()
            try:
                children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                pids.append(child)
                frontier.append(child)
        return pids

    def _signal(self, signum: int) -> None:
        for pid in reversed(self._beam_pids()):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def halt(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop the node (not epmd) by PID and wait until its port is closed."""
        if self.process is None:
            return
        self._signal(signum)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(10)
        deadline = time.monotonic() + 10
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.process = None

    def kill(self) -> None:
        self.halt(signal.SIGKILL)

    def restart(self) -> None:
        self.halt()
        self.start()

    def stop(self) -> None:
        self.halt()
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.kill()
            self.epmd.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
