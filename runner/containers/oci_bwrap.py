"""OCI images without a container engine: skopeo pulls, umoci unpacks, bubblewrap runs.

For hosts without Apptainer where podman cannot run (see ``docs/containers.md``).

**Pull** (:class:`OciRegistry`, a :class:`~runner.storage.base.Store` for ``docker://``
references, used through the cache manager's image cache, an
:class:`~runner.cache.ArtifactCache` with the artifact cache's size bound and LRU):
``skopeo inspect`` resolves the reference to its manifest digest (the cache key: a moved tag
is pulled again, the same digest never twice); on a miss ``skopeo copy`` fetches that digest
into a scratch OCI layout and ``umoci unpack`` (``--rootless`` when not root) unpacks it into
the cache entry (a folder: ``rootfs/`` and the image's ``config.json``).  Registries on
loopback addresses are spoken to over plain HTTP, as Docker does; any other registry
needs TLS.

**Run** (:class:`OciBwrapRuntime`): ``bwrap`` with a fresh ``tmpfs`` as ``/``, each top-level
entry of the image's ``rootfs`` bound **read-only** (or re-made as the same symlink), a fresh
``/dev`` and ``/proc``, private ``/tmp``, ``/run`` and ``/var/tmp``, the attempt's folder
read-write at ``/studioml``, the host's ``resolv.conf``/``hosts`` when the image has those
files, the run's GPU device nodes only, own PID/IPC/UTS namespaces, no capabilities, network
as ``--sandbox-network`` says.  The environment is the image's (``Env`` of its config, its
``PATH`` first) plus the experiment's variables.  ``bwrap`` is no daemon: everything stays
in the run's process group and cgroup (its memory limit holds inside the container).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import BadRequest, StorageError
from ..sandbox import gpu_args, handing_over_sigterm, namespace_args
from ..storage.base import ObjectInfo, Store
from .base import (ATTEMPT_MOUNT, CONTAINER_PYTHON, ContainerRuntime, ImageRef, Launch,
                   on_loopback)

PULL_TIMEOUT = 3600.0  # seconds one skopeo copy may take (a 10 GB image on a slow link)
INSPECT_TIMEOUT = 120.0
#: Made by the runtime itself, never bound from the image.
OWN_MOUNTS = ("dev", "proc", "tmp", "run", ATTEMPT_MOUNT.strip("/"))
#: Restores SIGTERM's default, then runs argv[1:] (the image's python is the only program
#: every image here is known to have).
RESET_TERM = (CONTAINER_PYTHON, "-c", "import os, signal, sys; signal.signal(signal.SIGTERM, "
              "signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])")


class OciRegistry(Store):
    """``docker://`` references as cache objects: identity = manifest digest, ``get``
    writes the unpacked image (a folder)."""

    def __init__(self, skopeo: str = "skopeo", umoci: str = "umoci"):
        self.skopeo, self.umoci = skopeo, umoci

    def _tls(self, reference: str, flag: str) -> list[str]:
        return [f"{flag}=false"] if on_loopback(reference) else []

    def _run(self, argv: list[str], what: str, timeout: float) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StorageError(f"{what}: {exc}") from exc
        if done.returncode != 0:
            message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
            if any(s in done.stderr for s in ("manifest unknown", "name unknown",
                                              "not found", "invalid reference format")):
                raise BadRequest(f"{what}: {message}")
            raise StorageError(f"{what}: {message or f'exit status {done.returncode}'}")
        return done.stdout

    def stat(self, url: str) -> ObjectInfo:
        out = self._run([self.skopeo, "inspect", "--no-tags", *self._tls(url, "--tls-verify"),
                         "--format", "{{.Digest}}", url], f"image {url}", INSPECT_TIMEOUT)
        digest = out.strip()
        if not digest.startswith("sha256:"):
            raise StorageError(f"image {url}: skopeo gave no digest ({digest!r})")
        return ObjectInfo(url=url, size=0, etag=digest, mtime=0.0)

    def identity(self, info: ObjectInfo) -> str:
        return f"oci-image\n{info.etag}"

    def pinned(self, url: str, digest: str) -> str:
        """``url`` with its tag replaced by ``digest`` (what was inspected is what is pulled)."""
        name = url.split("://", 1)[1].split("@", 1)[0]
        last = name.rsplit("/", 1)
        if ":" in last[-1]:
            name = name[:len(name) - len(last[-1])] + last[-1].split(":", 1)[0]
        return f"docker://{name}@{digest}"

    def get(self, url: str, dest: Path) -> ObjectInfo:
        info = self.stat(url)
        dest = Path(dest)
        layout = dest.with_name(dest.name + ".layout")
        try:
            self._run([self.skopeo, "copy", "--quiet", *self._tls(url, "--src-tls-verify"),
                       self.pinned(url, info.etag), f"oci:{layout}:image"],
                      f"pulling {url}", PULL_TIMEOUT)
            rootless = ["--rootless"] if os.geteuid() != 0 else []
            self._run([self.umoci, "unpack", *rootless, "--image", f"{layout}:image", str(dest)],
                      f"unpacking {url}", PULL_TIMEOUT)
        finally:
            shutil.rmtree(layout, ignore_errors=True)
        return info

    def put(self, url: str, src: Path) -> ObjectInfo:
        raise StorageError("images are pulled, never pushed")

    def list(self, prefix_url: str) -> list[str]:
        raise StorageError("a registry's images are not listed")


def image_environment(bundle: Path) -> dict:
    """The ``Env`` of an unpacked image's runtime config (``NAME=value`` list)."""
    try:
        config = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    env = {}
    for item in (config.get("process") or {}).get("env") or []:
        name, _, value = str(item).partition("=")
        if name:
            env[name] = value
    return env


class OciBwrapRuntime(ContainerRuntime):
    name = "bwrap"

    def __init__(self):
        self.programs = {name: shutil.which(name) for name in ("bwrap", "skopeo", "umoci")}

    def missing(self) -> str:
        absent = [name for name, path in self.programs.items() if path is None]
        return f"{', '.join(absent)} not installed" if absent else ""

    def accepts(self, image: ImageRef) -> bool:
        return image.scheme == "docker"

    def registry(self) -> OciRegistry:
        return OciRegistry(self.programs["skopeo"] or "skopeo", self.programs["umoci"] or "umoci")

    def command(self, launch: Launch, environ: dict) -> tuple[list[str], dict]:
        bundle = Path(launch.image)
        rootfs = bundle / "rootfs"
        args = [self.programs["bwrap"] or "bwrap", *namespace_args(launch.network),
                "--tmpfs", "/"]
        for entry in sorted(rootfs.iterdir()):
            if entry.name in OWN_MOUNTS:
                continue
            if entry.is_symlink():
                args += ["--symlink", os.readlink(entry), f"/{entry.name}"]
            else:
                args += ["--ro-bind", str(entry), f"/{entry.name}"]
        args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/run"]
        if (rootfs / "var" / "tmp").is_dir():
            args += ["--tmpfs", "/var/tmp"]
        for name in ("resolv.conf", "hosts"):
            host = os.path.realpath(f"/etc/{name}")
            if launch.network and (rootfs / "etc" / name).exists() and os.path.isfile(host):
                args += ["--ro-bind", host, f"/etc/{name}"]
        args += ["--bind", launch.workdir, ATTEMPT_MOUNT, *gpu_args(launch.devices),
                 "--chdir", f"{ATTEMPT_MOUNT}/workspace", "--"]
        env = image_environment(bundle)
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(launch.variables)
        return handing_over_sigterm(args, RESET_TERM, list(launch.command)), env
