"""The executor's spare launcher (``--spare-launcher on``): runs start through a launcher
started ahead of need, in their cgroup, with the environment and working directory the
direct start gives; without a usable spare they start the direct way; no spare outlives
its executor.  Real processes, the executor hosted in a thread (and a real supervisor)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from runner import cgroups, protocol, proctree

from .roles_support import RoleRig, eventually
from .support import processes_with, short_tempdir
from .test_role_executor import ended_with_output, prepared

REPORT = ("import json, os, sys\n"
          "print(json.dumps({'pid': os.getpid(), 'ppid': os.getppid(), 'cwd': os.getcwd(), "
          "'env': dict(os.environ), 'cgroup': open('/proc/self/cgroup').read(), "
          "'stdin': sys.stdin.read()}))\n")


def rig_with(*options: str) -> RoleRig:
    rig = RoleRig(*options)
    rig.host("executor")
    return rig


@pytest.fixture()
def rig():
    rig = rig_with()
    yield rig
    rig.close()


def executor_of(rig: RoleRig):
    return rig.hosts[0].role


def ready_spare(rig: RoleRig) -> int:
    """The pid of the executor's spare launcher, once it has one that a run can take (in
    its cgroup, where cgroups are enforced)."""
    executor = executor_of(rig)

    def ready() -> bool:
        spare, cgroup = executor.spare, executor.spare_cgroup
        return spare is not None and (cgroup is None or cgroup.holds(spare.pid))
    assert eventually(ready), "no spare launcher was made ready"
    return executor.spare.pid


def run_report(rig: RoleRig, message: protocol.AttemptPrepared | None = None
               ) -> tuple[protocol.AttemptEnded, dict]:
    message = message or prepared(rig, REPORT)
    rig.probe("cache_manager").send("executor", message)
    ended, output = ended_with_output(rig, message.attempt.attempt_id)
    assert ended.outcome.status == "completed", (ended.outcome, output)
    return ended, json.loads(output)


def test_a_run_starts_through_the_spare_and_a_new_one_is_made(rig) -> None:
    spare = ready_spare(rig)
    ended, report = run_report(rig)
    assert ended.facts["pid"] == spare  # (pids inside the run may be a sandbox's own)
    assert report["stdin"] == ""
    executor = executor_of(rig)
    assert eventually(lambda: executor.spare is not None and executor.spare.pid != spare)
    assert executor.stats()["running"] == 0  # a spare is no run


@pytest.mark.parametrize("options", [("--sandbox", "off"), ("--sandbox", "off", "--cgroups", "off"),
                                     ("--sandbox", "auto")])
def test_a_run_gets_the_environment_and_directory_the_direct_start_gives(options, monkeypatch,
                                                                         tmp_path) -> None:
    """The same variables either way, ``PWD`` too (the direct start's shell, with cgroups,
    sets it; the runner's own is passed on without)."""
    monkeypatch.setenv("PWD", str(tmp_path))  # a runner started elsewhere
    reports = []
    for option in ("on", "off"):
        rig = rig_with("--spare-launcher", option, *options)
        try:
            if option == "on":
                spare = ready_spare(rig)
            else:
                time.sleep(0.5)
                assert executor_of(rig).spare is None
            message = prepared(rig, REPORT)
            ended, report = run_report(rig, message)
            assert (ended.facts["pid"] == spare) == (option == "on")
            workdir = message.attempt.workdir
            assert report["cwd"] == str(Path(workdir) / "workspace")
            env = {name: value.replace(workdir, "WORKDIR").replace(message.attempt.key, "KEY")
                   for name, value in report["env"].items()}
            reports.append(env)
        finally:
            rig.close()
    assert reports[0] == reports[1]


def with_resources(message: protocol.AttemptPrepared, **resources) -> protocol.AttemptPrepared:
    attempt = protocol.Attempt(**{**protocol.to_map(message.attempt),
                                  "resources": dict(message.attempt.resources, **resources)})
    return protocol.AttemptPrepared(attempt=attempt, python=message.python,
                                    env_path=message.env_path)


@pytest.mark.parametrize("sandbox", ["auto", "off"])
def test_a_run_started_through_the_spare_is_in_its_cgroup(sandbox) -> None:
    """The spare waits inside a cgroup of its own (joined before any run: joining costs
    the kernel milliseconds); the run that takes it gets that cgroup with its own limits
    and (v1) its name."""
    rig = rig_with("--sandbox", sandbox)
    try:
        executor = executor_of(rig)
        if executor.cgroups is None:
            pytest.skip("cgroups are not writable on this host")
        spare = ready_spare(rig)
        spare_cgroup = executor.spare_cgroup
        assert spare_cgroup is not None
        assert eventually(lambda: spare in spare_cgroup.pids())  # before any run came
        assert f"/spare-{os.getpid()}-" in Path(f"/proc/{spare}/cgroup").read_text()
        message = with_resources(prepared(rig, "import sys, time\nprint(open('/proc/self/cgroup')"
                                               ".read(), flush=True)\ntime.sleep(600)\n"),
                                 cpus=1, ram=512 * 2**20)
        attempt_id = message.attempt.attempt_id
        rig.probe("cache_manager").send("executor", message)
        seen = rig.probe("scraper").expect(protocol.OutputChunk,
                                           lambda m: m.attempt_id == attempt_id, timeout=60)
        run = executor.runs[attempt_id]
        assert run.process.pid == spare and run.cgroup is spare_cgroup
        assert run.cgroup.limits == cgroups.Limits(cpus=1, ram=512 * 2**20,
                                                   pids=executor.config.run_pids)
        members = run.cgroup.pids()
        assert spare in members and len(members) >= 2, members  # the launcher and the run
        assert all(proctree.is_running(p, None) for p in proctree.descendants(spare))
        assert set(proctree.descendants(spare)) <= set(members)
        names = {folder.name for folder in run.cgroup.dirs.values()}
        if run.cgroup.version == 1:  # (v2 cannot rename a cgroup: it keeps the spare's name)
            assert names == {attempt_id}
            memory = run.cgroup.dirs.get("memory")
            if memory is not None:
                assert int((memory / "memory.limit_in_bytes").read_text()) == 512 * 2**20
        if executor.sandbox is None:  # (a sandbox has a cgroup namespace of its own)
            assert any(line.rsplit("/", 1)[-1] in names
                       for line in seen.data.decode().splitlines()), seen.data
        rig.probe("fetcher").send("executor", protocol.StopRuns(
            reason="test over", attempt_ids=[attempt_id], cause="cancelled"))
        ended = rig.probe("scraper").expect(protocol.AttemptEnded, timeout=60)
        assert ended.facts["pid"] == spare and "cgroup" in ended.facts
        assert ended.facts["cgroup"]["memory_limit"] == 512 * 2**20
        assert eventually(lambda: not any(d.exists() for d in run.cgroup.dirs.values()))
    finally:
        rig.close()


def test_limits_the_spares_cgroup_refuses_take_the_direct_way(rig) -> None:
    """A memory limit below what the waiting spare already uses cannot be written into its
    cgroup: the spare is retired and the run starts the direct way, in a new cgroup."""
    executor = executor_of(rig)
    if executor.cgroups is None or not ({"memory", "unified"} & set(executor.cgroups.bases)):
        pytest.skip("no memory cgroup on this host")
    spare = ready_spare(rig)
    spare_cgroup = executor.spare_cgroup
    message = with_resources(prepared(rig, REPORT), ram=2**20)  # 1 MiB: the spare uses more
    rig.probe("cache_manager").send("executor", message)
    ended = rig.probe("scraper").expect(protocol.AttemptEnded, timeout=60)
    assert ended.facts["pid"] != spare
    assert ended.facts["cgroup"]["memory_limit"] == 2**20  # its limit held, in a cgroup of its own
    assert not Path(f"/proc/{spare}").exists()  # killed and reaped
    assert eventually(lambda: not any(d.exists() for d in spare_cgroup.dirs.values()))
    assert eventually(lambda: executor.spare is not None and executor.spare.pid != spare)


def test_a_dead_spare_is_replaced_or_passed_over(rig) -> None:
    spare = ready_spare(rig)
    os.kill(spare, signal.SIGKILL)
    assert eventually(lambda: not proctree.is_running(spare, None))
    ended, report = run_report(rig)
    assert ended.facts["pid"] != spare and report["stdin"] == ""


def test_a_large_environment_takes_the_direct_way_and_keeps_the_spare(rig) -> None:
    spare = ready_spare(rig)
    message = prepared(rig, REPORT)
    request = dict(message.attempt.request)
    request["config"] = dict(request["config"], env={"BIG": "b" * 70_000})
    attempt = protocol.Attempt(**{**protocol.to_map(message.attempt), "request": request})
    ended, report = run_report(rig, protocol.AttemptPrepared(
        attempt=attempt, python=message.python, env_path=message.env_path))
    assert ended.facts["pid"] != spare and report["env"]["BIG"] == "b" * 70_000
    assert executor_of(rig).spare.pid == spare  # kept for the next run
    ended, _ = run_report(rig)
    assert ended.facts["pid"] == spare


def test_a_refused_start_still_ends_start_refused(rig) -> None:
    """E2BIG comes from the direct start, as before (the spec is far over the limit)."""
    ready_spare(rig)
    message = prepared(rig, REPORT)
    request = dict(message.attempt.request)
    request["config"] = dict(request["config"], env={f"PAD_{i}": "p" * 100_000 for i in range(30)})
    attempt = protocol.Attempt(**{**protocol.to_map(message.attempt), "request": request})
    rig.probe("cache_manager").send("executor", protocol.AttemptPrepared(
        attempt=attempt, python=message.python, env_path=message.env_path))
    ended = rig.probe("scraper").expect(protocol.AttemptEnded, timeout=60)
    assert ended.outcome.error == "StartRefused", ended.outcome
    assert "Argument list too long" in ended.outcome.message


def test_no_spare_outlives_the_executor() -> None:
    rig = rig_with()
    try:
        spare = ready_spare(rig)
    finally:
        rig.close()
    assert not Path(f"/proc/{spare}").exists()  # killed and reaped


def spares_of(executor_pid: int) -> list[int]:
    """The live spare launchers whose parent is ``executor_pid``."""
    found = []
    for pid in processes_with("--spare"):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--spare" in argv and argv[argv.index(b"--spare") - 1] == str(executor_pid).encode():
            found.append(pid)
    return found


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_no_spare_outlives_the_supervisor(runner, how) -> None:
    runner.start()
    executor = runner.role_pids()["executor"]
    runner.wait_for(lambda: spares_of(executor), timeout=30, what="the spare launcher")
    spare = spares_of(executor)[0]
    time.sleep(2.5)  # a few ticks of the executor, a child subreaper that kills orphans
    assert spares_of(executor) == [spare]  # the spare is not taken for one
    if how == "stopped":
        runner.stop()
    else:
        runner.kill()
    runner.wait_for(lambda: not proctree.is_running(spare, None), timeout=30,
                    what="the spare launcher to end")
    assert not spares_of(executor)


def test_a_runner_with_the_spare_off_starts_none() -> None:
    rig = rig_with("--spare-launcher", "off")
    try:
        run_report(rig)
        assert executor_of(rig).spare is None
        assert not spares_of(os.getpid())
    finally:
        rig.close()


def test_a_spare_that_cannot_enter_its_cgroup_turns_spares_off(monkeypatch) -> None:
    """Where the spare's shell cannot join the cgroup made for it (exit 125), no spare is
    kept any more and runs take the direct way."""
    base = Path(short_tempdir("fake-cgroups"))
    (base / f"spare-{os.getpid()}-1" / "cgroup.procs").mkdir(parents=True)  # unwritable
    monkeypatch.setattr(cgroups, "detect", lambda *_: (cgroups.Cgroups(1, {"pids": base}), ""))
    rig = rig_with()
    try:
        executor = executor_of(rig)
        assert eventually(lambda: not executor.spare_on), "spares stayed on"
        assert executor.spare is None and executor.spare_cgroup is None
        time.sleep(0.5)  # ticks go by: no new spare
        assert executor.spare is None and not spares_of(os.getpid())
        message = prepared(rig, REPORT)
        ended, _ = run_report(rig, message)  # the direct way: its shell joined its cgroup
        joined = (base / message.attempt.attempt_id / "cgroup.procs").read_text().split()
        assert joined == [str(ended.facts["pid"])]
    finally:
        rig.close()
        shutil.rmtree(base, ignore_errors=True)


class BrokenPipe:
    """A spare's standard input whose launcher died after the executor last looked."""

    def write(self, data: bytes) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def close(self) -> None:
        pass


def test_a_spare_that_died_before_its_spec_leaves_the_run_its_own_cgroup(rig) -> None:
    """The spare's cgroup (already named after the attempt) is given back its spare name
    before it is removed, so the direct start's cgroup of that name is the run's alone."""
    executor = executor_of(rig)
    if executor.cgroups is None:
        pytest.skip("cgroups are not writable on this host")
    spare = ready_spare(rig)
    spare_cgroup = executor.spare_cgroup
    assert eventually(lambda: spare in spare_cgroup.pids())
    real_stdin, executor.spare.stdin = executor.spare.stdin, BrokenPipe()
    real_stdin.close()
    message = prepared(rig, "import time\ntime.sleep(1)\nprint(open('/proc/self/cgroup').read())\n")
    rig.probe("cache_manager").send("executor", message)
    ended, output = ended_with_output(rig, message.attempt.attempt_id)
    assert ended.outcome.status == "completed", (ended.outcome, output)
    assert ended.facts["pid"] != spare
    assert not any("/spare-" in line for line in output.decode().splitlines())
    assert eventually(lambda: not any(d.exists() for d in spare_cgroup.dirs.values()))
