"""Tests for runner.environments: interpreters, requirements, the environment store, args.

Builds are real (uv and pip) but offline: the tiny package under test ships its own in-tree
PEP 517 backend (``requires = []``), and the installers run with ``UV_OFFLINE=1`` /
``PIP_NO_INDEX=1`` so no test touches the network.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runner import environments as envs
from runner.argv import script_command, split_args
from runner.environments import (Environment, EnvironmentStore, find_interpreter,
                                 normalize_requirements)
from runner.errors import BadRequest, EnvironmentBuildError, InterpreterNotFound

from .support import make_tiny_package

REPO = Path(__file__).resolve().parent.parent

@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """No network for installers; a private uv cache; a build counter file."""
    counter = tmp_path / "build-counter.txt"
    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    monkeypatch.setenv("TINY_BUILD_COUNTER", str(counter))
    return counter


@pytest.fixture()
def tiny(tmp_path) -> Path:
    return make_tiny_package(tmp_path / "src")


def tiny_req(proj: Path) -> str:
    return f"{proj.name} @ {proj.as_uri()}"


def have_uv() -> bool:
    return envs._find_uv() is not None


def counter_lines(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


# ---------------------------------------------------------------------------------------------
# Interpreters
# ---------------------------------------------------------------------------------------------

def _version_of(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_running_version_is_found():
    mine = "%d.%d" % sys.version_info[:2]
    assert _version_of(find_interpreter(mine)) == mine
    assert _version_of(find_interpreter(mine + ".0")) == mine
    assert find_interpreter(None) == Path(sys.executable)
    assert find_interpreter("") == Path(sys.executable)


def test_missing_version_names_version_and_places():
    with pytest.raises(InterpreterNotFound) as exc:
        find_interpreter("2.5", extra_dirs=["/nonexistent/extra"])
    msg = str(exc.value)
    assert "2.5" in msg and "python2.5" in msg
    assert "/nonexistent/extra" in msg and "/usr/bin" in msg and "uv python find" in msg


@pytest.mark.parametrize("bad", ["3", "three.eleven", "3.x", "3.11; rm -rf /"])
def test_bad_version_text(bad):
    with pytest.raises(InterpreterNotFound, match="not a version"):
        find_interpreter(bad)


def _other_installed_minor() -> tuple[str, Path] | None:
    mine = "%d.%d" % sys.version_info[:2]
    for minor in ("3.10", "3.12", "3.13", "3.9"):
        if minor == mine:
            continue
        hits = glob.glob(os.path.expanduser(f"~/.pyenv/versions/{minor}.*/bin/python{minor}"))
        if hits:
            return minor, Path(hits[0])
    return None


def test_other_minor_found_by_verification():
    other = _other_installed_minor()
    if other is None:
        pytest.skip("no other Python minor version under ~/.pyenv/versions")
    minor, _ = other
    found = find_interpreter(minor)
    assert _version_of(found) == minor
    assert "/shims/" not in str(found)  # a pyenv shim for a non-global version does not run


def test_candidate_in_extra_dirs_is_verified(tmp_path):
    fake = tmp_path / "fakebin"
    fake.mkdir()
    liar = fake / "python2.5"
    liar.write_text("#!/bin/sh\nexit 3\n")
    liar.chmod(0o755)
    with pytest.raises(InterpreterNotFound) as exc:
        find_interpreter("2.5", extra_dirs=[str(fake)])
    assert str(liar) in str(exc.value) and "exit 3" in str(exc.value)


# ---------------------------------------------------------------------------------------------
# Requirements
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lines, expected", [
    (["Numpy==1.2.3", "  ", "# comment", "numpy==1.2.3"], ["numpy==1.2.3"]),
    (["Foo_Bar.baz >= 1.0 , < 2"], ["foo-bar-baz>=1.0,<2"]),
    (["Requests[Security,SOCKS]==2.0"], ["requests[security,socks]==2.0"]),
    (["zeta==1", "alpha==2"], ["alpha==2", "zeta==1"]),
    (["six==1.0   # pinned"], ["six==1.0"]),
    (["pkg==1.0;python_version<'3.8'"], ["pkg==1.0; python_version<'3.8'"]),
    (["Bare_Name"], ["bare-name"]),
    (["-e git+https://github.com/Org/Repo.git#egg=Repo"],
     ["-e git+https://github.com/Org/Repo.git#egg=Repo"]),
    (["git+https://github.com/Org/Repo.git@v1#egg=Repo"],
     ["git+https://github.com/Org/Repo.git@v1#egg=Repo"]),
    (["file:///tmp/Some_Pkg"], ["file:///tmp/Some_Pkg"]),
    (["My_Pkg @ file:///tmp/My_Pkg"], ["My_Pkg @ file:///tmp/My_Pkg"]),
    (["b==1", "--index-url https://x/simple", "a==1", "--extra-index-url   https://y/simple",
      "--index-url https://x/simple"],
     ["--index-url https://x/simple", "--extra-index-url https://y/simple", "a==1", "b==1"]),
    ([], []),
])
def test_normalize_requirements(lines, expected):
    assert normalize_requirements(lines) == expected


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

def test_key_stability_and_sensitivity(tmp_path):
    store = EnvironmentStore(tmp_path / "store", installer="pip")
    py = Path(sys.executable)
    base = store.key_for(py, ["numpy==1.0", "Six==1.2"])
    assert len(base) == 32 and int(base, 16) >= 0
    assert store.key_for(py, ["six==1.2", "numpy==1.0"]) == base
    assert store.key_for(py, ["SIX==1.2", "numpy==1.0", "numpy==1.0", "", "# x"]) == base
    assert store.key_for(py, ["numpy==1.1", "six==1.2"]) != base
    assert store.key_for(py, ["numpy==1.0"]) != base
    other = _other_installed_minor()
    if other is not None:
        assert store.key_for(other[1], ["numpy==1.0", "six==1.2"]) != base
    # A second store (another process, a restart) computes the same key.
    assert EnvironmentStore(tmp_path / "other", installer="pip").key_for(
        py, ["numpy==1.0", "six==1.2"]) == base


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

INSTALLERS = [pytest.param("uv", marks=pytest.mark.skipif(not have_uv(), reason="uv missing")),
              "pip"]


def _import_value(env: Environment, module: str = "tinypkg") -> str:
    out = subprocess.run([str(env.python), "-c", f"import {module}; print({module}.VALUE)"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("installer", INSTALLERS)
def test_build_then_hit(tmp_path, offline, tiny, installer):
    store = EnvironmentStore(tmp_path / "store", installer=installer)
    assert store.installer == installer
    lines: list[str] = []
    t0 = time.monotonic()
    env = store.ensure(Path(sys.executable), [tiny_req(tiny)], log=lines.append)
    elapsed = time.monotonic() - t0
    print(f"\n{installer} build of tiny package: {elapsed:.2f}s")
    assert env.built is True and env.path == store.root / env.key
    assert _import_value(env) == "1.0"
    assert any(line.startswith("$ ") for line in lines)
    marker = json.loads((env.path / envs.MARKER).read_text())
    assert marker["installer"] == installer and marker["requirements"] == [tiny_req(tiny)]

    before = (env.path / envs.LAST_USED).stat().st_mtime_ns
    time.sleep(0.02)
    again = store.ensure(Path(sys.executable), [tiny_req(tiny), ""], log=lines.append)
    assert again.built is False and again.key == env.key and again.python == env.python
    assert (env.path / envs.LAST_USED).stat().st_mtime_ns > before
    assert counter_lines(offline) == 1
    listed = store.list()
    assert [d["key"] for d in listed] == [env.key] and listed[0]["last_used"] > 0


def test_no_requirements_builds_bare_venv(tmp_path, offline):
    store = EnvironmentStore(tmp_path / "store")
    env = store.ensure(Path(sys.executable), [])
    assert env.built and env.python.exists()
    assert store.ensure(Path(sys.executable), ["# nothing"]).built is False


def test_threads_build_once(tmp_path, offline, tiny):
    store = EnvironmentStore(tmp_path / "store")
    results: list[Environment] = []
    errors: list[BaseException] = []
    starts: list[str] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            barrier.wait()
            results.append(store.ensure(
                Path(sys.executable), [tiny_req(tiny)],
                log=lambda line: starts.append(line) if line.startswith("$ ") else None))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert sorted(r.built for r in results) == [False, False, False, True]
    assert len({r.key for r in results}) == 1
    assert sum(bool(re.search(r"^\$ \S+ venv |-m venv ", s)) for s in starts) == 1
    assert counter_lines(offline) == 1
    assert _import_value(results[0]) == "1.0"


_CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from runner.environments import EnvironmentStore
store = EnvironmentStore(Path({root!r}))
while time.time() < {go}:
    time.sleep(0.005)
env = store.ensure(Path(sys.executable), [{req!r}])
print(json.dumps({{"built": env.built, "key": env.key}}))
"""


def test_processes_build_once(tmp_path, offline, tiny):
    root = tmp_path / "store"
    go = time.time() + 1.5  # both children call ensure() at the same moment
    code = _CHILD.format(repo=str(REPO), root=str(root), go=go, req=tiny_req(tiny))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    answers = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(a["built"] for a in answers) == [False, True]
    assert answers[0]["key"] == answers[1]["key"]
    assert counter_lines(offline) == 1


def test_half_built_env_is_rebuilt(tmp_path, offline, tiny):
    store = EnvironmentStore(tmp_path / "store")
    key = store.key_for(Path(sys.executable), [tiny_req(tiny)])
    half = store.root / key
    (half / "bin").mkdir(parents=True)
    (half / "bin" / "junk").write_text("crashed mid-build")
    leftover = store.root / f"{key}.building-123-abc"
    leftover.mkdir()
    env = store.ensure(Path(sys.executable), [tiny_req(tiny)])
    assert env.built is True
    assert not (half / "bin" / "junk").exists() and not leftover.exists()
    assert _import_value(env) == "1.0"


@pytest.mark.parametrize("installer", INSTALLERS)
def test_failing_requirement(tmp_path, offline, installer):
    store = EnvironmentStore(tmp_path / "store", installer=installer)
    missing = tmp_path / "no-such-project"
    req = f"nosuchpkg @ {missing.as_uri()}"
    lines: list[str] = []
    with pytest.raises(EnvironmentBuildError) as exc:
        store.ensure(Path(sys.executable), [req], log=lines.append)
    msg = str(exc.value)
    assert "last output" in msg and "no-such-project" in msg
    key = store.key_for(Path(sys.executable), [req])
    assert not (store.root / key).exists()  # nothing half-built left behind
    assert store.list() == []


def test_remove(tmp_path, offline):
    store = EnvironmentStore(tmp_path / "store")
    env = store.ensure(Path(sys.executable), [])
    assert store.remove(env.key) is True
    assert not env.path.exists() and store.list() == []
    assert store.remove(env.key) is False
    with pytest.raises(ValueError):
        store.remove("../etc")
    assert store.ensure(Path(sys.executable), []).built is True


def test_other_minor_build(tmp_path, offline, tiny):
    other = _other_installed_minor()
    if other is None:
        pytest.skip("no other Python minor version under ~/.pyenv/versions")
    python = find_interpreter(other[0])
    env = EnvironmentStore(tmp_path / "store").ensure(python, [tiny_req(tiny)])
    assert _version_of(env.python) == other[0] and _import_value(env) == "1.0"


def test_bad_installer_name(tmp_path):
    from runner.errors import ConfigError
    with pytest.raises(ConfigError):
        EnvironmentStore(tmp_path, installer="conda")


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["'two words'"], ["two words"]),
    (['"a b"', "c"], ["a b", "c"]),
    ([r'"say \"hi\""'], ['say "hi"']),
    ([r"it\'s"], ["it's"]),
    (["'it'\"'\"'s'"], ["it's"]),  # shlex.quote("it's")
    (["$HOME"], ["$HOME"]),
    (['"$HOME"'], ["$HOME"]),
    (["*.py"], ["*.py"]),
    (["$(id)", "`id`", "a;b", "|", "~"], ["$(id)", "`id`", "a;b", "|", "~"]),
    (["$(rm -rf /)"], ["$(rm", "-rf", "/)"]),
    (["--lr=0.1", "--name", "'x y'"], ["--lr=0.1", "--name", "x y"]),
    (["''"], [""]),
    (["a  b"], ["a", "b"]),
    ([r'"back\slash"'], [r"back\slash"]),
    ([], []),
])
def test_split_args(args, words):
    assert split_args(args) == words


@pytest.mark.parametrize("args", [["'open"], ['"open'], ["trailing\\"]])
def test_split_args_unbalanced(args):
    with pytest.raises(BadRequest):
        split_args(args)


def test_split_args_matches_shell_for_quoted_input():
    import shlex
    original = ["two words", "it's", '"dq"', "$HOME", "*.py", "", "a\\b", "tab\there"]
    assert split_args([shlex.quote(a) for a in original]) == original


def test_script_command():
    py = Path("/env/bin/python")
    assert script_command(py, "-m", ["pkg.mod", "'x y'"]) == [str(py), "-m", "pkg.mod", "x y"]
    assert script_command(py, "train.py", ["--n", "3"]) == [str(py), "train.py", "--n", "3"]
    with pytest.raises(BadRequest):
        script_command(py, "-m", [])


# ---------------------------------------------------------------------------------------------
# Requirement lines pip freeze writes
# ---------------------------------------------------------------------------------------------

def test_pkg_resources_placeholder_is_dropped_and_said(tmp_path, offline, tiny):
    lines = ["pkg-resources==0.0.0", "pkg_resources==0.0.0", tiny_req(tiny)]
    assert normalize_requirements(lines) == [tiny_req(tiny)]
    assert envs.dropped_requirements(lines) == ["pkg-resources==0.0.0", "pkg_resources==0.0.0"]
    assert normalize_requirements(["pkg-resources==1.0"]) == ["pkg-resources==1.0"]
    said: list[str] = []
    env = EnvironmentStore(tmp_path / "store").ensure(Path(sys.executable), lines,
                                                      log=said.append)
    assert _import_value(env) == "1.0"
    assert any("left out 'pkg-resources==0.0.0'" in line for line in said)


@pytest.mark.parametrize("line, form", [
    ("-e git+https://github.com/o/r.git@v1#egg=rpkg", "rpkg @ git+https://github.com/o/r.git@v1"),
    ("--editable=git+ssh://git@host/r.git#subdirectory=p&egg=x.y", "x.y @ git+ssh://git@host/r.git"),
    ("-e git+https://host/r.git", "git+https://host/r.git"),
    ("-e ./local/dir", "-e ./local/dir"),
    ("numpy==1.26.4", "numpy==1.26.4"),
])
def test_uv_form_of_editable_repository_lines(line, form):
    assert envs.uv_form(line) == form


def _git_repository(project: Path) -> Path:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
           "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "tiny"]):
        subprocess.run(git + args, cwd=project, check=True, capture_output=True)
    return project


@pytest.mark.skipif(not have_uv(), reason="uv missing")
def test_editable_git_line_is_built_with_uv(tmp_path, offline, tiny):
    """SPEC lists ``-e git+…`` lines; uv refuses editable repositories, so the store
    installs them as direct references (a local repository stands in for a remote one)."""
    repository = _git_repository(tiny)
    line = f"-e git+{repository.as_uri()}@main#egg=tinypkg"
    said: list[str] = []
    env = EnvironmentStore(tmp_path / "store", installer="uv").ensure(
        Path(sys.executable), [line], log=said.append)
    assert _import_value(env) == "1.0"
    assert any("installing" in text and "tinypkg @ git+file://" in text for text in said)
    marker = json.loads((env.path / envs.MARKER).read_text())
    assert marker["requirements"] == [line], "the key and the marker keep the line as written"


@pytest.mark.parametrize("installer", INSTALLERS)
def test_failing_build_carries_the_installer_tail(tmp_path, offline, installer):
    store = EnvironmentStore(tmp_path / "store", installer=installer)
    with pytest.raises(EnvironmentBuildError) as exc:
        store.ensure(Path(sys.executable), [f"nosuchpkg @ {(tmp_path / 'gone').as_uri()}"])
    assert "gone" in exc.value.log_tail and exc.value.log_tail in str(exc.value)


# ---------------------------------------------------------------------------------------------
# Installer tools in a client's freeze
# ---------------------------------------------------------------------------------------------

def test_installer_tool_pins_do_not_make_a_new_set(tmp_path):
    assert normalize_requirements(["pip==23.2.1", "SetupTools==65.5.0", "wheel>=0.40",
                                   "studioml==0.0.49"]) == \
        ["pip", "setuptools", "studioml==0.0.49", "wheel"]
    store = EnvironmentStore(tmp_path / "store", installer="pip")
    py = Path(sys.executable)
    assert store.key_for(py, ["six==1.16.0", "pip==23.2.1", "setuptools==65.5.0"]) == \
        store.key_for(py, ["six==1.16.0", "pip==24.0", "setuptools==70.0.0"])
    assert store.key_for(py, ["six==1.16.0", "pip==23.2.1"]) != store.key_for(py, ["six==1.16.0"])
    assert envs.requirement_name("pip") == "pip" and envs.pinned("pip") is None


# ---------------------------------------------------------------------------------------------
# Delta builds, holds and eviction (real packages from PyPI, through the host's uv cache)
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def pypi(monkeypatch):
    """The package index reachable by uv (the host's uv cache is kept: the files of these
    small pinned releases are linked from it); skipped locally, failed under CI, when not."""
    if not have_uv():
        pytest.skip("uv missing")
    for name in ("UV_OFFLINE", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)


def _ensure_or_skip(store: EnvironmentStore, requirements: list[str], **kwargs) -> Environment:
    try:
        return store.ensure(Path(sys.executable), requirements, **kwargs)
    except EnvironmentBuildError as exc:
        if os.environ.get("CI", "").lower() != "true" and envs._NETWORK.search(str(exc)):
            pytest.skip(f"the package index is out of reach: {str(exc).splitlines()[0]}")
        raise


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: content hash, mode and mtime of files, link texts, folders
    (less the store's record of the last use, which a use as a source updates)."""
    import hashlib
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel == envs.LAST_USED:
            continue
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir",)
        else:
            st = path.stat()
            out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode,
                        st.st_mtime_ns)
    return out


def _version_in(env: Environment, module: str) -> str:
    out = subprocess.run([str(env.python), "-c",
                          f"import importlib.metadata as m; print(m.version({module!r}))"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "absent"


def test_delta_build_from_the_nearest_leaves_the_source_untouched(tmp_path, pypi):
    store = EnvironmentStore(tmp_path / "store", installer="uv")
    base = _ensure_or_skip(store, ["six==1.16.0", "tomli==2.0.1", "pip==23.2.1"])
    assert base.built and json.loads((base.path / envs.MARKER).read_text())["built_from"] is None
    before = _tree(base.path)
    usage_one = store.usage()

    said: list[str] = []
    changed = _ensure_or_skip(store, ["six==1.17.0", "tomli==2.0.1", "pip==24.0"],
                              log=said.append)
    marker = json.loads((changed.path / envs.MARKER).read_text())
    assert changed.built and marker["built_from"] == base.key
    assert marker["delta"] == {"added": ["six==1.17.0"], "removed": ["six==1.16.0"]}
    assert any(line.startswith(f"building from environment {base.key}") for line in said)
    assert not any(" venv " in line for line in said if line.startswith("$ ")), \
        "no new virtualenv: the copy is the venv"
    assert _version_in(changed, "six") == "1.17.0" and _version_in(changed, "tomli") == "2.0.1"
    assert _version_in(base, "six") == "1.16.0"
    assert _tree(base.path) == before, "building from it changed the source"
    # The copy shares the unchanged files (hard links), not its scripts.
    tomli_init = next(base.path.glob("lib/python*/site-packages/tomli/__init__.py"))
    twin = changed.path / tomli_init.relative_to(base.path)
    assert tomli_init.stat().st_ino == twin.stat().st_ino
    assert (base.path / "bin" / "pip").stat().st_ino != (changed.path / "bin" / "pip").stat().st_ino
    # The copy's scripts run its own interpreter (relocatable), not the source's.
    pip_version = subprocess.run([str(changed.path / "bin" / "pip"), "--version"],
                                 capture_output=True, text=True)
    assert pip_version.returncode == 0 and str(changed.path) in pip_version.stdout
    # Hard links are counted once: the copy adds far less than a second environment.
    usage_two = store.usage()
    assert usage_two.environments == 2
    assert usage_two.bytes - usage_one.bytes < usage_one.bytes / 2

    # A line dropped: its package is uninstalled from the copy, kept in the source.
    fewer = _ensure_or_skip(store, ["six==1.16.0", "pip"], log=said.append)
    marker = json.loads((fewer.path / envs.MARKER).read_text())
    assert marker["built_from"] == base.key and marker["delta"]["removed"] == ["tomli==2.0.1"]
    assert _version_in(fewer, "tomli") == "absent" and _version_in(fewer, "six") == "1.16.0"
    assert _version_in(base, "tomli") == "2.0.1"
    assert _tree(base.path) == before

    # A set sharing no line with any stored one is built from nothing.
    far = _ensure_or_skip(store, ["six==1.15.0"])
    assert json.loads((far.path / envs.MARKER).read_text())["built_from"] is None


def test_a_spare_copy_is_taken_by_the_next_delta_build(tmp_path, pypi):
    store = EnvironmentStore(tmp_path / "store", installer="uv")
    base = _ensure_or_skip(store, ["six==1.16.0", "tomli==2.0.1", "pip"])
    spare = store.root / f"{base.key}{envs.SPARE_SUFFIX}"
    assert store.make_spare(base.key) is True and spare.is_dir()
    assert store.make_spare(base.key) is True  # one spare per environment
    assert not (spare / envs.MARKER).exists(), "a spare is never served"
    before = _tree(base.path)
    said: list[str] = []
    changed = _ensure_or_skip(store, ["six==1.17.0", "tomli==2.0.1", "pip"], log=said.append)
    assert f"took the spare copy of {base.key}" in said and not spare.exists()
    assert _version_in(changed, "six") == "1.17.0" and _version_in(base, "six") == "1.16.0"
    assert _tree(base.path) == before
    pip_version = subprocess.run([str(changed.path / "bin" / "pip"), "--version"],
                                 capture_output=True, text=True)
    assert str(changed.path) in pip_version.stdout, "the spare's scripts run where it was moved"
    # The spare counts with its environment, and goes with it.
    assert store.make_spare(changed.key) and store.remove(changed.key)
    assert not (store.root / f"{changed.key}{envs.SPARE_SUFFIX}").exists()
    with pytest.raises(ValueError):
        store.make_spare("../x")


def test_no_spare_of_an_environment_pip_built(tmp_path, offline):
    store = EnvironmentStore(tmp_path / "store", installer="pip")
    env = store.ensure(Path(sys.executable), [])
    assert store.make_spare(env.key) is False and store.make_spare("0" * 32) is False


def test_nearest_needs_the_same_options_and_nameable_lines(tmp_path, pypi):
    store = EnvironmentStore(tmp_path / "store", installer="uv")
    base = _ensure_or_skip(store, ["six==1.16.0", "tomli==2.0.1"])
    py = Path(sys.executable)
    delta = store.nearest(py, ["six==1.16.0", "tomli==2.0.1", "typing-extensions==4.12.2"])
    assert delta is not None and delta.source == base.key
    assert delta.added == ("typing-extensions==4.12.2",) and delta.uninstall == ()
    assert store.nearest(py, ["--index-url https://example.invalid/simple", "six==1.16.0",
                              "tomli==2.0.1"]) is None
    assert store.nearest(py, ["six==1.16.0"]).uninstall == ("tomli",)
    # A source built before environments were relocatable is not copied.
    marker_path = base.path / envs.MARKER
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps(dict(marker, relocatable=False)))
    assert store.nearest(py, ["six==1.17.0", "tomli==2.0.1"]) is None


def test_a_source_removed_while_chosen_falls_back_to_a_full_build(tmp_path, pypi):
    store = EnvironmentStore(tmp_path / "store", installer="uv")
    base = _ensure_or_skip(store, ["six==1.16.0", "tomli==2.0.1"])
    delta = store.nearest(Path(sys.executable), ["six==1.17.0", "tomli==2.0.1"])
    store.remove(base.key)
    said: list[str] = []
    store.nearest = lambda *_args: delta  # chosen just before the removal
    env = _ensure_or_skip(store, ["six==1.17.0", "tomli==2.0.1"], log=said.append)
    assert any("was removed meanwhile" in line and "building from nothing" in line
               for line in said), said
    assert _version_in(env, "six") == "1.17.0"
    assert json.loads((env.path / envs.MARKER).read_text())["built_from"] is None


def _tiny_env(store: EnvironmentStore, where: Path, name: str, **kwargs) -> Environment:
    project = make_tiny_package(where, name=name)
    return store.ensure(Path(sys.executable), [tiny_req(project)], **kwargs)


def _age(env: Environment, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(env.path / envs.LAST_USED, (when, when))


def test_eviction_least_recently_used_first_never_held_or_locked(tmp_path, offline):
    store = EnvironmentStore(tmp_path / "store", installer="uv" if have_uv() else "pip")
    made = [_tiny_env(store, tmp_path / "src", f"tiny{i}") for i in range(4)]
    for age, env in zip((400, 300, 200, 100), made):  # made[0] is the least recently used
        _age(env, age)
    total = store.usage().bytes
    assert store.usage().environments == 4 and total > 0

    assert store.evict(0) == [] and store.evict(total) == []  # no cap / under the cap
    assert store.evict(total - 1) == [made[0].key]
    assert not made[0].path.exists() and made[1].path.exists()

    # Held (a run uses it) or locked (the source of a delta build): passed over.
    assert store.ensure(Path(sys.executable), [tiny_req(tmp_path / "src" / "tiny1")],
                        holder="host-1a").built is False
    assert store.holders(made[1].key) == ["host-1a"]
    _age(made[1], 300)  # ensure() counted as a use; make it the oldest again
    with store._locked(made[2].key, shared=True):
        assert store.evict(1) == [made[3].key]
    assert made[1].path.exists() and made[2].path.exists()
    assert store.last_usage.environments == 2

    assert store.release("host-1a") == [made[1].key] and store.holders(made[1].key) == []
    assert store.evict(1) == [made[1].key, made[2].key]
    assert store.list() == [] and store.last_usage.environments == 0
    with pytest.raises(ValueError):
        store.release("../x")


def test_holds_of_dead_attempts_are_pruned(tmp_path, offline):
    store = EnvironmentStore(tmp_path / "store")
    env = store.ensure(Path(sys.executable), [], holder="host-live")
    store.ensure(Path(sys.executable), [], holder="host-gone")
    assert store.holders(env.key) == ["host-gone", "host-live"]
    pruned = store.prune_holds(lambda holder, age: holder == "host-live" and age < 60)
    assert pruned == [(env.key, "host-gone")] and store.holders(env.key) == ["host-live"]
    with pytest.raises(ValueError):
        store.ensure(Path(sys.executable), [], holder="a/b")
    odd = "my_host[1]*-1a"  # any host name makes an attempt id
    assert store.ensure(Path(sys.executable), [], holder=odd).built is False
    assert store.holders(env.key) == ["host-live", odd] and store.release(odd) == [env.key]


def test_concurrent_delta_builds_from_one_source(tmp_path, pypi):
    """Two sets near one source built at once (one takes the spare, the other links the
    source) while the source is held by a run: both right, the source untouched."""
    store = EnvironmentStore(tmp_path / "store", installer="uv")
    base = _ensure_or_skip(store, ["six==1.16.0", "tomli==2.0.1", "pip"], holder="host-run")
    store.make_spare(base.key)
    before = _tree(base.path)
    sets = [["six==1.17.0", "tomli==2.0.1", "pip"], ["six==1.16.0", "tomli==2.0.0", "pip"]]
    results: dict[int, Environment] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def build(index: int) -> None:
        try:
            barrier.wait()
            results[index] = store.ensure(Path(sys.executable), sets[index])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    if errors and any(envs._NETWORK.search(str(e)) for e in errors) \
            and os.environ.get("CI", "").lower() != "true":
        pytest.skip(f"the package index is out of reach: {errors[0]}")
    assert not errors, errors
    assert _version_in(results[0], "six") == "1.17.0" and _version_in(results[0], "tomli") == "2.0.1"
    assert _version_in(results[1], "six") == "1.16.0" and _version_in(results[1], "tomli") == "2.0.0"
    for env in results.values():
        assert json.loads((env.path / envs.MARKER).read_text())["built_from"] == base.key
    assert _tree(base.path) == before and _version_in(base, "tomli") == "2.0.1"
    assert store.holders(base.key) == ["host-run"]
    assert sorted(store.evict(1)) == sorted([results[0].key, results[1].key]), \
        "the held source is never evicted"
    assert base.path.is_dir() and store.holders(base.key) == ["host-run"]
    assert list(store.root.glob(".bench-*/")) == [], "workbenches are left empty"
