"""The Pub/Sub emulator for the tests (``moto_server`` for SQS is ``support.MotoServer``).

It is started on a free loopback port and stopped by PID.  Where it cannot be
started the tests skip with the reason, except under ``CI=true`` where they fail.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


from .support import free_port, server_unavailable as unavailable

PUBSUB_EMULATOR = Path(os.environ.get(
    "PUBSUB_EMULATOR_BIN",
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"))


def _port_open(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)  # the group we started (java forks)
    except ProcessLookupError:
        return
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def account_dir(root: Path, name: str, key: str, region: str = "us-east-1") -> Path:
    """A ``--sqs-certs`` sub-directory as a mounted Kubernetes secret looks."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "credentials").write_text(
        f"[default]\naws_access_key_id = {key}\naws_secret_access_key = secret\n")
    (folder / "config").write_text(f"[default]\nregion = {region}\n")
    return folder


class PubSubEmulator:
    """The Google Pub/Sub emulator on a free port (``PUBSUB_EMULATOR_HOST``)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="pubsub", dir="/tmp"))
        self.process: subprocess.Popen | None = None

    def start(self) -> PubSubEmulator:
        try:
            from google.cloud import pubsub_v1  # noqa: F401
        except ImportError:
            unavailable("google-cloud-pubsub is not installed")
        if not PUBSUB_EMULATOR.exists():
            unavailable(f"the Pub/Sub emulator is not installed ({PUBSUB_EMULATOR}; apt "
                        "package google-cloud-cli-pubsub-emulator)")
        if shutil.which("java") is None:
            unavailable("the Pub/Sub emulator needs java")
        log = open(self.dir / "emulator.log", "ab")
        self.process = subprocess.Popen(
            [str(PUBSUB_EMULATOR), "--host=127.0.0.1", f"--port={self.port}",
             f"--dir={self.dir / 'data'}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                unavailable("the Pub/Sub emulator exited: "
                            f"{(self.dir / 'emulator.log').read_text()[-1000:]}")
            if _port_open(self.port) and "Server started" in \
                    (self.dir / "emulator.log").read_text(errors="replace"):
                return self
            time.sleep(0.2)
        self.stop()
        unavailable("the Pub/Sub emulator did not start within 60s")
        return self

    def env(self) -> dict:
        return {"PUBSUB_EMULATOR_HOST": self.host}

    def clients(self):
        from google.cloud import pubsub_v1
        old = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = self.host
        try:
            return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        finally:
            if old is None:
                os.environ.pop("PUBSUB_EMULATOR_HOST", None)
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = old

    def stop(self) -> None:
        _stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


def service_account_file(folder: Path, project: str) -> Path:
    """A service-account file naming ``project`` (the emulator checks no key)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{project}.json"
    path.write_text(json.dumps({"type": "service_account", "project_id": project,
                                "client_email": f"runner@{project}.iam.gserviceaccount.com",
                                "private_key_id": uuid.uuid4().hex}))
    return path
