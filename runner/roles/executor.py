"""The executor pool: starts experiment processes and watches them to the end.

Each ``AttemptPrepared`` becomes one child process in its own session (so the experiment and
every process it starts form one process group, killed together) and, where the host
allows it, its own cgroup (:mod:`runner.cgroups`: CPU quota from ``cpus``, memory limit
from ``ram``, ``--run-pids`` processes), with the working directory, environment and
command SPEC section 5 describes; the GPUs are the devices the fetcher's ledger reserved.
A run the kernel killed at its memory limit ends failed with ``out of memory: limit …``.  A reader thread per run
streams stdout and stderr (separate pipes, so that neither cuts a line of the other) to the
scraper in whole segments (:mod:`runner.output`).
The loop enforces ``max_duration``, ``time_added + experimentLifetime`` and stop requests
with SIGTERM to the group, ``--kill-grace``, then SIGKILL.  When the main process has
exited, whatever it left behind in its group is killed, and the attempt ends with an
``AttemptEnded`` for the scraper.

Isolation (:meth:`Executor.isolate`, docs/containers.md): a python-mode run starts inside
the bubblewrap sandbox where ``--sandbox`` gives one (:mod:`runner.sandbox`); a
container-mode run starts through its runtime's command line (:mod:`runner.containers`).
Either is one command started, watched and stopped like any other run, inside the run's
cgroup.

Spare launcher (``--spare-launcher on``, the default): the executor keeps one run launcher
(:mod:`runner.launcher`, spare mode) started ahead of need, blocked on its standard input,
where cgroups are enforced already inside a cgroup of its own (joining a cgroup costs the
kernel 5–25 ms, see :mod:`runner.cgroups`).  A run then starts by writing its limits into
that cgroup, naming it after the attempt, and writing the launcher the command, working
directory and environment, with no ``/bin/sh``, no interpreter start and no cgroup move on
the way; from then on the spare is the run's process like a launcher started for it.  A new
spare is started at the next tick.  Without a usable spare (none yet, it died, a spec over
:data:`SPARE_SPEC_LIMIT`, limits its cgroup refused) the run is started the direct way, as
before; a spare that cannot enter its cgroup turns spares off.  The spare is no run: not in
``runs``, not in the attempt files, killed at shutdown.  A finished run's cgroup is removed
off the loop's thread, after its end is posted (the kernel takes as long as for a move).
"""
from __future__ import annotations

import errno
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import attempt_files, cgroups, containers, fates, launcher, proctree, protocol, sandbox
from ..config import Config, instance_gone
from ..argv import script_command
from ..errors import BadRequest, RunnerError
from ..output import Segments, join_pieces
from ..resources import device_list
from ..storage import request_env
from ..units import describe_size
from .base import Role

READ_SIZE = 64 * 1024
DISK_CHECK_EVERY = 1.0  # seconds between two measures of the runs' working directories
SPARE_SPEC_LIMIT = 64 * 1024  # bytes: a larger spec (argv, env) takes the direct way
SPARE_RETRY = 5.0  # seconds before another spare after one failed to start or died unused
SPARE_CGROUP = "spare-"  # the name of a spare launcher's cgroup: SPARE_CGROUP<pid>-<n>
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")
_RUNNER_PRIVATE_VARIABLES = ("RUNNER_ROLE_CONFIG", "RUNNER_SUPERVISOR_PID")


def experiment_variables(attempt: protocol.Attempt, base: dict, home: str | None = None) -> dict:
    """The variables the runner gives every experiment (SPEC section 5.5): ``config.env``
    (``%NAME%`` replaced where ``base`` has NAME, other ``%…%`` text kept), ``STUDIOML_*``,
    the GPUs and thread counts. ``home`` is the attempt's folder as the run sees it (default:
    ``attempt.workdir``)."""
    env = request_env(attempt.request, base)
    env["STUDIOML_EXPERIMENT"] = attempt.key
    env["STUDIOML_HOME"] = home or attempt.workdir
    env["PYTHONUNBUFFERED"] = "1"
    devices = attempt.resources.get("devices") or "-1"
    env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"] = devices
    threads = str(max(1, int(attempt.resources.get("cpus") or 1)))
    for name in THREAD_VARIABLES:
        env[name] = threads
    return env


def experiment_environment(attempt: protocol.Attempt, env_path: str, base: dict | None = None,
                           config: Config | None = None) -> dict:
    """The environment of an experiment's process (SPEC section 5.5): the runner's (``base``,
    default ``os.environ``) less what ``config`` keeps from experiments
    (:meth:`Config.passed_environment`), then :func:`experiment_variables` (``%NAME%`` from
    what is passed), then the prepared virtualenv's."""
    base = dict(os.environ if base is None else base)
    if config is not None:
        base = config.passed_environment(base)
    env = {k: v for k, v in base.items() if k not in _RUNNER_PRIVATE_VARIABLES}
    env.update(experiment_variables(attempt, env))
    env.pop("PYTHONHOME", None)
    env["VIRTUAL_ENV"] = env_path
    env["PATH"] = os.pathsep.join([str(Path(env_path) / "bin"), env.get("PATH", os.defpath)])
    return env


def workspace_script(workspace: Path, filename: str) -> Path:
    """``filename`` resolved inside ``workspace`` (links followed); BadRequest when it
    names a file outside it (an absolute path, ``..``, a link out of the workspace)."""
    root = Path(workspace).resolve()
    script = (root / filename).resolve()
    if script != root and root not in script.parents:
        raise BadRequest(f"experiment.filename {filename!r} is not a file inside the workspace")
    return script


def disk_allocated(path: str) -> int:
    """Bytes of disk allocated to the files under ``path`` (``st_blocks``, as ``du``
    counts them; symbolic links are not followed, hard links counted once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [path]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def launched(command: list[str]) -> list[str]:
    """``command`` started through the run launcher (:mod:`runner.launcher`) by this
    process (its pid is the launcher's expected parent)."""
    return [sys.executable, "-I", "-S", launcher.__file__, str(os.getpid()), "--", *command]


def spare_gone(name: str) -> bool:
    """Whether the executor that named the spare launcher's cgroup ``name``
    (``SPARE_CGROUP<pid>-<n>``) has stopped (another live executor's is not)."""
    pid = name[len(SPARE_CGROUP):].split("-", 1)[0]
    return pid.isdigit() and int(pid) != os.getpid() and proctree.has_stopped(int(pid))


def spare_command() -> list[str]:
    """A spare run launcher of this process: it waits for its command on standard input."""
    return [sys.executable, "-I", "-S", launcher.__file__, str(os.getpid()), "--spare"]


@dataclass
class Run:
    """One running attempt."""

    attempt: protocol.Attempt
    process: subprocess.Popen
    started: float
    stop_at: float | None
    limit: str
    reader: threading.Thread | None = None
    output_done: threading.Event = field(default_factory=threading.Event)
    stop_reason: BaseException | None = None
    term_sent: float | None = None
    killed: bool = False
    leftovers_killed: bool = False
    cgroup: cgroups.RunCgroup | None = None
    output_sent: int = 0  # bytes of output handed to the scraper (OutputChunk.offset)


class Executor(Role):
    name = "executor"
    TICK = 0.25  # deadlines and kill grace; a run's end wakes the loop at once (read_output)

    def tick_interval(self) -> float:
        return self.TICK if self.runs or self.leftover_cgroups else self.IDLE_TICK
    EXIT_WAIT = 0.5

    def initialize(self) -> None:
        self.runs: dict[str, Run] = {}
        self.stop_all: Exception | None = None
        self.stop_pending: dict[str, Exception] = {}
        self.cgroups, why = cgroups.detect(self.config.cgroups,
                                           self.config.instance or str(os.getpid()))
        if self.cgroups is not None:
            self.cgroups.pids_limit = self.config.run_pids
            self.log.info("%s, at most %d processes each", self.cgroups.describe(),
                          self.config.run_pids)
            if why:
                self.log.info("cgroups: %s", why)
        else:
            self.log.warning("%s", why)  # said once, at start-up
        self.leftover_cgroups: list[cgroups.RunCgroup] = []
        # Finished runs' cgroups are removed on a thread of their own (removal_done: those
        # still busy after it tried, for the loop to retry at its ticks).
        self.removals = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cgroup-removal")
        self.removal_done: queue.SimpleQueue[cgroups.RunCgroup] = queue.SimpleQueue()
        if self.cgroups is not None:  # what executors and runners that were killed left
            try:
                self.cgroups.remove_left(SPARE_CGROUP, spare_gone)
                self.cgroups.remove_stopped_bases(
                    lambda instance: instance_gone(instance, self.config.hostname))
            except OSError as exc:  # a tidy-up: it never stops a start
                self.log.warning("cgroups left by stopped runners not removed: %s", exc)
        self.stuck_until = 0.0  # until then, runs' processes stuck in the kernel: wait briefly
        # SandboxError (--sandbox bwrap where it cannot be had) stops the runner at start.
        self.sandbox, why = sandbox.detect(self.config)
        self.log.info("%s", self.sandbox.describe() if self.sandbox else why)
        if self.sandbox is not None and why:
            self.log.warning("sandbox: %s", why)
        usable, _ = containers.runtimes_for(self.config.container_runtime)
        self.runtimes = {runtime.name: runtime for runtime in usable}
        self.disk_over: dict[str, tuple[int, int]] = {}  # attempt id -> (bytes used, hdd)
        self._disk_watcher: threading.Thread | None = None
        # Orphans of a run whose launcher was killed come here, not to init (reap_orphans):
        # only in a process of its own, where every child is a run's launcher or an orphan.
        self.subreaper = self.own_process and proctree.become_subreaper()
        if self.own_process and not self.subreaper:
            self.log.warning("cannot become the child subreaper of runs: processes that "
                             "leave a run killed with SIGKILL may outlive it")
        # A launcher started ahead of need (started and replaced in tick(), by the loop's
        # thread: a launcher dies with the thread that started it).
        self.spare: subprocess.Popen | None = None
        self.spare_cgroup: cgroups.RunCgroup | None = None  # the spare's, where enforced
        self.spare_on = self.config.spare_launcher == "on"
        self._spare_not_before = 0.0
        self._spares_made = 0

    def limits_of(self, attempt: protocol.Attempt) -> cgroups.Limits:
        return cgroups.Limits(cpus=float(attempt.resources.get("cpus") or 0),
                              ram=int(attempt.resources.get("ram") or 0),
                              pids=self.config.run_pids)

    def enforce(self, attempt: protocol.Attempt) -> cgroups.RunCgroup | None:
        """A new cgroup with the attempt's limits (None: limits accounted, not enforced)."""
        if self.cgroups is None:
            return None
        try:
            return self.cgroups.create(attempt.attempt_id, self.limits_of(attempt))
        except cgroups.CgroupError as exc:
            self.log.warning("key=%s attempt=%s %s; limits not enforced for it", attempt.key,
                             attempt.attempt_id, exc)
            self.runner_log(attempt.attempt_id, f"{exc}; limits accounted, not enforced")
            return None

    def say_limits(self, attempt: protocol.Attempt, cgroup: cgroups.RunCgroup) -> None:
        limits = cgroup.limits
        self.runner_log(attempt.attempt_id, "cgroup v%d: %s CPUs, memory %s, at most %d processes"
                        % (cgroup.version, f"{limits.cpus:g}" if limits.cpus else "unlimited",
                           describe_size(limits.ram) if limits.ram else "unlimited",
                           limits.pids))

    def remove_cgroup(self, cgroup: cgroups.RunCgroup) -> None:
        """Kill what is left in ``cgroup`` and remove it, on the removal thread; one still
        busy goes to ``leftover_cgroups`` (retried at each tick)."""
        def remove() -> None:
            if not cgroups.wait_removed(cgroup, timeout=0.2):
                self.removal_done.put(cgroup)
                self.wake(tick=True)
        try:
            self.removals.submit(remove)
        except RuntimeError:  # shutting down: the loop's thread does it
            if not cgroups.wait_removed(cgroup, timeout=0.2):
                self.leftover_cgroups.append(cgroup)

    # -- the spare launcher ------------------------------------------------------------
    def keep_spare(self) -> None:
        """Loop's thread: have a spare launcher ready (started here, off any run's start),
        inside a cgroup of its own where cgroups are enforced."""
        if not self.spare_on or self.stopping:
            return
        if self.spare is not None:
            if self.spare.poll() is None:
                return
            ended = self.spare.returncode
            self.log.debug("the spare launcher (pid %d) ended unused: %s", self.spare.pid, ended)
            in_cgroup = self.spare_cgroup is not None
            self.retire_spare()
            if in_cgroup and ended == cgroups.CANNOT_ENTER:  # it would fail the same way again
                self.spare_on = False
                self.log.warning("a spare launcher cannot enter its cgroup: runs start "
                                 "without a spare launcher")
                return
            self._spare_not_before = time.monotonic() + SPARE_RETRY
        if time.monotonic() < self._spare_not_before:
            return
        command, cgroup = spare_command(), None
        if self.cgroups is not None:
            self._spares_made += 1
            try:
                cgroup = self.cgroups.create(self.spare_cgroup_name(), cgroups.Limits())
            except cgroups.CgroupError as exc:
                self.log.warning("no spare launcher for now (runs start without one): %s", exc)
                self._spare_not_before = time.monotonic() + SPARE_RETRY
                return
            command = cgroup.wrap(command)
        cwd = self.config.runtime_dir if os.path.isdir(self.config.runtime_dir) else "/"
        try:
            self.spare = subprocess.Popen(
                command, cwd=cwd, env={}, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                close_fds=True)
            self.spare_cgroup = cgroup
        except OSError as exc:
            self.log.warning("cannot start a spare launcher (runs start without one): %s", exc)
            self._spare_not_before = time.monotonic() + SPARE_RETRY
            if cgroup is not None:
                self.remove_cgroup(cgroup)

    def spare_cgroup_name(self) -> str:
        """The name of the latest spare launcher's cgroup."""
        return f"{SPARE_CGROUP}{os.getpid()}-{self._spares_made}"

    def retire_spare(self) -> None:
        """Stop the spare launcher (unused: it has started nothing), reap it and remove
        its cgroup."""
        spare, self.spare = self.spare, None
        cgroup, self.spare_cgroup = self.spare_cgroup, None
        if spare is not None:
            for pipe in (spare.stdin, spare.stdout, spare.stderr):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
            try:
                spare.kill()
                spare.wait(5.0)
            except (OSError, subprocess.TimeoutExpired):
                self.log.error("the spare launcher (pid %d) did not die", spare.pid)
        if cgroup is not None:
            self.remove_cgroup(cgroup)

    def start_with_spare(self, attempt: protocol.Attempt, command: list[str], environment: dict,
                         cwd: Path) -> tuple[subprocess.Popen | None, cgroups.RunCgroup | None]:
        """The run started by the spare launcher, and its cgroup (the spare's, with the
        attempt's limits and name); (None, None) when it must be started the direct way
        (no spare ready, a spec too large, limits the spare's cgroup refused)."""
        spare, cgroup = self.spare, self.spare_cgroup
        if spare is None or spare.stdin is None:
            return None, None
        if cgroup is not None:  # the direct start's shell sets PWD: so does this one
            environment = cgroup.shell_environment(environment, str(cwd))
        try:
            spec = launcher.encode_spec(command, str(cwd), environment)
        except (ValueError, TypeError):
            return None, None  # the direct way raises what it always raised
        if len(spec) > SPARE_SPEC_LIMIT:
            return None, None  # kept for the next run
        if spare.poll() is not None:
            return None, None  # keep_spare retires it at the next tick (back-off, status 125)
        if cgroup is not None and not cgroup.holds(spare.pid):
            return None, None  # its shell is still joining the cgroup: kept for the next run
        if cgroup is not None and self.cgroups is not None:
            try:
                self.cgroups.apply(cgroup, self.limits_of(attempt))
            except OSError as exc:  # e.g. a memory limit below what the launcher uses
                self.log.info("key=%s attempt=%s the spare launcher's cgroup refused the "
                              "limits (%s): started the direct way", attempt.key,
                              attempt.attempt_id, exc)
                self.retire_spare()
                return None, None
            cgroup.rename(attempt.attempt_id)
        self.spare, self.spare_cgroup = None, None  # from here on, used or gone
        try:
            spare.stdin.write(spec)
            spare.stdin.close()
        except OSError:  # it died in between: not started, nothing of it runs
            if cgroup is not None:  # the direct start makes the attempt's own cgroup
                cgroup.rename(self.spare_cgroup_name())
            self.spare, self.spare_cgroup = spare, cgroup
            self.retire_spare()
            return None, None
        return spare, cgroup

    def handle(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.AttemptPrepared):
            self.start(message)
        elif isinstance(message, protocol.StopRuns) and message.cause in fates.FILES_FAULT_CAUSES:
            for attempt_id in message.attempt_ids:
                run = self.runs.get(attempt_id)
                if run is not None:
                    self.stop(run, fates.files_fault(
                        message.reason, fates.FILES_FAULT_CAUSES[message.cause],
                        disk_allocated(run.attempt.workdir),
                        int(run.attempt.resources.get("hdd") or 0)))
                else:  # not started yet: it had written nothing, the host is at fault
                    self.stop_pending[attempt_id] = fates.AttemptFilesUnwritable(
                        f"the attempt's files cannot be written: {message.reason}")
                    self.bound_stop_pending()
        elif isinstance(message, protocol.StopRuns):
            reason = fates.stop_exception(message.cause, message.reason)
            if not message.attempt_ids:
                self.stop_all = reason
            for attempt_id in message.attempt_ids:
                if attempt_id not in self.runs:  # still being prepared: stop it when it arrives
                    self.stop_pending[attempt_id] = reason
                    self.bound_stop_pending()
            for attempt_id, run in self.runs.items():
                if not message.attempt_ids or attempt_id in message.attempt_ids:
                    self.stop(run, reason)

    def bound_stop_pending(self) -> None:
        """Forget the oldest stop requests past 1000 (attempts that never came)."""
        while len(self.stop_pending) > 1000:
            self.stop_pending.pop(next(iter(self.stop_pending)))

    def start(self, prepared: protocol.AttemptPrepared) -> None:
        """Start the run of ``prepared``; whatever fails ends the attempt with its fate."""
        attempt = prepared.attempt
        try:
            self.launch(prepared)
        except Exception as exc:  # noqa: BLE001 - an attempt never leaks its slot
            if attempt.attempt_id in self.runs:
                raise  # started: its end is watched like any other run's
            if not isinstance(exc, RunnerError):
                self.log.exception("key=%s attempt=%s could not be started", attempt.key,
                                   attempt.attempt_id)
                exc = fates.ExperimentFailed(f"the run could not be started: "
                                             f"{type(exc).__name__}: {exc}")
            self.end(attempt, fates.outcome_for_exception(exc), {})

    def launch(self, prepared: protocol.AttemptPrepared) -> None:
        attempt = prepared.attempt
        stopped = self.stop_all or self.stop_pending.pop(attempt.attempt_id, None)
        if stopped is not None:
            self.end(attempt, fates.outcome_for_exception(stopped), {})
            return
        experiment = attempt.request.get("experiment", {})
        cwd = Path(attempt.workdir) / "workspace"
        filename = experiment["filename"]
        if filename != "-m":
            script = workspace_script(cwd, filename)  # run as given, once known to be inside
            if not prepared.container and not script.is_file():
                raise fates.ScriptMissing(f"no script {filename!r} in the workspace")
        python = prepared.python if not prepared.container else containers.CONTAINER_PYTHON
        command = script_command(Path(python), filename, experiment.get("args") or [])
        self.runner_log(attempt.attempt_id, f"starting {command} in {cwd} with devices "
                                    f"{attempt.resources.get('devices') or '-1'}")
        command, environment = self.isolate(prepared, command, cwd)  # start() ends it on error
        process, cgroup = self.start_with_spare(attempt, command, environment, cwd)
        if process is None:
            cgroup = self.enforce(attempt)
        if cgroup is not None:
            self.say_limits(attempt, cgroup)
        try:
            if process is None:
                started_command = launched(command)
                process = subprocess.Popen(
                    cgroup.wrap(started_command) if cgroup is not None else started_command,
                    cwd=cwd, env=environment,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    start_new_session=True, close_fds=True)
        except OSError as exc:
            if cgroup is not None:
                cgroups.wait_removed(cgroup)
            refused = fates.StartRefused if exc.errno == errno.E2BIG else fates.ExperimentFailed
            self.end(attempt, fates.outcome_for_exception(refused(
                f"cannot start {command[0]}: {exc}")), {})
            return
        now = time.time()
        limits = [(t, name) for t, name in ((attempt.deadline, "experimentLifetime"),
                                             (attempt.max_duration and now + attempt.max_duration,
                                              "max_duration")) if t]
        stop_at, limit = min(limits) if limits else (None, "")
        run = Run(attempt=attempt, process=process, started=now, stop_at=stop_at, limit=limit,
                  cgroup=cgroup)
        try:
            attempt_files.write(self.config.runtime_dir, attempt.attempt_id, "run", {
                "pid": process.pid, "ticks": proctree.start_ticks(process.pid),
                "cgroup": [str(d) for d in cgroup.dirs.values()] if cgroup else [],
                "attempt": protocol.to_map(attempt)})
        except OSError as exc:
            # Without its .run file a runner that died could not find this run again: it
            # does not go on.  Killed here; start() ends the attempt (the host's fault).
            self.kill_unwatched(run)
            raise fates.AttemptFilesUnwritable(
                f"cannot write the run's attempt file in {self.config.runtime_dir}: {exc}"
            ) from exc
        run.reader = threading.Thread(target=self.read_output, args=(run,), daemon=True,
                                      name=f"output-{attempt.attempt_id}")
        run.reader.start()
        self.runs[attempt.attempt_id] = run
        if int(attempt.resources.get("hdd") or 0) > 0 and self._disk_watcher is None:
            self._disk_watcher = threading.Thread(target=self.watch_disk, daemon=True,
                                                  name="disk-watcher")
            self._disk_watcher.start()
        self.wake(tick=True)  # from now on tick every TICK (deadlines), not IDLE_TICK
        self.log.info("key=%s attempt=%s started pid %d", attempt.key, attempt.attempt_id, process.pid)
        self.phase(attempt, protocol.PHASE_RUNNING, pid=process.pid)

    def isolate(self, prepared: protocol.AttemptPrepared, command: list[str], cwd: Path
                ) -> tuple[list[str], dict]:
        """(command line, environment) of the run: in its container runtime (container
        mode), in the sandbox (python mode with ``--sandbox``), or as it is."""
        attempt = prepared.attempt
        devices = device_list(attempt.resources.get("devices"))
        if prepared.container:
            runtime = self.runtimes.get(prepared.container)
            if runtime is None:
                raise containers.ContainerUnavailable(
                    f"container runtime {prepared.container} is not usable here")
            launch = containers.Launch(
                image=prepared.image, command=command, workdir=attempt.workdir, devices=devices,
                variables=experiment_variables(
                    attempt, self.config.passed_environment(sandbox.environment_for_runs(os.environ)),
                    containers.ATTEMPT_MOUNT),
                network=self.config.sandbox_network == "on")
            self.runner_log(attempt.attempt_id, f"in {runtime.name} image {prepared.image}, the "
                                        f"attempt's folder at {containers.ATTEMPT_MOUNT}")
            return runtime.command(launch, dict(os.environ))
        if self.sandbox is None:
            return command, experiment_environment(attempt, prepared.env_path, config=self.config)
        python_home = Path(os.path.realpath(prepared.python)).parent.parent
        self.runner_log(attempt.attempt_id, f"in the {self.sandbox.describe()}")
        return (self.sandbox.wrap(command, workdir=attempt.workdir, cwd=str(cwd),
                                  readable=[prepared.env_path, str(python_home)],
                                  devices=devices),
                experiment_environment(attempt, prepared.env_path,
                                       base=sandbox.environment_for_runs(os.environ),
                                       config=self.config))

    def read_output(self, run: Run) -> None:
        """Reader thread: whole segments of stdout and stderr (separate pipes, see
        :mod:`runner.output`) to the scraper, in the order they were read."""
        stdout, stderr = run.process.stdout, run.process.stderr
        assert stdout is not None and stderr is not None  # started with a pipe each
        streams = {pipe.fileno(): Segments() for pipe in (stdout, stderr)}
        poller = select.poll()
        for fd in streams:
            poller.register(fd, select.POLLIN)
        try:
            while streams:
                pieces: list[tuple[bytes, bool]] = []
                for fd, _event in poller.poll():
                    data = os.read(fd, READ_SIZE)
                    if data:
                        pieces += streams[fd].feed(data)
                    else:
                        pieces += streams.pop(fd).close()
                        poller.unregister(fd)
                self.post_output(run, pieces)
        finally:
            self.post_output(run, [piece for segments in streams.values()
                                   for piece in segments.close()])
            stdout.close()
            stderr.close()
            try:  # the output ends as the run exits: let the loop see both at once
                run.process.wait(self.EXIT_WAIT)
            except subprocess.TimeoutExpired:
                pass  # something else holds the pipe's end; the next tick finds the exit
            run.output_done.set()
            self.wake(tick=True)

    def post_output(self, run: Run, pieces: list[tuple[bytes, bool]]) -> None:
        """Reader thread: the run's output to the scraper, each chunk with its offset."""
        for data, scrape in join_pieces(pieces):
            self.post("scraper", protocol.OutputChunk(attempt_id=run.attempt.attempt_id, data=data,
                                                      scrape=scrape, offset=run.output_sent))
            run.output_sent += len(data)

    def kill_unwatched(self, run: Run) -> None:
        """Kill a run that was started but is not watched (not in ``runs``), and wait
        for it: its whole tree, its cgroup, its pipes closed."""
        self._signal_group(run, signal.SIGKILL)
        self.empty_cgroup(run)
        try:
            run.process.wait(5.0)
        except subprocess.TimeoutExpired:
            self.log.error("key=%s attempt=%s pid %d did not die", run.attempt.key,
                           run.attempt.attempt_id, run.process.pid)
        for pipe in (run.process.stdout, run.process.stderr):
            if pipe is not None:  # started with a pipe each
                pipe.close()
        if run.cgroup is not None:
            self.remove_cgroup(run.cgroup)

    def watch_disk(self) -> None:
        """Thread: every ``DISK_CHECK_EVERY`` seconds, measure the working directory of
        each run with an ``hdd`` budget; the loop stops a run found over it."""
        while not self.stopping:
            for run in list(self.runs.values()):
                budget = int(run.attempt.resources.get("hdd") or 0)
                if budget <= 0 or run.stop_reason is not None or run.process.poll() is not None:
                    continue
                used = disk_allocated(run.attempt.workdir)
                if used > budget:
                    self.disk_over[run.attempt.attempt_id] = (used, budget)
                    self.wake(tick=True)
            self._stop.wait(DISK_CHECK_EVERY)

    def stop_over_disk(self) -> None:
        """Stop the runs the disk watcher found over their ``hdd`` (a counted failure)."""
        for attempt_id in list(self.disk_over):
            used, budget = self.disk_over.pop(attempt_id)
            run = self.runs.get(attempt_id)
            if run is None or run.stop_reason is not None:
                continue
            reason = (f"disk limit exceeded: the working directory holds {describe_size(used)}"
                      f", over the request's hdd of {describe_size(budget)}")
            self.post("scraper", protocol.OutputChunk(attempt_id=attempt_id, data=f"{reason}\n".encode(),
                                                      offset=protocol.RUNNER_NOTE))
            self.stop(run, fates.DiskLimitExceeded(reason))

    def stop(self, run: Run, reason: BaseException) -> None:
        """Begin stopping ``run``: SIGTERM to its group now, SIGKILL after the grace."""
        if run.stop_reason is None:
            run.stop_reason = reason
            self.runner_log(run.attempt.attempt_id, f"stopping: {reason}")
        if run.term_sent is None:
            run.term_sent = time.monotonic()
            self._signal_group(run, signal.SIGTERM)

    def _signal_group(self, run: Run, signum: int) -> None:
        """``signum`` to the run's process group; SIGKILL reaches its whole tree (what
        left the group too, through the launcher, which is its subreaper)."""
        if signum == signal.SIGKILL and run.process.poll() is None:
            proctree.kill_tree(run.process.pid)
        try:
            os.killpg(run.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def reap_orphans(self) -> None:
        """Kill and reap processes re-parented to the executor (the subreaper): they were
        left by a run whose launcher was killed, so their run is over."""
        launchers = {run.process.pid for run in self.runs.values()}
        if self.spare is not None:
            launchers.add(self.spare.pid)
        for pid in proctree.children(os.getpid()):
            if pid in launchers:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                self.log.warning("killed pid %d, left behind by a run that ended", pid)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def tick(self) -> None:
        while not self.removal_done.empty():
            self.leftover_cgroups.append(self.removal_done.get())
        self.leftover_cgroups = [c for c in self.leftover_cgroups if not c.remove()]
        self.keep_spare()
        if self.subreaper:
            self.reap_orphans()
        if self.disk_over:
            self.stop_over_disk()
        now = time.time()
        for attempt_id, run in list(self.runs.items()):
            if run.stop_at is not None and now >= run.stop_at and run.stop_reason is None:
                self.stop(run, fates.LimitReached(f"{run.limit} reached after "
                                                  f"{now - run.started:.1f}s"))
            if (run.term_sent is not None and not run.killed
                    and time.monotonic() - run.term_sent >= self.config.kill_grace):
                run.killed = True
                self.runner_log(attempt_id, "grace period over: SIGKILL")
                self._signal_group(run, signal.SIGKILL)
            exit_code = run.process.poll()
            if exit_code is None:
                continue
            if not run.leftovers_killed:
                run.leftovers_killed = True  # the unit ends with its main process
                self._signal_group(run, signal.SIGKILL)
                if run.cgroup is not None:  # also what left the group (setsid, daemons)
                    run.cgroup.kill_all()
            if run.output_done.is_set():
                del self.runs[attempt_id]
                try:
                    self.finish(run, exit_code)
                except Exception as exc:  # noqa: BLE001 - the attempt still ends
                    self.log.exception("key=%s attempt=%s could not be closed", run.attempt.key,
                                       attempt_id)
                    self.end(run.attempt, fates.outcome_for_exception(fates.ExperimentFailed(
                        f"exit {exit_code}; closing the run failed: {exc}"), exit_code), {})

    STUCK_WAIT = 1.0         # s: how long a run's cgroup is waited for to empty ...
    STUCK_WAIT_AGAIN = 0.05  # s: ... and, after one did not, for STUCK_MEMORY seconds
    STUCK_MEMORY = 30.0

    def empty_cgroup(self, run: Run) -> bool:
        """Kill what is left in ``run``'s cgroup and wait until none of it remains
        (:func:`cgroups.wait_emptied`); False, logged, when some survive.  Once one run's
        processes outlived the wait (stuck in the kernel, state D: a hung driver or
        mount), the next runs are waited for only briefly: many runs ending together
        must not keep the loop, and its heartbeats, away for their sum."""
        if run.cgroup is None:
            return True
        stuck_lately = time.monotonic() < self.stuck_until
        if cgroups.wait_emptied(run.cgroup, self.STUCK_WAIT_AGAIN if stuck_lately
                                else self.STUCK_WAIT):
            return True
        self.stuck_until = time.monotonic() + self.STUCK_MEMORY
        self.log.error("key=%s attempt=%s processes %s of the run survive SIGKILL",
                       run.attempt.key, run.attempt.attempt_id, run.cgroup.pids())
        return False

    def finish(self, run: Run, exit_code: int) -> None:
        duration = time.time() - run.started
        facts = {"exit_code": exit_code, "pid": run.process.pid, "duration": round(duration, 3),
                 "devices": run.attempt.resources.get("devices") or "-1",
                 "output_sent": run.output_sent}
        oom_kills = 0
        if run.cgroup is not None:
            # The end frees the run's slot, CPUs and memory: no process of it may be left.
            self.empty_cgroup(run)
            usage = run.cgroup.usage()
            oom_kills = usage.get("oom_kills", 0)
            limits = run.cgroup.limits
            facts["cgroup"] = dict(usage, cpu_limit=limits.cpus, memory_limit=limits.ram,
                                   pids_limit=limits.pids)
        if oom_kills and run.cgroup is not None and exit_code != 0 and run.stop_reason is None:
            reason = f"out of memory: limit {describe_size(run.cgroup.limits.ram)}"
            self.post("scraper", protocol.OutputChunk(
                attempt_id=run.attempt.attempt_id, offset=protocol.RUNNER_NOTE,
                data=f"{reason} (the kernel killed the run at its memory limit)\n".encode()))
            outcome = fates.outcome_for_exception(fates.OutOfMemory(reason), exit_code)
        elif run.stop_reason is not None:
            outcome = fates.outcome_for_exception(run.stop_reason, exit_code)
        elif exit_code == 0:
            outcome = protocol.Outcome(status=fates.COMPLETED, exit_code=0)
        else:
            how = (f"killed by signal {-exit_code}" if exit_code < 0
                   else f"exited with status {exit_code}")
            outcome = fates.outcome_for_exception(fates.ExperimentFailed(how), exit_code)
        self.log.info("key=%s attempt=%s ended %s (exit %s) after %.1fs", run.attempt.key,
                      run.attempt.attempt_id, outcome.status, exit_code, duration)
        self.end(run.attempt, outcome, facts)
        if run.cgroup is not None:
            self.remove_cgroup(run.cgroup)

    def end(self, attempt: protocol.Attempt, outcome: protocol.Outcome, facts: dict) -> None:
        """No process of ``attempt`` runs any more: the scraper closes the attempt, the fetcher
        may give the run's slot, CPUs, RAM and GPUs to the next request."""
        self.post("scraper", protocol.AttemptEnded(attempt=attempt, outcome=outcome, facts=facts))
        self.post("fetcher", protocol.RunEnded(attempt_id=attempt.attempt_id))
        self.post("cache_manager", protocol.RunEnded(attempt_id=attempt.attempt_id))  # image lease
        self.phase(attempt, protocol.PHASE_ENDING)

    def stats(self) -> dict:
        return {"running": len(self.runs),
                "enforcement": f"cgroups v{self.cgroups.version}" if self.cgroups else "accounting"}

    def shutdown(self) -> None:
        self.retire_spare()
        self.removals.shutdown(wait=True)
        while not self.removal_done.empty():
            self.leftover_cgroups.append(self.removal_done.get())
        for run in self.runs.values():
            self._signal_group(run, signal.SIGKILL)
            if run.cgroup is not None:
                run.cgroup.kill_all()
                self.leftover_cgroups.append(run.cgroup)
        if self.subreaper:
            self.reap_orphans()
        for cgroup in self.leftover_cgroups:
            cgroups.wait_removed(cgroup, timeout=1.0)
        if self.cgroups is not None:
            self.cgroups.cleanup()
