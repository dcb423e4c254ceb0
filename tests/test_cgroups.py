"""Per-run cgroups (runner.cgroups).

Detection and limit files are tested on hierarchies described as data (a fake ``/proc/self``
and a fake cgroup v2 tree in a temporary folder).  Enforcement is tested with real processes
in real cgroups where this host lets the tests create them; elsewhere those tests skip and
say why.  No test asserts a wall-clock time: the CPU-quota test compares the run's CPU time
with its own wall time, with a generous margin.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from runner import _fast, cgroups, proctree
from runner.cgroups import Limits, detect
from runner.config import instance_gone, load
from runner.roles.executor import SPARE_CGROUP, Executor, spare_gone

MB = 10**6


def real_cgroups():
    driver, why = detect("auto", f"test-{uuid.uuid4().hex[:8]}")
    if driver is None:
        pytest.skip(f"cgroups are not writable on this host: {why}")
    return driver


@pytest.fixture()
def driver():
    found = real_cgroups()
    yield found
    found.cleanup()


def run_in(cgroup: cgroups.RunCgroup, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command = cgroup.wrap([sys.executable, "-c", textwrap.dedent(code)])
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


# -- described as data -----------------------------------------------------------------------

V1_MOUNTINFO = """\
25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
27 25 0:24 / {root}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
28 25 0:25 /docker/abc {root}/memory rw,relatime - cgroup cgroup rw,memory
29 25 0:26 / {root}/pids rw,relatime - cgroup cgroup rw,pids
"""
V1_CGROUP = """\
12:pids:/user.slice
4:memory:/docker/abc/inner
3:cpu,cpuacct:/
0::/
"""


def fake_proc(tmp_path: Path, mountinfo: str, cgroup: str) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(mountinfo)
    (proc / "cgroup").write_text(cgroup)
    return proc


def test_v1_paths_follow_own_cgroup_and_mount_root(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    for folder, _probe in (("cpu,cpuacct", ["cpu.cfs_quota_us", "cpuacct.usage"]),
                          ("memory/inner", ["memory.limit_in_bytes"]),
                          ("pids/user.slice", ["pids.max"])):
        (root / folder).mkdir(parents=True)
    proc = fake_proc(tmp_path, V1_MOUNTINFO.format(root=root), V1_CGROUP)
    # a plain folder does not create control files in new folders the way cgroupfs does
    found, why = detect("auto", "i1", proc=str(proc))
    assert found is None and "not writable" in why and "accounted, not enforced" in why
    # once the control files exist (as cgroupfs makes them) the folders are used
    for folder, probe in (("cpu,cpuacct", ["cpu.cfs_quota_us", "cpuacct.usage"]),
                          ("memory/inner", ["memory.limit_in_bytes"]),
                          ("pids/user.slice", ["pids.max"])):
        for name in probe:
            (root / folder / "studioml-runs-i1" / name).write_text("")
    found, why = detect("auto", "i1", proc=str(proc))
    assert found is not None and found.version == 1
    assert found.bases["cpu"] == root / "cpu,cpuacct" / "studioml-runs-i1"
    assert found.bases["cpuacct"] == found.bases["cpu"]
    assert found.bases["memory"] == root / "memory" / "inner" / "studioml-runs-i1"
    assert found.bases["pids"] == root / "pids" / "user.slice" / "studioml-runs-i1"
    run = found.create("a1", Limits(cpus=2, ram=500 * MB, pids=64))
    assert (run.dirs["cpu"] / "cpu.cfs_quota_us").read_text() == "200000"
    assert (run.dirs["cpu"] / "cpu.cfs_period_us").read_text() == "100000"
    assert (run.dirs["memory"] / "memory.limit_in_bytes").read_text() == str(500 * MB)
    assert (run.dirs["pids"] / "pids.max").read_text() == "64"
    assert len(run.enter_files()) == 3          # cpu and cpuacct share one folder
    (run.dirs["memory"] / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert run.oom_kills() == 2


def make_v2(tmp_path: Path, own: str = "/system.slice/runner.service"):
    root = tmp_path / "cg2"
    parent = root / own.lstrip("/")
    parent.mkdir(parents=True)
    (parent / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (parent / "cgroup.subtree_control").write_text("")
    proc = fake_proc(tmp_path, f"30 25 0:27 / {root} rw - cgroup2 cgroup2 rw\n", f"0::{own}\n")
    return root, parent, proc


def test_v2_delegates_controllers_and_writes_limits(tmp_path: Path) -> None:
    _root, parent, proc = make_v2(tmp_path)
    found, why = detect("auto", "i2", proc=str(proc))
    assert found is not None and found.version == 2, why
    assert (parent / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    base = parent / "studioml-runs-i2"
    assert found.bases == {"unified": base}
    assert (base / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    (base / "a1").mkdir()
    for name in ("memory.swap.max", "memory.oom.group"):
        (base / "a1" / name).write_text("")
    run = found.create("a1", Limits(cpus=1.5, ram=2 * 10**9, pids=100))
    assert (base / "a1" / "cpu.max").read_text() == "150000 100000"
    assert (base / "a1" / "memory.max").read_text() == "2000000000"
    assert (base / "a1" / "memory.swap.max").read_text() == "0"
    assert (base / "a1" / "memory.oom.group").read_text() == "1"
    assert (base / "a1" / "pids.max").read_text() == "100"
    assert run.enter_files() == [str(base / "a1" / "cgroup.procs")]
    (base / "a1" / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    (base / "a1" / "cpu.stat").write_text("usage_usec 2500000\nnr_throttled 7\n")
    usage = run.usage()
    assert usage["oom_kills"] == 1 and usage["cpu_seconds"] == 2.5
    assert usage["cpu_throttled_periods"] == 7


def test_v2_without_controllers_falls_back_with_a_reason(tmp_path: Path) -> None:
    _root, parent, proc = make_v2(tmp_path)
    (parent / "cgroup.controllers").write_text("cpu io\n")
    found, why = detect("auto", "i3", proc=str(proc))
    assert found is None
    assert "lacks controllers memory, pids" in why and "accounted, not enforced" in why


def test_delegate_v2_moves_only_a_lone_process(tmp_path: Path) -> None:
    _root, parent, proc = make_v2(tmp_path)
    (parent / "cgroup.procs").write_text(f"{os.getpid()}\n12345\n")
    assert cgroups.delegate_v2(proc=str(proc)) == ""          # shares its cgroup: left alone
    assert not (parent / "runner").exists()
    (parent / "cgroup.procs").write_text(f"{os.getpid()}\n")
    assert "moved the supervisor" in cgroups.delegate_v2(proc=str(proc))
    assert (parent / "runner" / "cgroup.procs").read_text() == str(os.getpid())


def test_after_delegation_runs_go_beside_the_supervisors_leaf(tmp_path: Path) -> None:
    """Under systemd with Delegate=yes: the supervisor moves into <unit>/runner, its roles
    start there, and their runs get cgroups under <unit> (the leaf holds processes: v2
    forbids it to delegate controllers, EBUSY)."""
    root, parent, proc = make_v2(tmp_path)
    (parent / "cgroup.procs").write_text(f"{os.getpid()}\n")
    assert "moved the supervisor" in cgroups.delegate_v2(proc=str(proc))
    (parent / "cgroup.procs").write_text("")  # what the kernel shows once it moved
    leaf = parent / cgroups.DELEGATE_LEAF
    (leaf / "cgroup.controllers").write_text("")  # <unit> delegates nothing to it yet
    (tmp_path / "role").mkdir()
    role = fake_proc(tmp_path / "role", f"30 25 0:27 / {root} rw - cgroup2 cgroup2 rw\n",
                     "0::/system.slice/runner.service/runner\n")
    found, why = detect("auto", "i9", proc=str(role))
    assert found is not None and found.version == 2, why
    assert found.bases == {"unified": parent / "studioml-runs-i9"}
    assert (parent / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    # a leaf named so whose parent still holds processes is nobody's delegation: left alone
    (parent / "cgroup.procs").write_text("12345\n")
    (leaf / "cgroup.controllers").write_text("cpu memory pids\n")
    (leaf / "cgroup.subtree_control").write_text("")
    found, why = detect("auto", "i10", proc=str(role))
    assert found is not None and found.bases == {"unified": leaf / "studioml-runs-i10"}, why


def test_off_means_accounting_only() -> None:
    found, why = detect("off", "x")
    assert found is None and why.startswith("cgroups off (--cgroups off)")


def test_no_hierarchy_at_all(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "", "")
    found, why = detect("auto", "x", proc=str(proc))
    assert found is None and "no cgroup hierarchy" in why


# -- real cgroups ----------------------------------------------------------------------------

def test_memory_limit_kills_the_run(driver) -> None:
    run = driver.create("mem", Limits(cpus=1, ram=80 * MB))
    try:
        result = run_in(run, """
            blocks = []
            while True:
                blocks.append(bytearray(10**6))
        """)
        assert result.returncode == -9
        assert run.oom_kills() >= 1
        assert run.usage()["memory_peak"] <= 80 * MB
    finally:
        assert cgroups.wait_removed(run)


def test_cpu_quota_holds_cpu_time_to_the_cpus_given(driver) -> None:
    # Three busy processes for two seconds of their own wall time: with a quota of one CPU
    # their CPU time is about one wall time, whatever the machine's load (never more).
    run = driver.create("cpu", Limits(cpus=1))
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        result = run_in(run, """
            import multiprocessing, time
            def spin():
                end = time.monotonic() + 2.0
                while time.monotonic() < end:
                    pass
            workers = [multiprocessing.Process(target=spin) for _ in range(3)]
            for w in workers: w.start()
            for w in workers: w.join()
        """)
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert result.returncode == 0, result.stderr
        assert cpu <= 1.35 * wall, f"{cpu:.2f}s of CPU in {wall:.2f}s of wall time"
        assert (run.dirs.get("cpu", run.dirs.get("unified")) is not None)
    finally:
        assert cgroups.wait_removed(run)


def test_process_count_limit_is_reached(driver) -> None:
    run = driver.create("pids", Limits(pids=12))
    try:
        result = run_in(run, """
            import os, time
            children = 0
            try:
                while children < 100:
                    if os.fork() == 0:
                        time.sleep(5)
                        os._exit(0)
                    children += 1
            except OSError as exc:
                print("refused after", children, exc.errno)
        """)
        assert "refused after" in result.stdout, result.stdout + result.stderr
        children = int(result.stdout.split()[2])
        assert children < 12
        assert run.usage()["pids_limit_hits"] >= 1
    finally:
        run.kill_all()
        assert cgroups.wait_removed(run)


def test_kill_all_reaches_processes_that_left_the_process_group(driver) -> None:
    run = driver.create("escape", Limits())
    try:
        result = run_in(run, """
            import os, subprocess, sys
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                     start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            print(child.pid)
        """)
        escaped = int(result.stdout.strip())
        assert escaped in run.pids()
        assert cgroups.wait_removed(run)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(escaped, 0)
                with open(f"/proc/{escaped}/stat") as stat:
                    if stat.read().split(")")[-1].split()[0] == "Z":
                        break
            except (ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the escaped process survived")
    finally:
        cgroups.wait_removed(run)


def test_a_run_that_cannot_enter_its_cgroup_does_not_start(tmp_path: Path) -> None:
    run = cgroups.RunCgroup(1, {"cpu": tmp_path / "missing"}, Limits())
    result = subprocess.run(run.wrap([sys.executable, "-c", "print('ran')"]),
                            capture_output=True, text=True)
    assert result.returncode == 125 and "ran" not in result.stdout
    assert "cannot enter cgroup" in result.stderr


def test_a_process_is_held_only_once_it_is_in_every_folder_of_the_cgroup(driver) -> None:
    """The executor renames a spare's cgroup only once the spare is held: a process still
    outside (as one is between fork and its shell's writes, whatever its command line
    says) or in some of the folders only is not."""
    run = driver.create("spare-1-3", Limits())
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                               stdin=subprocess.PIPE)
    try:
        assert not run.holds(process.pid)
        folders = list(dict.fromkeys(run.dirs.values()))
        for folder in folders[:-1]:
            (folder / "cgroup.procs").write_text(str(process.pid))
        assert not run.holds(process.pid)
        (folders[-1] / "cgroup.procs").write_text(str(process.pid))
        assert run.holds(process.pid)
    finally:
        process.kill()
        process.wait()
        assert cgroups.wait_removed(run)


def test_a_killed_process_is_waited_for_until_it_has_left_the_cgroup(driver) -> None:
    """A SIGKILLed process stays a member while the kernel frees its memory (the executor
    posts a run's end only once none is left: the next run gets that memory)."""
    run = driver.create("exiting-1", Limits())
    process = subprocess.Popen(run.wrap([sys.executable, "-c", "import time\n"
                                         "held = b'x' * (1500 * 10**6)\nprint(flush=True)\n"
                                         "time.sleep(600)"]), stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline() == b"\n"
        run.kill_all()
        assert cgroups.wait_emptied(run, timeout=30)
        assert run.pids() == []
    finally:
        process.kill()
        process.wait()
        assert cgroups.wait_removed(run)


def test_a_cgroup_joined_ahead_takes_limits_and_a_name_later(driver) -> None:
    """What the executor does with its spare launcher: a process started in a cgroup made
    with no limits, which then gets the run's limits and (v1) the attempt's name; the
    process stays inside under the new name."""
    run = driver.create("spare-1-1", Limits())
    process = subprocess.Popen(run.wrap([sys.executable, "-c", "import sys; sys.stdin.read()\n"
                                         "print(open('/proc/self/cgroup').read())"]),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdin is not None
        deadline = time.monotonic() + 30
        while process.pid not in run.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.pid in run.pids()
        driver.apply(run, Limits(cpus=0.5, ram=300 * 2**20))
        run.rename("a-run")
        assert run.limits == Limits(cpus=0.5, ram=300 * 2**20)
        if run.version == 1:
            assert {folder.name for folder in run.dirs.values()} == {"a-run"}
            memory = run.dirs.get("memory")
            if memory is not None:
                assert int((memory / "memory.limit_in_bytes").read_text()) == 300 * 2**20
            cpu = run.dirs.get("cpu")
            if cpu is not None:
                assert int((cpu / "cpu.cfs_quota_us").read_text()) == 50_000
        assert process.pid in run.pids()
        out, _ = process.communicate("", timeout=30)
        names = {folder.name for folder in run.dirs.values()}
        assert any(line.rsplit("/", 1)[-1] in names for line in out.splitlines() if line), out
    finally:
        process.kill()
        process.wait()
        assert cgroups.wait_removed(run)


def test_a_memory_limit_below_what_the_cgroup_uses_is_refused(driver) -> None:
    run = driver.create("spare-1-2", Limits())
    process = subprocess.Popen(run.wrap([sys.executable, "-c", "import sys\n"
                                         "held = bytearray(40 * 10**6)\nsys.stdin.read()"]),
                               stdin=subprocess.PIPE)
    try:
        if "memory" not in run.dirs and "unified" not in run.dirs:
            pytest.skip("no memory controller here")
        deadline = time.monotonic() + 30
        memory = run.dirs.get("memory") or run.dirs["unified"]
        usage_file = "memory.usage_in_bytes" if run.version == 1 else "memory.current"
        while int((memory / usage_file).read_text()) < 20 * MB and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(OSError):
            driver.apply(run, Limits(ram=1 * MB))
        assert process.poll() is None  # refused, not killed
    finally:
        process.kill()
        process.wait()
        assert cgroups.wait_removed(run)


def test_only_stopped_executors_spare_cgroups_are_removed(driver) -> None:
    """An executor starting removes the spare launchers' cgroups of executors that have
    stopped; another live executor's (its shell may not have joined it yet) and a busy
    one stay."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = [f"spare-{dead.pid}-1", f"spare-{os.getppid()}-1", f"spare-{dead.pid}-2"]
    made = [driver.create(name, Limits()) for name in names]
    busy = subprocess.Popen(made[2].wrap([sys.executable, "-c", "import sys; sys.stdin.read()"]),
                            stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not made[2].holds(busy.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        driver.remove_left("spare-", spare_gone)
        assert [any(d.exists() for d in run.dirs.values()) for run in made] == [False, True, True]
    finally:
        busy.kill()
        busy.wait()
        for run in made:
            cgroups.wait_removed(run)


def test_the_bases_of_stopped_runners_are_removed_with_their_cgroups(driver) -> None:
    """What a runner killed with SIGKILL left (its base, an emptied run's cgroup, a spare's)
    is removed; a live runner's base is not."""
    hostname = socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()
    live = load([], environ={}).supervisor_instance(os.getpid(), time.time()).instance
    stopped = f"{hostname}-{gone.pid}-{_fast.b62encode(int(time.time()))}"
    others = {}
    for instance in (stopped, live):
        found, _ = detect("auto", instance)
        assert found is not None
        found.create("spare-1-1", Limits())
        found.create("an-attempt", Limits())
        others[instance] = found
    try:
        driver.remove_stopped_bases(lambda instance: instance_gone(instance, hostname))
        assert not any(base.exists() for base in others[stopped].bases.values())
        assert all((base / "an-attempt").is_dir() for base in others[live].bases.values())
    finally:
        for found in others.values():
            found.cleanup()


def test_an_instance_is_gone_once_its_supervisor_has_stopped() -> None:
    hostname = socket.gethostname()
    config = load([], environ={})
    me = config.supervisor_instance(os.getpid(), time.time()).instance
    assert me.startswith(f"{config.hostname}-{os.getpid()}-")
    assert not instance_gone(me, config.hostname)
    stopped = subprocess.Popen(["true"])
    stopped.wait()
    now = _fast.b62encode(int(time.time()))
    assert instance_gone(f"{hostname}-{stopped.pid}-{now}", hostname)
    # a pid named by an instance made before its process started: reused, unless that
    # process is a runner (the wall clock may have been stepped forward since it started)
    long_ago = _fast.b62encode(1000)
    other = subprocess.Popen(["sleep", "60"])
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                               "runner-supervisor"])
    try:
        assert instance_gone(f"{hostname}-{other.pid}-{long_ago}", hostname)
        assert not instance_gone(f"{hostname}-{runner.pid}-{long_ago}", hostname)
    finally:
        for process in (other, runner):
            process.kill()
            process.wait()
    assert not instance_gone(f"elsewhere-{stopped.pid}-{now}", hostname)  # not ours to judge
    for odd in ("t-1a2b3c4d", "test-x", f"{hostname}-notapid-{now}", ""):
        assert not instance_gone(odd, hostname)


def test_only_a_process_surely_gone_has_stopped(monkeypatch) -> None:
    """A pid taken for stopped gives its cgroups away: a zombie or no such pid is stopped;
    a live one is not, nor one ``/proc`` hides (``hidepid``, emulated here by hiding the
    stat file of pid 1, which this user may not signal: EPERM)."""
    assert not proctree.has_stopped(os.getpid())
    exited = subprocess.Popen(["true"])
    exited.wait()
    assert proctree.has_stopped(exited.pid)
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 30
        while not proctree.has_stopped(zombie.pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # not reaped yet: a zombie once it has exited
        assert proctree.has_stopped(zombie.pid)
    finally:
        zombie.wait()
    if os.geteuid() != 0:
        real = proctree._stat_fields
        monkeypatch.setattr(proctree, "_stat_fields", lambda pid: None if pid == 1 else real(pid))
        assert not proctree.has_stopped(1)
        assert not spare_gone(f"{SPARE_CGROUP}1-1")


def test_a_tree_that_vanishes_while_it_is_removed_is_no_error(tmp_path: Path, monkeypatch) -> None:
    """Two runners may tidy the same stopped runner's base at once: folders the other one
    removed mid-walk are skipped (plain folders stand in for cgroups here)."""
    base = tmp_path / "studioml-runs-gone"
    for name in ("a/x", "a/y", "b", "c/z"):
        (base / name).mkdir(parents=True)
    real_scandir = os.scandir
    fired: list[str] = []

    def rival_first(path, *args, **kwargs):  # the other runner removes the rest meanwhile
        if not fired and os.path.dirname(os.fspath(path)) == str(base):
            fired.append(os.fspath(path))
            for other in (base / name for name in ("a", "b", "c")):
                if str(other) != fired[0]:
                    for child in (other / name for name in ("x", "y", "z")):
                        if child.exists():
                            child.rmdir()
                    other.rmdir()
        return real_scandir(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", rival_first)
    assert cgroups._remove_tree(base)
    monkeypatch.undo()
    assert fired and not base.exists()
    assert cgroups._remove_tree(tmp_path / "never-there")


class StuckCgroup:
    """A stand-in for a run's cgroup whose last process is stuck in the kernel (state D,
    SIGKILL pending): no process can be held so on this machine."""

    limits = Limits()

    def pids(self) -> list[int]:
        return [4242]

    def kill_all(self) -> int:
        return 0


def test_after_one_run_outlives_its_wait_the_next_are_waited_for_briefly(monkeypatch) -> None:
    """Many runs ending together with processes stuck in the kernel must not keep the
    executor's loop (and heartbeats) away for a second each."""
    executor = Executor.__new__(Executor)  # only what empty_cgroup uses
    executor.stuck_until, executor.log = 0.0, logging.getLogger("test-executor")
    waits: list[float] = []
    real_wait = cgroups.wait_emptied
    monkeypatch.setattr(cgroups, "wait_emptied",
                        lambda run, timeout: waits.append(timeout) or real_wait(run, timeout))

    def run_in(cgroup):
        return type("Run", (), {"cgroup": cgroup, "attempt": type("A", (), {
            "key": "k", "attempt_id": "a"})})()

    assert [executor.empty_cgroup(run_in(StuckCgroup())) for _ in range(3)] == [False] * 3
    assert waits == [Executor.STUCK_WAIT, Executor.STUCK_WAIT_AGAIN, Executor.STUCK_WAIT_AGAIN]
    executor.stuck_until = 0.0  # long after: a full wait again
    assert not executor.empty_cgroup(run_in(StuckCgroup()))
    assert waits[-1] == Executor.STUCK_WAIT
    assert executor.empty_cgroup(run_in(None))


def test_a_v2_memory_limit_below_the_usage_is_refused_not_written(tmp_path: Path) -> None:
    """cgroup v2 takes such a limit and OOM-kills the spare launcher waiting in it (a v2
    tree described as data: this host is v1)."""
    (tmp_path / "memory.current").write_text("50000000\n")
    (tmp_path / "memory.max").write_text("max\n")
    run = cgroups.RunCgroup(2, {"unified": tmp_path}, Limits())
    with pytest.raises(OSError) as refused:
        cgroups.Cgroups(2, {"unified": tmp_path.parent}).apply(run, Limits(ram=1 * MB))
    assert refused.value.errno == errno.EBUSY
    assert (tmp_path / "memory.max").read_text() == "max\n"
    cgroups.Cgroups(2, {"unified": tmp_path.parent}).apply(run, Limits(ram=100 * MB))
    assert (tmp_path / "memory.max").read_text() == str(100 * MB)


def test_a_refused_swap_limit_is_not_swallowed(tmp_path: Path) -> None:
    """Only an absent swap limit (swap accounting off) is skipped: a refused one leaves the
    run without the limit it asked for (a v1 tree described as data: the kernel here has
    no swap to refuse it with; a folder in place of the file makes the write fail)."""
    (tmp_path / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "memory.memsw.limit_in_bytes").mkdir()
    run = cgroups.RunCgroup(1, {"memory": tmp_path}, Limits())
    with pytest.raises(OSError):
        cgroups.Cgroups(1, {"memory": tmp_path.parent}).apply(run, Limits(ram=100 * MB))
    (tmp_path / "memory.memsw.limit_in_bytes").rmdir()
    cgroups.Cgroups(1, {"memory": tmp_path.parent}).apply(run, Limits(ram=100 * MB))
    assert (tmp_path / "memory.limit_in_bytes").read_text() == str(100 * MB)

