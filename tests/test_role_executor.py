"""The executor alone: hosted in a thread on the in-memory bus, it really runs a tiny
Python script (this interpreter) and reports its output and end to the other roles."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from runner import protocol

from .roles_support import RoleRig


@pytest.fixture()
def rig():
    rig = RoleRig()
    rig.host("executor")
    yield rig
    rig.close()


def prepared(rig: RoleRig, script: str) -> protocol.AttemptPrepared:
    attempt = rig.attempt(rig.request(mutable=()))
    workspace = Path(attempt.workdir) / "workspace"
    workspace.mkdir(parents=True)
    (workspace / "train.py").write_text(script)
    return protocol.AttemptPrepared(attempt=attempt, python=sys.executable,
                                    env_path=sys.prefix)


def ended_with_output(rig: RoleRig, attempt_id: str) -> tuple[protocol.AttemptEnded, bytes]:
    """The attempt's ``AttemptEnded`` to the scraper, and the run's output sent before it."""
    scraper = rig.probe("scraper")
    ended = scraper.expect(protocol.AttemptEnded, lambda m: m.attempt.attempt_id == attempt_id,
                           timeout=60)
    chunks = [m for m in scraper.seen if isinstance(m, protocol.OutputChunk)
              and m.attempt_id == attempt_id and m.offset >= 0]
    return ended, b"".join(m.data for m in sorted(chunks, key=lambda m: m.offset))


def test_a_run_streams_its_output_and_ends_completed(rig) -> None:
    message = prepared(rig, "import os\nprint('hello', os.environ['STUDIOML_EXPERIMENT'])\n")
    attempt = message.attempt
    rig.probe("cache_manager").send("executor", message)

    ended, output = ended_with_output(rig, attempt.attempt_id)
    assert ended.outcome.status == "completed" and ended.outcome.exit_code == 0
    assert ended.facts["exit_code"] == 0 and ended.facts["pid"] > 0
    assert output == f"hello {attempt.key}\n".encode()
    assert ended.facts["output_sent"] == len(output)
    for role in ("fetcher", "cache_manager"):  # the slot and the image lease are free
        assert rig.probe(role).expect(protocol.RunEnded).attempt_id == attempt.attempt_id
    supervisor = rig.probe("supervisor")
    running = supervisor.expect(protocol.AttemptPhase, lambda m: m.phase == protocol.PHASE_RUNNING)
    assert running.detail["pid"] == ended.facts["pid"]
    supervisor.expect(protocol.AttemptPhase, lambda m: m.phase == protocol.PHASE_ENDING)


def test_a_failing_run_ends_failed_with_its_exit_status(rig) -> None:
    message = prepared(rig, "import sys\nprint('bad', file=sys.stderr)\nsys.exit(3)\n")
    rig.probe("cache_manager").send("executor", message)
    ended, output = ended_with_output(rig, message.attempt.attempt_id)
    assert output == b"bad\n"
    assert ended.outcome.status == "failed" and ended.outcome.exit_code == 3
    assert ended.outcome.error == "ExperimentFailed"
    assert rig.probe("fetcher").expect(protocol.RunEnded).attempt_id == message.attempt.attempt_id


def test_stop_runs_ends_a_running_attempt(rig) -> None:
    message = prepared(rig, "import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    rig.probe("cache_manager").send("executor", message)
    rig.probe("scraper").expect(protocol.OutputChunk, lambda m: b"started" in m.data, timeout=60)
    rig.probe("fetcher").send("executor", protocol.StopRuns(
        reason="cancelled by runner-ctl cancel", attempt_ids=[message.attempt.attempt_id],
        cause="cancelled"))
    ended = rig.probe("scraper").expect(protocol.AttemptEnded, timeout=60)
    assert ended.outcome.status != "completed" and ended.outcome.error == "Cancelled"


@pytest.mark.parametrize("used, hdd, status, error", [
    (2_000_000, 0, "failed", "DiskFull"),  # no hdd declared (over one, the disk watcher acts)
    (0, 100_000_000, "cancelled", "AttemptFilesUnwritable"),
])
def test_a_run_whose_files_cannot_be_written_is_stopped_with_its_fate(rig, used, hdd, status,
                                                                      error) -> None:
    """The scraper's ``StopRuns`` (cause ``disk_full``): the executor measures the run's
    working directory against its ``hdd`` (over it, or none declared: the run filled the
    disk)."""
    message = prepared(rig, "import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    attempt = message.attempt
    attempt = protocol.Attempt(**{**protocol.to_map(attempt),
                                  "resources": {"cpus": 1, "devices": "-1", "hdd": hdd}})
    (Path(attempt.workdir) / "modeldir").mkdir()
    (Path(attempt.workdir) / "modeldir" / "weights").write_bytes(b"w" * used)
    rig.probe("cache_manager").send("executor", protocol.AttemptPrepared(
        attempt=attempt, python=message.python, env_path=message.env_path))
    rig.probe("scraper").expect(protocol.OutputChunk, lambda m: b"started" in m.data, timeout=60)
    rig.probe("scraper").send("executor", protocol.StopRuns(
        reason="[Errno 28] No space left on device", attempt_ids=[attempt.attempt_id],
        cause="disk_full"))
    ended = rig.probe("scraper").expect(protocol.AttemptEnded, timeout=60)
    assert ended.outcome.status == status and ended.outcome.error == error
    assert ended.outcome.message.startswith("disk full: [Errno 28] No space left on device")


def test_a_run_whose_attempt_file_cannot_be_written_is_killed(rig) -> None:
    """Without its ``<id>.run`` file a runner that died could not find the run again: the
    executor kills it and ends the attempt as the host's fault (here the file's place is
    taken by a folder, so the real rename fails)."""
    marker = Path(rig.root) / "pid"
    message = prepared(rig, f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))"
                            "\ntime.sleep(600)\n")
    (Path(rig.config.runtime_dir) / "attempts" / f"{message.attempt.attempt_id}.run").mkdir(
        parents=True)
    rig.probe("cache_manager").send("executor", message)
    ended = rig.probe("scraper").expect(protocol.AttemptEnded, timeout=60)
    assert ended.outcome.status == "cancelled" and ended.outcome.error == "AttemptFilesUnwritable"
    assert rig.probe("fetcher").expect(protocol.RunEnded).attempt_id == message.attempt.attempt_id
    if marker.exists():  # it may have been killed before it got that far
        pid = int(marker.read_text())
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text()


def test_no_process_of_the_run_is_left_when_its_end_is_posted() -> None:
    """The end gives the run's slot, CPUs and memory to the next request: a run killed at
    the end of its grace, with a process that left its group (setsid) holding a large
    memory, is over only once that process is dead, not while it is still exiting."""
    rig = RoleRig("--kill-grace", "0.5s", "--sandbox", "off")  # (a sandbox has its own pids)
    rig.host("executor")
    try:
        if rig.hosts[0].role.cgroups is None:
            pytest.skip("cgroups are not writable on this host")
        message = prepared(rig, textwrap.dedent("""\
            import signal, subprocess, sys, time
            holder = "import time\\nheld = b'x' * (1500 * 10**6)\\nprint(flush=True)\\n" \\
                     "time.sleep(600)"
            child = subprocess.Popen([sys.executable, "-c", holder], start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
            child.stdout.readline()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print(child.pid, flush=True)
            time.sleep(600)
            """))
        rig.probe("cache_manager").send("executor", message)
        started = rig.probe("scraper").expect(protocol.OutputChunk, timeout=60)
        left = int(started.data.split()[-1])
        rig.probe("fetcher").send("executor", protocol.StopRuns(
            reason="cancelled by runner-ctl cancel", attempt_ids=[message.attempt.attempt_id],
            cause="cancelled"))
        ended = rig.probe("scraper").expect(protocol.AttemptEnded, timeout=60)
        try:
            state = Path(f"/proc/{left}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        assert state in ("gone", "Z"), f"pid {left} is still {state} when the run's end is posted"
        assert ended.outcome.error == "Cancelled"
    finally:
        rig.close()
