"""runner.archive: compression detection, pack/unpack round trips, hostile archives, budget."""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from runner.archive import (CHUNK_SIZE, compression_for_key, detect_compression, pack,
                            pack_to_stream, unpack)
from runner.errors import ArchiveError, DiskBudgetExceeded

COMPRESSIONS = ["none", "gzip", "bzip2", "xz", "zstd"]


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data)
    if compression == "bzip2":
        return bz2.compress(data)
    if compression == "xz":
        return lzma.compress(data)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None,
           linkname: str = "", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    if kind == tarfile.REGTYPE:
        data = data or b""
        info.size = len(data)
    return info, data


def make_tar(path: Path, members: list, compression: str = "none") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    path.write_bytes(compress(buf.getvalue(), compression))
    return path


@pytest.fixture
def area(tmp_path: Path) -> dict[str, Path]:
    """dest (where unpacking goes) beside outside (which must stay empty)."""
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    return {"root": tmp_path, "dest": dest, "outside": outside}


def assert_outside_untouched(area: dict[str, Path]) -> None:
    assert list(area["outside"].iterdir()) == []
    assert sorted(p.name for p in area["root"].iterdir()) == ["a.tar", "dest", "outside"]


def tree(root: Path) -> dict[str, bytes | str | None]:
    out: dict[str, bytes | str | None] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = None
        else:
            out[rel] = p.read_bytes()
    return out


# --------------------------------------------------------------------------- detection

@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_detect_compression(compression: str) -> None:
    data = compress(b"\0" * 1024, compression)
    assert detect_compression(data[:8]) == compression


def test_detect_short_head() -> None:
    assert detect_compression(b"") == "none"
    assert detect_compression(b"\x1f") == "none"


@pytest.mark.parametrize("key,expected", [
    ("a/b/modeldir.tar", "none"),
    ("x.tar.gz", "gzip"), ("x.tgz", "gzip"), ("X.TAR.GZ", "gzip"),
    ("x.tar.bz2", "bzip2"), ("x.tbz2", "bzip2"),
    ("x.tar.xz", "xz"), ("x.txz", "xz"),
    ("x.tar.zst", "zstd"), ("x.tzst", "zstd"),
    ("x.zip", "none"), ("x", "none"), ("x.gz", "none"), ("", "none"),
])
def test_compression_for_key(key: str, expected: str) -> None:
    assert compression_for_key(key) == expected


# --------------------------------------------------------------------------- round trips

def make_source(root: Path) -> Path:
    src = root / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a.txt").write_bytes(b"hello\n")
    (src / "sub" / "deeper" / "big.bin").write_bytes(os.urandom(3 * CHUNK_SIZE // 2))
    (src / "run.sh").write_bytes(b"#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    os.symlink("../a.txt", src / "sub" / "link")
    os.link(src / "a.txt", src / "hard")
    return src


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_round_trip(tmp_path: Path, compression: str) -> None:
    src = make_source(tmp_path)
    archive = tmp_path / "out" / "x.tar"
    size = pack(src, archive, compression)
    assert size == archive.stat().st_size
    assert detect_compression(archive.read_bytes()[:8]) == compression
    assert [p.name for p in archive.parent.iterdir()] == ["x.tar"]
    dest = tmp_path / "dest"
    written = unpack(archive, dest)
    assert tree(dest) == tree(src)
    assert written == sum(p.stat().st_size for p in src.rglob("*")
                          if p.is_file() and not p.is_symlink() and p.name != "hard")
    assert (dest / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (dest / "hard").stat().st_ino == (dest / "a.txt").stat().st_ino


def test_pack_member_names_sorted_relative(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    buf = io.BytesIO()
    count = pack_to_stream(src, buf, "none")
    assert count == len(buf.getvalue())
    assert not buf.closed
    names = tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getnames()
    assert names == ["a.txt", "empty", "hard", "run.sh", "sub", "sub/deeper",
                     "sub/deeper/big.bin", "sub/link"]
    infos = tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getmembers()
    assert all(i.uid == 0 and i.uname == "" for i in infos)


def test_pack_unknown_compression(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError):
        pack(make_source(tmp_path), tmp_path / "x.tar", "rar")
    assert not (tmp_path / "x.tar").exists()


def test_detection_ignores_name(tmp_path: Path) -> None:
    members = [member("f.txt", data=b"content")]
    plain_named_gz = make_tar(tmp_path / "plain.tar.gz", members, "none")
    gzip_named_tar = make_tar(tmp_path / "gz.tar", members, "gzip")
    assert unpack(plain_named_gz, tmp_path / "d1") == 7
    assert unpack(gzip_named_tar, tmp_path / "d2") == 7
    assert (tmp_path / "d1" / "f.txt").read_bytes() == b"content"
    assert (tmp_path / "d2" / "f.txt").read_bytes() == b"content"


def test_empty_archive(tmp_path: Path) -> None:
    assert unpack(make_tar(tmp_path / "e.tar", []), tmp_path / "d") == 0
    assert list((tmp_path / "d").iterdir()) == []
    (tmp_path / "zero.tar").write_bytes(b"")
    assert unpack(tmp_path / "zero.tar", tmp_path / "d2") == 0
    empty_src = tmp_path / "emptysrc"
    empty_src.mkdir()
    pack(empty_src, tmp_path / "e2.tar.zst", "zstd")
    assert unpack(tmp_path / "e2.tar.zst", tmp_path / "d3") == 0


@pytest.mark.parametrize("garbage", [
    b"this is not a tar archive at all" * 40,
    gzip.compress(b"not a tar either" * 100),
    b"\x1f\x8b" + b"\x00" * 100,  # gzip magic, broken stream
    b"\x28\xb5\x2f\xfd" + os.urandom(200),  # zstd magic, broken frame
])
def test_corrupt_archive(tmp_path: Path, garbage: bytes) -> None:
    (tmp_path / "bad.tar").write_bytes(garbage)
    with pytest.raises(ArchiveError):
        unpack(tmp_path / "bad.tar", tmp_path / "d")


@pytest.mark.parametrize("compression", ["none", "gzip", "xz"])
def test_truncated_archive(tmp_path: Path, compression: str) -> None:
    archive = make_tar(tmp_path / "t.tar", [member("f", data=os.urandom(50_000))], compression)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ArchiveError):
        unpack(archive, tmp_path / "d")


def test_setuid_dropped_and_existing_inode_not_written(area: dict[str, Path]) -> None:
    secret = area["outside"] / "secret"
    dest = area["dest"]
    archive = make_tar(area["root"] / "a.tar", [
        member("suid", data=b"x", mode=0o6755),
        member("f", data=b"new"),
    ])
    # A pre-existing symlink at a member's own path is replaced, never followed.
    os.symlink(secret, dest / "f")
    unpack(archive, dest)
    assert (dest / "suid").stat().st_mode & 0o7777 == 0o755
    assert not (dest / "f").is_symlink() and (dest / "f").read_bytes() == b"new"
    assert not secret.exists()


def test_inside_links_allowed(area: dict[str, Path]) -> None:
    archive = make_tar(area["root"] / "a.tar", [
        member("dir", tarfile.DIRTYPE, mode=0o755),
        member("dir/f", data=b"data"),
        member("up", tarfile.SYMTYPE, linkname="dir/f"),
        member("dir/self", tarfile.SYMTYPE, linkname="."),
        member("dir/again", tarfile.LNKTYPE, linkname="dir/f"),
        member("./dot/g", data=b"g"),
    ])
    assert unpack(archive, area["dest"]) == 5
    assert (area["dest"] / "up").read_bytes() == b"data"
    assert (area["dest"] / "dir" / "again").read_bytes() == b"data"
    assert (area["dest"] / "dot" / "g").read_bytes() == b"g"
    assert_outside_untouched(area)


# --------------------------------------------------------------------------- hostile archives

def unpack_hostile(area: dict[str, Path], members: list, match: str) -> None:
    archive = make_tar(area["root"] / "a.tar", members)
    with pytest.raises(ArchiveError, match=match):
        unpack(archive, area["dest"])
    assert_outside_untouched(area)


def test_hostile_absolute_path(area: dict[str, Path]) -> None:
    unpack_hostile(area, [member(str(area["outside"] / "evil"), data=b"x")], "absolute")


def test_hostile_dotdot(area: dict[str, Path]) -> None:
    unpack_hostile(area, [member("ok/../../outside/evil", data=b"x")], r"'\.\.'")


@pytest.mark.parametrize("target", ["../outside", "sub/../../outside", "ABS"])
def test_hostile_symlink_escaping(area: dict[str, Path], target: str) -> None:
    target = str(area["outside"]) if target == "ABS" else target
    unpack_hostile(area, [member("link", tarfile.SYMTYPE, linkname=target),
                          member("link/evil", data=b"x")], "'link'")
    assert not (area["dest"] / "link").exists()


@pytest.mark.parametrize("target", ["../outside/secret", "ABS", "viasym/secret"])
def test_hostile_hardlink_escaping(area: dict[str, Path], target: str) -> None:
    secret = area["root"] / "secret"
    secret.write_bytes(b"outside data")
    target = str(secret) if target == "ABS" else target
    # "viasym" is a symlink already in dest pointing outside; a hard link through it escapes.
    os.symlink(area["root"], area["dest"] / "viasym")
    with pytest.raises(ArchiveError, match="'h'"):
        unpack(make_tar(area["root"] / "a.tar",
                        [member("h", tarfile.LNKTYPE, linkname=target)]), area["dest"])
    assert not (area["dest"] / "h").exists()
    assert secret.stat().st_nlink == 1
    assert list(area["outside"].iterdir()) == []


def test_hostile_file_through_existing_symlink(area: dict[str, Path]) -> None:
    # dest already holds a symlink pointing outside (left by an earlier run, say).
    os.symlink(area["outside"], area["dest"] / "trap")
    unpack_hostile(area, [member("trap/evil", data=b"x")], "'trap/evil'")


def test_hostile_symlink_then_file_through_it(area: dict[str, Path]) -> None:
    # x -> y/.. is inside while y is missing; y -> . then makes x point at dest/..
    unpack_hostile(area, [
        member("x", tarfile.SYMTYPE, linkname="y/.."),
        member("y", tarfile.SYMTYPE, linkname="."),
        member("x/outside/evil", data=b"x"),
    ], "'x/outside/evil'")


@pytest.mark.parametrize("kind,match", [
    (tarfile.CHRTYPE, "device"),
    (tarfile.BLKTYPE, "device"),
    (tarfile.FIFOTYPE, "FIFO"),
])
def test_hostile_special_files(area: dict[str, Path], kind: bytes, match: str) -> None:
    unpack_hostile(area, [member("special", kind)], match)
    assert not os.path.lexists(area["dest"] / "special")


def test_file_over_directory_refused(area: dict[str, Path]) -> None:
    unpack_hostile(area, [member("d", tarfile.DIRTYPE), member("d", data=b"x")], "directory")


# --------------------------------------------------------------------------- budget

def bytes_on_disk(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_budget_exceeded_stops_early(area: dict[str, Path], compression: str) -> None:
    chunk = 256 * 1024
    members = [member(f"f{i}", data=bytes([i]) * chunk) for i in range(8)]
    archive = make_tar(area["root"] / "a.tar", members, compression)
    budget = 3 * chunk + 100
    with pytest.raises(DiskBudgetExceeded, match="'f3'"):
        unpack(archive, area["dest"], budget=budget)
    on_disk = bytes_on_disk(area["dest"])
    assert on_disk <= budget + CHUNK_SIZE
    assert on_disk == 3 * chunk  # refused before writing f3 at all
    assert not (area["dest"] / "f4").exists()


def test_budget_single_huge_member(area: dict[str, Path]) -> None:
    archive = make_tar(area["root"] / "a.tar", [member("huge", data=b"\0" * (4 * CHUNK_SIZE))],
                       "gzip")
    with pytest.raises(DiskBudgetExceeded):
        unpack(archive, area["dest"], budget=CHUNK_SIZE)
    assert bytes_on_disk(area["dest"]) <= CHUNK_SIZE + CHUNK_SIZE


def test_budget_exactly_enough(area: dict[str, Path]) -> None:
    archive = make_tar(area["root"] / "a.tar", [member("a", data=b"12345"),
                                                member("b", data=b"678")])
    assert unpack(archive, area["dest"], budget=8) == 8
    with pytest.raises(DiskBudgetExceeded):
        unpack(archive, area["root"] / "dest" / "again", budget=7)


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_single_file_packing_names_the_file_dot_slash(tmp_path: Path, compression: str) -> None:
    """The StudioML client reads a tar whose one member is ./<name> as a file."""
    from runner.archive import pack_to_stream, single_file_of

    folder = tmp_path / "retval"
    folder.mkdir()
    (folder / "retval").write_bytes(b"pickled")
    out = io.BytesIO()
    pack_to_stream(folder, out, compression, single_file=True)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:*") as tar:
        assert tar.getnames() == ["./retval"]
        assert tar.extractfile("./retval").read() == b"pickled"
        assert int(tar.getmember("./retval").mtime) == int((folder / "retval").stat().st_mtime)
    unpacked = tmp_path / "again"
    archive = tmp_path / "retval.tar"
    archive.write_bytes(out.getvalue())
    unpack(archive, unpacked)
    assert (unpacked / "retval").read_bytes() == b"pickled"

    (folder / "more").mkdir()  # anything but one file stays a folder archive
    assert single_file_of(folder) is None
    out = io.BytesIO()
    pack_to_stream(folder, out, "none", single_file=True)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        assert tar.getnames() == ["more", "retval"]


def test_pack_leaves_out_links_no_unpack_would_accept(tmp_path: Path) -> None:
    """A run that leaves ``modeldir/root -> /`` must not spoil its retries: the output is
    packed without that link (and the others unpack refuses), so it unpacks again."""
    src = tmp_path / "modeldir"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "weights.bin").write_bytes(b"w" * 100)
    os.symlink("/", src / "root")
    os.symlink("/etc/passwd", src / "sub" / "passwd")
    os.symlink("../../outside", src / "sub" / "up")
    os.symlink("sub/weights.bin", src / "latest")  # inside: kept
    archive = tmp_path / "modeldir.tar"
    pack(src, archive, "none")
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    assert names == ["latest", "sub", "sub/weights.bin"], names
    dest = tmp_path / "again"
    unpack(archive, dest)  # the next attempt's download
    assert (dest / "latest").read_bytes() == b"w" * 100
