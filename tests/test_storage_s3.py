"""The S3 back end against a real S3 endpoint (``moto_server`` on loopback).

URL/endpoint/region rules are a table; credential precedence is checked with moto
enforcing signatures and IAM policies; a public bucket is read anonymously; a bucket that
refuses signed requests is read by the anonymous retry; uploads stream as multipart.
"""
from __future__ import annotations

import http.server
import json
import os
import threading
import uuid
from pathlib import Path

import pytest

from runner.errors import StorageError
from runner.storage import ObjectMissing, PermanentStorageError, S3Store, open_store
from runner.storage import base as storage_base
from runner.storage.s3 import parse_s3_url, resolve_credentials

from .support import TEST_AWS, MotoServer, short_tempdir


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch):
    """The runner's own credentials for the plain moto server (it accepts any)."""
    for name, value in TEST_AWS.items():
        monkeypatch.setenv(name, value)


# ------------------------------------------------------------------------ URL rules

@pytest.mark.parametrize("url, storage, tls, expected", [
    # MinIO/moto style: host:port first, path style, plain HTTP
    ("s3://127.0.0.1:9000/bkt/a/b.tar", None, False,
     ("http://127.0.0.1:9000", None, "bkt", "a/b.tar", "s3://127.0.0.1:9000/bkt")),
    ("s3://minio.local/bkt/k", None, False, ("http://minio.local", None, "bkt", "k", "s3://minio.local/bkt")),
    ("s3://localhost/bkt/k", None, False, ("http://localhost", None, "bkt", "k", "s3://localhost/bkt")),
    # any TLS option turns non-AWS hosts to https
    ("s3://minio.local:9000/bkt/k", None, True, ("https://minio.local:9000", None, "bkt", "k", "s3://minio.local:9000/bkt")),
    # AWS hosts: TLS, region from the host
    ("s3://s3.amazonaws.com/bkt/k", None, False, ("https://s3.amazonaws.com", "us-east-1", "bkt", "k", "s3://s3.amazonaws.com/bkt")),
    ("s3://s3.eu-west-1.amazonaws.com/bkt/k", None, False,
     ("https://s3.eu-west-1.amazonaws.com", "eu-west-1", "bkt", "k", "s3://s3.eu-west-1.amazonaws.com/bkt")),
    ("s3://s3-us-west-2.amazonaws.com/bkt/x/y", None, False,
     ("https://s3-us-west-2.amazonaws.com", "us-west-2", "bkt", "x/y", "s3://s3-us-west-2.amazonaws.com/bkt")),
    ("s3://s3.cn-north-1.amazonaws.com.cn/bkt/k", None, False,
     ("https://s3.cn-north-1.amazonaws.com.cn", "cn-north-1", "bkt", "k", "s3://s3.cn-north-1.amazonaws.com.cn/bkt")),
    # config.storage.endpoint wins over the URL's host
    ("s3://s3.eu-west-1.amazonaws.com/bkt/k", {"endpoint": "http://10.1.2.3:9000"}, False,
     ("http://10.1.2.3:9000", None, "bkt", "k", "s3://s3.eu-west-1.amazonaws.com/bkt")),
    ("s3://old-host:9000/bkt/k", {"endpoint": "new-host:9001"}, False,
     ("http://new-host:9001", None, "bkt", "k", "s3://old-host:9000/bkt")),
    ("s3://old-host:9000/bkt/k", {"endpoint": "s3.ap-south-1.amazonaws.com"}, False,
     ("https://s3.ap-south-1.amazonaws.com", "ap-south-1", "bkt", "k", "s3://old-host:9000/bkt")),
    # bucket-first form: AWS default endpoint, or config.storage.endpoint
    ("s3://bkt/a/k.tar", None, False, (None, None, "bkt", "a/k.tar", "s3://bkt")),
    ("s3://bkt/k", {"endpoint": "https://minio.example:443"}, False,
     ("https://minio.example:443", None, "bkt", "k", "s3://bkt")),
])
def test_url_endpoint_and_region_rules(url, storage, tls, expected, monkeypatch):
    monkeypatch.setattr(storage_base, "SETTINGS",
                        storage_base.StorageSettings(s3_ca="/ca.pem" if tls else ""))
    target = parse_s3_url(url, storage)
    assert (target.endpoint_url, target.region, target.bucket, target.key, target.root) == expected


@pytest.mark.parametrize("url", ["s3://", "s3://host:9000/", "gs://bkt/k"])
def test_bad_s3_urls(url):
    with pytest.raises(StorageError):
        parse_s3_url(url)


def test_region_comes_from_host_then_credentials_then_environment(monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "sa-east-1")
    aws = {"aws": {"access_key": "a", "secret_access_key": "s", "region": "eu-north-1"}}
    store = S3Store(aws)
    assert store.region_for(store.target("s3://s3.us-west-1.amazonaws.com/b/k")) == "us-west-1"
    assert store.region_for(store.target("s3://minio:9000/b/k")) == "eu-north-1"
    assert S3Store().region_for(store.target("s3://minio:9000/b/k")) == "sa-east-1"


def test_credential_precedence_table():
    artifact = {"aws": {"access_key": "A", "secret_access_key": "As", "session_token": "At"}}
    storage = {"credentials": {"aws": {"access_key": "S", "secret_access_key": "Ss"}}}
    env = {"AWS_ACCESS_KEY_ID": "E", "AWS_SECRET_ACCESS_KEY": "Es"}
    assert resolve_credentials(artifact, storage, env).access_key == "A"
    assert resolve_credentials(artifact, storage, env).session_token == "At"
    assert resolve_credentials(None, storage, env).source == "storage"
    assert resolve_credentials({"aws": {"access_key": "half"}}, None, env).access_key == "E"
    assert resolve_credentials(None, None, env).source == "config.env"
    assert resolve_credentials(None, None, {"AWS_ACCESS_KEY_ID": "only-id"}).source == "runner"
    assert resolve_credentials(None, None, None).source == "runner"


# ------------------------------------------------------------------------ against moto

@pytest.fixture()
def bucket(moto):
    return moto.create_bucket()


def test_round_trip_stat_get_list_and_missing(moto, bucket, tmp_path):
    url = f"{moto.root_url(bucket)}/experiments/x/modeldir.tar"
    store = open_store(url)
    assert store.stat(url) is None  # a missing mutable object is not an error
    with pytest.raises(ObjectMissing):
        store.get(url, tmp_path / "nothing")
    assert list(tmp_path.iterdir()) == []
    info = store.put_bytes(url, b"hello world")
    stat = store.stat(url)
    assert stat.size == 11 and stat.etag == info.etag and stat.etag
    got = store.get(url, tmp_path / "deep" / "copy")
    assert (tmp_path / "deep" / "copy").read_bytes() == b"hello world"
    assert got.etag == stat.etag and got.size == 11
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["copy"]  # no partial left
    store.put_bytes(f"{moto.root_url(bucket)}/experiments/x/_metadata/a.log", b"a")
    store.put_bytes(f"{moto.root_url(bucket)}/experiments/xy/other.tar", b"b")
    assert store.list(f"{moto.root_url(bucket)}/experiments/x/") == [
        f"{moto.root_url(bucket)}/experiments/x/_metadata/a.log", url]
    with pytest.raises(PermanentStorageError, match="NoSuchBucket"):  # retrying cannot help
        store.get(f"{moto.root_url('no-such-bucket')}/k", tmp_path / "nb")
    with pytest.raises(PermanentStorageError, match="NoSuchBucket"):
        store.put_bytes(f"{moto.root_url('no-such-bucket')}/k", b"x")


def test_streamed_upload_is_multipart_and_holds_one_part(moto, bucket, monkeypatch):
    monkeypatch.setattr(storage_base, "SETTINGS",
                        storage_base.StorageSettings(part_size=5 * 1024 * 1024))
    url = f"{moto.root_url(bucket)}/big.bin"
    block = os.urandom(1024 * 1024)
    writes = []

    def fill(out):
        for _ in range(12):  # 12 MiB in 1 MiB writes: three parts of 5, 5 and 2 MiB
            out.write(block)
            writes.append(out.buffered)
    info = S3Store().put_stream(url, fill)
    assert info.size == 12 * 1024 * 1024
    assert max(writes) < 5 * 1024 * 1024  # never more than one part buffered
    head = moto.client().head_object(Bucket=bucket, Key="big.bin")
    assert head["ContentLength"] == 12 * 1024 * 1024
    assert head["ETag"].strip('"').endswith("-3"), "a three-part multipart upload"
    body = moto.client().get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert body == block * 12


def test_failed_streamed_upload_leaves_no_object(moto, bucket, monkeypatch):
    monkeypatch.setattr(storage_base, "SETTINGS",
                        storage_base.StorageSettings(part_size=5 * 1024 * 1024))
    url = f"{moto.root_url(bucket)}/broken.tar"

    def fill(out):
        out.write(b"x" * (6 * 1024 * 1024))
        raise StorageError("the packer failed")
    with pytest.raises(StorageError, match="packer"):
        S3Store().put_stream(url, fill)
    assert S3Store().stat(url) is None
    uploads = moto.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == [], "the multipart upload was aborted"


def test_unreachable_endpoint_is_a_transient_storage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(storage_base, "SETTINGS",
                        storage_base.StorageSettings(tries=2, backoff=0.01))
    url = "s3://127.0.0.1:9/bkt/k"  # discard port: nothing listens
    with pytest.raises(StorageError) as info:
        S3Store().get(url, tmp_path / "x")
    assert not isinstance(info.value, (PermanentStorageError, ObjectMissing))


def test_public_object_is_read_anonymously_without_any_credentials(moto, bucket, tmp_path,
                                                                   monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    moto.client().put_object(Bucket=bucket, Key="public.tar", Body=b"public bytes",
                             ACL="public-read")
    moto.client().put_object(Bucket=bucket, Key="private.tar", Body=b"secret")
    store = S3Store()
    url = f"{moto.root_url(bucket)}/public.tar"
    assert store.stat(url).size == 12
    store.get(url, tmp_path / "public")
    assert (tmp_path / "public").read_bytes() == b"public bytes"
    assert store.anonymous
    with pytest.raises(StorageError) as denied:
        S3Store().get(f"{moto.root_url(bucket)}/private.tar", tmp_path / "private")
    assert not isinstance(denied.value, ObjectMissing)
    assert not (tmp_path / "private").exists()


class _SignedRefusingBucket(http.server.BaseHTTPRequestHandler):
    """A bucket whose policy refuses signed requests from outside accounts (403
    AccessDenied) but serves everyone anonymously, as AWS does for such public data."""

    body = b"open data"

    def _refuse(self) -> bool:
        if "Authorization" in self.headers:
            payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                       b"<Message>Access Denied</Message></Error>")
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload) if self.command == "GET" else 0))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(payload)
            return True
        return False

    def _headers(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.send_header("Last-Modified", "Wed, 01 Jan 2025 00:00:00 GMT")
        self.end_headers()

    def do_HEAD(self):  # noqa: N802
        if not self._refuse():
            self._headers()

    def do_GET(self):  # noqa: N802
        if not self._refuse():
            self._headers()
            self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_bucket_refusing_signed_requests_is_read_by_the_anonymous_retry(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SignedRefusingBucket)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"s3://127.0.0.1:{server.server_address[1]}/open-bucket/data.bin"
        store = S3Store({"aws": {"access_key": "mine", "secret_access_key": "not-theirs"}})
        assert store.stat(url).size == len(_SignedRefusingBucket.body)
        store.get(url, tmp_path / "data")
        assert (tmp_path / "data").read_bytes() == _SignedRefusingBucket.body
        assert store.anonymous
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------ credential precedence

@pytest.fixture(scope="module")
def iam_moto():
    """A moto server that checks signatures and IAM policies, with three users, each
    allowed into its own bucket only, and a fourth that may only read its bucket's objects
    (no listing)."""
    server = MotoServer(short_tempdir("motoiam")).start()
    iam = __import__("boto3").client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                                     aws_access_key_id="x", aws_secret_access_key="y")
    users = {}
    for name in ("artifact", "envcfg", "runner", "reader"):
        bucket = f"{name}-{uuid.uuid4().hex[:6]}"
        server.create_bucket(bucket)
        iam.create_user(UserName=name)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "s3:*",
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}
        if name == "reader":
            policy["Statement"][0].update(Action="s3:GetObject", Resource=f"arn:aws:s3:::{bucket}/*")
        iam.put_user_policy(UserName=name, PolicyName="own", PolicyDocument=json.dumps(policy))
        server.client().put_object(Bucket=bucket, Key="obj", Body=name.encode())
        users[name] = (bucket, key["AccessKeyId"], key["SecretAccessKey"])
    server.set_auth(True)
    yield server, users
    server.stop()


def _readable(store: S3Store, server: MotoServer, bucket: str, tmp: Path) -> bool:
    url = f"{server.root_url(bucket)}/obj"
    try:
        store.get(url, tmp / uuid.uuid4().hex)
        return True
    except StorageError:
        return False


@pytest.mark.integration
def test_credential_precedence_against_an_endpoint_that_checks_them(iam_moto, tmp_path,
                                                                     monkeypatch):
    server, users = iam_moto
    monkeypatch.setattr(storage_base, "SETTINGS", storage_base.StorageSettings(tries=1))
    (art_bucket, art_id, art_secret) = users["artifact"]
    (env_bucket, env_id, env_secret) = users["envcfg"]
    (run_bucket, run_id, run_secret) = users["runner"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", run_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", run_secret)
    artifact = {"aws": {"access_key": art_id, "secret_access_key": art_secret}}
    env = {"AWS_ACCESS_KEY_ID": env_id, "AWS_SECRET_ACCESS_KEY": env_secret}

    # the artifact's own credentials win over config.env and the runner's environment
    store = open_store(f"{server.root_url(art_bucket)}/obj", credentials=artifact, env=env)
    assert store.credentials.source == "artifact"
    assert _readable(store, server, art_bucket, tmp_path)
    assert not _readable(store, server, env_bucket, tmp_path)
    assert not _readable(store, server, run_bucket, tmp_path)

    # then config.env's AWS variables win over the runner's environment
    store = open_store(f"{server.root_url(env_bucket)}/obj", env=env)
    assert store.credentials.source == "config.env"
    assert _readable(store, server, env_bucket, tmp_path)
    assert not _readable(store, server, run_bucket, tmp_path)

    # then the runner's own environment
    store = open_store(f"{server.root_url(run_bucket)}/obj", env={})
    assert store.credentials.source == "runner"
    assert _readable(store, server, run_bucket, tmp_path)
    assert not _readable(store, server, art_bucket, tmp_path)

    # a refused write is permanent (not retried for minutes)
    with pytest.raises(PermanentStorageError):
        open_store(f"{server.root_url(art_bucket)}/new", env={}).put_bytes(
            f"{server.root_url(art_bucket)}/new", b"x")


# ------------------------------------------------------------------------ which objects exist

def test_existing_tells_which_objects_of_one_folder_exist_in_one_listing(moto, bucket):
    root = moto.root_url(bucket)
    store = open_store(f"{root}/x")
    store.put_bytes(f"{root}/experiments/k/modeldir.tar", b"m")
    store.put_bytes(f"{root}/experiments/k/_metadata/output-host-a.log", b"o")
    store.put_bytes(f"{root}/experiments/k2/output.tar", b"a sibling folder's")
    urls = [f"{root}/experiments/k/{name}" for name in ("modeldir.tar", "output.tar", "_metadata")]
    assert store.existing(urls) == {urls[0]}
    assert store.existing([urls[0], f"{root}/experiments/k2/output.tar"]) is None, "two folders"
    assert store.existing([]) == set()
    for folder in ("/", "", "e//"):  # "s3://b//a.tar", keys at the root, a doubled slash
        first, second = f"{root}/{folder}a.tar", f"{root}/{folder}b.tar"
        store.put_bytes(first, b"a")
        assert store.existing([first, second]) == {first}, folder
    from runner.roles.cache_manager import absent_of

    assert absent_of([(url, store) for url in urls]) == set(urls[1:])


@pytest.mark.integration
def test_a_refused_listing_tells_nothing_absent(iam_moto, monkeypatch, tmp_path):
    """Credentials that may read objects but not list them: every artifact is asked for."""
    from runner.roles.cache_manager import absent_of

    server, users = iam_moto
    monkeypatch.setattr(storage_base, "SETTINGS", storage_base.StorageSettings(tries=1))
    bucket, key_id, secret = users["reader"]
    credentials = {"aws": {"access_key": key_id, "secret_access_key": secret}}
    urls = [f"{server.root_url(bucket)}/obj", f"{server.root_url(bucket)}/missing"]
    store = open_store(urls[0], credentials=credentials, env={})
    with pytest.raises(StorageError):
        store.existing(urls)
    assert absent_of([(url, store) for url in urls]) == set()
    assert _readable(store, server, bucket, tmp_path)
