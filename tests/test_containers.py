"""Container mode end to end (runner/containers).

OCI images: a real registry (``docker-registry``) on a free loopback port serves a tiny
Python image built here (tests/container_support.py); a real ``runner-supervisor`` with
``--container-runtime bwrap`` pulls it with skopeo, unpacks it with umoci into its image
cache and runs experiments in it under bubblewrap.

Apptainer/Singularity cannot be installed from the registries reachable here: their command
lines are tested against ``STAND_IN``, a stand-in executable named ``apptainer`` /
``singularity`` that records its arguments and environment and runs the command on the
host, in the folder ``--bind``/``--pwd`` name.  Where a real ``apptainer`` exists,
``test_real_apptainer_runs_an_oci_image_from_the_local_registry`` runs it for real.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from runner import containers, metadata
from runner.containers.apptainer import ApptainerRuntime, SingularityRuntime

from .container_support import (GRACEFUL, Registry, assert_sigterm_grace, need_programs, push,
                                python_image_layout)
from .support import short_tempdir
from .test_e2e import tar_members
from .test_e2e_resources import MEMORY_HOG, needs_cgroups, only_document, output_of

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def registry():
    need_programs("docker-registry", "skopeo")
    server = Registry(short_tempdir("reg")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def python_image(registry) -> str:
    """``docker://127.0.0.1:<port>/studioml/python:1`` in the local registry."""
    need_programs("umoci", "bwrap")
    return push(python_image_layout(), registry, "studioml/python:1")


IN_IMAGE = """
    import json, os, sys
    print("inside", sys.executable, os.getcwd(), flush=True)
    print(json.dumps({"experiment": {"python": sys.executable, "cwd": os.getcwd(),
                                     "home": os.environ["STUDIOML_HOME"],
                                     "mark": os.environ.get("IMAGE_MARK"),
                                     "mine": os.environ.get("MINE"),
                                     "root": sorted(os.listdir("/")),
                                     "args": sys.argv[1:]}}))
    with open(os.path.join("..", "modeldir", "weights.txt"), "w") as handle:
        handle.write("w=42")
"""


def image_request(runner, image: str, script: str, **options) -> dict:
    request = runner.request(runner.workspace({"train.py": script}), "train.py", **options)
    request["config"]["image"] = image
    return request


@pytest.mark.runner_options(container_runtime="bwrap")
def test_oci_image_experiments_run_end_to_end_and_the_image_is_pulled_once(runner, python_image):
    runner.start()
    requests = [image_request(runner, python_image, IN_IMAGE, args=[f"run{i}"],
                              env={"MINE": f"value {i}"}) for i in range(2)]
    for request in requests:
        runner.publish(request)
    for i, request in enumerate(requests):
        record = runner.wait_final(request, timeout=180)
        assert record["status"] == "completed", runner.log()
        [document] = runner.scrape_documents(request)
        seen = document["experiment"]
        assert seen["python"] == "/usr/bin/python3"  # the image's interpreter, not the host's
        assert seen["cwd"] == "/studioml/workspace" and seen["home"] == "/studioml"
        assert seen["mark"] == "tiny-python" and seen["mine"] == f"value {i}"
        assert seen["args"] == [f"run{i}"]
        assert "work" not in seen["root"] and "studioml" in seen["root"]  # not the host's /
        output = (runner.experiment_dir(request) / "_metadata" /
                  metadata.output_name(record["attempt"])).read_text()
        assert "inside /usr/bin/python3 /studioml/workspace" in output
        modeldir = tar_members(runner.experiment_dir(request) / "modeldir.tar")
        assert modeldir["weights.txt"] == b"w=42"
    def image_cache():  # heartbeat stats: wait for the one after both runs ended
        stats = runner.status()["roles"]["cache_manager"]["stats"]
        return stats if stats["image_cache_in_use"] == 0 and stats["image_cache_hits"] else None
    stats = runner.wait_for(image_cache, what="the image cache's stats after both runs")
    assert (stats["image_cache_misses"], stats["image_cache_hits"]) == (1, 1)  # one pull
    assert stats["image_cache_entries"] == 1


@pytest.mark.runner_options(container_runtime="bwrap")
def test_oci_run_killed_at_max_duration_leaves_no_process_behind(runner, python_image):
    runner.start()
    marker = f"marker-{uuid.uuid4().hex}"
    script = f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
                                  "import os, time; os.setsid(); time.sleep(300)", {marker!r}])
        print("child started", child.pid, flush=True)
        time.sleep(300)
    """
    request = image_request(runner, python_image, script, max_duration="3s")
    runner.publish(request)
    record = runner.wait_final(request, timeout=180)
    assert record["status"] == "expired"
    [document] = runner.scrape_documents(request)
    assert "max_duration" in document["runner"]["message"]

    def leftovers():
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                    found.append(proc.name)
            except OSError:
                pass
        return found
    runner.wait_for(lambda: not leftovers(), timeout=30, what="the container's processes to end")


def test_sigterm_to_the_group_reaches_the_experiment_in_the_image_with_its_grace(python_image,
                                                                               tmp_path):
    """What drain, cancel and every stop do first (SIGTERM to the run's process group)."""
    runtime = containers.RUNTIMES["bwrap"]()
    image = tmp_path / "image"
    runtime.registry().get(python_image, image)
    workdir = tmp_path / "attempt"
    (workdir / "workspace").mkdir(parents=True)
    (workdir / "workspace" / "graceful.py").write_text(textwrap.dedent(GRACEFUL))
    argv, env = runtime.command(containers.Launch(
        image=str(image), command=["python3", "graceful.py"], workdir=str(workdir),
        variables={}), dict(os.environ))
    assert_sigterm_grace(argv, env, workdir / "workspace")


@needs_cgroups
@pytest.mark.runner_options(container_runtime="bwrap", max_attempts=1)
def test_the_cgroup_memory_limit_holds_inside_the_container(runner, python_image):
    runner.start()
    request = image_request(runner, python_image, MEMORY_HOG)
    request["experiment"]["resources_needed"]["ram"] = "100mb"
    runner.publish(request)
    record = runner.wait_final(request, timeout=180)
    assert record["status"] == "failed"
    document = only_document(runner, request)
    assert document["runner"]["error"] == "OutOfMemory"
    assert document["runner"]["cgroup"]["oom_kills"] >= 1
    assert "allocating" in output_of(runner, request, document)


@pytest.mark.runner_options(container_runtime="bwrap", max_attempts=1)
def test_an_image_missing_from_the_registry_is_a_bad_request(runner, python_image):
    runner.start()
    missing = python_image.rsplit(":", 1)[0] + "-absent:1"
    request = image_request(runner, missing, IN_IMAGE)
    runner.publish(request)
    record = runner.wait_final(request, timeout=120)
    assert record["status"] == "failed"
    dead = runner.wait_for(
        lambda: list((runner.root / "q" / runner.queue / ".dead").glob("*.reason.txt")),
        what="the request to be dead-lettered")
    assert "absent" in dead[0].read_text()


# ---------------------------------------------------------------------------------------
# Apptainer / Singularity: the command line, against a stand-in
# ---------------------------------------------------------------------------------------

STAND_IN = r'''#!{python}
"""Stand-in for {name} (not the real runtime): records argv and the environment, then runs
the command on the host in the folder that --bind/--pwd name."""
import json, os, sys
args = sys.argv[1:]
with open({record!r}, "a") as out:
    out.write(json.dumps({{"argv": sys.argv, "env": dict(os.environ)}}) + "\n")
assert args[0] == "exec", args
i, binds, pwd = 1, {{}}, None
while args[i].startswith("--"):
    if args[i] == "--bind":
        source, target = args[i + 1].split(":")
        binds[target] = source
        i += 2
    elif args[i] == "--pwd":
        pwd = args[i + 1]
        i += 2
    elif args[i] == "--network":
        i += 2
    else:
        i += 1
image, command = args[i], args[i + 1:]
for target, source in binds.items():
    if pwd.startswith(target):
        pwd = source + pwd[len(target):]
prefix = {prefix!r}
env = {{k[len(prefix):]: v for k, v in os.environ.items() if k.startswith(prefix)}}
env["PATH"] = os.environ["PATH"]
os.chdir(pwd)
os.execvpe(command[0], command, env)
'''


def install_stand_in(folder: Path, name: str, prefix: str) -> Path:
    """A stand-in ``name`` executable in ``folder``; returns the file it records into."""
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / f"{name}.calls"
    program = folder / name
    program.write_text(STAND_IN.format(python=sys.executable, name=name, record=str(record),
                                       prefix=prefix))
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return record


def calls(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


IN_APPTAINER = """
    import json, os, sys
    print(json.dumps({"experiment": {"cwd": os.getcwd(), "mine": os.environ.get("MINE"),
                                     "home": os.environ.get("STUDIOML_HOME"),
                                     "runner_var": os.environ.get("RUNNER_ONLY")}}))
    with open(os.path.join("..", "modeldir", "weights.txt"), "w") as handle:
        handle.write("w=7")
"""


@pytest.mark.parametrize("name, prefix", [("apptainer", "APPTAINERENV_"),
                                          ("singularity", "SINGULARITYENV_")])
def test_singularity_artifact_runs_through_the_runtimes_command_line(runner, name, prefix):
    stand_ins = runner.root / "bin"
    record = install_stand_in(stand_ins, name, prefix)
    runner.env["PATH"] = f"{stand_ins}{os.pathsep}{runner.env['PATH']}"
    runner.env["RUNNER_ONLY"] = "runner's own"
    runner.options["container-runtime"] = name
    runner.start()
    image = runner.root / "lolcow.sif"
    image.write_bytes(b"SIF_MAGIC stand-in image bytes")
    sif_url = f"{runner.store_root}/images/lolcow.sif"
    target = runner.store_path(sif_url)  # the store is a file:// folder: place the object
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, target)
    request = runner.request(runner.workspace({"train.py": IN_APPTAINER}), "train.py",
                             args=["a b"], env={"MINE": "secret-ish value"})
    request["experiment"]["artifacts"]["_singularity"] = {"qualified": sif_url,
                                                         "key": "images/lolcow.sif"}
    runner.publish(request)
    record_doc = runner.wait_final(request)
    assert record_doc["status"] == "completed", runner.log()
    [call] = calls(record)
    argv = call["argv"][1:]
    bind = argv[argv.index("--bind") + 1]
    workdir = bind.split(":")[0]
    assert argv[:2] == ["exec", "--containall"]
    assert bind == f"{workdir}:/studioml" and Path(workdir).name == record_doc["attempt"]
    assert argv[argv.index("--pwd") + 1] == "/studioml/workspace"
    assert "--nv" not in argv  # no GPUs given
    image_path = argv[argv.index("--pwd") + 2]
    assert image_path.startswith(str(runner.root / "c" / "artifacts" / "objects"))  # cached
    assert argv[-4:] == ["python3", "train.py", "a", "b"]  # args split as in python mode
    assert call["env"][prefix + "MINE"] == "secret-ish value"
    assert call["env"][prefix + "STUDIOML_HOME"] == "/studioml"
    assert "secret-ish value" not in " ".join(argv)  # variables never on the command line
    assert prefix + "RUNNER_ONLY" not in call["env"]  # --cleanenv: not the runner's
    [document] = runner.scrape_documents(request)
    assert document["experiment"]["mine"] == "secret-ish value"
    assert document["experiment"]["runner_var"] is None
    assert tar_members(runner.experiment_dir(request) / "modeldir.tar")["weights.txt"] == b"w=7"


@pytest.mark.runner_options(container_runtime="apptainer")
def test_an_image_no_runtime_here_runs_is_put_back_untouched(runner):
    runner.env["PATH"] = os.pathsep.join(p for p in runner.env["PATH"].split(os.pathsep)
                                         if not (Path(p) / "apptainer").exists())
    runner.start()
    request = runner.request(runner.workspace({"train.py": IN_APPTAINER}), "train.py")
    request["experiment"]["artifacts"]["_singularity"] = {"qualified": "docker://busybox:1"}
    runner.publish(request)
    reason = "no container runtime on this host runs docker://busybox:1"
    runner.wait_for(lambda: f"cannot run on this runner: {reason}" in runner.log(),
                    what="the request to be held aside as one that never runs here")
    record = runner.record(request)
    assert record["status"] == "waiting" and reason in json.dumps(record)  # no attempt
    assert runner.scrape_documents(request) == []
    queue = runner.root / "q" / runner.queue
    assert not list(queue.glob(".dead/*"))
    runner.stop()  # a stopping runner puts back what it holds aside
    assert [p for p in queue.iterdir() if p.is_file()], "the request did not go back"
    assert "attempt=" not in runner.log()


def test_apptainer_command_line_for_gpus_references_and_no_network():
    runtime = ApptainerRuntime("/opt/stand-in/apptainer")
    launch = containers.Launch(image="docker://127.0.0.1:5000/py:1", command=["python3", "t.py"],
                               workdir="/w/a", variables={"K": "v"}, devices=["GPU-1"],
                               network=False)
    argv, env = runtime.command(launch, {"PATH": "/usr/bin", "SECRET": "x"})
    assert argv == ["/opt/stand-in/apptainer", "exec", "--containall", "--bind", "/w/a:/studioml",
                    "--pwd", "/studioml/workspace", "--nv", "--net", "--network", "none",
                    "--nohttps", "docker://127.0.0.1:5000/py:1", "python3", "t.py"]
    assert env == {"PATH": "/usr/bin", "APPTAINERENV_K": "v"}
    assert SingularityRuntime("singularity").command(launch, {})[1] == {"SINGULARITYENV_K": "v"}


@pytest.mark.parametrize("reference, loopback", [
    ("docker://127.0.0.1:5000/a/b:1", True), ("docker://localhost/a", True),
    ("docker://[::1]:5000/a", True), ("docker://127.9.9.9/a", True),
    ("docker://registry.example.com:5000/a", False), ("docker://10.0.0.1/a", False),
    ("oras://ghcr.io/a/b:1", False)])
def test_only_loopback_registries_go_without_tls(reference, loopback):
    assert containers.base.on_loopback(reference) is loopback


def test_auto_prefers_apptainer_and_refuses_images_no_runtime_here_runs(tmp_path, monkeypatch):
    install_stand_in(tmp_path, "apptainer", "APPTAINERENV_")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    usable, _ = containers.runtimes_for("auto")
    assert usable[0].name == "apptainer"
    sif = containers.ImageRef(storage_url="s3://bucket/img.sif")
    assert containers.choose(usable, sif).name == "apptainer"
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    usable, problems = containers.runtimes_for("auto")
    assert usable == [] and any("apptainer" in p for p in problems)
    with pytest.raises(containers.ContainerUnavailable, match="no container runtime"):
        containers.choose(usable, sif, problems)


@pytest.mark.skipif(shutil.which("apptainer") is None,
                    reason="apptainer is not installed (not in the package registries here)")
@pytest.mark.runner_options(container_runtime="apptainer")
def test_real_apptainer_runs_an_oci_image_from_the_local_registry(runner, python_image):
    runner.start()
    request = image_request(runner, python_image, IN_IMAGE)
    runner.publish(request)
    record = runner.wait_final(request, timeout=300)
    assert record["status"] == "completed", runner.log()
    assert tar_members(runner.experiment_dir(request) / "modeldir.tar")["weights.txt"] == b"w=42"
