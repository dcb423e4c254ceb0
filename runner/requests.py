"""Reading a request body (SPEC section 2) into the facts the runner acts on.

:func:`parse_request` is the only place that decides whether a body is a *bad request*;
everything it raises is a :class:`~runner.errors.BadRequest` with a reason a person can
act on.  Unknown fields are kept and ignored.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from .errors import BadRequest
from .storage import STORES, artifact_url
from .units import UnitError, parse_duration, parse_size

DEFAULT_SAVE_FREQUENCY = 60.0
MAX_SAVE_FREQUENCY = 3600.0
MUTABLE_LABELS = ("modeldir", "output", "retval", "tb", "_metrics", "_metadata")
#: Artifacts the StudioML client reads as one file: packed as a tar whose only member is
#: ``./<name>`` when their folder holds one file (SPEC section 11).
SINGLE_FILE_LABELS = ("output", "retval", "_metrics")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


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
    try:
        return parse_duration(value)
    except UnitError as exc:
        raise BadRequest(f"{where}: {exc}") from exc


def parse_resources(raw: dict | None) -> dict:
    """``resources_needed`` with sizes in bytes: cpus, gpus, ram, hdd, gpuMem (ints)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise BadRequest("resources_needed must be an object")
    out = {}
    try:
        out["cpus"] = int(float(raw.get("cpus") or 1))
        out["gpus"] = int(float(raw.get("gpus") or raw.get("gpuCount") or 0))
        for name in ("ram", "hdd", "gpuMem"):
            value = raw.get(name)
            out[name] = parse_size(value) if value not in (None, "") else 0
    except (ValueError, UnitError) as exc:
        raise BadRequest(f"resources_needed: {exc}") from exc
    if out["cpus"] < 0 or out["gpus"] < 0:
        raise BadRequest("resources_needed: counts cannot be negative")
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


def parse_request(body: bytes, *, min_save_interval: float = 10.0) -> tuple[dict, RequestFacts]:
    """The request dict and its facts; raises BadRequest when it can never run."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from exc
    if not isinstance(request, dict):
        raise BadRequest("body is not a JSON object")
    if "message" in request and "experiment" not in request:
        raise BadRequest("encrypted request envelope: no decryption key configured")
    experiment = request.get("experiment")
    config = request.get("config") or {}
    if not isinstance(experiment, dict):
        raise BadRequest("missing experiment object")
    if not isinstance(config, dict):
        raise BadRequest("config must be an object")
    key = experiment.get("key")
    filename = experiment.get("filename")
    if not isinstance(key, str) or not key.strip():
        raise BadRequest("missing experiment.key")
    if key.startswith("/") or ".." in key.split("/") or any(c in key for c in "\0\n"):
        raise BadRequest(f"experiment.key {key!r} is not usable in storage paths")
    project = experiment.get("project")
    if isinstance(project, str) and (project.startswith("/") or ".." in project.split("/")):
        raise BadRequest(f"experiment.project {project!r} is not usable in storage paths")
    if not isinstance(filename, str) or not filename.strip():
        raise BadRequest("missing experiment.filename")
    args = experiment.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise BadRequest("experiment.args must be a list of strings")
    pythonenv = experiment.get("pythonenv") or []
    if not isinstance(pythonenv, list) or not all(isinstance(a, str) for a in pythonenv):
        raise BadRequest("experiment.pythonenv must be a list of strings")
    artifacts = experiment.get("artifacts") or {}
    if not isinstance(artifacts, dict):
        raise BadRequest("experiment.artifacts must be an object")
    for label, artifact in artifacts.items():
        if not isinstance(artifact, dict):
            raise BadRequest(f"artifact {label!r} is not an object")
        url = artifact_url(artifact)
        if url is not None:
            scheme = url.split("://", 1)[0].lower() if "://" in url else ""
            if scheme not in STORES:
                raise BadRequest(f"artifact {label!r}: unsupported storage URL {url!r}")
    if "_singularity" in artifacts:
        raise BadRequest("container mode (_singularity) is not supported by this runner")
    if "workspace" not in artifacts:
        raise BadRequest("no workspace artifact: unknown mode")
    resources = parse_resources(experiment.get("resources_needed") or config.get("resources_needed"))
    time_added = experiment.get("time_added")
    if time_added is not None:
        try:
            time_added = float(time_added)
        except (TypeError, ValueError) as exc:
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
