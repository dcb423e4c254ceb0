"""What every container runtime offers the runner, and which image a request names.

A request is in **container mode** when its ``_singularity`` artifact (StudioML's container
mode) or its ``config.image`` field names an image (:func:`image_of`):

* a reference: ``docker://host/repo:tag`` (an OCI image in a registry), ``oras://...``,
  ``library://...`` or ``shub://...`` (Singularity's own), given as the artifact's
  ``qualified``/``url``/``local`` or as ``config.image``;
* an image file in storage (a ``.sif``), given as a storage URL in the artifact, fetched
  through the artifact cache.

A :class:`ContainerRuntime` turns the experiment's command into the runtime's command line
(:meth:`ContainerRuntime.command`); the executor starts it exactly as it starts python-mode
runs (same process group, same cgroup, same output pipe).  Inside every runtime the attempt's
folder is at :data:`ATTEMPT_MOUNT` (so ``workspace``, ``modeldir``, ... keep their relative
places: ``../modeldir`` from the workspace) and the run starts in its ``workspace``.
"""
from __future__ import annotations

import abc
import ipaddress
from dataclasses import dataclass, field

from ..errors import BadRequest, ResourcesUnavailable
from ..storage import STORES, artifact_url

#: Where the attempt's folder is inside a container; ``STUDIOML_HOME`` says so too.
ATTEMPT_MOUNT = "/studioml"
#: Image reference schemes (passed to the runtime, never fetched from storage).
REFERENCE_SCHEMES = ("docker", "oras", "library", "shub")
#: The interpreter that runs the experiment's script inside an image (found on its PATH).
CONTAINER_PYTHON = "python3"


class ContainerUnavailable(ResourcesUnavailable):
    """This host has no runtime for the request's image (another runner may have one)."""


@dataclass(frozen=True)
class ImageRef:
    """The image a request names: a runtime ``reference`` (``docker://...``) or a
    ``storage_url`` of an image file (``.sif``)."""

    reference: str = ""
    storage_url: str = ""

    @property
    def scheme(self) -> str:
        return self.reference.split("://", 1)[0] if self.reference else "file"

    def __str__(self) -> str:
        return self.reference or self.storage_url


def on_loopback(reference: str) -> bool:
    """Whether the registry ``reference`` names is on this host (spoken to over plain HTTP,
    as Docker does for 127.0.0.0/8; every other registry needs TLS)."""
    host = reference.split("://", 1)[-1].split("/", 1)[0]
    host = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def image_of(request: dict) -> ImageRef | None:
    """The image ``request`` names, or None (python mode); raises :class:`BadRequest`
    for one that cannot be understood."""
    experiment = request.get("experiment") or {}
    artifact = (experiment.get("artifacts") or {}).get("_singularity")
    config_image = (request.get("config") or {}).get("image")
    if artifact is None and config_image in (None, ""):
        return None
    if artifact is not None and config_image not in (None, ""):
        raise BadRequest("both a _singularity artifact and config.image name an image")
    if artifact is not None:
        candidates = [artifact_url(artifact), artifact.get("local")]
        where = "artifact '_singularity'"
    else:
        candidates = [config_image]
        where = "config.image"
    for value in candidates:
        if not isinstance(value, str) or "://" not in value:
            continue
        scheme = value.split("://", 1)[0].lower()
        if scheme in REFERENCE_SCHEMES:
            if not value.split("://", 1)[1].strip("/"):
                raise BadRequest(f"{where}: {value!r} names no image")
            return ImageRef(reference=value)
        if scheme in STORES and artifact is not None and value == artifact_url(artifact):
            return ImageRef(storage_url=value)
    schemes = ", ".join(s + "://" for s in REFERENCE_SCHEMES)
    raise BadRequest(f"{where}: no image reference ({schemes}) or image file in storage")


@dataclass(frozen=True)
class Launch:
    """One container run as the executor sees it.

    ``image`` is what the cache manager prepared (a local image file, a reference, or an
    unpacked root file system); ``command`` runs inside, in ``ATTEMPT_MOUNT/workspace``;
    ``variables`` are the experiment's own environment variables (``config.env`` and the
    runner's ``STUDIOML_*``, ``CUDA_VISIBLE_DEVICES``, thread counts); ``devices`` GPU UUIDs.
    """

    image: str
    command: list
    workdir: str
    variables: dict
    devices: list = field(default_factory=list)
    network: bool = True


class ContainerRuntime(abc.ABC):
    """One way of running images; one instance per executor or cache manager."""

    name: str = ""

    @abc.abstractmethod
    def missing(self) -> str:
        """Why this runtime cannot run here (a missing program), or empty when it can."""

    @abc.abstractmethod
    def accepts(self, image: ImageRef) -> bool:
        """Whether this runtime runs ``image``."""

    def registry(self):
        """The :class:`~runner.storage.base.Store` that pulls references into the image
        cache, or None when the runtime pulls (and caches) them itself."""
        return None

    @abc.abstractmethod
    def command(self, launch: Launch, environ: dict) -> tuple[list[str], dict]:
        """(argv, environment) that run ``launch``; ``environ`` is the runner's own."""
