"""A bubblewrap sandbox around python-mode runs (``--sandbox auto|bwrap|off``).

:func:`detect` decides once, when the executor starts, whether runs are sandboxed: ``off``
never; ``bwrap`` always (a host where ``bwrap`` is missing or cannot make namespaces stops
the executor with :class:`SandboxError`); ``auto`` when ``bwrap`` is installed and works.

:meth:`Sandbox.wrap` turns an experiment's command into a ``bwrap`` command line that gives
the run, in this order (later mounts win over earlier ones):

* the host's root file system **read-only** (``--ro-bind / /``), a fresh ``/dev`` (null,
  zero, random, tty, ...; no disks), a ``/proc`` of its own **PID namespace** (it sees its
  own processes only), private IPC and UTS namespaces and no capabilities (``--cap-drop
  ALL``: it cannot remount what hides the host's folders);
* empty private ``tmpfs`` over ``/tmp``, ``/var/tmp``, ``/run`` (the host's sockets, the
  container engines' among them) and ``/dev/shm``;
* empty ``tmpfs`` over every **hidden folder**: the runner's working directory (every
  attempt's folder), cache (artifact cache and environment store), queue root, runtime
  directory (its ZeroMQ sockets), credential and key folders (``--sqs-certs``,
  ``--google-certs``, ``--encrypt-key-dir``, ``--encrypt-passphrase-dir``,
  ``--signing-keys-dir``) and the runner user's ``$HOME``; ``/dev/null`` over every
  **hidden file** (``--s3-key``, ``--s3-cert``, ``--options-file``, the files that
  ``$GOOGLE_APPLICATION_CREDENTIALS``, ``$AWS_SHARED_CREDENTIALS_FILE`` and
  ``$AWS_CONFIG_FILE`` name);
* then, back in place: the **attempt's working directory read-write** (its workspace and
  artifact folders), the run's **environment read-only** (and the interpreter installation
  it was made from, when a hidden folder covers it), ``/etc/resolv.conf``'s target when it
  lies in ``/run``;
* the **device nodes of the run's GPUs** only (``/dev/nvidia<minor>`` for each UUID, found
  in ``/proc/driver/nvidia/gpus/*/information``) with ``nvidiactl``, ``nvidia-uvm``,
  ``nvidia-uvm-tools`` and ``nvidia-modeset``;
* the runner's environment **without its secrets**: :func:`environment_for_runs` drops every
  variable whose name says it holds a secret (``*SECRET*``, ``*TOKEN*``, ``*PASSW*``,
  ``*ACCESS_KEY*``, ``*CREDENTIAL*``, ...: :func:`runner.redact.is_secret_name`) before it
  is passed on or used for ``%NAME%`` in ``config.env``; the request's own ``config.env``
  values are the experiment's and are kept;
* the network of the host, or none at all (``--unshare-net``: loopback only) with
  ``--sandbox-network off``.

Stopping: SIGTERM to the run's process group must reach the experiment (it is in the group)
while ``bwrap`` itself waits for it; the wrapper therefore starts ``bwrap`` with SIGTERM
ignored and the experiment with SIGTERM back at its default (``env --default-signal``), so the
kill grace is the experiment's to use.  SIGKILL reaches everything: the namespace's first
process dies and the kernel kills the rest, and ``--die-with-parent`` takes the run down when
the runner is gone.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RunnerError
from .redact import is_secret_name

log = logging.getLogger("runner.sandbox")

#: The interface nodes every GPU process needs besides its own ``/dev/nvidia<minor>``.
NVIDIA_SHARED_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                       "/dev/nvidia-modeset")
NVIDIA_GPU_INFO = "/proc/driver/nvidia/gpus"
PRIVATE_FOLDERS = ("/tmp", "/var/tmp", "/run", "/dev/shm")
CREDENTIAL_FILE_VARIABLES = ("GOOGLE_APPLICATION_CREDENTIALS", "AWS_SHARED_CREDENTIALS_FILE",
                             "AWS_CONFIG_FILE")
#: Started by ``/bin/sh``: ignore SIGTERM for ``bwrap`` (``$@``), see the module docstring.
_IGNORE_TERM = 'trap "" TERM; exec "$@"'


class SandboxError(RunnerError):
    """The sandbox that was asked for cannot be made on this host."""


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def gpu_device_nodes(uuids: Iterable[str], info_root: str = NVIDIA_GPU_INFO) -> list[str]:
    """``/dev/nvidia<minor>`` of each GPU UUID (NVIDIA driver's ``information`` files).

    A UUID the driver does not list is left out (the run then cannot open that device);
    the shared interface nodes are not included.
    """
    wanted = {u.strip() for u in uuids if u.strip()}
    nodes = []
    for info in sorted(glob.glob(os.path.join(info_root, "*", "information"))):
        fields = {}
        try:
            text = Path(info).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
        if fields.get("GPU UUID") in wanted and fields.get("Device Minor", "").isdigit():
            nodes.append(f"/dev/nvidia{fields['Device Minor']}")
    return nodes


@dataclass(frozen=True)
class Sandbox:
    """How runs are wrapped: the ``bwrap`` binary, what is hidden, whether there is network."""

    bwrap: str
    hidden_folders: tuple = ()
    hidden_files: tuple = ()
    network: bool = True
    gpu_info: str = NVIDIA_GPU_INFO
    reset_term: tuple = field(default=("env", "--default-signal=TERM"))

    def describe(self) -> str:
        return (f"bubblewrap sandbox ({self.bwrap}; network "
                f"{'on' if self.network else 'off'}; {len(self.hidden_folders)} folders "
                f"and {len(self.hidden_files)} files hidden)")

    def wrap(self, command: list[str], *, workdir: str, cwd: str,
             readable: Iterable[str] = (), devices: Iterable[str] = ()) -> list[str]:
        """``command`` run inside the sandbox.

        ``workdir`` (the attempt's folder) is bound read-write; each ``readable`` path
        that a hidden folder covers is bound back read-only; ``devices`` are GPU UUIDs.
        """
        args = [self.bwrap, *namespace_args(self.network), "--ro-bind", "/", "/",
                "--dev", "/dev", "--proc", "/proc"]
        covering = list(PRIVATE_FOLDERS)
        for folder in PRIVATE_FOLDERS:
            args += ["--tmpfs", folder]
        for folder in self.hidden_folders:
            if os.path.isdir(folder) and folder != "/":
                args += ["--tmpfs", folder]
                covering.append(folder)
        for name in self.hidden_files:
            if os.path.isfile(name):
                args += ["--ro-bind", "/dev/null", name]
        workdir = os.path.realpath(workdir)  # bwrap makes mount points along real paths
        args += ["--bind", workdir, workdir]
        resolv = os.path.realpath("/etc/resolv.conf")
        for path in [*(os.path.realpath(p) for p in readable), resolv]:
            if os.path.exists(path) and any(_inside(path, c) for c in covering):
                args += ["--ro-bind", path, path]
        args += gpu_args(devices, self.gpu_info)
        # Real path: a link on the way may lie in a folder that the sandbox covers.
        args += ["--chdir", os.path.realpath(cwd), "--"]
        return handing_over_sigterm(args, self.reset_term, command)


def namespace_args(network: bool) -> list[str]:
    """bwrap options: own PID, IPC, UTS (and cgroup) namespaces, no capabilities, the
    network cut unless ``network``; ends the run when its parent dies."""
    args = ["--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--cap-drop", "ALL"]
    return args if network else [*args, "--unshare-net"]


def gpu_args(devices: Iterable[str], info_root: str = NVIDIA_GPU_INFO) -> list[str]:
    """bwrap options binding the device nodes of the GPUs ``devices`` (UUIDs) only."""
    nodes = gpu_device_nodes(devices, info_root) if devices else []
    if nodes:
        nodes += [n for n in NVIDIA_SHARED_NODES if os.path.exists(n)]
    return [arg for node in nodes for arg in ("--dev-bind", node, node)]


def handing_over_sigterm(bwrap_args: list[str], reset_term: tuple | list,
                         command: list[str]) -> list[str]:
    """The bwrap command line started with SIGTERM ignored, ``reset_term`` (a command
    prefix that restores SIGTERM's default and execs the rest) in front of ``command``:
    SIGTERM to the run's process group then reaches the experiment but not bwrap.
    Without ``reset_term`` SIGTERM ends bwrap and, with it, the whole run at once."""
    if not reset_term:
        return [*bwrap_args, *command]
    return ["/bin/sh", "-c", _IGNORE_TERM, "runner-bwrap", *bwrap_args, *reset_term, *command]


def environment_for_runs(environ: Mapping[str, str]) -> dict:
    """The runner's environment as a sandboxed run may see it: no secret-named variables,
    none naming credential files, none of the runner's own options (``RUNNER_AMQP_URL``
    and its go-runner name carry the broker's password in the URL)."""
    from .config import OPTIONS  # the option table, not needed before a run starts

    options = {name for option in OPTIONS for name in option.env_names}
    return {name: value for name, value in environ.items()
            if not is_secret_name(name) and name not in CREDENTIAL_FILE_VARIABLES
            and name not in options}


def hidden_paths(config, environ: Mapping[str, str]) -> tuple[tuple, tuple]:
    """(folders, files) of the runner that a sandboxed run must not see."""
    folders = [config.working_dir, config.cache_dir, config.runtime_dir, config.queue_root,
               config.sqs_certs, config.google_certs, environ.get("HOME", ""),
               config.encrypt_key_dir, config.encrypt_passphrase_dir, config.signing_keys_dir]
    files = [config.s3_key, config.s3_cert, config.options_file,
             *(environ.get(name, "") for name in CREDENTIAL_FILE_VARIABLES)]
    def clean(paths: list) -> tuple:
        return tuple(dict.fromkeys(os.path.realpath(p) for p in paths if p))
    return clean(folders), clean(files)


def _works(bwrap: str, reset_term: tuple) -> str:
    """Empty when ``bwrap`` can make a sandbox here, else why not."""
    probe = Sandbox(bwrap, network=False, reset_term=reset_term)
    try:
        done = subprocess.run(probe.wrap(["true"], workdir="/", cwd="/"),
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{bwrap} cannot be run: {exc}"
    if done.returncode != 0:
        return f"{bwrap} cannot make a sandbox here: {done.stderr.strip() or done.returncode}"
    return ""


def detect(config, environ: Mapping[str, str] | None = None
           ) -> tuple[Sandbox | None, str]:
    """The sandbox for this host's runs, or None and why not.

    Raises :class:`SandboxError` when ``--sandbox bwrap`` was asked for and cannot be had.
    """
    environ = os.environ if environ is None else environ
    mode = getattr(config, "sandbox", "off")
    if mode == "off":
        return None, "sandbox off (--sandbox off): runs see the host as the runner's user"
    bwrap = shutil.which("bwrap")
    reset_term: tuple = ("env", "--default-signal=TERM")
    why = "bwrap (bubblewrap) is not installed" if bwrap is None else ""
    if bwrap is not None:
        if subprocess.run(["env", "--default-signal=TERM", "true"],
                          capture_output=True).returncode != 0:
            reset_term = ()  # old coreutils: runs get no SIGTERM grace inside the sandbox
        why = _works(bwrap, reset_term)
    if why or bwrap is None:
        if mode == "bwrap":
            raise SandboxError(f"--sandbox bwrap: {why}")
        return None, f"no sandbox: {why} (--sandbox auto)"
    folders, files = hidden_paths(config, environ)
    sandbox = Sandbox(bwrap, folders, files, network=config.sandbox_network == "on",
                      reset_term=reset_term)
    return sandbox, "" if reset_term else "env --default-signal missing: no SIGTERM grace"
