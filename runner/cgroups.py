"""One cgroup per run: CPU quota, memory limit and process-count limit, enforced by the kernel.

:func:`detect` finds how this host can do it, once, when the executor starts:

* **cgroup v2** (a unified hierarchy with controllers, ``/sys/fs/cgroup/cgroup.controllers``):
  runs go under ``<the runner's own cgroup>/studioml-runs-<instance>/<attempt>``.  The v2
  rule "no processes in a cgroup that delegates controllers" means the runner's own cgroup
  must be free of processes: :func:`delegate_v2` (called by the supervisor before it starts
  its roles) moves the supervisor into a ``<own>/runner`` leaf when it is the only process
  there, as under systemd with ``Delegate=yes``; the roles are then in that leaf, and
  :func:`detect` puts the runs beside it, under the emptied ``<own>``.
* **cgroup v1** (one hierarchy per controller, as on many older hosts): runs go under
  ``<mount>/<own path>/studioml-runs-<instance>/<attempt>`` in each of the ``cpu``,
  ``memory`` and ``pids`` hierarchies that are mounted and writable.

Where neither is writable, :func:`detect` returns no driver and a reason, which the executor
logs once; the ledger's accounting still holds (resources are counted, not enforced).

A run enters its cgroup before it executes anything: the executor starts it through
:data:`ENTER_CODE` (``/bin/sh -c``), which writes its own pid into the cgroup and then
``exec``\\ s the experiment's command, so every process the run starts is inside.  (A shell,
not ``python -I -S``: it starts in about a millisecond where an interpreter took ~6 ms of
CPU for every run.)  It exits :data:`CANNOT_ENTER` (125) when it cannot enter the cgroup,
and the shell's 126/127 when the command cannot be executed or found.

Joining a cgroup is slow: the kernel waits for an RCU grace period on each move (5–25 ms
measured on a v1 host here, ``cgroup.procs`` written from Python), and removing one costs as
much.  So the executor's spare launcher is started ahead of need in a cgroup of its own
(``spare-<executor pid>-<n>``); a run that takes it gets its limits written into that cgroup
(:meth:`Cgroups.apply`) and the cgroup renamed after the attempt (:meth:`RunCgroup.rename`;
cgroup v1 only: v2 keeps the spare's name, the attempt's ``.run`` file lists the folders).

Limits: ``cpus`` → a CFS quota of ``cpus`` × the period; ``ram`` → the memory limit (and the
memory+swap limit on v1, so swap does not stretch it; ``memory.swap.max = 0`` on v2);
``pids`` → ``pids.max``.  After the run, :meth:`RunCgroup.oom_kills` says whether the kernel
killed something for exceeding the memory limit.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import RunnerError

log = logging.getLogger("runner.cgroups")

CONTROLLERS = ("cpu", "memory", "pids")
BASE_NAME = "studioml-runs"  # a runner's base folder: BASE_NAME-<instance>
CPU_PERIOD_US = 100_000
CANNOT_ENTER = 125  # exit status of ENTER_CODE when the cgroup cannot be entered
ENTER_CODE = (
    'while [ "$1" != -- ]; do\n'
    f'    echo $$ > "$1" || {{ echo "runner: cannot enter cgroup $1" >&2; exit {CANNOT_ENTER}; }}\n'
    '    shift\n'
    'done\n'
    'shift\n'
    'exec "$@"\n'
)


class CgroupError(RunnerError):
    """A cgroup could not be made or configured."""


@dataclass(frozen=True)
class Limits:
    """What one run may use; 0 means no limit of that kind."""

    cpus: float = 0
    ram: int = 0
    pids: int = 0


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _keyed(text: str) -> dict:
    """``name value`` lines as a dict of ints (cpu.stat, memory.events, oom_control)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


@dataclass
class RunCgroup:
    """The cgroup (v2) or cgroups (v1, one per controller) of one run."""

    version: int
    dirs: dict                  # controller (v1) or "unified" (v2) -> Path
    limits: Limits
    removed: bool = False

    def enter_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid into to join the run."""
        return sorted({str(d / "cgroup.procs") for d in self.dirs.values()})

    def rename(self, name: str) -> None:
        """Give the cgroup's folders the name ``name`` where the kernel allows it (cgroup
        v1; v2 has no rename: those folders keep their name)."""
        for folder in dict.fromkeys(self.dirs.values()):  # one folder may serve two controllers
            target = folder.with_name(name)
            try:
                os.rename(folder, target)
            except OSError as exc:
                log.debug("cgroup %s keeps its name (%s)", folder, exc.strerror or exc)
                continue
            self.dirs = {key: target if path == folder else path for key, path in self.dirs.items()}

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` started so that it runs inside this cgroup from its first instruction
        (:data:`ENTER_CODE` writes the shell's pid to :meth:`enter_files`)."""
        return ["/bin/sh", "-c", ENTER_CODE, "runner-enter-cgroup", *self.enter_files(), "--",
                *command]

    @staticmethod
    def shell_environment(env: dict, cwd: str) -> dict:
        """``env`` as the command of :meth:`wrap` started in ``cwd`` gets it: the shell
        exports ``PWD``, kept from ``env`` when it is absolute and names ``cwd``, else the
        physical path (what the command a spare launcher started in the cgroup is handed
        must be given instead)."""
        pwd = env.get("PWD", "")
        if pwd.startswith("/"):
            try:
                given, actual = os.stat(pwd), os.stat(cwd)
                if (given.st_dev, given.st_ino) == (actual.st_dev, actual.st_ino):
                    return dict(env)
            except OSError:
                pass
        return dict(env, PWD=os.path.realpath(cwd))

    def _dir(self, controller: str) -> Path | None:
        return self.dirs.get("unified" if self.version == 2 else controller)

    def holds(self, pid: int) -> bool:
        """Whether process ``pid`` is in every folder of the cgroup (one started by
        :meth:`wrap` is once its shell has joined them all: only then may the folders be
        renamed under it)."""
        wanted = str(pid)
        return all(wanted in _read(folder / "cgroup.procs").split()
                   for folder in dict.fromkeys(self.dirs.values()))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for folder in self.dirs.values():
            for line in _read(folder / "cgroup.procs").split():
                if line.isdigit():
                    found.add(int(line))
        return sorted(found)

    def oom_kills(self) -> int:
        """Processes the kernel killed because the run reached its memory limit."""
        folder = self._dir("memory")
        if folder is None:
            return 0
        if self.version == 2:
            return _keyed(_read(folder / "memory.events")).get("oom_kill", 0)
        control = _keyed(_read(folder / "memory.oom_control"))
        if "oom_kill" in control:
            return control["oom_kill"]
        # kernels before 4.13 have no counter: hitting the limit is the best evidence
        return 1 if _keyed("failcnt " + _read(folder / "memory.failcnt").strip()).get("failcnt") else 0

    def usage(self) -> dict:
        """Facts for the scrape document: CPU time, throttling, memory peak, OOM kills."""
        facts: dict = {"version": self.version, "oom_kills": self.oom_kills()}
        cpu = self._dir("cpu")
        if cpu is not None:
            stat = _keyed(_read(cpu / "cpu.stat"))
            if "usage_usec" in stat:
                facts["cpu_seconds"] = stat["usage_usec"] / 1e6
            facts["cpu_throttled_periods"] = stat.get("nr_throttled", 0)
        if self.version == 1 and "cpuacct" in self.dirs:
            usage = _read(self.dirs["cpuacct"] / "cpuacct.usage").strip()
            if usage.isdigit():
                facts["cpu_seconds"] = int(usage) / 1e9
        memory = self._dir("memory")
        if memory is not None:
            name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
            peak = _read(memory / name).strip()
            if peak.isdigit():
                facts["memory_peak"] = int(peak)
        pids = self._dir("pids")
        if pids is not None:
            peak = _read(pids / "pids.peak").strip()
            if peak.isdigit():
                facts["pids_peak"] = int(peak)
            events = _keyed(_read(pids / "pids.events"))
            if "max" in events:
                facts["pids_limit_hits"] = events["max"]
        return facts

    def kill_all(self) -> None:
        """SIGKILL every process still in the cgroup (also those that left the process group)."""
        if self.version == 2:
            kill = self.dirs["unified"] / "cgroup.kill"
            if kill.exists():
                try:
                    _write(kill, "1")
                    return
                except OSError:
                    pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def remove(self) -> bool:
        """Remove the cgroup once it is empty; True when gone (safe to call again)."""
        if self.removed:
            return True
        busy = False
        for folder in self.dirs.values():
            try:
                os.rmdir(folder)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                    busy = True
                else:
                    log.warning("cannot remove cgroup %s: %s", folder, exc)
        self.removed = not busy
        return self.removed


@dataclass
class Cgroups:
    """How this host makes run cgroups: the version and the base folder(s)."""

    version: int
    bases: dict                       # controller (v1) or "unified" (v2) -> Path
    pids_limit: int = 0
    created: list = field(default_factory=list)

    def describe(self) -> str:
        where = ", ".join(f"{c}={p}" for c, p in sorted(self.bases.items()))
        kinds = "cpu, memory, pids" if self.version == 2 else ", ".join(
            c for c in CONTROLLERS if c in self.bases)
        return f"cgroups v{self.version}: {kinds} limits enforced per run under {where}"

    def create(self, name: str, limits: Limits) -> RunCgroup:
        """A cgroup for one run with ``limits`` applied; raises CgroupError."""
        dirs = {}
        try:
            for controller, base in self.bases.items():
                folder = base / name
                folder.mkdir(exist_ok=True)
                dirs[controller] = folder
            run = RunCgroup(self.version, dirs, limits)
            self.apply(run, limits)
        except OSError as exc:
            for folder in dirs.values():
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
            raise CgroupError(f"cannot set up cgroup {name}: {exc}") from exc
        return run

    def apply(self, run: RunCgroup, limits: Limits) -> None:
        """Write ``limits`` into ``run`` (0: that kind stays as it is, unlimited in a new
        cgroup; pids: ``--run-pids``); OSError when the kernel refuses one, or when a memory
        limit is below what the cgroup already uses (v1 refuses it with EBUSY; v2 would
        OOM-kill its processes: refused here with EBUSY before it is written)."""
        run.limits = limits
        pids = limits.pids or self.pids_limit
        if self.version == 2:
            folder = run.dirs["unified"]
            if limits.cpus:
                _write(folder / "cpu.max", f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
            if limits.ram:
                # v2 does not refuse a limit below the usage: it reclaims, then OOM-kills
                used = _read(folder / "memory.current").strip()
                if used.isdigit() and int(used) > limits.ram:
                    raise OSError(errno.EBUSY, f"memory limit {limits.ram} below the "
                                               f"{used} bytes the cgroup uses")
                _write(folder / "memory.max", str(limits.ram))
                if (folder / "memory.swap.max").exists():
                    _write(folder / "memory.swap.max", "0")
                if (folder / "memory.oom.group").exists():
                    _write(folder / "memory.oom.group", "1")
            if pids:
                _write(folder / "pids.max", str(pids))
            return
        if limits.cpus and "cpu" in run.dirs:
            _write(run.dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(run.dirs["cpu"] / "cpu.cfs_quota_us", str(int(limits.cpus * CPU_PERIOD_US)))
        if limits.ram and "memory" in run.dirs:
            _write(run.dirs["memory"] / "memory.limit_in_bytes", str(limits.ram))
            swap = run.dirs["memory"] / "memory.memsw.limit_in_bytes"
            if swap.exists():  # (absent: swap accounting is off, nothing to limit)
                try:
                    _write(swap, str(limits.ram))
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.EOPNOTSUPP):
                        raise  # e.g. EBUSY: memory and swap in use above the limit
        if pids and "pids" in run.dirs:
            _write(run.dirs["pids"] / "pids.max", str(pids))

    def remove_left(self, prefix: str, gone: Callable[[str], bool]) -> None:
        """Remove the empty cgroups named ``prefix…`` under the bases whose name ``gone``
        says is of a process that has stopped (spare launchers' cgroups an executor that
        was killed left behind; another live executor's are kept, a busy one stays)."""
        for base in self.bases.values():
            for child in base.glob(f"{prefix}*"):
                if gone(child.name):
                    _remove_tree(child)

    def remove_stopped_bases(self, gone: Callable[[str], bool]) -> None:
        """Remove the base folders (``BASE_NAME-<instance>``, siblings of this runner's) of
        the instances ``gone`` says have stopped, with the empty cgroups in them (what a
        runner that was killed left: its runs' processes are killed at recovery, its
        spare launchers die with it); one with a process in it stays."""
        own = {base.name for base in self.bases.values()}
        for base in self.bases.values():
            for sibling in base.parent.glob(f"{BASE_NAME}-*"):
                instance = sibling.name[len(BASE_NAME) + 1:]
                if sibling.name not in own and sibling.is_dir() and gone(instance):
                    _remove_tree(sibling)

    def cleanup(self) -> None:
        """Remove the base folders (at executor shutdown, once the runs are gone)."""
        for base in self.bases.values():
            _remove_tree(base)


# -- finding the hierarchy -----------------------------------------------------------------

def _own_paths(proc_cgroup: str) -> dict:
    """``/proc/self/cgroup`` as controller -> path; the v2 entry under ``""``."""
    paths = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, path = parts
        for name in (controllers.split(",") if controllers else [""]):
            paths[name] = path
    return paths


def _mounts(mountinfo: str) -> dict:
    """``/proc/self/mountinfo`` as controller (v1) or "" (v2) -> (mount point, mount root)."""
    found: dict[str, tuple[str, str]] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point, fstype, options = fields[3], fields[4], tail[0], tail[2]
        if fstype == "cgroup2":
            found.setdefault("", (point, root))
        elif fstype == "cgroup":
            for option in options.split(","):
                if option in CONTROLLERS or option == "cpuacct":
                    found.setdefault(option, (point, root))
    return found


def _join(point: str, root: str, path: str) -> Path:
    relative = path[len(root):] if root != "/" and path.startswith(root) else path
    return Path(point) / relative.lstrip("/")


def detect(mode: str, instance: str, proc: str = "/proc/self",
           base_name: str = BASE_NAME) -> tuple[Cgroups | None, str]:
    """The cgroup driver for this host, or None and why the runner only accounts.

    ``mode`` is the ``--cgroups`` option (``auto`` or ``off``); ``instance`` names the
    runner's base folder so that concurrent runners never share one.
    """
    if mode == "off":
        return None, "cgroups off (--cgroups off): resources are accounted, not enforced"
    try:
        own = _own_paths(Path(proc, "cgroup").read_text())
        mounts = _mounts(Path(proc, "mountinfo").read_text())
    except OSError as exc:
        return None, f"cgroups unavailable ({exc}): resources are accounted, not enforced"
    name = f"{base_name}-{instance}"
    reasons = []
    if "" in mounts and "" in own:
        point, root = mounts[""]
        parent = _join(point, root, own[""])
        if parent.name == DELEGATE_LEAF and not _read(parent.parent / "cgroup.procs").split():
            # delegate_v2 moved the supervisor into <own>/runner, whose processes forbid
            # it to delegate controllers: runs go beside it, under the emptied <own>.
            parent = parent.parent
        available = _read(parent / "cgroup.controllers").split()
        if all(c in available for c in CONTROLLERS):
            try:
                enabled = _read(parent / "cgroup.subtree_control").split()
                missing = [c for c in CONTROLLERS if c not in enabled]
                if missing:
                    _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
                base = parent / name
                base.mkdir(exist_ok=True)
                _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
                return Cgroups(2, {"unified": base}), ""
            except OSError as exc:
                hint = (" (it holds processes: run the runner in a cgroup of its own, e.g. "
                        "systemd Delegate=yes)" if exc.errno == errno.EBUSY else "")
                reasons.append(f"v2 at {parent} not writable: {exc.strerror}{hint}")
        elif available:  # an empty list is a hybrid host's controller-less v2: use v1
            reasons.append(f"v2 at {parent} lacks controllers "
                           f"{', '.join(c for c in CONTROLLERS if c not in available)}")
    bases = {}
    for controller in CONTROLLERS + ("cpuacct",):
        if controller not in mounts or controller not in own:
            continue
        point, root = mounts[controller]
        base = _join(point, root, own[controller]) / name
        try:
            base.mkdir(exist_ok=True)
            probe = {"cpu": "cpu.cfs_quota_us", "memory": "memory.limit_in_bytes",
                     "pids": "pids.max", "cpuacct": "cpuacct.usage"}[controller]
            if not (base / probe).exists():
                raise OSError(errno.ENOENT, f"no {probe}")
            bases[controller] = base
        except OSError as exc:
            reasons.append(f"v1 {controller} at {base.parent} not writable: "
                           f"{exc.strerror or exc}")
    if any(c in bases for c in CONTROLLERS):
        return Cgroups(1, bases), "; ".join(reasons)
    why = "; ".join(reasons) or "no cgroup hierarchy with cpu, memory or pids controllers"
    return None, f"cgroups not usable ({why}): resources are accounted, not enforced"


DELEGATE_LEAF = "runner"  # the leaf delegate_v2 moves the supervisor (and so its roles) into


def delegate_v2(proc: str = "/proc/self") -> str:
    """Prepare a cgroup v2 host for :func:`detect`: move this process into ``<own>/runner``.

    Only when the own cgroup holds this process alone (a service of its own, such as a
    systemd unit with ``Delegate=yes``) and does not delegate controllers yet; anything
    else is left alone.  Returns what was done (empty when nothing).  Children started
    afterwards (the roles) inherit the leaf.
    """
    try:
        own = _own_paths(Path(proc, "cgroup").read_text())
        mounts = _mounts(Path(proc, "mountinfo").read_text())
    except OSError:
        return ""
    if "" not in mounts or "" not in own or own[""] in ("/", ""):
        return ""
    point, root = mounts[""]
    parent = _join(point, root, own[""])
    if not _read(parent / "cgroup.controllers").split():
        return ""
    members = _read(parent / "cgroup.procs").split()
    if members != [str(os.getpid())]:
        return ""
    leaf = parent / DELEGATE_LEAF
    try:
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
    except OSError as exc:
        return f"could not move into {leaf}: {exc}"
    return f"moved the supervisor into {leaf} so that runs can get cgroups of their own"


def _remove_tree(folder: Path) -> bool:
    """Remove the cgroup ``folder`` and the cgroups under it, deepest first, where empty;
    True when it is gone.  Folders that vanish while it walks (another runner removing the
    same stopped runner's tree) are skipped, never an error."""
    for parent, folders, _files in os.walk(folder, topdown=False, onerror=lambda _exc: None):
        for name in folders:
            try:
                os.rmdir(os.path.join(parent, name))
            except OSError:
                pass
    try:
        os.rmdir(folder)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def wait_emptied(run: RunCgroup, timeout: float = 1.0) -> bool:
    """Kill what is left in ``run`` until no process of it remains (a SIGKILLed process
    stays a member while it exits: freeing a large memory takes up to ~100 ms); False
    when some still remain after ``timeout`` seconds (one stuck in the kernel, state D)."""
    deadline = time.monotonic() + timeout
    while run.pids():
        if time.monotonic() > deadline:
            return False
        run.kill_all()
        time.sleep(0.005)
    return True


def wait_removed(run: RunCgroup, timeout: float = 2.0) -> bool:
    """Kill what is left in ``run`` and remove it, waiting briefly for the kernel."""
    deadline = time.monotonic() + timeout
    while True:
        run.kill_all()
        if run.remove() or time.monotonic() > deadline:
            return run.removed
        time.sleep(0.02)
