"""Container mode: one module per runtime, chosen per host by ``--container-runtime``.

* :mod:`.apptainer` — ``apptainer exec`` / ``singularity exec`` (``.sif`` files and every
  reference scheme);
* :mod:`.oci_bwrap` — ``docker://`` OCI images pulled with skopeo, unpacked with umoci into
  the image cache and run under bubblewrap.

:func:`runtimes_for` builds, from the option, the runtimes this host offers, in order of
preference; :func:`choose` picks the first that accepts an image, or raises
:class:`~.base.ContainerUnavailable` (the request goes back to its queue uncounted, for a
runner that has one).  ``auto`` means apptainer, then singularity, then bwrap: whichever
of them is installed.
"""
from __future__ import annotations

from collections.abc import Sequence

from .apptainer import ApptainerRuntime, SingularityRuntime
from .base import (ATTEMPT_MOUNT, CONTAINER_PYTHON, ContainerRuntime, ContainerUnavailable,
                   ImageRef, Launch, image_of)
from .oci_bwrap import OciBwrapRuntime, OciRegistry

RUNTIMES: dict[str, type[ContainerRuntime]] = {
    "apptainer": ApptainerRuntime,
    "singularity": SingularityRuntime,
    "bwrap": OciBwrapRuntime,
}
AUTO_ORDER = ("apptainer", "singularity", "bwrap")


def runtimes_for(option: str) -> tuple[list[ContainerRuntime], list[str]]:
    """(usable runtimes in order of preference, why each other one is not usable)."""
    names = AUTO_ORDER if option == "auto" else (option,)
    usable, problems = [], []
    for name in names:
        cls = RUNTIMES.get(name)
        if cls is None:
            problems.append(f"{name}: no such container runtime in this runner")
            continue
        runtime = cls()
        why = runtime.missing()
        if why:
            problems.append(f"{name}: {why}")
        else:
            usable.append(runtime)
    return usable, problems


def choose(runtimes: list[ContainerRuntime], image: ImageRef,
           problems: Sequence[str] = ()) -> ContainerRuntime:
    """The first runtime that runs ``image``; :class:`ContainerUnavailable` if none does."""
    for runtime in runtimes:
        if runtime.accepts(image):
            return runtime
    offered = ", ".join(r.name for r in runtimes) or "none"
    why = f" ({'; '.join(problems)})" if problems else ""
    raise ContainerUnavailable(f"no container runtime on this host runs {image} "
                               f"(runtimes here: {offered}{why})")


__all__ = ["ATTEMPT_MOUNT", "AUTO_ORDER", "CONTAINER_PYTHON", "ContainerRuntime",
           "ContainerUnavailable", "ImageRef", "Launch", "OciRegistry", "RUNTIMES",
           "choose", "image_of", "runtimes_for"]
