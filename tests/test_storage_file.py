"""FileStore round trips, URL checks, atomicity; the storage registry."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runner.storage.file as file_mod
from runner.errors import BadRequest, StorageError
from runner.storage import FileStore, ObjectMissing, artifact_url, open_store
from runner.storage.base import ObjectInfo, split_url


def url(p: Path) -> str:
    return "file://" + str(p)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


@pytest.fixture
def store() -> FileStore:
    return FileStore()


def test_put_stat_get_round_trip(store: FileStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3_000_000)
    target = tmp_path / "bucket" / "deep" / "obj.tar"
    info = store.put(url(target), src)
    assert info == store.stat(url(target))
    assert info.size == 3_000_000 and info.url == url(target)
    st = target.stat()
    assert info.etag == f"{st.st_size}-{st.st_mtime_ns}"
    dest = tmp_path / "out" / "copy.bin"
    got = store.get(url(target), dest)
    assert dest.read_bytes() == src.read_bytes()
    assert got == info
    assert leftovers(dest.parent) == [] and leftovers(target.parent) == []


def test_put_bytes_and_overwrite_changes_etag(store: FileStore, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.json"
    first = store.put_bytes(url(target), b"{}")
    os.utime(target, ns=(1, 1))
    second = store.put_bytes(url(target), b'{"a": 1}')
    assert target.read_bytes() == b'{"a": 1}'
    assert second.size == 8 and first.etag != second.etag
    assert isinstance(second, ObjectInfo)


def test_localhost_url_accepted(store: FileStore, tmp_path: Path) -> None:
    target = tmp_path / "x"
    store.put_bytes("file://localhost" + str(target), b"abc")
    assert store.stat(url(target)).size == 3


def test_missing_object(store: FileStore, tmp_path: Path) -> None:
    assert store.stat(url(tmp_path / "nope")) is None
    assert store.stat(url(tmp_path / "file" / "under-a-file")) is None
    dest = tmp_path / "dest"
    with pytest.raises(ObjectMissing):
        store.get(url(tmp_path / "nope"), dest)
    with pytest.raises(StorageError):  # ObjectMissing is a StorageError
        store.get(url(tmp_path / "nope"), dest)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_directory_is_not_an_object(store: FileStore, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    assert store.stat(url(tmp_path / "d")) is None
    with pytest.raises(ObjectMissing):
        store.get(url(tmp_path / "d"), tmp_path / "out")


def test_fifo_is_not_read(store: FileStore, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    assert store.stat(url(tmp_path / "fifo")) is None
    with pytest.raises(ObjectMissing):  # must not block opening the FIFO
        store.get(url(tmp_path / "fifo"), tmp_path / "out")


@pytest.mark.parametrize("bad", [
    "file://relative/path",
    "file://otherhost/abs/path",
    "file:relative",
    "file:/no-double-slash",
    "/plain/path",
    "file:///a/../etc/passwd",
    "s3://host/bucket/key",
    "file:///a\x00b",
])
def test_bad_urls(store: FileStore, bad: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        store.stat(bad)
    with pytest.raises(StorageError):
        store.put_bytes(bad, b"x")


def test_list_prefixes(store: FileStore, tmp_path: Path) -> None:
    for rel in ["exp/a.tar", "exp/sub/b.tar", "exp2/c.tar", "other/d"]:
        store.put_bytes(url(tmp_path / rel), b"1")
    (tmp_path / "exp" / "a.tar.partial-0123456789ab").write_bytes(b"tmp")
    (tmp_path / "exp" / "emptydir").mkdir()
    everything = [url(tmp_path / r) for r in ["exp/a.tar", "exp/sub/b.tar", "exp2/c.tar"]]
    assert store.list(url(tmp_path / "exp")) == everything
    assert store.list(url(tmp_path / "exp") + "/") == everything[:2]
    assert store.list(url(tmp_path / "exp/a")) == everything[:1]
    assert store.list(url(tmp_path / "exp/a.tar")) == everything[:1]
    assert store.list(url(tmp_path / "nothing")) == []
    assert store.list(url(tmp_path / "nodir") + "/") == []


def test_put_missing_source_leaves_nothing(store: FileStore, tmp_path: Path) -> None:
    target = tmp_path / "out" / "obj"
    with pytest.raises(StorageError):
        store.put(url(target), tmp_path / "does-not-exist")
    assert not target.exists()
    assert not target.parent.exists() or leftovers(target.parent) == []


def test_put_failing_midway_is_atomic(store: FileStore, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"new content" * 1000)
    target = tmp_path / "out" / "obj"
    store.put_bytes(url(target), b"old")

    def broken_copy(fsrc, fdst) -> int:
        fdst.write(fsrc.read(10))
        src.unlink()  # the source disappears mid-way
        raise OSError("source vanished")

    monkeypatch.setattr(file_mod, "_copy_stream", broken_copy)
    with pytest.raises(StorageError):
        store.put(url(target), src)
    assert target.read_bytes() == b"old"
    assert leftovers(target.parent) == []


def test_get_failing_midway_is_atomic(store: FileStore, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    obj = tmp_path / "obj"
    obj.write_bytes(b"z" * 100)
    dest_dir = tmp_path / "cache"
    dest_dir.mkdir()

    def broken_copy(fsrc, fdst) -> int:
        fdst.write(fsrc.read(10))
        raise OSError("disk on fire")

    monkeypatch.setattr(file_mod, "_copy_stream", broken_copy)
    with pytest.raises(StorageError):
        store.get(url(obj), dest_dir / "entry")
    assert list(dest_dir.iterdir()) == []


def test_registry_and_artifact_url(tmp_path: Path) -> None:
    assert isinstance(open_store(url(tmp_path / "x")), FileStore)
    assert isinstance(open_store("FILE:///x", credentials={}, storage_config={}), FileStore)
    with pytest.raises(BadRequest, match="unsupported storage scheme"):
        open_store("ftp://host/x")
    with pytest.raises(BadRequest):
        open_store("no-scheme")
    assert artifact_url({"qualified": "s3://h/b/k", "url": "http://x", "local": "/l"}) == "s3://h/b/k"
    assert artifact_url({"url": "https://x/y", "local": "/l"}) == "https://x/y"
    assert artifact_url({"qualified": "", "url": "https://x/y"}) == "https://x/y"
    assert artifact_url({"local": "/home/client/file"}) is None
    assert artifact_url({}) is None
    assert split_url("S3://host/b/k") == ("s3", "host/b/k")
    with pytest.raises(StorageError):
        split_url("nothing")


WRITER = """
import sys, time
from runner.storage.file import FileStore

def fill(out):
    out.write(b"x" * 100_000)
    out.flush()
    print("writing", flush=True)
    time.sleep(600)  # SIGKILLed here, mid-upload

FileStore().put_stream(sys.argv[1], fill)
"""


def test_a_killed_writers_partial_file_is_removed_by_a_later_put(store: FileStore,
                                                                  tmp_path: Path) -> None:
    """A writer SIGKILLed mid-``put`` leaves ``<name>.partial-<hex>``; the next ``put`` into
    that folder removes it once nobody has written to it for STALE_PARTIAL_AFTER (its
    mtime is set back that far here instead of waiting), and leaves a live writer's
    partial file alone."""
    target = tmp_path / "experiments" / "k" / "modeldir.tar"
    url = f"file://{target}"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"writing\n"
    finally:
        writer.kill()
        writer.wait()
    [dead] = target.parent.glob("modeldir.tar.partial-*")
    assert dead.stat().st_size == 100_000 and not target.exists()
    stale = time.time() - file_mod.STALE_PARTIAL_AFTER - 60
    os.utime(dead, (stale, stale))
    live = target.with_name("modeldir.tar.partial-0123456789ab")
    live.write_bytes(b"being written")  # another writer's, written to just now

    store.put_bytes(url, b"the next upload")
    assert target.read_bytes() == b"the next upload"
    assert not dead.exists() and live.exists()
    assert store.list(f"file://{target.parent}/") == [url]
