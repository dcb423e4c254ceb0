"""Container test parts: a real local registry and a tiny Python image built here.

* :class:`Registry` — Debian's ``docker-registry`` (Docker's distribution) on a free loopback
  port, storage in a temporary folder, stopped by PID.
* :func:`python_image_layout` — an OCI image layout with a minimal root file system: the
  interpreter running the tests, the shared libraries ``ldd`` lists for it, and its standard
  library (without tests and site-packages).  Built with ``umoci`` (no network, a few
  seconds) and kept under ``tests/.data/images`` (the tests' data folder) between runs,
  keyed by the interpreter.
* :func:`push` — ``skopeo copy`` of that layout into the registry (plain HTTP: loopback).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

from .support import REPO, _Server, server_unavailable, short_tempdir

IMAGE_DATA = REPO / "tests" / ".data" / "images"
_STDLIB_SKIPPED = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
                   "site-packages", "dist-packages", "pydoc_data"}


#: An experiment that saves (prints) on SIGTERM after half a second, and exits 3.
GRACEFUL = """
    import os, signal, sys, time
    def stop(*_):  # os.write: SIGTERM may come while print("ready") is still flushing
        time.sleep(0.5)
        os.write(1, b"saved on SIGTERM\\n")
        sys.exit(3)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    time.sleep(60)
"""


def assert_sigterm_grace(argv: list[str], env: dict | None, cwd: Path) -> None:
    """Start ``argv`` (running :data:`GRACEFUL`) as the executor does, send SIGTERM to its
    process group as the executor does, and check the experiment used its grace."""
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE,
                               start_new_session=True)
    try:
        assert process.stdout.readline() == b"ready\n"
        os.killpg(process.pid, signal.SIGTERM)
        rest = process.stdout.read()
        assert rest == b"saved on SIGTERM\n", (rest, process.wait(30))
        assert process.wait(30) == 3
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def need_programs(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        server_unavailable(f"not installed: {', '.join(missing)} (.ci/run installs them)")


class Registry(_Server):
    """A real OCI registry (``docker-registry serve``) on 127.0.0.1:<free port>."""

    name = "docker-registry"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'data'}\n"
            f"  delete:\n    enabled: true\nhttp:\n  addr: {self.host}\n")
        return ["docker-registry", "serve", str(config)]

    def ready_url(self) -> str:
        return f"http://{self.host}/v2/"

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _libraries(executable: str) -> list[str]:
    out = subprocess.run(["ldd", executable], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            found.append(path)
    return found


def _populate(rootfs: Path) -> None:
    executable = os.path.realpath(sys.executable)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    (rootfs / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(executable, rootfs / "usr" / "bin" / version)
    os.symlink(version, rootfs / "usr" / "bin" / "python3")
    for library in _libraries(executable):
        target = rootfs / library.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(library), target)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(stdlib, rootfs / "usr" / "lib" / version, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if n in _STDLIB_SKIPPED])
    dynload = Path(sysconfig.get_paths()["platstdlib"]) / "lib-dynload"
    if dynload.is_dir() and not (rootfs / "usr" / "lib" / version / "lib-dynload").exists():
        shutil.copytree(dynload, rootfs / "usr" / "lib" / version / "lib-dynload")
    for folder in ("tmp", "etc", "var/tmp", "root"):
        (rootfs / folder).mkdir(parents=True, exist_ok=True)
    (rootfs / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (rootfs / "etc" / "resolv.conf").write_text("")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")


def python_image_layout() -> Path:
    """An OCI layout (tag ``py``) holding a minimal image with this interpreter, cached."""
    need_programs("umoci", "ldd")
    executable = os.path.realpath(sys.executable)
    key = hashlib.sha256(f"{executable}\n{sys.version}\n2".encode()).hexdigest()[:12]
    layout = IMAGE_DATA / f"python-{key}"
    if (layout / "index.json").exists():
        return layout
    IMAGE_DATA.mkdir(parents=True, exist_ok=True)
    work = Path(short_tempdir("img"))
    try:
        building = work / "layout"
        bundle = work / "bundle"
        rootless = ["--rootless"] if os.geteuid() != 0 else []
        subprocess.run(["umoci", "init", "--layout", str(building)], check=True)
        subprocess.run(["umoci", "new", "--image", f"{building}:py"], check=True)
        subprocess.run(["umoci", "unpack", *rootless, "--image", f"{building}:py", str(bundle)],
                       check=True)
        _populate(bundle / "rootfs")
        subprocess.run(["umoci", "repack", "--image", f"{building}:py", str(bundle)], check=True)
        subprocess.run(["umoci", "config", "--image", f"{building}:py",
                        "--config.env", "PATH=/usr/local/bin:/usr/bin:/bin",
                        "--config.env", "LANG=C.UTF-8", "--config.env", "IMAGE_MARK=tiny-python"],
                       check=True)
        subprocess.run(["umoci", "gc", "--layout", str(building)], check=True)
        shutil.move(str(building), str(layout))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return layout


def push(layout: Path, registry: Registry, name: str) -> str:
    """Copy the layout's ``py`` image to ``registry`` as ``name``; the docker:// reference."""
    reference = f"docker://{registry.host}/{name}"
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:py",
                    reference], check=True, capture_output=True, timeout=300)
    return reference
