"""The bubblewrap sandbox (runner/sandbox.py): what a sandboxed script cannot do.

Every test runs a real Python script under real ``bwrap`` with the command line the
executor uses.  The runner's folders are laid out under the ``tests/.data``
folder (or, when the checkout itself lies under ``/tmp`` or another folder the sandbox makes
private, under ``/var/cache``), so that each hidden folder is proven hidden by its own rule
and not by the sandbox's private ``/tmp``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from runner import metadata, sandbox
from runner.config import from_values

from .container_support import GRACEFUL, assert_sigterm_grace
from .support import REPO, server_unavailable

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def bwrap() -> str:
    found = shutil.which("bwrap")
    if found is None:
        server_unavailable("bwrap (bubblewrap) is not installed")
    return found


def layout_base() -> Path:
    """Where the test lays out a runner's folders: outside every folder the sandbox makes
    private (a write there would land in the sandbox's own tmpfs, not be refused)."""
    for base in (REPO / "tests" / ".data", Path("/var/cache/studioml-runner-tests")):
        real = os.path.realpath(base)
        if not any(real == f or real.startswith(f + "/") for f in sandbox.PRIVATE_FOLDERS):
            try:
                base.mkdir(parents=True, exist_ok=True)
                return base
            except OSError:
                continue
    server_unavailable("no writable folder outside /tmp for the sandbox's layout")


@pytest.fixture()
def layout(bwrap):
    """A runner's folders (work, cache with an environment, runtime, certs, home)."""
    root = layout_base() / f"sb-{uuid.uuid4().hex[:8]}"
    dirs = {name: root / name for name in ("work", "cache", "run", "certs", "home")}
    for folder in dirs.values():
        folder.mkdir(parents=True)
    attempt = dirs["work"] / "exp-a" / "host-1"
    (attempt / "workspace").mkdir(parents=True)
    (attempt / "modeldir").mkdir()
    (attempt / "workspace" / "mine.txt").write_text("my input")
    other = dirs["work"] / "exp-b" / "host-2" / "workspace"
    other.mkdir(parents=True)
    (other / "theirs.txt").write_text("another attempt's input")
    (dirs["cache"] / "artifacts").mkdir()
    (dirs["cache"] / "artifacts" / "blob").write_text("someone's workspace")
    env = dirs["cache"] / "envs" / "abc123"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    (dirs["certs"] / "credentials").write_text("[default]\naws_secret_access_key=s3cr3t\n")
    (dirs["home"] / ".netrc").write_text("machine x password hunter2\n")
    key_file = root / "client.key"
    key_file.write_text("PRIVATE KEY")
    box = sandbox.Sandbox(bwrap, hidden_folders=tuple(str(dirs[n]) for n in
                                                      ("work", "cache", "run", "certs", "home")),
                          hidden_files=(str(key_file),))
    yield {"root": root, "attempt": attempt, "other": other, "env": env, "box": box,
           "key_file": key_file, **dirs}
    shutil.rmtree(root, ignore_errors=True)


def run_sandboxed(layout, code: str, box: sandbox.Sandbox | None = None,
                  timeout: float = 60) -> dict:
    """Run :data:`PROBE` + ``code`` as the attempt's script in the sandbox; its last stdout
    line is JSON."""
    attempt = layout["attempt"]
    script = attempt / "workspace" / "probe.py"
    script.write_text(textwrap.dedent(PROBE) + textwrap.dedent(code))
    python = layout["env"] / "bin" / "python"
    command = (box or layout["box"]).wrap(
        [str(python), str(script)], workdir=str(attempt), cwd=str(attempt / "workspace"),
        readable=[str(layout["env"])])
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          cwd=attempt / "workspace")
    assert done.returncode == 0 and done.stdout.strip(), (done.returncode, done.stdout, done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


PROBE = """
    import json, os, sys
    def attempt(fn):
        try:
            return ["ok", fn()]
        except OSError as exc:
            return ["denied", type(exc).__name__]
    def read(path):
        return attempt(lambda: open(path).read())
    def write(path):
        return attempt(lambda: open(path, "w").write("x"))
    def listing(path):
        return attempt(lambda: sorted(os.listdir(path)))
"""


def test_the_attempt_reads_its_inputs_writes_its_outputs_and_runs_its_environment(layout):
    result = run_sandboxed(layout, """
    print(json.dumps({"mine": read("mine.txt"), "out": write("../modeldir/weights"),
                      "prefix": sys.prefix, "system": read("/etc/hostname")[0]}))
    """)
    assert result["mine"] == ["ok", "my input"]
    assert result["out"][0] == "ok"
    assert (layout["attempt"] / "modeldir" / "weights").read_text() == "x"
    assert result["prefix"] == str(layout["env"])
    assert result["system"] == "ok"  # the host's root stays readable


def test_cannot_read_other_attempts_the_cache_or_credentials(layout):
    result = run_sandboxed(layout, f"""
    print(json.dumps({{
        "other": read({str(layout["other"] / "theirs.txt")!r}),
        "work": listing({str(layout["work"])!r}),
        "cache": read({str(layout["cache"] / "artifacts" / "blob")!r}),
        "certs": read({str(layout["certs"] / "credentials")!r}),
        "home": read({str(layout["home"] / ".netrc")!r}),
        "key": read({str(layout["key_file"])!r}),
        "key_write": write({str(layout["key_file"])!r})}}))
    """)
    assert result["other"] == ["denied", "FileNotFoundError"]
    assert result["work"] == ["ok", ["exp-a"]]  # only the path to its own attempt
    assert result["cache"] == ["denied", "FileNotFoundError"]
    assert result["certs"] == ["denied", "FileNotFoundError"]
    assert result["home"] == ["denied", "FileNotFoundError"]
    assert result["key"][0] == "denied"  # /dev/null (no device access) over the file
    assert result["key_write"][0] == "denied"
    assert layout["key_file"].read_text() == "PRIVATE KEY"


def test_cannot_write_the_environment_store_or_the_host(layout):
    site = layout["env"] / "lib"
    result = run_sandboxed(layout, f"""
    print(json.dumps({{
        "env": write({str(layout["env"] / "pyvenv.cfg")!r}),
        "env_new": write({str(site / "evil.pth")!r}),
        "store": listing({str(layout["cache"] / "envs")!r}),
        "host": write({str(layout["root"] / "planted")!r}),
        "etc": write("/etc/planted")}}))
    """)
    assert result["env"] == ["denied", "OSError"]  # read-only file system
    assert result["env_new"] == ["denied", "OSError"]
    assert result["store"] == ["ok", ["abc123"]]  # its own environment only
    assert result["host"][0] == "denied" and result["etc"][0] == "denied"
    assert not (site / "evil.pth").exists() and not (layout["root"] / "planted").exists()
    assert not Path("/etc/planted").exists()


def test_cannot_see_the_runners_sockets_or_processes(layout):
    path = layout["run"] / "control.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        result = run_sandboxed(layout, f"""
        import socket
        def connect():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect({str(path)!r})
            return "connected"
        def signal_runner():
            os.kill({os.getpid()}, 0)
            return "signalled"
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        print(json.dumps({{"sockets": listing({str(layout["run"])!r}),
                           "connect": attempt(connect), "signal": attempt(signal_runner),
                           "pids": pids, "me": os.getpid()}}))
        """)
    finally:
        listener.close()
    assert result["sockets"] == ["ok", []]
    assert result["connect"][0] == "denied"
    assert result["signal"] == ["denied", "ProcessLookupError"]
    assert os.getpid() not in result["pids"] or result["me"] == os.getpid()
    assert len(result["pids"]) <= 3  # its own PID namespace: bwrap's init and the script


def test_private_tmp(layout):
    marker = Path("/tmp") / f"host-{uuid.uuid4().hex}"
    marker.write_text("host file")
    try:
        result = run_sandboxed(layout, f"""
        print(json.dumps({{"host": read({str(marker)!r}), "own": write("/tmp/scratch"),
                           "listing": listing("/tmp")}}))
        """)
    finally:
        marker.unlink()
    assert result["host"] == ["denied", "FileNotFoundError"]
    assert result["own"][0] == "ok" and result["listing"] == ["ok", ["scratch"]]
    assert not Path("/tmp/scratch").exists()


@pytest.fixture()
def tcp_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


CONNECT = """
    import json, socket
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
        print(json.dumps("reached"))
    except OSError as exc:
        print(json.dumps(type(exc).__name__))
"""


def test_network_on_by_default_and_cut_with_sandbox_network_off(layout, tcp_server):
    code = CONNECT.format(port=tcp_server)
    assert run_sandboxed(layout, code) == "reached"
    cut = sandbox.Sandbox(layout["box"].bwrap, layout["box"].hidden_folders,
                          layout["box"].hidden_files, network=False)
    assert run_sandboxed(layout, code, box=cut) == "ConnectionRefusedError"


def test_sigterm_to_the_group_reaches_the_experiment_which_keeps_its_grace(layout):
    attempt = layout["attempt"]
    script = attempt / "workspace" / "graceful.py"
    script.write_text(textwrap.dedent(GRACEFUL))
    command = layout["box"].wrap([str(layout["env"] / "bin" / "python"), str(script)],
                                 workdir=str(attempt), cwd=str(attempt / "workspace"),
                                 readable=[str(layout["env"])])
    assert_sigterm_grace(command, None, attempt / "workspace")


def test_sigkill_to_the_group_leaves_nothing_in_the_namespace(layout):
    attempt = layout["attempt"]
    script = attempt / "workspace" / "spawner.py"
    script.write_text(textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); "
                                  "time.sleep(300)"])
        print(child.pid, flush=True)
        time.sleep(300)
    """))
    command = layout["box"].wrap([str(layout["env"] / "bin" / "python"), str(script)],
                                 workdir=str(attempt), cwd=str(attempt / "workspace"),
                                 readable=[str(layout["env"])])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout.readline().strip()
    marker = str(script)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                 and marker.encode() in _cmdline(p)]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, "a process of the sandbox outlived SIGKILL to its group"


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_gpu_nodes_are_only_those_of_the_given_devices(tmp_path, bwrap):
    for index, (uuid_, minor) in enumerate((("GPU-aaa", 0), ("GPU-bbb", 3))):
        folder = tmp_path / f"0000:0{index}:00.0"
        folder.mkdir()
        (folder / "information").write_text(
            f"Model: \t\t NVIDIA H100\nIRQ: 1\nGPU UUID: \t {uuid_}\nDevice Minor: \t {minor}\n")
    assert sandbox.gpu_device_nodes(["GPU-bbb"], str(tmp_path)) == ["/dev/nvidia3"]
    assert sandbox.gpu_device_nodes(["GPU-zzz"], str(tmp_path)) == []
    box = sandbox.Sandbox(bwrap, gpu_info=str(tmp_path))
    command = box.wrap(["true"], workdir="/w", cwd="/w", devices=["GPU-bbb"])
    bound = [command[i + 1] for i, arg in enumerate(command) if arg == "--dev-bind"]
    assert "/dev/nvidia3" in bound and "/dev/nvidia0" not in bound


def test_detect_follows_the_option(bwrap, monkeypatch, tmp_path):
    config = from_values({"sandbox": "off"}, {})
    assert sandbox.detect(config)[0] is None
    (tmp_path / "keys").mkdir()
    config = from_values({"sandbox": "auto", "sandbox_network": "off",
                          "working_dir": str(tmp_path / "w"),
                          "encrypt_key_dir": str(tmp_path / "keys")}, {"HOME": str(tmp_path)})
    found, _ = sandbox.detect(config, {"HOME": str(tmp_path)})
    assert found is not None and found.network is False
    for hidden in (tmp_path / "w", tmp_path, tmp_path / "keys"):
        assert str(hidden) in found.hidden_folders
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert sandbox.detect(from_values({"sandbox": "auto"}, {}))[0] is None
    with pytest.raises(sandbox.SandboxError, match="bwrap"):
        sandbox.detect(from_values({"sandbox": "bwrap"}, {}))


SANDBOXED_EXPERIMENT = """
    import json, os, sys
    def names(path):
        try:
            return sorted(os.listdir(path))
        except OSError as exc:
            return type(exc).__name__
    work, cache, run = sys.argv[1:4]
    print(json.dumps({"experiment": {"secret_env": "RUNNER_API_TOKEN" in os.environ,
                                     "options": [n for n in ("MAX_ATTEMPTS",
                                                             "RUNNER_MAX_ATTEMPTS")
                                                 if n in os.environ],
                                     "expanded": os.environ["FROM_RUNNER"],
                                     "own": os.environ["OWN_TOKEN"] == "mine",
                                     "plain": os.environ.get("RUNNER_PLAIN"),
                                     "work": names(work), "cache": names(cache),
                                     "run": names(run), "pids": len([p for p in os.listdir("/proc")
                                                                     if p.isdigit()])}}))
    with open(os.path.join("..", "modeldir", "weights.txt"), "w") as handle:
        handle.write("w=42")
"""


@pytest.mark.runner_options(sandbox="bwrap")
def test_executor_runs_python_mode_experiments_in_the_sandbox(runner, bwrap):
    from .test_e2e import tar_members

    runner.env.update(RUNNER_API_TOKEN="runner-secret-value", RUNNER_PLAIN="plain",
                      MAX_ATTEMPTS="3", RUNNER_MAX_ATTEMPTS="3")  # option variables
    runner.start()
    workspace = runner.workspace({"train.py": SANDBOXED_EXPERIMENT})
    options = runner.options
    request = runner.request(workspace, "train.py", args=[
        str(options["working-dir"]), str(options["cache-dir"]), str(options["runtime-dir"])],
        env={"FROM_RUNNER": "[%RUNNER_API_TOKEN%]", "OWN_TOKEN": "mine"})
    runner.publish(request)
    record = runner.wait_final(request)
    assert record["status"] == "completed", runner.log()
    seen = runner.scrape_documents(request)[-1]["experiment"]
    assert seen["work"] == [request["experiment"]["project"]]  # the path to its attempt only
    assert seen["cache"] == ["envs"] and seen["run"] == []  # no artifact cache, no sockets
    assert seen["pids"] <= 3
    # the runner's secrets stay out, also through %NAME% (a name the run does not get is
    # not replaced: kept as written); the request's own values stay in
    assert seen["secret_env"] is False and seen["expanded"] == "[%RUNNER_API_TOKEN%]"
    assert seen["options"] == []
    assert seen["own"] is True and seen["plain"] == "plain"
    modeldir = tar_members(runner.experiment_dir(request) / "modeldir.tar")
    assert modeldir["weights.txt"] == b"w=42"
    runner_log = (runner.experiment_dir(request) / "_metadata" /
                  metadata.runner_log_name(record["attempt"])).read_text()
    assert "bubblewrap sandbox" in runner_log


@pytest.mark.runner_options(sandbox="bwrap")
def test_a_runner_that_must_sandbox_does_not_start_without_bwrap(runner):
    runner.env["PATH"] = str(runner.root / "no-programs-here")
    runner.start(wait=False)
    code = runner.wait_exit(timeout=60)
    assert code != 0
    assert "--sandbox bwrap: bwrap (bubblewrap) is not installed" in runner.log()


def test_folders_named_through_symlinks_are_hidden_all_the_same(layout):
    linked = layout["root"] / "linked"
    linked.symlink_to(layout["root"])  # --working-dir and --cache-dir given through a link
    box = sandbox.Sandbox(layout["box"].bwrap,
                          hidden_folders=tuple(os.path.realpath(linked / n) for n in
                                               ("work", "cache")))
    attempt = linked / layout["attempt"].relative_to(layout["root"])
    env = linked / layout["env"].relative_to(layout["root"])
    other_file = (layout["other"] / "theirs.txt").relative_to(layout["root"])
    script = attempt / "workspace" / "probe.py"
    script.write_text(textwrap.dedent(PROBE) + textwrap.dedent(f"""
        print(json.dumps({{"other": read({str(linked / other_file)!r}),
                           "cache": read({str(linked / "cache" / "artifacts" / "blob")!r}),
                           "prefix": sys.prefix}}))
    """))
    done = subprocess.run(box.wrap([str(env / "bin" / "python"), str(script)],
                                   workdir=str(attempt), cwd=str(attempt / "workspace"),
                                   readable=[str(env)]),
                          capture_output=True, text=True, timeout=60, cwd=attempt / "workspace")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["other"] == ["denied", "FileNotFoundError"]
    assert result["cache"] == ["denied", "FileNotFoundError"]
    assert result["prefix"] == str(env)
