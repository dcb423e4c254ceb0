"""What an experiment or a crash must never do to the runner's records, end to end.

Real ``runner-supervisor`` processes on a ``file://`` store:

* a run that fills its working directory's file system (a small tmpfs mounted as
  ``--working-dir``: real ENOSPC at the runner's real write calls) ends with a fate, its
  slot and working directory are freed and its request is settled: ``failed`` ("disk
  full: …") when the run went past its ``hdd``, handed back when something else filled
  the disk;
* a run cannot forge the runner's metadata files (``../_metadata/…``);
* an attempt a SIGKILLed runner left, recovered after a newer attempt of its request
  completed elsewhere, never overwrites that attempt's outputs.

The tmpfs tests need to mount a file system (root); they are skipped where that is refused.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from runner import attempt_files, metadata

from .support import Runner, short_tempdir

FS_SIZE = "16m"


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")


@pytest.fixture()
def small_fs_runner():
    """A runner (not started) whose --working-dir is a 16 MiB tmpfs, one executor."""
    root = short_tempdir()
    harness = Runner(root, executors=1, max_attempts=1)
    mount_tmpfs(root / "w", FS_SIZE)
    yield harness
    harness.kill()
    subprocess.run(["umount", "-l", str(root / "w")], capture_output=True)
    harness.cleanup()


def fill(path: Path) -> int:
    """Write ``path`` until its file system is full (ENOSPC); bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as out:
        try:
            while True:
                written += out.write(b"\0" * 65536)
        except OSError:
            pass
    return written


def tar_member(data: bytes, name: str) -> bytes:
    """The bytes of member ``name`` (with or without a leading ``./``) of a tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        [member] = [m for m in archive.getmembers() if m.name.removeprefix("./") == name]
        return archive.extractfile(member).read()


def attempt_folders(working_dir: Path) -> list[str]:
    """The attempt folders (and runner folders beside them) left under ``working_dir``."""
    return sorted(str(p.relative_to(working_dir)) for p in working_dir.glob("*/*/*"))


FILLER = """
    import sys, time
    with open("../modeldir/fill.bin", "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\\0" * 65536)
        except OSError as exc:
            print("the run met:", exc, flush=True)
    while True:  # and goes on printing into a full disk
        print("x" * 10000, flush=True)
        time.sleep(0.05)
"""


def test_a_run_that_fills_its_disk_ends_failed_and_frees_its_slot(small_fs_runner):
    runner = small_fs_runner
    runner.start()
    request = runner.request(runner.workspace({"fill.py": FILLER}), "fill.py")
    request["experiment"]["resources_needed"]["hdd"] = "2mb"
    runner.publish(request)

    record = runner.wait_final(request, timeout=90)
    assert record["status"] == "failed", record
    [document] = runner.scrape_documents(request)
    assert document["studioml"]["status"] == "failed"
    assert document["runner"]["message"].startswith("disk full: "), document["runner"]
    assert "over the request's hdd" in document["runner"]["message"]
    assert "No space left" in document["runner"]["files_error"]
    working_dir = Path(runner.options["working-dir"])
    runner.wait_for(lambda: not attempt_folders(working_dir), 30,
                    "the attempt's folders to be removed")

    # The slot (one executor) is free again: the next request runs.
    after = runner.request(runner.workspace({"ok.py": "print('fine')\n"}), "ok.py")
    after["experiment"]["resources_needed"]["hdd"] = "2mb"
    runner.publish(after)
    assert runner.wait_final(after, timeout=90)["status"] == "completed"
    assert "periodic work failed" not in runner.log()


PRINTER = """
    import pathlib, sys, time
    marker = pathlib.Path({marker!r})
    if marker.exists():
        print("the second run", flush=True)
        sys.exit(0)
    marker.write_text("1")
    while True:
        print("y" * 10000, flush=True)
        time.sleep(0.05)
"""


def test_a_disk_filled_by_someone_else_hands_the_request_back(small_fs_runner):
    runner = small_fs_runner
    runner.start()
    marker = runner.root / "first-run"
    request = runner.request(runner.workspace({"p.py": PRINTER.format(marker=str(marker))}),
                             "p.py")
    request["experiment"]["resources_needed"]["hdd"] = "4mb"
    runner.publish(request)
    runner.wait_for(marker.exists, 60, "the first run to start")
    filler = Path(runner.options["working-dir"]) / "someone-else.bin"
    fill(filler)

    def handed_back():
        record = runner.record(request)
        return record if record and record.get("status") == "cancelled" else None

    record = runner.wait_for(handed_back, 60, "the attempt to be handed back")
    assert not record["final"] and record["attempts"] == 0, record  # not counted
    filler.unlink()
    assert runner.wait_final(request, timeout=120)["status"] == "completed"
    documents = {d["studioml"]["status"]: d for d in runner.scrape_documents(request)}
    assert set(documents) == {"cancelled", "completed"}, documents
    message = documents["cancelled"]["runner"]["message"]
    assert message.startswith("disk full: ") and "the host's fault" in message, message
    working_dir = Path(runner.options["working-dir"])
    runner.wait_for(lambda: not attempt_folders(working_dir), 30,
                    "the attempts' folders to be removed")


FORGER = """
    import json, os, pathlib, sys
    attempt = os.path.basename(os.environ["STUDIOML_HOME"])
    folder = pathlib.Path("../_metadata")
    folder.mkdir(exist_ok=True)
    forged = {"studioml": {"status": "completed"}, "experiment": {"loss": 0},
              "runner": {"start": "2099-01-01T00:00:00.000Z"}}
    (folder / "scrape-host-vm-zzzzzz.json").write_text(json.dumps(forged))
    (folder / f"output-host-{attempt}.log").write_text("FORGED OUTPUT\\n")
    (folder / f"scrape-host-{attempt}.json").write_text(json.dumps(forged))
    print("real output", flush=True)
    sys.exit(1)
"""


@pytest.mark.runner_options(max_attempts=1)
def test_a_run_cannot_forge_the_runners_metadata_files(runner):
    """SPEC section 6: the runner owns its metadata.  The run writes the ``_metadata``
    folder of its working directory; the runner's files are elsewhere and only the
    attempt's own are uploaded (``--sandbox off``: the harness's default)."""
    runner.start()
    request = runner.request(runner.workspace({"forge.py": FORGER}), "forge.py")
    runner.publish(request)
    record = runner.wait_final(request)
    assert record["status"] == "failed"
    attempt_id = record["attempt"]
    folder = runner.experiment_dir(request) / "_metadata"
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        metadata.output_name(attempt_id), metadata.runner_log_name(attempt_id),
        metadata.scrape_name(attempt_id)])
    assert (folder / metadata.output_name(attempt_id)).read_text() == "real output\n"
    [document] = runner.scrape_documents(request)
    assert document["studioml"]["status"] == "failed" and document["experiment"] == {}


TWO_RUNS = """
    import json, pathlib, time
    marker = pathlib.Path({marker!r})
    first = not marker.exists()
    which = "first" if first else "second"
    (pathlib.Path("..") / "modeldir" / "model.json").write_text(json.dumps({{"run": which}}))
    print("run:", which, flush=True)
    if first:
        marker.write_text("1")
        time.sleep(600)  # killed with its runner
"""


def test_a_recovered_attempt_never_overwrites_a_newer_attempts_outputs(runners):
    """Runner A runs the first attempt and is SIGKILLed; runner B (another host, as far as
    the queue can tell) takes the request back and completes it; then A restarts and
    recovers its attempt as cancelled.  B's outputs must stand."""
    root_a, root_b = short_tempdir(), short_tempdir()
    a = Runner(root_a)
    runners.append(a)
    b = Runner(root_b, store_root=a.store_root, queue_root=a.options["queue-root"])
    runners.append(b)
    marker = root_a / "first-run"
    a.start()
    request = a.request(a.workspace({"two.py": TWO_RUNS.format(marker=str(marker))}),
                        "two.py")
    a.publish(request)
    a.wait_for(marker.exists, 60, "the first run to start")
    roles = a.role_pids()
    a.kill()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    a.wait_for(lambda: all(gone(pid) for pid in roles.values()), 30, "A's roles to exit")
    runtime_a = str(a.options["runtime-dir"])
    [left] = attempt_files.attempt_ids(runtime_a)

    b.start()
    record = b.wait_final(request, timeout=90)
    assert record["status"] == "completed" and record["attempt"] != left, record
    b.stop()
    modeldir = a.experiment_dir(request) / "modeldir.tar"
    output = a.experiment_dir(request) / "output.tar"
    assert json.loads(tar_member(modeldir.read_bytes(), "model.json")) == {"run": "second"}
    second_output = output.read_bytes()

    a.start()  # recovers its attempt, ends it cancelled, uploads what it may
    a.wait_for(lambda: not attempt_files.attempt_ids(runtime_a), 60,
               "A's recovered attempt to be settled")
    assert json.loads(tar_member(modeldir.read_bytes(), "model.json")) == {"run": "second"}
    assert output.read_bytes() == second_output
    assert a.record(request) == record
    documents = {d["runner"]["attempt"]: d for d in a.scrape_documents(request)}
    assert documents[left]["studioml"]["status"] == "cancelled"  # its own files, uploaded
    assert documents[record["attempt"]]["studioml"]["status"] == "completed"
    assert b"run: first" in (a.experiment_dir(request) / "_metadata"
                             / metadata.output_name(left)).read_bytes()
