"""Storage back ends, chosen by URL scheme (SPEC section 4, DESIGN convention 7).

Adding a back end means one new module here and one line in :data:`STORES`.
"""
from __future__ import annotations

import logging

from ..errors import BadRequest
from .base import ObjectInfo, ObjectMissing, Store, split_url
from .file import FileStore

log = logging.getLogger(__name__)

#: scheme -> Store class.  One line per back end.
STORES: dict[str, type[Store]] = {
    "file": FileStore,
}


def open_store(url: str, *, credentials: dict | None = None,
               storage_config: dict | None = None) -> Store:
    """A store able to serve ``url``, chosen by its scheme.

    ``credentials`` is the artifact's credentials map, ``storage_config`` the request's
    ``config.storage``; both are passed to the back end's :meth:`Store.from_url`.
    Raises :class:`BadRequest` for a URL without a scheme or with an unsupported one.
    """
    if not isinstance(url, str) or "://" not in url:
        raise BadRequest(f"not a storage URL: {url!r}")
    scheme = url.split("://", 1)[0].lower()
    cls = STORES.get(scheme)
    if cls is None:
        raise BadRequest(f"unsupported storage scheme {scheme!r} in {url!r} "
                         f"(supported: {', '.join(sorted(STORES))})")
    return cls.from_url(url, credentials=credentials, storage_config=storage_config)


def artifact_url(artifact: dict) -> str | None:
    """The URL to read/write a request artifact: ``qualified``, else ``url``, else ``None``.

    ``local`` (a path on the client's machine) is never used.  Empty strings count as absent.
    """
    if not isinstance(artifact, dict):
        return None
    for field in ("qualified", "url"):
        value = artifact.get(field)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


__all__ = ["STORES", "FileStore", "ObjectInfo", "ObjectMissing", "Store", "artifact_url",
           "open_store", "split_url"]
