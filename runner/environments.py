"""Interpreters and virtualenvs (SPEC sections 2 and 5.4).

* :func:`find_interpreter` picks a local interpreter of a requested ``pythonver`` minor
  version, verifying every candidate by running it (a broken pyenv shim is not an interpreter).
* :func:`normalize_requirements` turns a ``pythonenv`` list into a canonical form, so that
  identical requirement sets map to one environment.
* :class:`EnvironmentStore` builds each environment once, shared by threads, processes and
  runner restarts, under a per-key ``flock``; a directory is served only once its marker file
  ``.studioml-env.json`` exists (the marker is written last).  A set close to a stored one is
  built from it: a hard-linked copy of the nearest environment plus only the difference
  (``docs/environments.md``).  Environments in use are held; the least recently used others
  are evicted past a size cap.

The experiment's command line is :mod:`runner.argv`'s.
"""
from __future__ import annotations

import builtins
import collections
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import (ConfigError, EnvironmentBuildError, InterpreterNotFound,
                     RequirementsUnsatisfiable)
from .redact import safe_url
from .units import describe_size

logger = logging.getLogger(__name__)

__all__ = [
    "Delta",
    "Environment",
    "EnvironmentStore",
    "StoreUsage",
    "find_interpreter",
    "interpreter_version",
    "normalize_requirements",
]

MARKER = ".studioml-env.json"
LAST_USED = ".last-used"
REQUIREMENTS_FILE = ".studioml-requirements.txt"
DELTA_FILE = ".studioml-delta.txt"
CONSTRAINTS_FILE = ".studioml-constraints.txt"
SPARE_SUFFIX = ".spare"
_BENCH_PREFIX = ".bench-"
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


# Installer tools: a client's ``pip freeze`` pins them (the StudioML client's freeze always
# lists ``pip`` and ``setuptools``), but their version says nothing about the experiment.  Their
# lines are reduced to the bare name, so that sets differing only there share one environment.
INSTALLER_TOOLS = frozenset({"pip", "setuptools", "wheel"})

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
    if out in INSTALLER_TOOLS:
        return out  # any pin, extra or marker of pip/setuptools/wheel: the newest one
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


def is_option(line: str) -> bool:
    """True for an installer option line (``--index-url …``), not a requirement (``-e …``)."""
    return line.startswith("-") and not (line.startswith("-e ") or line.startswith("--editable"))


_DIRECT_NAME_RE = re.compile(r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*"
                             r"(?:\[[^\]]*\])?\s*@\s")


def requirement_name(line: str) -> str | None:
    """The PEP 503 name a requirement line installs (``name==1``, ``name @ url``,
    ``…#egg=name``), or None when the line does not say (a bare URL or path)."""
    for pattern, group in ((_NAME_SPEC_RE, "name"), (_DIRECT_NAME_RE, "name"),
                           (_EGG_RE, "name")):
        match = pattern.match(line) if pattern is not _EGG_RE else pattern.search(line)
        if match:
            return _pep503(match.group(group))
    return None


def pinned(line: str) -> str | None:
    """``name==version`` (with its ``; marker``) when ``line`` pins one release, else None:
    the form a constraints file takes."""
    match = _NAME_SPEC_RE.match(line)
    if not match or not re.fullmatch(r"==[^,=<>!~]+", re.sub(r"\s+", "", match.group("spec"))):
        return None
    return _normalize_line(f"{match.group('name')}{match.group('spec')}{match.group('rest')}")


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
    deduplicated and sorted.  Lines in :data:`DROPPED_REQUIREMENTS` are left out;
    ``pip``, ``setuptools`` and ``wheel`` lines (:data:`INSTALLER_TOOLS`) become the bare name.
    (A request never brings option lines: admission refuses them,
    :func:`runner.requests.check_requirement_line`.)
    """
    options: list[str] = []
    reqs: set[str] = set()
    for raw in lines:
        line = re.sub(r"(^|\s)#.*$", "", str(raw)).strip()
        line = " ".join(line.split())
        if not line or _normalize_line(line) in DROPPED_REQUIREMENTS:
            continue
        if is_option(line):
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


@dataclass(frozen=True)
class StoreUsage:
    """What the store holds: ``bytes`` of disk (``du``-like: each inode once, in allocated
    blocks, hard links inside the store not counted twice), ``environments`` finished, and
    when it was measured (``measured``, unix seconds)."""

    bytes: int
    environments: int
    measured: float


@dataclass(frozen=True)
class Delta:
    """How to build a set from a stored environment: ``source`` (its key), the requirement
    lines to install (``added``), the lines of the source the set has not (``removed``), and
    the names of those no line of the set installs any more (``uninstall``)."""

    source: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    uninstall: tuple[str, ...]
    shared: int


# Files of the store's own in an environment's folder; never copied into another.
_OWN_FILES = frozenset({MARKER, MARKER + ".tmp", LAST_USED, REQUIREMENTS_FILE, DELTA_FILE,
                        CONSTRAINTS_FILE})
_HOLDS_SUFFIX = ".holds"


class EnvironmentStore:
    """Virtualenvs under ``root``, one per (interpreter, normalised requirements), built once.

    Layout: ``<root>/<key>/`` is the venv, complete iff ``<root>/<key>/.studioml-env.json``
    exists (written last); ``<root>/<key>.lock`` is the per-key ``flock`` shared by every thread
    and process using the store (lock files are never deleted: deleting one would break mutual
    exclusion): exclusive to build or remove the environment, shared while it is the source of
    a delta build or a hold is written.  ``<root>/<key>.holds/<holder>`` says that ``holder``
    (an attempt id) uses the environment: a held environment is never evicted.

    ``installer`` is ``"auto"`` (uv when available, else pip), ``"uv"`` or ``"pip"``.
    ``build_timeout`` (seconds, None = no limit) kills an installer step that runs longer.
    ``cap_bytes`` (0 = no cap) is what :meth:`evict` brings the store down to.  ``delta``
    (uv only) builds a set close to a stored one from it (:meth:`nearest`).
    """

    def __init__(self, root: Path, *, installer: str = "auto",
                 build_timeout: float | None = None, cap_bytes: int = 0, delta: bool = True):
        if installer not in ("auto", "uv", "pip"):
            raise ConfigError([f"installer must be 'auto', 'uv' or 'pip', not {installer!r}"])
        if cap_bytes < 0:
            raise ConfigError([f"the environment store's cap must be 0 or more bytes, not {cap_bytes}"])
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.build_timeout = build_timeout
        self.cap_bytes = int(cap_bytes)
        self._uv: str | None = None
        if installer in ("auto", "uv"):
            self._uv = _find_uv()
            if self._uv is None and installer == "uv":
                raise ConfigError(["installer 'uv' requested but no working uv executable found"])
        self.installer = "uv" if self._uv else "pip"
        self.delta = delta and self.installer == "uv"
        self.last_usage: StoreUsage | None = None
        self._evicting = threading.Lock()

    # -- keys ---------------------------------------------------------------------------------

    def key_for(self, interpreter: Path, requirements: list[str], *, normalized: bool = False) -> str:
        """Return the 32-hex-digit key of (interpreter real path, its full version, normalised
        requirements; ``normalized``: they already are). Raises :class:`InterpreterNotFound`
        if the interpreter cannot run."""
        material = json.dumps({
            "interpreter": os.path.realpath(interpreter),
            "version": interpreter_version(Path(interpreter)),
            "requirements": (list(requirements) if normalized
                             else normalize_requirements(list(requirements))),
        }, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()[:32]

    # -- locking ------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, key: str, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
        """Hold the per-key flock, exclusive or ``shared`` (a fresh open file description per
        call, so threads of one process exclude each other as well as processes).  Yields
        whether it is held: always True when ``wait``, else False when someone else holds it."""
        fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                            | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    # -- holds --------------------------------------------------------------------------------

    def _write_hold(self, key: str, holder: str) -> None:
        """Record ``holder``'s use of ``key``; the caller holds the key's lock."""
        folder = self.root / f"{key}{_HOLDS_SUFFIX}"
        folder.mkdir(exist_ok=True)
        (folder / holder).write_text(json.dumps({"since": time.time(), "pid": os.getpid()}))

    def holders(self, key: str) -> list[str]:
        """Who holds environment ``key`` (attempt ids), sorted."""
        try:
            return sorted(os.listdir(self.root / f"{key}{_HOLDS_SUFFIX}"))
        except FileNotFoundError:
            return []

    def release(self, holder: str) -> list[str]:
        """Drop every hold of ``holder``; return the keys it held (none: nothing to do)."""
        _check_holder(holder)
        released = []
        for folder in self.root.glob(f"*{_HOLDS_SUFFIX}"):
            try:
                (folder / holder).unlink()
                released.append(folder.name[:-len(_HOLDS_SUFFIX)])
            except FileNotFoundError:
                pass
        return sorted(released)

    def prune_holds(self, live: Callable[[str, float], bool]) -> list[tuple[str, str]]:
        """Drop the holds for which ``live(holder, age_seconds)`` is False (a runner that
        died left them); return them as ``(key, holder)``."""
        pruned = []
        now = time.time()
        for hold in self.root.glob(f"*{_HOLDS_SUFFIX}/*"):
            try:
                age = now - hold.stat().st_mtime
            except FileNotFoundError:
                continue
            if not live(hold.name, age):
                hold.unlink(missing_ok=True)
                pruned.append((hold.parent.name[:-len(_HOLDS_SUFFIX)], hold.name))
        return pruned

    # -- ensure -------------------------------------------------------------------------------

    def _hit(self, key: str, holder: str | None = None, locked: bool = False) -> Environment | None:
        path = self.root / key
        if not (path / MARKER).is_file():
            return None
        if holder is not None and not locked:
            with self._locked(key, shared=True):  # a hold is never written beside a removal
                return self._hit(key, holder, locked=True)
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
        if holder is not None:
            self._write_hold(key, holder)
        return Environment(key=key, path=path, python=path / "bin" / "python", built=False)

    def ensure(self, interpreter: Path, requirements: list[str], *,
               log: Callable[[str], None] | None = None,
               holder: str | None = None) -> Environment:
        """Return the finished environment for (interpreter, requirements), building it if needed.

        Exactly one caller (thread or process) builds a given key; the others wait on the key's
        lock and then get the finished environment with ``built=False``. Installer output is
        passed line by line to ``log``. Raises :class:`EnvironmentBuildError` (with the last
        lines of installer output) when the build fails; nothing half-built is left to serve.
        Records the last use on every call.  With ``holder`` (an attempt id) the environment
        is held for it (never evicted) until :meth:`release`; ValueError for a holder that is
        not a plain name.
        """
        interpreter = Path(interpreter)
        if holder is not None:
            _check_holder(holder)
        for line in dropped_requirements(list(requirements)):
            if log is not None:
                log(f"left out {line!r} (a placeholder pip freeze writes on Debian/Ubuntu; "
                    "no index has it)")
        reqs = normalize_requirements(list(requirements))
        key = self.key_for(interpreter, reqs, normalized=True)
        hit = self._hit(key, holder)
        if hit is not None:
            return hit
        with self._locked(key):
            hit = self._hit(key, holder, locked=True)
            if hit is not None:
                return hit
            self._build(key, interpreter, reqs, log)
            if holder is not None:
                self._write_hold(key, holder)
        return Environment(key=key, path=self.root / key, python=self.root / key / "bin" / "python",
                           built=True)

    def nearest(self, interpreter: Path, requirements: list[str]) -> Delta | None:
        """The cheapest way to build ``requirements`` from a stored environment, or None.

        A source qualifies when it was built by uv relocatable (its marker says so), with the
        same interpreter (real path and version) and the same option lines, when it shares a
        requirement line with the set and the lines to add plus the lines to drop are no more
        than the set's own lines (building from it is no more work than building from
        nothing), and when every line of it that the set lacks names its package (so it can
        be uninstalled).  Of those, the one with the fewest added plus dropped lines wins; ties
        go to the latest used.
        """
        reqs = normalize_requirements(list(requirements))
        real = os.path.realpath(interpreter)
        version = interpreter_version(Path(interpreter))
        options = [line for line in reqs if is_option(line)]
        wanted = set(reqs) - set(options)
        names_kept = {requirement_name(line) for line in wanted}
        best: Delta | None = None
        for info in reversed(self.list()):  # latest used first
            if info.get("installer") != "uv" or not info.get("relocatable"):
                continue
            if (os.path.realpath(str(info.get("interpreter", ""))) != real
                    or info.get("interpreter_version") != version):
                continue
            theirs = normalize_requirements(list(info.get("requirements") or []))
            if [line for line in theirs if is_option(line)] != options:
                continue
            have = set(theirs) - set(options)
            shared = len(wanted & have)
            removed = sorted(have - wanted)
            if not shared or len(wanted - have) + len(removed) > len(wanted):
                continue
            removed_names = {requirement_name(line) for line in removed}
            if None in removed_names:
                continue
            delta = Delta(source=info["key"], added=tuple(sorted(wanted - have)),
                          removed=tuple(removed), shared=shared,
                          uninstall=tuple(sorted(n for n in removed_names  # type: ignore[misc]
                                                 if n not in names_kept)))
            if best is None or (len(delta.added) + len(delta.removed)
                                < len(best.added) + len(best.removed)):
                best = delta
        return best

    def _build(self, key: str, interpreter: Path, reqs: list[str],
               log: Callable[[str], None] | None) -> None:
        """Build ``<root>/<key>`` in place, from the nearest stored environment when there is
        one (else, or when that fails, from nothing); the caller holds the key's lock."""
        path = self.root / key
        for pattern in (f"{key}.building-*", f"{key}{SPARE_SUFFIX}*"):
            for leftover in self.root.glob(pattern):  # a spare of an earlier build is stale
                shutil.rmtree(leftover, ignore_errors=True)
        if path.exists() or path.is_symlink():
            logger.warning("removing incomplete environment %s (no marker)", path)
            _remove_path(path)
        emit = log or (lambda _line: None)
        env = dict(os.environ, UV_PYTHON_DOWNLOADS="never", PIP_DISABLE_PIP_VERSION_CHECK="1",
                   PIP_NO_INPUT="1", NO_COLOR="1")
        for var in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "CONDA_PREFIX"):
            env.pop(var, None)
        delta = self.nearest(interpreter, reqs) if self.delta else None
        if delta is not None:
            started = time.monotonic()
            try:
                self._build_delta(key, interpreter, reqs, delta, env, emit)
                self._finish(key, interpreter, reqs, started, built_from=delta)
                return
            except (EnvironmentBuildError, OSError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                emit(f"building from environment {delta.source} failed ({first}); "
                     "building from nothing")
                logger.warning("environment %s: delta from %s failed: %s", key, delta.source,
                               first)
                _remove_path(path)
            except BaseException:
                _remove_path(path)
                raise
        started = time.monotonic()
        try:
            self._build_full(key, interpreter, reqs, env, emit)
            self._finish(key, interpreter, reqs, started, built_from=None)
        except BaseException:
            _remove_path(path)
            raise

    def _install_lines(self, reqs: list[str], emit: Callable[[str], None]) -> list[str]:
        """``reqs`` in the form the installer takes (uv: :func:`uv_form`), saying each change."""
        if self.installer != "uv":
            return list(reqs)
        install = [uv_form(line) for line in reqs]
        for line, form in zip(reqs, install):
            if form != line:
                emit(f"installing {safe_url(line)!r} as {safe_url(form)!r} (uv installs "
                     "editable lines only from local directories)")
        return install

    def _build_full(self, key: str, interpreter: Path, reqs: list[str], env: dict[str, str],
                    emit: Callable[[str], None]) -> None:
        """A new venv (uv: relocatable, so it can be copied) and every requirement line."""
        path = self.root / key
        logger.info("building environment %s with %s (%d requirement lines)", key,
                    self.installer, len(reqs))
        if self.installer == "uv":
            assert self._uv is not None
            self._run([self._uv, "venv", "--no-project", "--no-config", "--relocatable",
                       "--python", str(interpreter), str(path)], env, emit, key)
        else:
            self._run([str(interpreter), "-m", "venv", str(path)], env, emit, key)
        req_file = path / REQUIREMENTS_FILE
        req_file.write_text("".join(line + "\n" for line in self._install_lines(reqs, emit)))
        if reqs:
            venv_python = path / "bin" / "python"
            if self.installer == "uv":
                cmd = [self._uv, "pip", "install", "--no-config", "--python", str(venv_python),
                       "-r", str(req_file)]
            else:
                cmd = [str(venv_python), "-m", "pip", "install", "-r", str(req_file)]
            self._run(cmd, env, emit, key)  # type: ignore[arg-type]

    def _build_delta(self, key: str, interpreter: Path, reqs: list[str], delta: Delta,
                     env: dict[str, str], emit: Callable[[str], None]) -> None:
        """A hard-linked copy of ``delta.source`` (its spare, else linked now; either under the
        source's shared lock, so it is not removed meanwhile), then: uninstall what no line installs
        any more, install the added lines constrained to the set's pins, and when something
        was uninstalled check the whole set (uv installs what a removed line had provided to
        others).  All of it in a workbench folder of a path uv has seen before (uv probes the
        interpreter of a path it does not know), renamed to ``<root>/<key>`` when done.

        Safe for the source: ``bin/`` and top-level files are copied, not linked (installers
        rewrite scripts), and uv replaces files (unlink, then link or rename) rather than
        writing into them, so no file the two share is ever written."""
        assert self._uv is not None
        source = self.root / delta.source
        logger.info("building environment %s from %s (+%d -%d lines)", key, delta.source,
                    len(delta.added), len(delta.removed))
        emit(f"building from environment {delta.source}: {delta.shared} lines shared, "
             f"{len(delta.added)} to add, {len(delta.removed)} to drop"
             + (f" ({', '.join(delta.uninstall)} uninstalled)" if delta.uninstall else ""))
        with self._workbench(interpreter) as bench:
            added = bench.with_name(bench.name + DELTA_FILE)
            constraints = bench.with_name(bench.name + CONSTRAINTS_FILE)
            options = [line for line in reqs if is_option(line)]
            added.write_text("".join(line + "\n" for line in
                                     options + self._install_lines(list(delta.added),
                                                                   lambda _line: None)))
            constraints.write_text("".join(pin + "\n" for pin in
                                           filter(None, (pinned(line) for line in reqs))))
            install = ["pip", "install", "--no-config", "-r", str(added), "-c", str(constraints)]
            with self._locked(delta.source, shared=True):
                if not (source / MARKER).is_file():
                    raise EnvironmentBuildError(f"environment {delta.source} was removed meanwhile")
                try:
                    os.rename(self.root / f"{delta.source}{SPARE_SUFFIX}", bench)
                    emit(f"took the spare copy of {delta.source}")
                except OSError:  # none made (yet), or another build took it
                    copied = _link_tree(source, bench, skip=_OWN_FILES)
                    emit(f"linked {copied} entries of {delta.source}")
                try:
                    os.utime(source / LAST_USED)
                except OSError:
                    pass
            venv_python = str(bench / "bin" / "python")
            full = bench / REQUIREMENTS_FILE
            full.write_text("".join(line + "\n" for line in self._install_lines(reqs, emit)))
            if delta.uninstall:
                self._run([self._uv, "pip", "uninstall", "--no-config", "--python", venv_python,
                           *delta.uninstall], env, emit, key)
            if delta.added:
                self._run([self._uv, *install, "--python", venv_python], env, emit, key)
                os.replace(added, bench / DELTA_FILE)
                os.replace(constraints, bench / CONSTRAINTS_FILE)
            if delta.uninstall:
                self._run([self._uv, "pip", "install", "--no-config", "--python", venv_python,
                           "-r", str(full)], env, emit, key)
            os.rename(bench, self.root / key)

    @contextmanager
    def _workbench(self, interpreter: Path) -> Iterator[Path]:
        """A free workbench path for a delta build with ``interpreter`` (held under its own
        flock; one per build at a time, the same few paths reused), empty on entry and on
        exit.  uv remembers what it learnt of a path's interpreter, so a reused path saves
        it a probe; one per interpreter, so what it remembers stays true."""
        tag = hashlib.sha256(os.path.realpath(interpreter).encode()).hexdigest()[:8]
        number = 0
        while True:
            bench = self.root / f"{_BENCH_PREFIX}{tag}-{number}"
            fd = os.open(bench.with_name(bench.name + ".lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                number += 1
                continue
            break
        try:
            for leftover in (bench, bench.with_name(bench.name + DELTA_FILE),
                             bench.with_name(bench.name + CONSTRAINTS_FILE)):
                if leftover.exists() or leftover.is_symlink():
                    _remove_path(leftover)
            yield bench
        finally:
            try:
                for leftover in (bench, bench.with_name(bench.name + DELTA_FILE),
                                 bench.with_name(bench.name + CONSTRAINTS_FILE)):
                    if leftover.exists() or leftover.is_symlink():
                        _remove_path(leftover)
            finally:
                os.close(fd)

    def _finish(self, key: str, interpreter: Path, reqs: list[str], started: float,
                built_from: Delta | None) -> None:
        """Write the marker last: from now on the environment is served."""
        path = self.root / key
        (path / LAST_USED).touch()
        marker = {
            "key": key,
            "requirements": reqs,
            "interpreter": str(interpreter),
            "interpreter_version": interpreter_version(interpreter),
            "created": time.time(),
            "installer": self.installer,
            "relocatable": self.installer == "uv",
            "built_from": built_from.source if built_from else None,
            "delta": ({"added": list(built_from.added), "removed": list(built_from.removed)}
                      if built_from else None),
            "build_seconds": round(time.monotonic() - started, 3),
        }
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker, indent=1))
        os.replace(tmp, path / MARKER)
        logger.info("built environment %s in %.1fs%s", key, marker["build_seconds"],
                    f" from {built_from.source}" if built_from else "")

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
        use: a running experiment's interpreter would vanish under it (:meth:`evict` checks)."""
        if not _KEY_RE.match(key):
            raise ValueError(f"not an environment key: {key!r}")
        with self._locked(key):
            return self._remove_locked(key)

    def _remove_locked(self, key: str) -> bool:
        path = self.root / key
        existed = path.exists()
        try:
            (path / MARKER).unlink()
        except FileNotFoundError:
            pass
        _remove_path(path)
        for pattern in (f"{key}.building-*", f"{key}{SPARE_SUFFIX}*"):
            for leftover in self.root.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        return existed

    def make_spare(self, key: str) -> bool:
        """Lay a hard-linked copy of environment ``key`` aside (``<key>.spare``), so that the
        next delta build from it only renames it into place: the copying is done here, off
        an experiment's path (the cache manager calls this after each build).  Returns
        whether a spare is there now; False for an environment that cannot be a source.
        The copy is made under the key's shared lock; :meth:`remove` deletes it too."""
        if not _KEY_RE.match(key):
            raise ValueError(f"not an environment key: {key!r}")
        spare = self.root / f"{key}{SPARE_SUFFIX}"
        if spare.is_dir():
            return True
        with self._locked(key, shared=True):
            try:
                info = json.loads((self.root / key / MARKER).read_text())
            except (OSError, ValueError):
                return False
            if not (self.delta and info.get("installer") == "uv" and info.get("relocatable")):
                return False
            staging = self.root / f"{key}{SPARE_SUFFIX}-{os.getpid()}-{threading.get_ident()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                _link_tree(self.root / key, staging, skip=_OWN_FILES)
                os.rename(staging, spare)
            except OSError as exc:  # another spare won the rename, or the disk is full
                shutil.rmtree(staging, ignore_errors=True)
                if not spare.is_dir():
                    logger.warning("no spare copy of environment %s: %s", key, exc)
                    return False
        return True

    def usage(self) -> StoreUsage:
        """Measure the store now (a walk over every file; see :class:`StoreUsage`)."""
        sizes, _inodes, _owners = self._scan()
        self.last_usage = StoreUsage(bytes=sum(sizes.values()), environments=len(self.list()),
                                     measured=time.time())
        return self.last_usage

    def _scan(self) -> tuple[dict[tuple[int, int], int], dict[str, builtins.list[tuple[int, int]]],
                             dict[tuple[int, int], int]]:
        """(per inode of the store its disk use, each inode once; per environment key the
        inodes in it and in its spare copy; per inode the number of environments it is in)."""
        sizes: dict[tuple[int, int], int] = {}
        per_key: dict[str, list[tuple[int, int]]] = {}
        owners: dict[tuple[int, int], int] = {}
        try:
            top = list(os.scandir(self.root))
        except FileNotFoundError:
            return sizes, per_key, owners
        for entry in top:
            inodes = _inodes_under(entry, sizes)
            key = entry.name[:-len(SPARE_SUFFIX)] if entry.name.endswith(SPARE_SUFFIX) else entry.name
            if _KEY_RE.match(key) and entry.is_dir(follow_symlinks=False):
                per_key.setdefault(key, []).extend(inodes)
        for key, inodes in per_key.items():
            per_key[key] = unique = list(dict.fromkeys(inodes))
            for inode in unique:
                owners[inode] = owners.get(inode, 0) + 1
        return sizes, per_key, owners

    def evict(self, cap_bytes: int | None = None,
              log: Callable[[str], None] | None = None) -> builtins.list[str]:
        """Remove least-recently-used environments until the store takes at most ``cap_bytes``
        (default: the store's cap; 0: no cap); return the keys removed, oldest use first.

        Never removed: an environment someone holds (:meth:`holders`), one whose lock is
        taken (being built, being removed, or the source of a delta build).  Removing an
        environment frees only the files no other environment in the store shares (hard
        links), and that is what is counted.  Measures the store (:attr:`last_usage`).  One
        eviction at a time per store object; a second caller returns ``[]`` at once.
        """
        cap = self.cap_bytes if cap_bytes is None else int(cap_bytes)
        if not self._evicting.acquire(blocking=False):
            return []
        try:
            sizes, per_key, owners = self._scan()
            total = sum(sizes.values())
            removed: list[str] = []
            listed = self.list()
            for info in listed:
                if not cap or total <= cap:
                    break
                key = info["key"]
                if self.holders(key):
                    continue
                with self._locked(key, wait=False) as locked:
                    if not locked or self.holders(key):
                        continue
                    self._remove_locked(key)
                freed = 0
                for inode in per_key.get(key, ()):
                    owners[inode] -= 1
                    if owners[inode] == 0:
                        freed += sizes.pop(inode, 0)
                total -= freed
                removed.append(key)
                message = (f"evicted environment {key} (last used "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['last_used']))}"
                           f", {describe_size(freed)} freed); the store holds "
                           f"{describe_size(total)}, cap {describe_size(cap)}")
                logger.info("%s", message)
                if log is not None:
                    log(message)
            self.last_usage = StoreUsage(bytes=total, environments=len(listed) - len(removed),
                                         measured=time.time())
            return removed
        finally:
            self._evicting.release()


def _check_holder(holder: str) -> None:
    """A holder names a file: a non-empty name of at most 200 characters, without ``/`` or
    NUL, not starting with a dot (attempt ids ``<hostname>-<base62>`` are such names)."""
    if (not isinstance(holder, str) or not holder or len(holder) > 200 or "/" in holder
            or "\0" in holder or holder.startswith(".")):
        raise ValueError(f"not a holder name (an attempt id): {holder!r}")


def _inodes_under(entry: os.DirEntry, sizes: dict[tuple[int, int], int]) -> list[tuple[int, int]]:
    """Every inode at and under ``entry`` (not following links), recording the disk use of
    each one first seen in ``sizes`` (``st_blocks`` × 512, as ``du`` counts)."""
    found: list[tuple[int, int]] = []
    stack = [entry]
    while stack:
        item = stack.pop()
        try:
            st = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while walking
        inode = (st.st_dev, st.st_ino)
        found.append(inode)
        if inode not in sizes:
            sizes[inode] = st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(item.path) as children:
                    stack.extend(children)
            except (FileNotFoundError, NotADirectoryError):
                continue
    return found


def _link_tree(source: Path, target: Path, skip: frozenset[str] = frozenset()) -> int:
    """Make ``target`` a copy of the folder ``source`` whose files are hard links to
    ``source``'s (copied where a link cannot be made: another file system, a link limit),
    except the top-level files and those in ``bin/``, which are copied; symbolic links are
    made anew with the same text; top-level names in ``skip`` are left out.  ``target`` must
    not exist.  Returns the number of entries made."""
    made = 0
    os.mkdir(target)
    stack: list[tuple[str, str, bool, bool]] = [(str(source), str(target), True, False)]
    while stack:
        src_dir, dst_dir, top, copy_files = stack.pop()
        with os.scandir(src_dir) as entries:
            for entry in entries:
                if top and entry.name in skip:
                    continue
                dst = os.path.join(dst_dir, entry.name)
                if entry.is_symlink():
                    os.symlink(os.readlink(entry.path), dst)
                elif entry.is_dir(follow_symlinks=False):
                    os.mkdir(dst)
                    stack.append((entry.path, dst, False, top and entry.name == "bin"))
                elif top or copy_files:
                    shutil.copy2(entry.path, dst)
                else:
                    try:
                        os.link(entry.path, dst)
                    except OSError:
                        shutil.copy2(entry.path, dst)
                made += 1
    return made


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
