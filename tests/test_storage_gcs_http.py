"""The GCS back end against ``gcp-storage-emulator``, and read-only http(s) artifacts
against a local HTTP server."""
from __future__ import annotations

import functools
import http.server
import json
import os
import threading

import pytest

from runner.errors import StorageError
from runner.storage import GcsStore, HttpStore, ObjectMissing, PermanentStorageError, open_store
from runner.storage import base as storage_base
from runner.storage.gcs import parse_gs_url, resolve_gcp_credentials


# ------------------------------------------------------------------------ GCS

def test_gs_urls():
    assert parse_gs_url("gs://bkt/a/b.tar") == ("bkt", "a/b.tar")
    assert parse_gs_url("gs://bkt") == ("bkt", "")
    for bad in ("gs:///k", "s3://b/k"):
        with pytest.raises(StorageError):
            parse_gs_url(bad)


def _service_account(project: str = "proj-a") -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {"type": "service_account", "project_id": project, "private_key_id": "1",
            "private_key": pem, "client_email": f"runner@{project}.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}


def test_gcp_credential_precedence(tmp_path):
    document = _service_account("from-artifact")
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(_service_account("from-file")))
    chosen = resolve_gcp_credentials({"gcp": document}, {"GOOGLE_APPLICATION_CREDENTIALS": str(path)},
                                     environ={"GOOGLE_APPLICATION_CREDENTIALS": str(path)})
    assert (chosen.source, chosen.project) == ("artifact", "from-artifact")
    chosen = resolve_gcp_credentials({"gcp": json.dumps(document)}, None, environ={})
    assert chosen.source == "artifact"
    chosen = resolve_gcp_credentials(None, None, environ={"GOOGLE_APPLICATION_CREDENTIALS": str(path)})
    assert (chosen.source, chosen.path, chosen.project) == ("file", str(path), "from-file")
    chosen = resolve_gcp_credentials({"aws": {}}, {"GOOGLE_APPLICATION_CREDENTIALS": str(path)},
                                     environ={})
    assert chosen.source == "file"
    assert resolve_gcp_credentials(None, None, environ={}).source == "default"
    assert resolve_gcp_credentials(
        None, None, environ={"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "gone")}).source == "default"


def test_artifact_service_account_builds_a_signed_client(monkeypatch):
    from runner.storage import gcs as gcs_module

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    creds = resolve_gcp_credentials({"gcp": _service_account("sa-project")}, None, environ={})
    client = gcs_module._client(creds)  # builds without any network access
    assert client.project == "sa-project"
    assert client._credentials.service_account_email == "runner@sa-project.iam.gserviceaccount.com"


def test_gcs_round_trip_against_the_emulator(gcs_env, tmp_path, monkeypatch):
    monkeypatch.setattr(storage_base, "SETTINGS",
                        storage_base.StorageSettings(part_size=256 * 1024))
    bucket = gcs_env.create_bucket()
    url = f"gs://{bucket}/experiments/x/modeldir.tar"
    store = open_store(url)
    assert isinstance(store, GcsStore)
    assert store.stat(url) is None
    with pytest.raises(ObjectMissing):
        store.get(url, tmp_path / "none")
    data = os.urandom(1024 * 1024 + 17)  # several resumable chunks
    info = store.put_stream(url, lambda out: [out.write(data[i:i + 65536])
                                              for i in range(0, len(data), 65536)])
    assert info.size == len(data)
    stat = store.stat(url)
    assert stat.size == len(data) and stat.etag  # the generation
    got = store.get(url, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == data and got.etag == stat.etag
    store.put_bytes(url, b"second")  # a rewrite gets a new generation
    assert store.stat(url).etag != stat.etag
    store.put_bytes(f"gs://{bucket}/experiments/x/_metadata/a.log", b"a")
    store.put_bytes(f"gs://{bucket}/experiments/xy.tar", b"b")
    assert store.list(f"gs://{bucket}/experiments/x/") == [
        f"gs://{bucket}/experiments/x/_metadata/a.log", url]
    folder = [url, f"gs://{bucket}/experiments/x/tb.tar", f"gs://{bucket}/experiments/x/_metadata"]
    assert store.existing(folder) == {url}  # one listing of the folder, its subfolders left out
    assert store.existing([url, f"gs://{bucket}/experiments/xy.tar"]) is None  # two folders
    for folder in ("", "e//"):  # keys at the bucket's root, a doubled slash
        first, second = f"gs://{bucket}/{folder}a.tar", f"gs://{bucket}/{folder}b.tar"
        store.put_bytes(first, b"a")
        assert store.existing([first, second]) == {first}, folder
    source = tmp_path / "src"
    source.write_bytes(b"from a file")
    store.put(f"gs://{bucket}/file.bin", source)
    store.get(f"gs://{bucket}/file.bin", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == b"from a file"


# ------------------------------------------------------------------------ http(s)

class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_Files, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_artifacts_are_read_only_downloads(http_root, tmp_path):
    root, base = http_root
    (root / "data.tar").write_bytes(b"y" * 3_000_000)
    url = f"{base}/data.tar"
    store = open_store(url)
    assert isinstance(store, HttpStore)
    info = store.stat(url)
    assert info.size == 3_000_000 and info.etag  # Last-Modified stands in for an ETag
    assert store.identity(info)
    got = store.get(url, tmp_path / "out" / "data.tar")
    assert got.size == 3_000_000 and (tmp_path / "out" / "data.tar").read_bytes() == b"y" * 3_000_000
    assert store.stat(f"{base}/missing") is None
    with pytest.raises(ObjectMissing):
        store.get(f"{base}/missing", tmp_path / "m")
    with pytest.raises(PermanentStorageError):
        store.put(url, tmp_path / "out" / "data.tar")
    with pytest.raises(PermanentStorageError):
        store.list(base + "/")
