"""Apptainer and SingularityCE: ``apptainer exec`` / ``singularity exec``.

The command line (their documented CLI, the same for both):

``apptainer exec --containall --bind <attempt>:/studioml --pwd /studioml/workspace
[--nv] [--net --network none] <image> python3 <filename> <args>``

* ``--containall``: a clean environment (``--cleanenv``), private ``/tmp``, ``$HOME``,
  IPC and PID namespaces; the host's file system is not mounted except what is bound;
* the experiment's variables reach it as ``APPTAINERENV_<NAME>`` (``SINGULARITYENV_`` for
  singularity) in the runtime's environment, never on its command line (where any user could
  read them in ``/proc``);
* ``--nv`` when the run has GPUs: the runtime binds the NVIDIA libraries and device nodes,
  ``CUDA_VISIBLE_DEVICES`` / ``NVIDIA_VISIBLE_DEVICES`` (the run's UUIDs) pick the devices;
* ``--net --network none`` with ``--sandbox-network off``;
* ``--nohttps`` for a reference to a registry on a loopback address.

The image is a ``.sif`` file from the artifact cache (read in place, never copied) or a
reference (``docker://``, ``oras://``, ``library://``, ``shub://``) that the runtime pulls
into its own cache.  Apptainer runs without a daemon: the container's processes stay in the
run's process group and cgroup, so stopping, ``max_duration`` and the cgroup limits work as
in python mode.
"""
from __future__ import annotations

import shutil

from .base import ATTEMPT_MOUNT, ContainerRuntime, ImageRef, Launch, on_loopback

#: The runtime's own variables kept from the runner's environment (it needs them to start).
PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "TMPDIR", "HOME", "USER", "XDG_RUNTIME_DIR")


class ApptainerRuntime(ContainerRuntime):
    name = "apptainer"
    env_prefix = "APPTAINERENV_"

    def __init__(self, program: str | None = None):
        self.program = program or shutil.which(self.name) or self.name

    def missing(self) -> str:
        return "" if shutil.which(self.program) else f"{self.name} is not installed"

    def accepts(self, image: ImageRef) -> bool:
        return True  # .sif files and every reference scheme

    def command(self, launch: Launch, environ: dict) -> tuple[list[str], dict]:
        argv = [self.program, "exec", "--containall",
                "--bind", f"{launch.workdir}:{ATTEMPT_MOUNT}",
                "--pwd", f"{ATTEMPT_MOUNT}/workspace"]
        if launch.devices:
            argv.append("--nv")
        if not launch.network:
            argv += ["--net", "--network", "none"]
        if "://" in launch.image and on_loopback(launch.image):
            argv.append("--nohttps")  # a registry on this host: plain HTTP
        argv += [launch.image, *launch.command]
        env = {k: environ[k] for k in PASSED_THROUGH if k in environ}
        env.update({self.env_prefix + name: value for name, value in launch.variables.items()})
        return argv, env


class SingularityRuntime(ApptainerRuntime):
    name = "singularity"
    env_prefix = "SINGULARITYENV_"
