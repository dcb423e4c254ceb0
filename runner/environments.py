"""Interpreters and virtualenvs (SPEC sections 2 and 5.4).

* :func:`find_interpreter` picks a local interpreter of a requested ``pythonver`` minor
  version, verifying every candidate by running it (a broken pyenv shim is not an interpreter).
* :func:`normalize_requirements` turns a ``pythonenv`` list into a canonical form, so that
  identical requirement sets map to one environment.
* :class:`EnvironmentStore` builds each environment once, shared by threads, processes and
  runner restarts, under a per-key ``flock``; a directory is served only once its marker file
  ``.studioml-env.json`` exists (the marker is written last).

The experiment's command line is :mod:`runner.argv`'s.
"""
from __future__ import annotations

import collections
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import (BadRequest, ConfigError, EnvironmentBuildError, InterpreterNotFound,
                     RequirementsUnsatisfiable)
from .redact import safe_url

logger = logging.getLogger(__name__)

__all__ = [
    "Environment",
    "EnvironmentStore",
    "find_interpreter",
    "interpreter_version",
    "normalize_requirements",
]

MARKER = ".studioml-env.json"
LAST_USED = ".last-used"
REQUIREMENTS_FILE = ".studioml-requirements.txt"
_PROBE_TIMEOUT_S = 10.0
_TAIL_LINES = 40
_KEY_RE = re.compile(r"^[0-9a-f]{32}$")

# --------------------------------------------------------------------------------------------
# Interpreters
# --------------------------------------------------------------------------------------------

_PYTHONVER_RE = re.compile(r"^(?:python)?(\d+)\.(\d+)(?:\.\d+)?(?:(?:a|b|rc)\d+)?\+?$")
_PROBE_CODE = "import sys; print('%d.%d' % sys.version_info[:2]); print(sys.version.replace(chr(10), ' '))"

# realpath + (mtime_ns, size) -> (major_minor or None, full version or error text)
_probe_cache: dict[tuple[str, int, int], tuple[str | None, str]] = {}
_probe_lock = threading.Lock()


def _probe(candidate: Path) -> tuple[str | None, str]:
    """Run ``candidate`` and return ``("X.Y", full sys.version)``, or ``(None, why)``.

    Results are cached per process, keyed by the real path and its mtime and size, so a
    re-installed interpreter is probed again.
    """
    try:
        real = os.path.realpath(candidate)
        st = os.stat(real)
    except OSError as exc:
        return None, f"cannot stat: {exc.strerror}"
    if not os.access(real, os.X_OK) or not os.path.isfile(real):
        return None, "not an executable file"
    cache_key = (real, st.st_mtime_ns, st.st_size)
    with _probe_lock:
        hit = _probe_cache.get(cache_key)
    if hit is not None:
        return hit
    try:
        proc = subprocess.run([str(candidate), "-c", _PROBE_CODE], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S,
                              errors="replace")
    except subprocess.TimeoutExpired:
        result: tuple[str | None, str] = (None, f"no answer within {_PROBE_TIMEOUT_S:.0f}s")
    except OSError as exc:
        result = (None, f"cannot run: {exc.strerror}")
    else:
        lines = proc.stdout.splitlines()
        if proc.returncode != 0 or len(lines) < 2:
            first_err = (proc.stderr.strip().splitlines() or [""])[0]
            result = (None, f"exit {proc.returncode}: {first_err}".rstrip(": "))
        else:
            result = (lines[0].strip(), lines[1].strip())
    with _probe_lock:
        _probe_cache[cache_key] = result
    return result


def interpreter_version(interpreter: Path) -> str:
    """Return the full ``sys.version`` of ``interpreter`` (cached per process).

    Raises :class:`InterpreterNotFound` if it cannot be run.
    """
    minor, text = _probe(Path(interpreter))
    if minor is None:
        raise InterpreterNotFound(f"interpreter {interpreter} cannot be used: {text}")
    return text


def _candidate_places(name: str, minor: str, extra_dirs: list[str]) -> list[tuple[str, list[Path]]]:
    """Return ``(description, candidate paths)`` for every place looked at, in order."""
    places: list[tuple[str, list[Path]]] = []
    path_dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    places.append((f"PATH ({os.pathsep.join(path_dirs)})", [Path(d) / name for d in path_dirs]))
    for d in extra_dirs:
        places.append((d, [Path(d) / name, Path(d) / "bin" / name]))
    for d in ("/usr/local/bin", "/usr/bin"):
        places.append((d, [Path(d) / name]))
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    pattern = os.path.join(pyenv_root, "versions", "*", "bin", name)
    places.append((pattern, [Path(p) for p in sorted(glob.glob(pattern), reverse=True)]))
    places.append((f"`uv python find {minor}` (downloads disabled)", _uv_python_find(minor)))
    return places


def _uv_python_find(minor: str) -> list[Path]:
    uv = _find_uv()
    if uv is None:
        return []
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never", NO_COLOR="1")
    try:
        proc = subprocess.run([uv, "python", "find", "--no-project", minor], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=30, errors="replace")
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.debug("uv python find %s failed: %s", minor, exc)
        return []
    out = proc.stdout.strip()
    return [Path(out.splitlines()[-1])] if proc.returncode == 0 and out else []


def find_interpreter(pythonver: str | None, extra_dirs: list[str] | None = None) -> Path:
    """Return the path of a local interpreter of ``pythonver``'s minor version.

    ``pythonver`` is ``"3.11"`` style; ``"3.11.7"`` matches minor 3.11 too. ``None`` or ``""``
    means the runner's own ``sys.executable``. Candidates named ``pythonX.Y`` are looked for on
    PATH, in ``extra_dirs`` (and their ``bin/``), /usr/local/bin, /usr/bin,
    ``$PYENV_ROOT/versions/*/bin`` and ``uv python find`` (never downloading); each is verified
    by running it, results cached per process. Raises :class:`InterpreterNotFound` naming the
    version and every place looked (and why candidates were rejected), or when the version text
    cannot be understood.
    """
    if pythonver is None or not str(pythonver).strip():
        return Path(sys.executable)
    text = str(pythonver).strip()
    m = _PYTHONVER_RE.match(text)
    if not m:
        raise InterpreterNotFound(
            f"pythonver {text!r} is not a version like '3.11' or '3.11.7'; no interpreter chosen")
    minor = f"{int(m.group(1))}.{int(m.group(2))}"
    if "%d.%d" % sys.version_info[:2] == minor:
        return Path(sys.executable)
    name = f"python{minor}"
    seen: set[str] = set()
    rejected: list[str] = []
    looked: list[str] = []
    for description, candidates in _candidate_places(name, minor, list(extra_dirs or [])):
        looked.append(description)
        for cand in candidates:
            key = str(cand)
            if key in seen or not os.path.lexists(cand):
                continue
            seen.add(key)
            got, detail = _probe(cand)
            if got == minor:
                logger.info("pythonver %s -> %s (%s)", text, cand, detail)
                return cand
            rejected.append(f"{cand}: " + (f"is Python {got}" if got else detail))
    msg = (f"no Python {minor} interpreter found (pythonver {text!r}); looked for {name} in: "
           + "; ".join(looked))
    if rejected:
        msg += ". Rejected candidates: " + "; ".join(rejected)
    raise InterpreterNotFound(msg)


# --------------------------------------------------------------------------------------------
# Requirements
# --------------------------------------------------------------------------------------------

_NAME_SPEC_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*"
    r"(?:\[(?P<extras>[^\]]*)\])?\s*"
    r"(?P<spec>(?:(?:===|==|!=|~=|>=|<=|>|<)\s*[^,;\s]+\s*(?:,\s*)?)*)"
    r"(?P<rest>(?:;.*)?)$")


def _pep503(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ``pip freeze`` on Debian and Ubuntu lists this placeholder of the system's patched pip; no
# index has it, so installing it can only fail.
DROPPED_REQUIREMENTS = frozenset({"pkg-resources==0.0.0"})

# ``-e <vcs>+<url>`` (an editable checkout of a repository): pip builds it, uv refuses
# editables that are not local directories.
_EDITABLE_VCS_RE = re.compile(r"^(?:-e|--editable)(?:\s+|=)(?P<url>(?:git|hg|svn|bzr)\+\S+)$")
_EGG_RE = re.compile(r"[#&]egg=(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)")


def dropped_requirements(lines: list[str]) -> list[str]:
    """The lines of ``lines`` that :func:`normalize_requirements` leaves out as known bogus."""
    return [str(line).strip() for line in lines
            if _normalize_line(" ".join(str(line).split())) in DROPPED_REQUIREMENTS]


def uv_form(line: str) -> str:
    """``line`` in a form uv installs: an editable repository line
    ``-e git+https://host/repo.git@ref#egg=name`` becomes the direct reference
    ``name @ git+https://host/repo.git@ref`` (built and installed, not editable; without
    ``#egg=`` the bare URL); any other line is returned unchanged."""
    match = _EDITABLE_VCS_RE.match(line.strip())
    if match is None:
        return line
    url = match.group("url")
    egg = _EGG_RE.search(url)
    base = url.split("#", 1)[0]
    return f"{egg.group('name')} @ {base}" if egg else base


def _normalize_line(line: str) -> str:
    m = _NAME_SPEC_RE.match(line)
    if not m:
        return line  # URLs, `name @ url`, paths, -e …: kept as written
    out = _pep503(m.group("name"))
    extras = m.group("extras")
    if extras is not None:
        names = sorted({_pep503(e.strip()) for e in extras.split(",") if e.strip()})
        if names:
            out += "[" + ",".join(names) + "]"
    out += re.sub(r"\s+", "", m.group("spec")).rstrip(",")
    rest = m.group("rest").strip()
    if rest:
        out += "; " + rest[1:].strip()
    return out


def normalize_requirements(lines: list[str]) -> list[str]:
    """Return ``lines`` in canonical form: equal sets of requirements give equal lists.

    Rules: each line is stripped; blank lines, ``#`` comment lines and trailing `` # …``
    comments are dropped; runs of whitespace become one space. *Option* lines (starting with
    ``-`` but not ``-e``/``--editable``, e.g. ``--index-url …``, ``--extra-index-url …``,
    ``--find-links …``) keep their relative order and go first, deduplicated, because their
    order matters to the installer. Every other line is a requirement: ``name==ver``,
    ``name>=…``, ``name[extra]==…`` and bare ``name`` forms get a lowercase PEP 503 name (and
    extras), no spaces in the specifier, and ``; marker`` spacing made uniform; URLs, ``-e …``,
    ``git+…``, ``file://…`` and ``name @ url`` lines are kept as written. Requirements are
    deduplicated and sorted.  Lines in :data:`DROPPED_REQUIREMENTS` are left out.
    """
    options: list[str] = []
    reqs: set[str] = set()
    for raw in lines:
        line = re.sub(r"(^|\s)#.*$", "", str(raw)).strip()
        line = " ".join(line.split())
        if not line or _normalize_line(line) in DROPPED_REQUIREMENTS:
            continue
        if line.startswith("-") and not (line.startswith("-e ") or line.startswith("--editable")):
            if line not in options:
                options.append(line)
            continue
        reqs.add(_normalize_line(line))
    return options + sorted(reqs)


# --------------------------------------------------------------------------------------------
# The environment store
# --------------------------------------------------------------------------------------------

_uv_lock = threading.Lock()
_uv_cached: list[str | None] = []


def _find_uv() -> str | None:
    """Return a working ``uv`` executable (the uv package's binary first, then PATH), or None."""
    with _uv_lock:
        if _uv_cached:
            return _uv_cached[0]
        candidates: list[str] = []
        try:
            import uv as _uv_pkg  # type: ignore[import-not-found]
            candidates.append(_uv_pkg.find_uv_bin())
        except Exception:  # noqa: BLE001 - not installed or no binary
            pass
        which = shutil.which("uv")
        if which:
            candidates.append(which)
        found = None
        for cand in candidates:
            try:
                ok = subprocess.run([cand, "--version"], capture_output=True, timeout=15,
                                    stdin=subprocess.DEVNULL).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                found = cand
                break
        _uv_cached.append(found)
        return found


@dataclass(frozen=True)
class Environment:
    """A finished environment: ``python`` is its interpreter; ``built`` is True only for the
    ``ensure`` call that built it."""

    key: str
    path: Path
    python: Path
    built: bool


class EnvironmentStore:
    """Virtualenvs under ``root``, one per (interpreter, normalised requirements), built once.

    Layout: ``<root>/<key>/`` is the venv, complete iff ``<root>/<key>/.studioml-env.json``
    exists (written last); ``<root>/<key>.lock`` is the per-key ``flock`` shared by every thread
    and process using the store (lock files are never deleted: deleting one would break mutual
    exclusion). ``installer`` is ``"auto"`` (uv when available, else pip), ``"uv"`` or ``"pip"``.
    ``build_timeout`` (seconds, None = no limit) kills an installer step that runs longer.
    """

    def __init__(self, root: Path, *, installer: str = "auto",
                 build_timeout: float | None = None):
        if installer not in ("auto", "uv", "pip"):
            raise ConfigError([f"installer must be 'auto', 'uv' or 'pip', not {installer!r}"])
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.build_timeout = build_timeout
        self._uv: str | None = None
        if installer in ("auto", "uv"):
            self._uv = _find_uv()
            if self._uv is None and installer == "uv":
                raise ConfigError(["installer 'uv' requested but no working uv executable found"])
        self.installer = "uv" if self._uv else "pip"

    # -- keys ---------------------------------------------------------------------------------

    def key_for(self, interpreter: Path, requirements: list[str]) -> str:
        """Return the 32-hex-digit key of (interpreter real path, its full version, normalised
        requirements). Raises :class:`InterpreterNotFound` if the interpreter cannot run."""
        material = json.dumps({
            "interpreter": os.path.realpath(interpreter),
            "version": interpreter_version(Path(interpreter)),
            "requirements": normalize_requirements(list(requirements)),
        }, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()[:32]

    # -- locking ------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Hold the exclusive per-key flock (a fresh open file description per call, so threads
        of one process exclude each other as well as processes)."""
        fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # -- ensure -------------------------------------------------------------------------------

    def _hit(self, key: str) -> Environment | None:
        path = self.root / key
        if not (path / MARKER).is_file():
            return None
        try:
            os.utime(path / LAST_USED)  # never creates: a concurrent remove() stays clean
        except FileNotFoundError:
            if not (path / MARKER).is_file():
                return None  # removed meanwhile: a miss
            try:
                (path / LAST_USED).touch()
            except OSError:
                return None
        except OSError as exc:
            logger.debug("cannot record use of %s: %s", path, exc)
        return Environment(key=key, path=path, python=path / "bin" / "python", built=False)

    def ensure(self, interpreter: Path, requirements: list[str], *,
               log: Callable[[str], None] | None = None) -> Environment:
        """Return the finished environment for (interpreter, requirements), building it if needed.

        Exactly one caller (thread or process) builds a given key; the others wait on the key's
        lock and then get the finished environment with ``built=False``. Installer output is
        passed line by line to ``log``. Raises :class:`EnvironmentBuildError` (with the last
        lines of installer output) when the build fails; nothing half-built is left to serve.
        Records the last use on every call.
        """
        interpreter = Path(interpreter)
        for line in dropped_requirements(list(requirements)):
            if log is not None:
                log(f"left out {line!r} (a placeholder pip freeze writes on Debian/Ubuntu; "
                    "no index has it)")
        reqs = normalize_requirements(list(requirements))
        key = self.key_for(interpreter, reqs)
        hit = self._hit(key)
        if hit is not None:
            return hit
        with self._locked(key):
            hit = self._hit(key)
            if hit is not None:
                return hit
            self._build(key, interpreter, reqs, log)
        return Environment(key=key, path=self.root / key, python=self.root / key / "bin" / "python",
                           built=True)

    def _build(self, key: str, interpreter: Path, reqs: list[str],
               log: Callable[[str], None] | None) -> None:
        """Build ``<root>/<key>`` in place; the caller holds the key's lock."""
        path = self.root / key
        for leftover in self.root.glob(f"{key}.building-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if path.exists() or path.is_symlink():
            logger.warning("removing incomplete environment %s (no marker)", path)
            _remove_path(path)
        started = time.monotonic()
        emit = log or (lambda _line: None)
        env = dict(os.environ, UV_PYTHON_DOWNLOADS="never", PIP_DISABLE_PIP_VERSION_CHECK="1",
                   PIP_NO_INPUT="1", NO_COLOR="1")
        for var in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "CONDA_PREFIX"):
            env.pop(var, None)
        venv_python = path / "bin" / "python"
        req_file = path / REQUIREMENTS_FILE
        logger.info("building environment %s with %s (%d requirement lines)", key,
                    self.installer, len(reqs))
        try:
            if self.installer == "uv":
                assert self._uv is not None
                self._run([self._uv, "venv", "--no-project", "--no-config", "--python",
                           str(interpreter), str(path)], env, emit, key)
            else:
                self._run([str(interpreter), "-m", "venv", str(path)], env, emit, key)
            install = reqs
            if self.installer == "uv":
                install = [uv_form(line) for line in reqs]
                for line, form in zip(reqs, install):
                    if form != line:
                        emit(f"installing {safe_url(line)!r} as {safe_url(form)!r} (uv installs "
                             "editable lines only from local directories)")
            req_file.write_text("".join(line + "\n" for line in install))
            if reqs:
                if self.installer == "uv":
                    cmd = [self._uv, "pip", "install", "--no-config", "--python", str(venv_python),
                           "-r", str(req_file)]
                else:
                    cmd = [str(venv_python), "-m", "pip", "install", "-r", str(req_file)]
                self._run(cmd, env, emit, key)  # type: ignore[arg-type]
            now = time.time()
            (path / LAST_USED).touch()
            marker = {
                "key": key,
                "requirements": reqs,
                "interpreter": str(interpreter),
                "interpreter_version": interpreter_version(interpreter),
                "created": now,
                "installer": self.installer,
                "build_seconds": round(time.monotonic() - started, 3),
            }
            tmp = path / (MARKER + ".tmp")
            tmp.write_text(json.dumps(marker, indent=1))
            os.replace(tmp, path / MARKER)
        except BaseException:
            _remove_path(path)
            raise
        logger.info("built environment %s in %.1fs", key, time.monotonic() - started)

    def _run(self, cmd: list[str], env: dict[str, str], emit: Callable[[str], None],
             key: str) -> None:
        """Run one installer step, streaming its output to ``emit``; raise on failure."""
        shown = safe_url(" ".join(cmd))
        emit(f"$ {shown}")
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        try:
            proc = subprocess.Popen(cmd, env=env, cwd=str(self.root), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1, errors="replace", start_new_session=True)
        except OSError as exc:
            raise EnvironmentBuildError(f"environment {key}: cannot run {shown}: {exc}") from exc
        timer = None
        if self.build_timeout is not None:
            timer = threading.Timer(self.build_timeout, _kill_group, (proc,))
            timer.daemon = True
            timer.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = safe_url(raw.rstrip("\r\n"))
                tail.append(line)
                emit(line)
            rc = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            if proc.poll() is None:
                _kill_group(proc)
                proc.wait()
        if rc != 0:
            why = f"exit status {rc}"
            if rc < 0 and self.build_timeout is not None:
                why += f" (killed; build_timeout {self.build_timeout:g}s)"
            failure = RequirementsUnsatisfiable if unsatisfiable(tail) else EnvironmentBuildError
            raise failure(
                f"building environment {key} failed: `{shown}` ended with {why}; last output:\n"
                + "\n".join(tail), log_tail="\n".join(tail))

    # -- bookkeeping --------------------------------------------------------------------------

    def list(self) -> list[dict]:
        """Return one dict per finished environment: the marker's fields plus ``key``, ``path``
        and ``last_used`` (unix seconds), oldest use first."""
        out: list[dict] = []
        for marker in self.root.glob(f"*/{MARKER}"):
            path = marker.parent
            if not _KEY_RE.match(path.name):
                continue
            try:
                info = json.loads(marker.read_text())
                try:
                    last_used = (path / LAST_USED).stat().st_mtime
                except OSError:
                    last_used = marker.stat().st_mtime
            except (OSError, ValueError):
                continue
            info.update(key=path.name, path=str(path), last_used=last_used)
            out.append(info)
        out.sort(key=lambda d: d["last_used"])
        return out

    def remove(self, key: str) -> bool:
        """Delete environment ``key`` under its lock (marker first, so it is never served
        half-deleted); return whether anything was there. The caller must know it is not in
        use: a running experiment's interpreter would vanish under it."""
        if not _KEY_RE.match(key):
            raise ValueError(f"not an environment key: {key!r}")
        path = self.root / key
        with self._locked(key):
            existed = path.exists()
            try:
                (path / MARKER).unlink()
            except FileNotFoundError:
                pass
            _remove_path(path)
            for leftover in self.root.glob(f"{key}.building-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        return existed


def _remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


# What uv and pip print when the requirements cannot be met whatever the retry: a
# requirement that does not exist, or pins that conflict.
_UNSATISFIABLE = re.compile(
    r"No solution found when resolving dependencies|requirements are unsatisfiable"
    r"|Distribution not found at|No matching distribution found|ResolutionImpossible"
    r"|conflicting dependencies|Could not find a version that satisfies|Invalid requirement")
# ... unless the host could not reach the index: that may pass.
_NETWORK = re.compile(r"network was disabled|Failed to fetch|error sending request|dns error"
                      r"|Connection refused|NewConnectionError|timed out|Temporary failure",
                      re.IGNORECASE)


def unsatisfiable(output: Iterable[str]) -> bool:
    """True when an installer's output says its requirements cannot be met (and not that
    the package index was out of reach)."""
    text = "\n".join(output)
    return bool(_UNSATISFIABLE.search(text)) and not _NETWORK.search(text)
