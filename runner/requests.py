"""Reading a request body (SPEC section 2) into the facts the runner acts on.

:func:`parse_request` is the only place that decides whether a body is a *bad request*,
and it never raises anything else: whatever goes wrong while reading a body (deep
nesting, numbers that overflow, values of the wrong type) becomes a
:class:`~runner.errors.BadRequest` with a reason a person can act on.  Unknown fields are
kept and ignored, but every value must be one the runner's internal bus can carry
(integers within 64 bits, at most :data:`MAX_NESTING` levels deep, finite numbers, text
that is valid Unicode) and the body at most :data:`MAX_BODY_BYTES` long.

Fields the runner acts on are checked for what they will be used for: ``filename`` is a
path inside the workspace (or ``-m``), artifact labels are single folder names,
``args``, ``pythonenv``, ``config.pip`` are lists of strings and ``config.env`` an object
of scalars, none of them holding a NUL character.  The experiment's ``key`` and
``project`` name storage paths (``experiments/<key>/…``, ``metadata/<project>/<key>.json``),
so each must be one path component (:func:`check_name`).  ``pythonver`` must be a version
(``3.11``, ``3.11.7``).  Requirement lines may not be installer options (``--index-url``,
``-f``, ``-r`` …): a request must not choose where packages come from
(:func:`check_requirement_line`).  ``file://`` artifacts must lie under the runner's
``--file-store-roots`` (:mod:`runner.storage.file`).  ``config.env`` and ``args`` must fit
what the kernel lets a process start with (:data:`MAX_ARG_STRING`, :data:`MAX_EXEC_BYTES`).
"""
from __future__ import annotations

import json
import math
import posixpath
import re
from dataclasses import dataclass, field

import msgpack

from .containers.base import image_of
from .argv import split_args
from .errors import BadRequest, StorageError
from .storage import STORES, artifact_url
from .storage.file import check_file_url
from .units import UnitError, parse_duration, parse_size

DEFAULT_SAVE_FREQUENCY = 60.0
MAX_SAVE_FREQUENCY = 3600.0
MUTABLE_LABELS = ("modeldir", "output", "retval", "tb", "_metrics", "_metadata")
#: Artifacts the StudioML client reads as one file: packed as a tar whose only member is
#: ``./<name>`` when their folder holds one file (SPEC section 11).
SINGLE_FILE_LABELS = ("output", "retval", "_metrics")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")

MAX_BODY_BYTES = 8 * 1024 * 1024
"""The largest body accepted (a request with a whole ``pip freeze`` is tens of kB)."""
MAX_NESTING = 64
"""The deepest nesting of arrays and objects accepted in a body."""
MAX_COUNT = 2**53
"""The largest resource count or size accepted (sizes in bytes: 8 PiB)."""
_INT_MIN, _INT_MAX = -2**63, 2**64 - 1  # what msgpack carries
MAX_ARG_STRING = 128 * 1024
"""The longest single argument or ``NAME=value`` the kernel passes to a new process
(Linux's ``MAX_ARG_STRLEN``, NUL included)."""
MAX_EXEC_BYTES = 1024 * 1024
"""The most bytes ``args`` and ``config.env`` together may take; the kernel's limit for a
whole command line and environment is about 2 MiB, and the runner adds its own variables."""
_PYTHONVER = re.compile(r"^(?:python)?\d+(?:\.\d+){0,2}(?:(?:a|b|rc)\d+)?\+?$")
_EDITABLE = re.compile(r"^(?:-e|--editable)(?:\s+|=)\S")
_HASH_OPTION = re.compile(r"^--hash(?:=\S+)?$")


@dataclass(frozen=True)
class RequestFacts:
    """What the runner needs from a request; times in seconds, sizes in bytes."""

    key: str
    project: str
    filename: str
    resources: dict
    max_duration: float | None
    lifetime: float | None
    time_added: float | None
    save_frequency: float
    artifact_save_frequency: dict = field(default_factory=dict)  # label -> seconds

    @property
    def stale_at(self) -> float | None:
        """Unix time after which the request is stale, or None."""
        if self.lifetime is None or self.time_added is None:
            return None
        return self.time_added + self.lifetime


def _duration_field(value, where: str) -> float | None:
    if value in (None, "", 0, "0"):
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise BadRequest(f"{where}: not a duration: {_show(value)}")
    try:
        return parse_duration(value)
    except UnitError as exc:
        raise BadRequest(f"{where}: {exc}") from exc
    except (OverflowError, ValueError) as exc:
        raise BadRequest(f"{where}: not a duration: {_show(value)}") from exc


def parse_resources(raw: dict | None) -> dict:
    """``resources_needed`` with sizes in bytes: cpus, gpus, ram, hdd, gpuMem (ints)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise BadRequest("resources_needed must be an object")
    out = {"cpus": _count(raw.get("cpus") or 1, "cpus"),
           "gpus": _count(raw.get("gpus") or raw.get("gpuCount") or 0, "gpus")}
    for name in ("ram", "hdd", "gpuMem"):
        value = raw.get(name)
        try:
            out[name] = parse_size(value) if value not in (None, "") else 0
        except (ValueError, UnitError, OverflowError, TypeError) as exc:
            raise BadRequest(f"resources_needed.{name}: not a size: {_show(value)}") from exc
        if out[name] > MAX_COUNT:
            raise BadRequest(f"resources_needed.{name}: {_show(value)} is too large")
    return out


def clamp_save_frequency(seconds: float | None, min_save_interval: float) -> float:
    """A save period in seconds within ``[min_save_interval, 1h]``; None: the default (1m)."""
    return min(max(seconds or DEFAULT_SAVE_FREQUENCY, min_save_interval), MAX_SAVE_FREQUENCY)


def artifact_save_frequencies(artifacts: dict, min_save_interval: float) -> dict[str, float]:
    """``label -> seconds`` for each mutable artifact with its own ``saveFrequency``
    (SPEC section 2), clamped like ``saveWorkspaceFrequency``; the others follow
    ``saveWorkspaceFrequency``.  Raises :class:`BadRequest` for a value that is no duration.
    """
    found = {}
    for label, artifact in artifacts.items():
        if not isinstance(artifact, dict) or not artifact.get("mutable"):
            continue
        seconds = _duration_field(artifact.get("saveFrequency"),
                                  f"artifact {label!r}: saveFrequency")
        if seconds is not None:
            found[label] = clamp_save_frequency(seconds, min_save_interval)
    return found


def _count(value, name: str) -> int:
    """A whole count of CPUs or GPUs from a number or numeric text."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(f"resources_needed.{name}: not a number: {_show(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError) as exc:
        raise BadRequest(f"resources_needed.{name}: not a number: {_show(value)}") from exc
    if not math.isfinite(number) or number > MAX_COUNT:
        raise BadRequest(f"resources_needed.{name}: {_show(value)} is not a finite count")
    if number < 0:
        raise BadRequest("resources_needed: counts cannot be negative")
    return int(number)


def _show(value, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters (for reasons in logs and dead letters)."""
    try:
        text = repr(value)
    except Exception:  # a value whose repr fails (an integer too long to print)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= width else text[:width - 3] + "..."


def parse_request(body: bytes | str, *, min_save_interval: float = 10.0
                  ) -> tuple[dict, RequestFacts]:
    """The request dict and its facts.

    Raises :class:`BadRequest` (and nothing else) when the body can never run: its
    message says why.
    """
    try:
        return _parse_request(body, min_save_interval)
    except BadRequest:
        raise
    except Exception as exc:  # the boundary: no body may raise anything but BadRequest
        raise BadRequest(f"request cannot be read: {type(exc).__name__}: "
                         f"{_show(str(exc), 200)}") from exc


def _reject_constant(name: str):
    raise BadRequest(f"body holds {name}, which is not JSON")


def _check_carriable(request: dict) -> None:
    """BadRequest unless every value of ``request`` can cross the internal bus."""
    stack = [(request, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        elif isinstance(value, int) and not isinstance(value, bool):
            if not _INT_MIN <= value <= _INT_MAX:
                raise BadRequest(f"body holds an integer outside 64 bits ({len(str(value))} "
                                 "digits)")
            continue
        else:
            continue
        if depth > MAX_NESTING:
            raise BadRequest(f"body is nested deeper than {MAX_NESTING} levels")
        stack.extend((child, depth + 1) for child in children)
    try:
        msgpack.packb(request, use_bin_type=True)
    except (ValueError, TypeError, OverflowError, UnicodeError) as exc:
        raise BadRequest(f"body holds a value the runner cannot carry: {exc}") from exc


def _strings(value, where: str) -> list:
    """``value`` (None or a list of strings without NUL), as a list."""
    value = value or []
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise BadRequest(f"{where} must be a list of strings")
    if any("\0" in a for a in value):
        raise BadRequest(f"{where} holds a NUL character")
    return value


def check_name(value, where: str) -> None:
    """BadRequest unless ``value`` (a key or project) is usable as one path component.

    Refused: empty text, ``.`` and ``..``, text holding ``/``, a NUL or another control
    character (newline, tab …).  Everything else StudioML clients make is accepted
    (``1701234567_<uuid>``, ``<name>__opt__<random>__<time>``, ``lr-0.01``, ``résumé``,
    ``a b``); names too long for their store are refused by
    :func:`runner.metadata.check_object_names`, which knows the store's limits.
    """
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"missing {where}")
    reason = ""
    if value in (".", ".."):
        reason = "is a relative folder name"
    elif "/" in value:
        reason = "holds a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        reason = "holds a control character"
    if reason:
        raise BadRequest(f"{where} {_show(value)} {reason}: it names a folder in storage, "
                         "so it must be one path component")


def check_requirement_line(line: str, where: str) -> None:
    """BadRequest when a requirement line is an installer option.

    Lines like ``--index-url URL``, ``--extra-index-url``, ``-i``, ``-f``/``--find-links``,
    ``-c``/``-r`` (other files), ``--trusted-host``, ``--no-index`` and per-requirement
    options (``--config-settings``, ``--install-option``) would let a request choose where
    packages come from or run the installer differently; the runner's operator chooses
    that.  What ``pip freeze`` writes is accepted: ``name==1.0``, ``name @ URL``,
    ``-e``/``--editable`` lines (``-e git+https://…#egg=name``, ``-e /path``), comments,
    and ``--hash=…`` after a requirement or on a line of its own (``pip-compile``).
    """
    text = re.sub(r"(^|\s)#.*$", "", line).strip()
    if not text:
        return
    tokens = [t for t in text.split() if t != "\\"]  # pip-compile's line continuations
    first = 0
    if _EDITABLE.match(text):
        first = 2 if tokens[0] in ("-e", "--editable") else 1
    elif all(_HASH_OPTION.match(t) for t in tokens):
        return  # a continuation line of hashes (``    --hash=sha256:… \``)
    elif tokens[0].startswith("-"):
        raise BadRequest(f"{where}: {_show(text)} is an installer option, not a requirement "
                         "(the runner's operator chooses package indexes and files)")
    for token in tokens[first:]:
        if token.startswith("-") and not _HASH_OPTION.match(token):
            raise BadRequest(f"{where}: {_show(text)} carries the installer option "
                             f"{_show(token, 30)} (only --hash is accepted after a requirement)")


def _check_pythonver(pythonver) -> None:
    """``experiment.pythonver``: absent, a number (``3.11``) or version text (``"3.11.7"``)."""
    if pythonver is None or pythonver == "":
        return
    if isinstance(pythonver, bool) or not isinstance(pythonver, (str, int, float)):
        raise BadRequest("experiment.pythonver must be text like \"3.11\"")
    if not _PYTHONVER.match(str(pythonver).strip()):
        raise BadRequest(f"experiment.pythonver {_show(pythonver)} is not a version like "
                         "\"3.11\" or \"3.11.7\"")


def _check_exec_size(args: list, env) -> None:
    """BadRequest when ``args`` and ``config.env`` could not be given to a new process."""
    strings = [a.encode("utf-8", "surrogatepass") for a in args]
    strings += [f"{name}={'' if value is None else value}".encode("utf-8", "surrogatepass")
                for name, value in (env or {}).items()]
    longest = max((len(s) + 1 for s in strings), default=0)
    if longest > MAX_ARG_STRING:
        raise BadRequest(f"experiment.args or config.env holds a value of {longest} bytes; a "
                         f"process can be started with at most {MAX_ARG_STRING} per value")
    total = sum(len(s) + 1 for s in strings)
    if total > MAX_EXEC_BYTES:
        raise BadRequest(f"experiment.args and config.env take {total} bytes; at most "
                         f"{MAX_EXEC_BYTES} fit a process's start")


def _check_filename(filename) -> None:
    """``filename`` is ``-m`` or a relative path that stays inside the workspace."""
    if not isinstance(filename, str) or not filename.strip():
        raise BadRequest("missing experiment.filename")
    if filename == "-m":
        return
    if "\0" in filename:
        raise BadRequest("experiment.filename holds a NUL character")
    normal = posixpath.normpath(filename)
    if filename.startswith(("/", "~")) or normal == ".." or normal.startswith("../"):
        raise BadRequest(f"experiment.filename {_show(filename)} is not a path inside the "
                         "workspace")


def _check_env(env) -> None:
    """``config.env``: an object of scalar values, names usable as environment variables."""
    if env is None:
        return
    if not isinstance(env, dict):
        raise BadRequest("config.env must be an object")
    for name, value in env.items():
        if not name or "=" in name or "\0" in name:
            raise BadRequest(f"config.env: {_show(name)} is not an environment variable name")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise BadRequest(f"config.env.{name}: a value must be text or a number")
        if isinstance(value, str) and "\0" in value:
            raise BadRequest(f"config.env.{name} holds a NUL character")


_ARTIFACT_TEXT_FIELDS = ("key", "bucket", "qualified", "url", "hash")


def _check_artifacts(artifacts) -> None:
    if not isinstance(artifacts, dict):
        raise BadRequest("experiment.artifacts must be an object")
    for label, artifact in artifacts.items():
        if (not label or label in (".", "..") or "/" in label or "\0" in label
                or label.startswith(".")):
            raise BadRequest(f"artifact label {_show(label)} is not a folder name")
        if not isinstance(artifact, dict):
            raise BadRequest(f"artifact {label!r} is not an object")
        for name in _ARTIFACT_TEXT_FIELDS:
            value = artifact.get(name)
            if value is not None and not isinstance(value, str):
                raise BadRequest(f"artifact {label!r}: {name} must be text")
            if isinstance(value, str) and "\0" in value:
                raise BadRequest(f"artifact {label!r}: {name} holds a NUL character")
        url = artifact_url(artifact)
        if url is not None and label != "_singularity":  # an image reference: image_of
            scheme = url.split("://", 1)[0].lower() if "://" in url else ""
            if scheme not in STORES:
                raise BadRequest(f"artifact {label!r}: unsupported storage URL {_show(url)}")
            if scheme == "file":
                try:
                    check_file_url(url)
                except StorageError as exc:
                    raise BadRequest(f"artifact {label!r}: {exc}") from exc


def _parse_request(body: bytes | str, min_save_interval: float) -> tuple[dict, RequestFacts]:
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"body of {len(body)} bytes exceeds the {MAX_BODY_BYTES} this runner "
                         "accepts")
    try:
        request = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadRequest(f"body is nested deeper than {MAX_NESTING} levels") from exc
    if not isinstance(request, dict):
        raise BadRequest("body is not a JSON object")
    if "message" in request and "experiment" not in request:
        raise BadRequest("encrypted request envelope: no decryption key configured")
    experiment = request.get("experiment")
    config = request.get("config")
    if not isinstance(experiment, dict):
        raise BadRequest("missing experiment object")
    if config is None:
        config = request["config"] = {}  # every role reads request["config"] as an object
    if not isinstance(config, dict):
        raise BadRequest("config must be an object")
    _check_carriable(request)
    key = experiment.get("key")
    filename = experiment.get("filename")
    check_name(key, "experiment.key")
    assert isinstance(key, str)  # check_name raised otherwise
    project = experiment.get("project")
    if project is not None and (isinstance(project, bool)
                                or not isinstance(project, (str, int))):
        raise BadRequest("experiment.project must be text")
    if project not in (None, ""):
        check_name(str(project), "experiment.project")
    _check_filename(filename)
    assert isinstance(filename, str)  # _check_filename raised otherwise
    args = _strings(experiment.get("args"), "experiment.args")
    split_args(args)  # quotes must balance
    if filename == "-m" and not any(split_args(experiment.get("args") or [])):
        raise BadRequest("filename '-m' needs the module name as the first argument")
    for where, lines in (("experiment.pythonenv", experiment.get("pythonenv")),
                         ("config.pip", config.get("pip"))):
        for line in _strings(lines, where):
            check_requirement_line(line, where)
    _check_env(config.get("env"))
    _check_exec_size(args, config.get("env"))
    _check_pythonver(experiment.get("pythonver"))
    artifacts = experiment.get("artifacts") or {}
    _check_artifacts(artifacts)
    image = image_of(request)
    if image is not None and (image.storage_url or "").lower().startswith("file://"):
        try:
            check_file_url(image.storage_url)
        except StorageError as exc:
            raise BadRequest(f"artifact '_singularity': {exc}") from exc
    if image is None and "workspace" not in artifacts:
        raise BadRequest("no workspace artifact and no image (_singularity, config.image): "
                         "unknown mode")
    resources = parse_resources(experiment.get("resources_needed") or config.get("resources_needed"))
    time_added = experiment.get("time_added")
    if time_added is not None:
        if isinstance(time_added, bool):
            raise BadRequest("experiment.time_added is not a number")
        try:
            time_added = float(time_added)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadRequest("experiment.time_added is not a number") from exc
        if not math.isfinite(time_added):
            raise BadRequest("experiment.time_added is not finite")
    save = _duration_field(config.get("saveWorkspaceFrequency"), "config.saveWorkspaceFrequency")
    save = clamp_save_frequency(save, min_save_interval)
    facts = RequestFacts(
        key=key,
        project=str(experiment.get("project") or ""),
        filename=filename,
        resources=resources,
        max_duration=_duration_field(experiment.get("max_duration"), "experiment.max_duration"),
        lifetime=_duration_field(config.get("experimentLifetime"), "config.experimentLifetime"),
        time_added=time_added,
        save_frequency=save,
        artifact_save_frequency=artifact_save_frequencies(artifacts, min_save_interval),
    )
    return request, facts


def safe_path_part(text: str) -> str:
    """``text`` made safe as one path component (for working directories)."""
    cleaned = _SAFE_NAME.sub("_", text).strip("._") or "_"
    return cleaned[:100]
