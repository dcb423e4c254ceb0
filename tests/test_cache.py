"""The artifact cache: single-flight downloads, LRU eviction by bytes that spares entries
in use, restart safety, content identity, counters."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from runner.cache import ArtifactCache
from runner.errors import PermanentStorageError, StorageError
from runner.storage import FileStore, ObjectInfo, ObjectMissing, S3Store

from .support import TEST_AWS


class CountingStore(FileStore):
    """A real file store that counts downloads and can be slowed down or broken."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.delay, self.fail, self.gets = delay, fail, 0
        self.lock = threading.Lock()

    def get(self, url, dest):
        with self.lock:
            self.gets += 1
        time.sleep(self.delay)
        if self.fail:
            raise StorageError("storage went away")
        return super().get(url, dest)


def put(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / "store" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.as_uri()


def lease_side_by_side(cache, store, url, expected: bytes, leases: int = 6) -> list:
    """(hit, bytes as expected) of ``leases`` concurrent leases of ``url``; none may fail."""
    results, errors = [], []

    def lease():
        try:
            with cache.lease(store, url) as got:
                results.append((got.hit, got.path.read_bytes() == expected))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=lease) for _ in range(leases)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == leases
    return results


def test_concurrent_leases_of_one_object_download_it_once(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", 10**9)
    url = put(tmp_path, "ws.tar", b"w" * 100_000)
    store = CountingStore(delay=0.5)
    results = lease_side_by_side(cache, store, url, b"w" * 100_000)
    assert store.gets == 1
    assert sorted(results) == [(False, True)] + [(True, True)] * 5
    stats = cache.stats()
    assert (stats["cache_misses"], stats["cache_hits"], stats["cache_entries"]) == (1, 5, 1)
    with cache.lease(store, url) as again:
        assert again.hit
    assert store.gets == 1


def test_a_failed_download_fails_its_waiters_and_caches_nothing(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", 10**9)
    url = put(tmp_path, "ws.tar", b"w" * 1000)
    store = CountingStore(delay=0.3, fail=True)
    failures = []

    def lease():
        try:
            with cache.lease(store, url):
                pass
        except StorageError as exc:
            failures.append(str(exc))
    threads = [threading.Thread(target=lease) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(failures) == 3 and store.gets == 1
    assert cache.stats()["cache_entries"] == 0
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    store.fail = False
    with cache.lease(store, url) as got:
        assert not got.hit and got.path.stat().st_size == 1000


def test_missing_object_is_object_missing(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", 10**9)
    with pytest.raises(ObjectMissing), cache.lease(FileStore(), (tmp_path / "nothing").as_uri()):
        pass


def test_lru_eviction_by_bytes(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", 250)
    store = CountingStore()
    urls = [put(tmp_path, f"o{i}", bytes([i]) * 100) for i in range(4)]
    for url in urls[:2]:
        with cache.lease(store, url):
            pass
    with cache.lease(store, urls[0]):  # o0 is now the most recently used
        pass
    with cache.lease(store, urls[2]):  # 300 bytes > 250: the least recently used (o1) goes
        pass
    assert cache.stats()["cache_bytes"] == 200 and cache.stats()["cache_evictions"] == 1
    gets = store.gets
    with cache.lease(store, urls[0]) as got:
        assert got.hit
    with cache.lease(store, urls[1]) as got:
        assert not got.hit
    assert store.gets == gets + 1


def test_an_entry_in_use_survives_eviction_pressure(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", 150)
    store = CountingStore()
    big = put(tmp_path, "big", b"b" * 100)
    with cache.lease(store, big) as held:
        for i in range(5):  # each new object pushes the cache past its size
            with cache.lease(store, put(tmp_path, f"n{i}", bytes([i]) * 100)):
                pass
            assert held.path.read_bytes() == b"b" * 100
        assert cache.stats()["cache_in_use"] == 1
    # once released it is the least recently used and goes at the next pressure
    with cache.lease(store, put(tmp_path, "last", b"l" * 100)):
        pass
    assert not held.path.exists()
    assert cache.stats()["cache_bytes"] <= 150


def test_object_larger_than_the_cache_is_served_then_evicted(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", 10)
    url = put(tmp_path, "huge", b"h" * 1000)
    with cache.lease(CountingStore(), url) as got:
        assert got.path.read_bytes() == b"h" * 1000
    assert cache.stats()["cache_entries"] == 0 and not got.path.exists()


def test_file_identity_is_the_content_hash(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", 10**9)
    store = CountingStore()
    first = put(tmp_path, "a/ws.tar", b"same bytes")
    second = put(tmp_path, "b/copy.tar", b"same bytes")
    with cache.lease(store, first):
        pass
    with cache.lease(store, second) as got:
        assert got.hit, "two paths with the same content share one entry"
    Path(first[len("file://"):]).write_bytes(b"new bytes!")  # same size, new content
    with cache.lease(store, first) as got:
        assert not got.hit and got.path.read_bytes() == b"new bytes!"
    assert store.gets == 2


def test_restart_discards_partials_and_truncated_entries_and_keeps_complete_ones(tmp_path):
    root = tmp_path / "cache"
    cache = ArtifactCache(root, 10**9)
    store = CountingStore()
    url = put(tmp_path, "ws.tar", b"k" * 5000)
    with cache.lease(store, url) as got:
        entry = got.path
    other = put(tmp_path, "other.tar", b"o" * 5000)
    with cache.lease(store, other) as got:
        truncated = got.path
    cache.close()
    # A crash left a partial download, and a torn entry (shorter than its name says).
    (root / "tmp" / f"{'0' * 64}.abc123").write_bytes(b"k" * 10)
    (root / "tmp" / "x.partial-0123456789ab").write_bytes(b"k" * 10)
    with open(truncated, "r+b") as handle:
        handle.truncate(100)
    (root / "objects" / "garbage").write_bytes(b"?")

    cache = ArtifactCache(root, 10**9)
    assert list((root / "tmp").iterdir()) == []
    assert sorted(p.name for p in (root / "objects").iterdir()) == [entry.name]
    assert cache.stats()["cache_entries"] == 1 and cache.stats()["cache_bytes"] == 5000
    with cache.lease(store, url) as got:
        assert got.hit and got.path.read_bytes() == b"k" * 5000
    with cache.lease(store, other) as got:
        assert not got.hit and got.path.read_bytes() == b"o" * 5000, "never served truncated"


def test_one_process_owns_a_cache_directory(tmp_path):
    import subprocess
    import sys

    held = ArtifactCache(tmp_path / "cache", 10)  # held by this process
    code = ("import sys; from runner.cache import ArtifactCache, CacheBusy\n"
            f"try:\n    ArtifactCache({str(tmp_path / 'cache')!r}, 10)\n"
            "except CacheBusy as e:\n    print('busy', e); sys.exit(0)\nsys.exit(1)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "in use by another runner" in result.stdout
    held.close()


class FolderStore(FileStore):
    """A real file store whose ``get`` unpacks: it writes a folder holding the object
    twice (as an unpacked container image is a folder, not a file)."""

    def get(self, url, dest):
        Path(dest).mkdir()
        info = super().get(url, Path(dest) / "a")
        (Path(dest) / "sub").mkdir()
        (Path(dest) / "sub" / "b").write_bytes((Path(dest) / "a").read_bytes())
        return info


def test_folder_entries_are_cached_sized_evicted_and_rebuilt(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", 5_000, name="image cache")
    first, second = put(tmp_path, "one", b"1" * 2_000), put(tmp_path, "two", b"2" * 2_000)
    store = FolderStore()
    with cache.lease(store, first) as got:
        assert got.path.is_dir() and (got.path / "sub" / "b").read_bytes() == b"1" * 2_000
    assert cache.stats()["cache_bytes"] == 4_000
    cache.close()
    cache = ArtifactCache(tmp_path / "cache", 5_000, name="image cache")  # a restart
    assert cache.stats()["cache_entries"] == 1 and cache.stats()["cache_bytes"] == 4_000
    with cache.lease(store, first) as got:
        assert got.hit
    with cache.lease(store, second) as got:  # 8000 bytes > 5000: the older folder goes
        kept = got.path
    assert cache.stats()["cache_evictions"] == 1 and cache.stats()["cache_entries"] == 1
    assert [p for p in (tmp_path / "cache" / "objects").iterdir()] == [kept]
    (kept / "sub" / "b").write_bytes(b"truncated")  # a damaged folder is not served
    cache.close()
    cache = ArtifactCache(tmp_path / "cache", 5_000, name="image cache")
    assert cache.stats()["cache_entries"] == 0 and not kept.exists()


# ------------------------------------------- remote stores: one request for a new URL

class CountingS3(S3Store):
    """The real S3 store (on moto), counting its stat and get requests."""

    def __init__(self):
        super().__init__()
        self.stats = self.gets = self.in_flight = self.most_in_flight = 0
        self.counter = threading.Lock()

    def stat(self, url):
        with self.counter:
            self.stats += 1
        return super().stat(url)

    def get(self, url, dest):
        with self.counter:
            self.gets += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(0.05)  # long enough for concurrent leases to meet
            return super().get(url, dest)
        finally:
            with self.counter:
                self.in_flight -= 1


@pytest.fixture()
def s3(moto, monkeypatch):
    for name, value in TEST_AWS.items():
        monkeypatch.setenv(name, value)
    bucket = moto.create_bucket()
    store = CountingS3()
    yield store, moto.root_url(bucket)
    store.close()


def test_a_new_url_is_one_get_and_a_stored_one_a_stat_and_a_hit(s3, tmp_path):
    store, root = s3
    url = f"{root}/experiments/e1/workspace.tar"
    store.put_bytes(url, b"w" * 5000)
    cache = ArtifactCache(tmp_path / "cache", 10**9)
    with cache.lease(store, url) as got:
        assert not got.hit and got.path.read_bytes() == b"w" * 5000 and got.info.size == 5000
    assert (store.stats, store.gets) == (0, 1), "a URL never stored: no HEAD before the GET"
    with cache.lease(store, url) as got:
        assert got.hit and got.path.read_bytes() == b"w" * 5000
    assert (store.stats, store.gets) == (1, 1), "a stored URL: a HEAD, served from the cache"
    cache.close()
    again = ArtifactCache(tmp_path / "cache", 10**9)  # the URL's note survives a restart
    with again.lease(store, url) as got:
        assert got.hit
    assert (store.stats, store.gets) == (2, 1)
    store.put_bytes(url, b"changed")  # a stored URL whose object changed is downloaded anew
    with again.lease(store, url) as got:
        assert not got.hit and got.path.read_bytes() == b"changed"
    assert (store.stats, store.gets) == (3, 2)
    with again.lease(store, url) as got:
        assert got.hit and got.path.read_bytes() == b"changed"


def test_a_missing_new_url_is_object_missing_and_leaves_nothing(s3, tmp_path):
    store, root = s3
    cache = ArtifactCache(tmp_path / "cache", 10**9)
    with pytest.raises(ObjectMissing), cache.lease(store, f"{root}/experiments/e1/output.tar"):
        pass
    assert (store.stats, store.gets) == (0, 1)
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert list((tmp_path / "cache" / "urls").iterdir()) == []
    assert cache.stats()["cache_entries"] == 0


def test_concurrent_leases_of_a_new_url_download_it_once(s3, tmp_path):
    store, root = s3
    url = f"{root}/datasets/shared.bin"
    store.put_bytes(url, b"d" * 100_000)
    cache = ArtifactCache(tmp_path / "cache", 10**9)
    seen = lease_side_by_side(cache, store, url, b"d" * 100_000)
    assert store.gets == 1 and sorted(seen) == [(False, True)] + [(True, True)] * 5


def test_an_evicted_entry_forgets_its_urls_and_broken_notes_are_dropped(s3, tmp_path):
    store, root = s3
    first, second = f"{root}/a.bin", f"{root}/b.bin"
    store.put_bytes(first, b"a" * 600)
    store.put_bytes(second, b"b" * 600)
    cache = ArtifactCache(tmp_path / "cache", 1000)
    with cache.lease(store, first):
        pass
    notes = tmp_path / "cache" / "urls"
    assert len(list(notes.iterdir())) == 1
    with cache.lease(store, second):
        pass  # the first entry is evicted to make room, and its note with it
    assert len(list(notes.iterdir())) == 1
    with cache.lease(store, first) as got:
        assert not got.hit
    assert (store.stats, store.gets) == (0, 3), "an evicted URL is new again: no HEAD"
    cache.close()
    (notes / ("0" * 64)).write_text("not a key")
    (notes / "stray").write_text("x")
    ArtifactCache(tmp_path / "cache", 1000).close()
    assert len(list(notes.iterdir())) == 1


def test_lease_all_downloads_side_by_side_and_reports_each_outcome(s3, tmp_path):
    store, root = s3
    urls = [f"{root}/experiments/e1/{name}" for name in ("workspace", "modeldir", "output", "tb")]
    store.put_bytes(urls[0], b"ws")
    store.put_bytes(urls[2], b"out")
    cache = ArtifactCache(tmp_path / "cache", 10**9)
    with cache.lease_all([(store, url) for url in urls]) as leases:
        assert [type(lease).__name__ for lease in leases] == [
            "Lease", "ObjectMissing", "Lease", "ObjectMissing"]
        assert leases[0].path.read_bytes() == b"ws" and leases[2].path.read_bytes() == b"out"
        assert cache.stats()["cache_in_use"] == 2
    assert cache.stats()["cache_in_use"] == 0, "every lease is released with the with"
    assert store.gets == 4 and store.most_in_flight > 1, "the requests overlap"


def test_lease_all_releases_what_it_took_when_one_lease_crashes(s3, tmp_path):
    store, root = s3
    good, bad = f"{root}/good", f"{root}/bad"
    store.put_bytes(good, b"g")
    store.put_bytes(bad, b"b")

    class Crashing(CountingS3):
        def get(self, url, dest):
            if url == bad:
                raise RuntimeError("a bug, not a storage fault")
            return super().get(url, dest)

    crashing = Crashing()
    cache = ArtifactCache(tmp_path / "cache", 10**9)
    with pytest.raises(RuntimeError, match="a bug"), cache.lease_all([(crashing, good), (crashing, bad)]):
        pass
    assert cache.stats()["cache_in_use"] == 0 and cache.stats()["cache_entries"] == 1
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    crashing.close()


def test_a_caller_refused_a_new_url_does_not_fail_another_that_may_read_it(s3, tmp_path):
    """Two experiments lease one new URL with different credentials: the one refused
    fails alone, the other downloads for itself (the old HEAD-first path never shared)."""
    store, root = s3
    url = f"{root}/datasets/shared.bin"
    store.put_bytes(url, b"d" * 1000)
    cache = ArtifactCache(tmp_path / "cache", 10**9)

    class Refused(CountingS3):
        def get(self, url, dest):
            time.sleep(0.4)  # in flight while the other caller comes
            raise PermanentStorageError(f"cannot download {url}: AccessDenied")

    refused, outcome = Refused(), {}

    def lease(name, which):
        try:
            with cache.lease(which, url) as got:
                outcome[name] = got.path.read_bytes() == b"d" * 1000
        except Exception as exc:  # noqa: BLE001 - compared below
            outcome[name] = exc

    first = threading.Thread(target=lease, args=("refused", refused))
    first.start()
    time.sleep(0.1)
    second = threading.Thread(target=lease, args=("allowed", store))
    second.start()
    first.join()
    second.join()
    assert isinstance(outcome["refused"], PermanentStorageError)
    assert outcome["allowed"] is True, outcome["allowed"]
    refused.close()


def test_a_stat_that_cannot_name_the_content_and_a_download_that_can(s3, tmp_path):
    """A stored URL whose stat has no validator (a server that sends an ETag only with the
    body) is downloaded again; the entry that download names is held and let go, never
    deleted under the index."""
    store, root = s3
    url = f"{root}/datasets/x.bin"

    class ValidatorOnGet(CountingS3):
        def stat(self, url):
            info = super().stat(url)
            return info and ObjectInfo(url=info.url, size=info.size, etag="", mtime=info.mtime)

        def identity(self, info):
            return super().identity(info) if info.etag else ""

    odd = ValidatorOnGet()
    odd.put_bytes(url, b"x" * 100)
    cache = ArtifactCache(tmp_path / "cache", 10**9)
    for _ in range(3):
        with cache.lease(odd, url) as got:
            assert got.path.read_bytes() == b"x" * 100
    stats = cache.stats()
    assert stats["cache_in_use"] == 0 and stats["cache_entries"] == 1
    assert [p.stat().st_size for p in (tmp_path / "cache" / "objects").iterdir()] == [100]
    odd.close()
