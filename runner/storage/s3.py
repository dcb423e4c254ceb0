"""``s3://`` storage with boto3 (SPEC section 4).

URLs are written the way StudioML clients write them, with the server first and
path-style addressing: ``s3://host[:port]/bucket/key``.  The first component is taken as
the host when it contains ``.`` or ``:`` or is ``localhost``; otherwise the URL is the
bucket-first form ``s3://bucket/key`` and the endpoint is ``config.storage.endpoint`` or
AWS itself.  Endpoint rules (see :func:`parse_s3_url`):

* ``config.storage.endpoint`` wins over the URL's host when both exist; it may carry its
  own ``http://``/``https://``;
* AWS hosts (``s3.amazonaws.com``, ``s3.<region>.amazonaws.com``,
  ``s3-<region>.amazonaws.com``) use TLS and give the region;
* any other host (MinIO, moto, Ceph) uses plain HTTP unless TLS is configured with
  ``--s3-ca`` / ``--s3-cert`` / ``--s3-key`` (see :mod:`runner.storage.base`'s settings).

Credentials, first found wins (see :func:`resolve_credentials`): the artifact's own
``credentials.aws``; ``config.storage.credentials.aws``; the request's ``config.env``
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``); the runner's
own environment, shared files or instance role (boto3's default chain).  When a read is
refused (403, or no credentials at all), it is tried once more unsigned, for public
buckets; a store that succeeded unsigned stays unsigned for reads.

Downloads stream in 1 MiB chunks into a temporary file beside the destination.  Uploads
stream: :meth:`S3Store.put_stream` buffers one part (``part_size``, 8 MiB by default) at
a time and sends it as a multipart upload part, or as one ``PutObject`` when the whole
object fits in one part, so an archive is never held in memory or on disk whole.  Each
operation is retried with backoff on transient errors (and botocore's own retries).

boto3 is imported on first use, so a runner that never sees an ``s3://`` URL does not pay
for it.
"""
from __future__ import annotations

import builtins
import contextlib
import io
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from ..errors import StorageError
from . import base
from .base import (CHUNK_SIZE, ObjectInfo, ObjectMissing, PermanentStorageError, Store,
                   atomic_destination, retrying, split_url)

log = logging.getLogger(__name__)

_AWS_HOST = re.compile(
    r"^s3(?:[.-]dualstack)?(?:[.-](?P<region>[a-z]{2}(?:-gov)?-[a-z]+-\d+|external-1))?"
    r"\.amazonaws\.com(?:\.cn)?$", re.IGNORECASE)
_MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_REFUSED_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                  "ExpiredToken", "InvalidToken", "AllAccessDisabled", "Forbidden"}
_PERMANENT_STATUS = {400, 401, 403, 405, 411, 413}
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Target:
    """Where one ``s3://`` URL points.

    ``endpoint_url`` is ``None`` for AWS's default endpoint; ``region`` is the region a
    host named (``None`` when it names none); ``root`` is the URL without its key
    (``s3://host/bucket``), used to name listed objects.
    """

    endpoint_url: str | None
    region: str | None
    bucket: str
    key: str
    root: str


def _is_host(component: str) -> bool:
    return ":" in component or "." in component or component.lower() == "localhost"


def _aws_region(host: str) -> tuple[bool, str | None]:
    """(is an AWS S3 host, region it names or None)."""
    match = _AWS_HOST.match(host.split(":", 1)[0])
    if not match:
        return False, None
    region = match.group("region")
    if region in (None, "external-1"):
        region = DEFAULT_REGION
    return True, region


def _tls_configured() -> bool:
    settings = base.SETTINGS
    return bool(settings.s3_ca or settings.s3_cert or settings.s3_key)


def parse_s3_url(url: str, storage_config: dict | None = None) -> S3Target:
    """The endpoint, region, bucket and key of ``url`` (module doc gives the rules).

    Raises :class:`StorageError` for another scheme or a URL without a bucket.
    """
    scheme, rest = split_url(url)
    if scheme != "s3":
        raise StorageError(f"not an s3:// URL: {url!r}")
    first, _, remainder = rest.partition("/")
    if _is_host(first):
        host: str | None = first
        bucket, _, key = remainder.partition("/")
        root = f"s3://{first}/{bucket}"
    else:
        host, bucket, key = None, first, remainder
        root = f"s3://{bucket}"
    if not bucket:
        raise StorageError(f"s3 URL has no bucket: {url!r}")
    endpoint = (storage_config or {}).get("endpoint") if isinstance(storage_config, dict) else None
    if isinstance(endpoint, str) and endpoint.strip():
        endpoint = endpoint.strip().rstrip("/")
    else:
        endpoint = host
    if endpoint is None:
        return S3Target(None, None, bucket, key, root)
    if "://" in endpoint:
        endpoint_scheme, endpoint_host = endpoint.split("://", 1)
        if endpoint_scheme.lower() not in ("http", "https"):
            raise StorageError(f"S3 endpoint must be http:// or https://: {endpoint!r}")
        _, region = _aws_region(endpoint_host.split("/", 1)[0])
        return S3Target(endpoint, region, bucket, key, root)
    is_aws, region = _aws_region(endpoint)
    secure = is_aws or _tls_configured()
    return S3Target(f"{'https' if secure else 'http'}://{endpoint}", region, bucket, key, root)


@dataclass(frozen=True)
class AwsCredentials:
    """One set of AWS credentials and where they came from (``artifact``, ``storage``,
    ``config.env`` or ``runner``; the last has no keys: boto3's default chain)."""

    source: str
    access_key: str = ""
    secret_key: str = ""
    session_token: str = ""
    region: str = ""


def _first(mapping: dict, *names: str) -> str:
    for name in names:
        value = mapping.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _from_map(source: str, aws) -> AwsCredentials | None:
    if not isinstance(aws, dict):
        return None
    access = _first(aws, "access_key", "aws_access_key_id", "access_key_id", "AWS_ACCESS_KEY_ID")
    secret = _first(aws, "secret_access_key", "aws_secret_access_key", "secret_key",
                    "AWS_SECRET_ACCESS_KEY")
    if not (access and secret):
        return None
    return AwsCredentials(source, access, secret,
                          _first(aws, "session_token", "aws_session_token", "AWS_SESSION_TOKEN"),
                          _first(aws, "region", "AWS_DEFAULT_REGION", "AWS_REGION"))


def resolve_credentials(credentials: dict | None, storage_config: dict | None,
                        env: dict | None) -> AwsCredentials:
    """The credentials an S3 request should sign with (precedence in the module doc)."""
    found = _from_map("artifact", (credentials or {}).get("aws") if isinstance(credentials, dict) else None)
    if found:
        return found
    storage_credentials = (storage_config or {}).get("credentials") if isinstance(storage_config, dict) else None
    if isinstance(storage_credentials, dict):
        found = _from_map("storage", storage_credentials.get("aws"))
        if found:
            return found
    found = _from_map("config.env", env if isinstance(env, dict) else None)
    if found:
        return found
    region = _first(env, "AWS_DEFAULT_REGION", "AWS_REGION") if isinstance(env, dict) else ""
    return AwsCredentials("runner", region=region)


# ------------------------------------------------------------------------- clients

_CLIENTS: OrderedDict[tuple, object] = OrderedDict()
_CLIENTS_LOCK = threading.Lock()
_CLIENTS_MAX = 32


def _client(endpoint_url: str | None, region: str, creds: AwsCredentials, signed: bool):
    """A cached boto3 S3 client (clients are thread-safe; building one costs ~50 ms)."""
    settings = base.SETTINGS
    runner_env = (os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_PROFILE", ""))
    key = (endpoint_url, region, creds, signed, settings.s3_ca, settings.s3_cert,
           settings.s3_key, runner_env if creds.source == "runner" else None)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is not None:
            _CLIENTS.move_to_end(key)
            return client
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config as BotoConfig

        options = dict(signature_version="s3v4" if signed else UNSIGNED,
                       s3={"addressing_style": "path"},
                       retries={"max_attempts": 3, "mode": "standard"},
                       connect_timeout=5, read_timeout=60, max_pool_connections=32)
        with contextlib.suppress(TypeError):  # botocore >= 1.36 only
            BotoConfig(request_checksum_calculation="when_required")
            options.update(request_checksum_calculation="when_required",
                           response_checksum_validation="when_required")
        if settings.s3_cert:
            options["client_cert"] = ((settings.s3_cert, settings.s3_key) if settings.s3_key
                                      else settings.s3_cert)
        if creds.source == "runner":
            session = boto3.session.Session()
        else:
            session = boto3.session.Session(aws_access_key_id=creds.access_key,
                                            aws_secret_access_key=creds.secret_key,
                                            aws_session_token=creds.session_token or None)
        client = session.client("s3", endpoint_url=endpoint_url, region_name=region,
                                config=BotoConfig(**options),
                                verify=settings.s3_ca or None)
        _CLIENTS[key] = client
        while len(_CLIENTS) > _CLIENTS_MAX:
            _CLIENTS.popitem(last=False)
        return client


def _error_code(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code") or "")
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return code, status


def _refused(exc: BaseException) -> bool:
    """A signed read was refused in a way an anonymous read might not be."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return True
    if isinstance(exc, ClientError):
        code, status = _error_code(exc)
        return code in _REFUSED_CODES or status == 403
    return False


def _translate(exc: BaseException, url: str, what: str, *, reading: bool) -> StorageError:
    """A runner StorageError for a boto3/botocore exception."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, ClientError):
        code, status = _error_code(exc)
        message = f"cannot {what} {url}: {code or status} {exc}"
        if code == "NoSuchBucket":  # no retry creates the bucket: the request's fault
            return PermanentStorageError(message)
        if reading and (code in _MISSING_CODES or status == 404):
            return ObjectMissing(url)
        if status in _PERMANENT_STATUS or code in _REFUSED_CODES:
            return PermanentStorageError(message)
        return StorageError(message)
    if isinstance(exc, NoCredentialsError):
        return PermanentStorageError(f"cannot {what} {url}: no AWS credentials found")
    if isinstance(exc, (BotoCoreError, OSError, ValueError)):
        return StorageError(f"cannot {what} {url}: {type(exc).__name__}: {exc}")
    raise exc


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, StorageError) and not isinstance(
        exc, (PermanentStorageError, ObjectMissing))


# ------------------------------------------------------------------------- uploads

class _ChunksReader(io.RawIOBase):
    """A seekable read-only file over a list of byte strings (a part, without joining
    them into one more copy)."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks
        self.size = sum(len(c) for c in chunks)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base_pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, min(self.size, base_pos + offset))
        return self.pos

    def readinto(self, target) -> int:
        view = memoryview(target).cast("B")
        done, offset = 0, 0
        for chunk in self.chunks:
            if done >= len(view):
                break
            end = offset + len(chunk)
            if end > self.pos + done:
                start = self.pos + done - offset
                n = min(len(chunk) - start, len(view) - done)
                view[done:done + n] = chunk[start:start + n]
                done += n
            offset = end
        self.pos += done
        return done

    def __len__(self) -> int:
        return self.size


class _MultipartWriter:
    """A write-only file object that uploads what it is given, one part at a time.

    Holds the part being filled plus at most ``in_flight`` parts being sent (each sent on
    a small thread pool while the producer keeps packing).  Objects smaller than one part
    go up as one ``PutObject``.  :meth:`finish` completes the upload; :meth:`abort` drops
    it.
    """

    def __init__(self, client, bucket: str, key: str, url: str, part_size: int,
                 in_flight: int = 1):
        self.client, self.bucket, self.key, self.url = client, bucket, key, url
        self.part_size = max(5 * 1024 * 1024, part_size)
        self.in_flight = max(1, in_flight)
        self.buffer: list[bytes] = []  # the part being filled
        self.buffered = 0
        self.upload_id: str | None = None
        self.parts: list[dict] = []
        self.pending: list = []  # futures of parts being sent, oldest first
        self.pool: Any = None  # a ThreadPoolExecutor once the multipart upload has begun
        self.number = 0  # of the last part handed to the pool
        self.size = 0
        self.etag = ""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        while view:
            room = self.part_size - self.buffered
            piece = bytes(view[:room])  # the caller may reuse its buffer
            self.buffer.append(piece)
            self.buffered += len(piece)
            view = view[room:]
            if self.buffered >= self.part_size:
                self._send_part()
        self.size += n
        return n

    def flush(self) -> None:
        pass

    def _call(self, what: str, fn, **kwargs):
        def once():
            try:
                return fn(**kwargs)
            except Exception as exc:
                raise _translate(exc, self.url, what, reading=False) from exc
        return retrying(once, f"{what} of {self.url}", transient=_transient)

    def _send_part(self) -> None:
        part = _ChunksReader(self.buffer)
        self.buffer, self.buffered = [], 0
        if self.upload_id is None:
            reply = self._call("start a multipart upload to", self.client.create_multipart_upload,
                               Bucket=self.bucket, Key=self.key)
            self.upload_id = reply["UploadId"]
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=self.in_flight,
                                           thread_name_prefix="s3-part")
        self.number += 1
        number = self.number
        while len(self.pending) >= self.in_flight:
            self._collect(self.pending.pop(0))
        self.pending.append(self.pool.submit(
            self._call, f"upload part {number} to", self.client.upload_part,
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number,
            Body=part))
        self.pending[-1].number = number

    def _collect(self, future) -> None:
        reply = future.result()
        self.parts.append({"PartNumber": future.number, "ETag": reply["ETag"]})

    def _drain(self) -> None:
        try:
            while self.pending:
                self._collect(self.pending.pop(0))
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None

    def finish(self) -> None:
        if self.upload_id is None:
            reply = self._call("upload", self.client.put_object, Bucket=self.bucket,
                               Key=self.key, Body=_ChunksReader(self.buffer))
            self.buffer, self.buffered = [], 0
        else:
            if self.buffer:
                self._send_part()
            self._drain()
            parts = sorted(self.parts, key=lambda part: part["PartNumber"])
            reply = self._call("complete the upload to", self.client.complete_multipart_upload,
                               Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                               MultipartUpload={"Parts": parts})
        self.etag = str(reply.get("ETag") or "").strip('"')

    def abort(self) -> None:
        self.buffer, self.buffered = [], 0
        for future in self.pending:
            future.cancel()
        self.pending = []
        try:
            self._drain()
        except Exception:
            pass
        if self.upload_id is not None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key,
                                                   UploadId=self.upload_id)
            except Exception as exc:  # the server may be the reason we are aborting
                log.warning("could not abort multipart upload to %s: %s", self.url, exc)


# ------------------------------------------------------------------------- the store

class S3Store(Store):
    """S3 (AWS, MinIO, Ceph, moto) through boto3; see the module doc for the rules."""

    scheme = "s3"

    def __init__(self, credentials: dict | None = None, storage_config: dict | None = None,
                 env: dict | None = None):
        self.storage_config = storage_config if isinstance(storage_config, dict) else {}
        self.credentials = resolve_credentials(credentials, storage_config, env)
        self.env = env if isinstance(env, dict) else {}
        self.anonymous = False

    @classmethod
    def from_url(cls, url: str, *, credentials: dict | None = None,
                 storage_config: dict | None = None, env: dict | None = None) -> S3Store:
        parse_s3_url(url, storage_config)  # refuse a malformed URL now
        return cls(credentials, storage_config, env)

    # -- plumbing
    def target(self, url: str) -> S3Target:
        return parse_s3_url(url, self.storage_config)

    def region_for(self, target: S3Target) -> str:
        return (target.region or self.credentials.region
                or _first(self.storage_config, "region")
                or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
                or DEFAULT_REGION)

    def client(self, target: S3Target, signed: bool = True):
        return _client(target.endpoint_url, self.region_for(target), self.credentials, signed)

    def _read(self, url: str, what: str, call: Callable):
        """``call(client, target)`` signed, then unsigned when refused (public buckets)."""
        target = self.target(url)

        def once():
            if not self.anonymous:
                try:
                    return call(self.client(target, signed=True), target)
                except Exception as exc:
                    if not _refused(exc):
                        raise _translate(exc, url, what, reading=True) from exc
                    signed_error = exc
                try:
                    result = call(self.client(target, signed=False), target)
                except Exception as exc:
                    log.debug("anonymous %s of %s failed too: %s", what, url, exc)
                    anonymous_error = _translate(exc, url, what, reading=True)
                    if isinstance(anonymous_error, ObjectMissing):
                        raise anonymous_error from exc
                    raise _translate(signed_error, url, what, reading=True) from signed_error
                log.info("%s refused signed requests (%s); reading it anonymously",
                         url, _error_code(signed_error)[0] or type(signed_error).__name__)
                self.anonymous = True
                return result
            try:
                return call(self.client(target, signed=False), target)
            except Exception as exc:
                raise _translate(exc, url, what, reading=True) from exc

        return retrying(once, f"{what} {url}", transient=_transient)

    # -- Store
    def stat(self, url: str) -> ObjectInfo | None:
        def head(client, target):
            reply = client.head_object(Bucket=target.bucket, Key=target.key)
            return ObjectInfo(url=url, size=int(reply.get("ContentLength") or 0),
                              etag=str(reply.get("ETag") or "").strip('"'),
                              mtime=reply["LastModified"].timestamp()
                              if reply.get("LastModified") else 0.0)
        try:
            return self._read(url, "stat", head)
        except ObjectMissing:
            return None

    def get(self, url: str, dest: Path) -> ObjectInfo:
        dest = Path(dest)

        def download(client, target):
            with atomic_destination(dest) as tmp:
                reply = client.get_object(Bucket=target.bucket, Key=target.key)
                body = reply["Body"]
                copied = 0
                try:
                    with open(tmp, "wb") as out:
                        for chunk in body.iter_chunks(CHUNK_SIZE):
                            out.write(chunk)
                            copied += len(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                finally:
                    body.close()
                expected = int(reply.get("ContentLength") or 0)
                if copied != expected:
                    raise StorageError(f"download of {url} truncated: {copied} of {expected} bytes")
            return ObjectInfo(url=url, size=copied, etag=str(reply.get("ETag") or "").strip('"'),
                              mtime=reply["LastModified"].timestamp()
                              if reply.get("LastModified") else 0.0)
        return self._read(url, "download", download)

    def put(self, url: str, src: Path) -> ObjectInfo:
        return self.put_file_by_stream(url, src)

    def put_stream(self, url: str, fill: Callable[[BinaryIO], object]) -> ObjectInfo:
        target = self.target(url)
        if not target.key or target.key.endswith("/"):
            raise StorageError(f"s3 URL names no object: {url!r}")
        client = self.client(target)
        writer = _MultipartWriter(client, target.bucket, target.key, url, base.SETTINGS.part_size,
                                  base.SETTINGS.parts_in_flight)
        try:
            fill(writer)  # type: ignore[arg-type]
            writer.finish()
        except BaseException as exc:
            writer.abort()
            if isinstance(exc, StorageError) or not isinstance(exc, Exception):
                raise
            raise _translate(exc, url, "upload", reading=False) from exc
        return ObjectInfo(url=url, size=writer.size, etag=writer.etag, mtime=time.time())

    def put_bytes(self, url: str, data: bytes) -> ObjectInfo:
        return self.put_stream(url, lambda out: out.write(data))

    def existing(self, urls: builtins.list[str]) -> set[str] | None:
        """One ``ListObjectsV2`` of the folder (``Delimiter=/``) when every URL is an object
        of one folder of one bucket; else None."""
        if not urls:
            return set()
        targets = {url: self.target(url) for url in urls}
        # The folder is the key up to and with its last "/" ("" at the bucket's root; "/"
        # for "/name", whose listing with Delimiter=/ must start there to show it).
        folders = {(t.endpoint_url, t.bucket, t.key[:t.key.rfind("/") + 1])
                   for t in targets.values()}
        if len(folders) != 1:
            return None
        prefix = folders.pop()[2]

        def listing(client, target):
            keys: set[str] = set()
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=target.bucket, Prefix=prefix, Delimiter="/"):
                keys.update(item["Key"] for item in page.get("Contents") or [])
            return keys

        keys = self._read(urls[0], "list", listing)
        return {url for url, target in targets.items() if target.key in keys}

    def list(self, prefix_url: str) -> list[str]:
        return [info.url for info in self.list_info(prefix_url)]

    def list_info(self, prefix_url: str) -> builtins.list[ObjectInfo]:
        def listing(client, target):
            found = []
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=target.bucket, Prefix=target.key):
                for item in page.get("Contents") or []:
                    modified = item.get("LastModified")
                    found.append(ObjectInfo(url=f"{target.root}/{item['Key']}",
                                            size=int(item.get("Size") or 0),
                                            etag=str(item.get("ETag") or "").strip('"'),
                                            mtime=modified.timestamp() if modified else 0.0))
            return found
        try:
            return sorted(self._read(prefix_url, "list", listing), key=lambda info: info.url)
        except ObjectMissing:
            return []
