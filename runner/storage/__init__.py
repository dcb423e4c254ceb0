"""Storage back ends, chosen by URL scheme (SPEC section 4, DESIGN convention 7).

Adding a back end means one new module here and one line in :data:`STORES`.
(:mod:`runner.storage.memory`, the stub store for tests, adds its ``memory`` line only
while a test has installed it.)
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

from ..errors import BadRequest
from .base import (ObjectInfo, ObjectMissing, PermanentStorageError, Store,
                   StorageSettings, configure, split_url)
from .file import FileStore
from .gcs import GcsStore
from .http import HttpStore
from .s3 import S3Store

log = logging.getLogger(__name__)

#: scheme -> Store class.  One line per back end.
STORES: dict[str, type[Store]] = {
    "file": FileStore,
    "s3": S3Store,
    "gs": GcsStore,
    "http": HttpStore,
    "https": HttpStore,
}

_PERCENT_VAR = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")


def open_store(url: str, *, credentials: dict | None = None,
               storage_config: dict | None = None, env: dict | None = None) -> Store:
    """A store able to serve ``url``, chosen by its scheme.

    ``credentials`` is the artifact's credentials map, ``storage_config`` the request's
    ``config.storage``, ``env`` the request's expanded ``config.env``; all are passed to
    the back end's :meth:`Store.from_url`.
    Raises :class:`BadRequest` for a URL without a scheme or with an unsupported one.
    """
    if not isinstance(url, str) or "://" not in url:
        raise BadRequest(f"not a storage URL: {url!r}")
    scheme = url.split("://", 1)[0].lower()
    cls = STORES.get(scheme)
    if cls is None:
        raise BadRequest(f"unsupported storage scheme {scheme!r} in {url!r} "
                         f"(supported: {', '.join(sorted(STORES))})")
    return cls.from_url(url, credentials=credentials, storage_config=storage_config, env=env)


def request_env(request: dict, base: dict | None = None) -> dict:
    """The request's ``config.env`` with ``%NAME%`` replaced by ``base[NAME]`` (default: the
    runner's environment) where ``base`` has NAME; any other ``%…%`` text (``%Y%m%d``,
    ``50%off%sale``) is kept as written."""
    names: Mapping[str, str] = os.environ if base is None else base
    config = request.get("config") if isinstance(request, dict) else None
    env = (config or {}).get("env") if isinstance(config, dict) else None
    if not isinstance(env, dict):
        return {}
    return {str(name): _PERCENT_VAR.sub(lambda m: names.get(m.group(1), m.group(0)), str(value))
            for name, value in env.items()}


def open_for_request(url: str, request: dict, artifact: dict | None = None) -> Store:
    """A store for ``url`` with everything the request says about storage access.

    ``artifact`` supplies its own ``credentials``; the request supplies ``config.storage``
    and ``config.env`` (credentials precedence is the back end's business).
    """
    config = request.get("config") if isinstance(request, dict) else None
    storage_config = (config or {}).get("storage") if isinstance(config, dict) else None
    credentials = artifact.get("credentials") if isinstance(artifact, dict) else None
    return open_store(url, credentials=credentials if isinstance(credentials, dict) else None,
                      storage_config=storage_config if isinstance(storage_config, dict) else None,
                      env=request_env(request))


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


__all__ = ["STORES", "FileStore", "GcsStore", "HttpStore", "ObjectInfo",
           "ObjectMissing", "PermanentStorageError", "S3Store", "Store", "StorageSettings",
           "artifact_url", "configure", "open_for_request", "open_store", "request_env",
           "split_url"]
