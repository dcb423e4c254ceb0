"""Driving one role alone: hosted in a thread on the in-memory bus, with the stub queue
and store (runner.queues.memory, runner.storage.memory) installed.

``RoleRig`` builds a real configuration on a private root, installs the stubs, hosts roles
with :func:`runner.rolehost.run_in_thread`, and gives a :class:`Probe` per participant to
read what the roles sent it and to send them messages.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
import time
import uuid

from runner import protocol
from runner.bus_memory import MemoryHub
from runner.config import load
from runner.queues import memory as memory_queues
from runner.rolehost import run_in_thread
from runner.storage import memory as memory_storage

from .support import short_tempdir

WAIT = 30.0  # seconds a probe waits for an expected message (a slow shared machine)


def eventually(condition, timeout: float = WAIT) -> bool:
    """Whether ``condition()`` became true within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


class Probe:
    """One participant of the hub (the supervisor, a role not running): what was sent to it
    is read in order; what did not match an expectation is kept in ``seen``."""

    def __init__(self, hub: MemoryHub, name: str):
        self.bus = hub.bus(name)
        self.seen: list[protocol.Message] = []

    def expect(self, kind: type, where=lambda m: True, timeout: float = WAIT):
        """The first message of ``kind`` (and ``where(message)``) sent to this participant,
        among those kept or arriving within ``timeout`` seconds; AssertionError if none."""
        for index, message in enumerate(self.seen):
            if isinstance(message, kind) and where(message):
                return self.seen.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} reached {self.bus.name}; got "
                                     f"{[type(m).__name__ for m in self.seen]}")
            message = self.bus.recv(left)
            if message is None:
                continue
            if isinstance(message, kind) and where(message):
                return message
            self.seen.append(message)

    def quiet(self, kind: type, seconds: float = 0.5) -> list:
        """Messages of ``kind`` that reached this participant within ``seconds`` (also
        those kept): what a test expects to be empty."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self.bus.recv(left)
            if message is not None:
                self.seen.append(message)
        return [m for m in self.seen if isinstance(m, kind)]

    def send(self, destination: str, message: protocol.Message) -> None:
        self.bus.send(destination, message)


class RoleRig:
    """A private root, the stubs installed, and the roles hosted in threads."""

    def __init__(self, *options: str):
        self.root = short_tempdir()
        self.hub = MemoryHub()
        self.broker = memory_queues.install()
        self.objects = memory_storage.install()
        self.bucket = f"memory://b{uuid.uuid4().hex[:8]}"
        self.config = load(["--queue-root", str(self.root / "q"),
                            "--working-dir", str(self.root / "w"),
                            "--cache-dir", str(self.root / "c"),
                            "--runtime-dir", str(self.root / "run"),
                            "--queue-match", "^memory_", "--executors", "1", *options],
                           environ={}).with_instance(f"t-{uuid.uuid4().hex[:8]}")
        (self.root / "run").mkdir(parents=True, exist_ok=True)
        self.hosts = []
        self.probes: dict[str, Probe] = {}

    def host(self, role: str):
        host = run_in_thread(role, self.config, self.hub)
        self.hosts.append(host)
        return host

    def probe(self, name: str) -> Probe:
        if name not in self.probes:
            self.probes[name] = Probe(self.hub, name)
        return self.probes[name]

    def put_folder(self, files: dict[str, str], name: str) -> str:
        """A plain tar of ``files`` (name -> text) stored at ``<bucket>/<name>``; its URL."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for path, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(path)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        url = f"{self.bucket}/{name}"
        self.objects.write(url, buffer.getvalue())
        return url

    def request(self, key: str | None = None, filename: str = "train.py",
                workspace: dict[str, str] | None = None, mutable=("output", "_metadata")
                ) -> dict:
        """A request as SPEC section 2 has it, its artifacts in the memory store: a
        workspace holding ``workspace`` (name -> text; a ``train.py`` printing ``hi`` by
        default) and an empty object-less artifact per ``mutable`` label."""
        key = key or f"k-{uuid.uuid4().hex[:8]}"
        artifacts = {}
        workspace = {"train.py": "print('hi')\n"} if workspace is None else workspace
        url = self.put_folder(workspace, f"blobs/{key}.tar")
        artifacts["workspace"] = {"key": f"blobs/{key}.tar", "qualified": url,
                                  "unpack": True, "mutable": False}
        for label in mutable:
            object_key = f"experiments/{key}/{label}.tar"
            artifacts[label] = {"key": object_key, "qualified": f"{self.bucket}/{object_key}",
                                "unpack": True, "mutable": True}
        return {"experiment": {"key": key, "project": "p", "filename": filename, "args": [],
                               "pythonver": f"{sys.version_info[0]}.{sys.version_info[1]}",
                               "pythonenv": [], "time_added": time.time(),
                               "resources_needed": {"cpus": 1, "gpus": 0, "ram": "10mb",
                                                    "hdd": "100mb"},
                               "artifacts": artifacts},
                "config": {"env": {}, "saveWorkspaceFrequency": "1h"}}

    def attempt(self, request: dict, attempt_id: str | None = None, **fields
                ) -> protocol.Attempt:
        """An attempt of ``request`` as the fetcher would hand it out."""
        attempt_id = attempt_id or f"host-{uuid.uuid4().hex[:6]}"
        experiment = request["experiment"]
        values = {"attempt_id": attempt_id, "queue": "memory_q", "token": "t", "attempts": 0,
                  "key": experiment["key"], "project": experiment.get("project") or "",
                  "request": request, "workdir": str(self.root / "w" / attempt_id),
                  "resources": {"cpus": 1, "devices": "-1"}, "taken_at": time.time(),
                  "save_frequency": 3600.0, "queue_type": "memory"}
        values.update(fields)
        return protocol.Attempt(**values)

    def publish(self, request: dict, queue: str = "memory_q", attempts: int = 0) -> None:
        self.broker.publish(queue, json.dumps(request).encode(), attempts)

    def close(self) -> None:
        try:
            for host in self.hosts:
                host.stop()
        finally:
            memory_queues.uninstall()
            memory_storage.uninstall()
            self.hub.close()
            shutil.rmtree(self.root, ignore_errors=True)
