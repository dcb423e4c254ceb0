"""runner._fast: both implementations (compiled and pure twin) against the same tables."""
from __future__ import annotations

import copy
import math
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import xxhash

import runner._fast as fast

IMPLS = fast.implementations()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _impl_param(name):
    if name == "compiled" and IMPLS["compiled"] is None and not IN_CI:
        return pytest.param(
            name,
            marks=pytest.mark.skip(
                reason="compiled runner._fast not built "
                f"({fast.compiled_import_error()}); run: python3 setup.py build_ext --inplace"
            ),
        )
    return pytest.param(name)


@pytest.fixture(params=[_impl_param("pure"), _impl_param("compiled")])
def impl(request):
    ns = IMPLS[request.param]
    if ns is None:  # only reachable under CI=true
        pytest.fail(f"compiled runner._fast is not built under CI: {fast.compiled_import_error()}")
    return ns


def _compiled_or_fail():
    if IMPLS["compiled"] is None:
        if IN_CI:
            pytest.fail(f"compiled runner._fast is not built under CI: {fast.compiled_import_error()}")
        pytest.skip("compiled runner._fast not built; run: python3 setup.py build_ext --inplace")
    return IMPLS["compiled"]


# ---------------------------------------------------------------- base62

VECTORS = [
    (0, "0"),
    (1, "1"),
    (61, "z"),
    (62, "10"),
    (1546495043, "1gew0R"),
    (1541618418, "1gKTNC"),
    (1700000000, "1r31eq"),
    (2**64 - 1, "LygHa16AHYF"),
    (2**64, "LygHa16AHYG"),
]


@pytest.mark.parametrize("n,s", VECTORS)
def test_b62_vectors(impl, n, s):
    assert impl.b62encode(n) == s
    assert impl.b62decode(s) == n


def test_b62_random_round_trips(impl):
    rng = random.Random(62)
    for bits in (8, 32, 63, 64, 65, 128, 300):
        for _ in range(200):
            n = rng.getrandbits(bits)
            s = impl.b62encode(n)
            assert impl.b62decode(s) == n
            assert s == IMPLS["pure"].b62encode(n)


def test_b62_sorts_in_time_order(impl):
    ts = [1541618418, 1546495043, 1700000000, 1800000000]
    names = [impl.b62encode(t) for t in ts]
    assert names == sorted(names)


@pytest.mark.parametrize("bad", [-1, -(2**70)])
def test_b62_negative(impl, bad):
    with pytest.raises(ValueError):
        impl.b62encode(bad)


@pytest.mark.parametrize("bad", ["", "abc-", " 1", "1 ", "é", "1gew0R!", "z" * 12 + "_"])
def test_b62_decode_invalid(impl, bad):
    with pytest.raises(ValueError):
        impl.b62decode(bad)


def test_b62_type_errors(impl):
    with pytest.raises(TypeError):
        impl.b62encode(1.0)
    with pytest.raises(TypeError):
        impl.b62decode(b"1gew0R")


# ---------------------------------------------------------------- hashing


@pytest.mark.parametrize("size", [0, 1, 1000, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 5 * (1 << 20) + 123])
def test_content_hash_matches_xxhash(impl, tmp_path, size):
    data = random.Random(size).randbytes(size)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    want = xxhash.xxh3_128(data).hexdigest()
    assert impl.content_hash(str(p)) == want
    assert impl.content_hash(p) == want  # PathLike
    assert impl.hash_bytes(data) == want
    assert len(want) == 32


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, (1 << 20) + 7, (4 << 20) - 1, 4 << 20,
                                  (4 << 20) + 1, (9 << 20) + 3])
def test_compiled_hash_paths_agree(tmp_path, monkeypatch, overlap, size):
    """Both compiled loops (serial; reader thread + hasher) give xxh3_128 of the bytes."""
    _compiled_or_fail()
    from runner._fast import _hashing as hashing
    monkeypatch.setattr(hashing, "OVERLAP_FROM", 0 if overlap else 1 << 62)
    monkeypatch.setattr(hashing, "_may_overlap", lambda: True)
    data = random.Random(size).randbytes(size)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert hashing.content_hash(p) == xxhash.xxh3_128(data).hexdigest()


def test_compiled_hash_overlaps_only_with_a_free_cpu(monkeypatch):
    _compiled_or_fail()
    from runner._fast import _hashing
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert _hashing._may_overlap() is False  # one CPU: always the serial loop
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4096)))
    assert _hashing._may_overlap() is True  # far more CPUs than runnable tasks


def test_compiled_hash_overlaps_big_files(tmp_path):
    """A file over the threshold takes the overlapped loop by default (where 2 CPUs exist)."""
    _compiled_or_fail()
    from runner._fast import _hashing
    data = random.Random(7).randbytes(_hashing.OVERLAP_FROM + 12345)
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    assert _hashing.content_hash(p) == xxhash.xxh3_128(data).hexdigest()


def test_content_hash_missing_file(impl, tmp_path):
    with pytest.raises(FileNotFoundError):
        impl.content_hash(tmp_path / "nope")


# ---------------------------------------------------------------- merge

BIG = 123456789012345678901234567890

# (name, initial doc, chunk, expected doc, expected patch candidates)
MERGE_CASES = [
    ("nested merge", {}, b'{"experiment":{"a":1,"n":{"x":1}}}\n{"experiment":{"b":2,"n":{"y":2}}}\n',
     {"experiment": {"a": 1, "b": 2, "n": {"x": 1, "y": 2}}}, []),
    ("later scalar replaces", {}, b'{"e":{"loss":1.5}}\n{"e":{"loss":0.5}}\n', {"e": {"loss": 0.5}}, []),
    ("scalar replaces dict", {}, b'{"e":{"a":{"b":1}}}\n{"e":{"a":3}}\n', {"e": {"a": 3}}, []),
    ("dict replaces scalar", {}, b'{"e":{"a":3}}\n{"e":{"a":{"b":1}}}\n', {"e": {"a": {"b": 1}}}, []),
    ("list replaces", {}, b'{"e":{"l":[1,2,3]}}\n{"e":{"l":[4]}}\n', {"e": {"l": [4]}}, []),
    ("list replaces dict", {}, b'{"e":{"l":{"a":1}}}\n{"e":{"l":[4]}}\n', {"e": {"l": [4]}}, []),
    ("keys never seen again kept", {}, b'{"e":{"a":1}}\n{"f":2}\n', {"e": {"a": 1}, "f": 2}, []),
    ("null kept", {}, b'{"e":{"a":1}}\n{"e":{"a":null}}\n', {"e": {"a": None}}, []),
    ("top-level null", {"x": 1}, b'{"x":null}', {"x": None}, []),
    ("runner and asset ignored", {"runner": {"host": "h"}, "asset": "u"},
     b'{"runner":{"host":"evil","new":1},"asset":"x","e":1}\n{"runner":5}\n',
     {"runner": {"host": "h"}, "asset": "u", "e": 1}, []),
    ("runner ignored even when absent", {}, b'{"runner":{"a":1},"asset":"x"}', {}, []),
    ("studioml add-only", {"studioml": {"status": "running", "experiment": {"key": "k"}}},
     b'{"studioml":{"status":"completed","extra":1,"experiment":{"key":"evil","note":"n"}}}\n'
     b'{"studioml":{"extra":2}}\n',
     {"studioml": {"status": "running", "extra": 1, "experiment": {"key": "k", "note": "n"}}}, []),
    ("studioml scalar never replaced by dict", {"studioml": {"s": 1}}, b'{"studioml":{"s":{"a":1}}}',
     {"studioml": {"s": 1}}, []),
    ("studioml whole value not replaced", {"studioml": {"s": 1}}, b'{"studioml":5}', {"studioml": {"s": 1}}, []),
    ("studioml added when absent", {}, b'{"studioml":{"a":1}}', {"studioml": {"a": 1}}, []),
    ("studioml null key kept add-only", {"studioml": {"a": None}}, b'{"studioml":{"a":1}}',
     {"studioml": {"a": None}}, []),
    ("whitespace and indented lines", {}, b'   {"a":1}   \n\t{"b":2}\t\n\x0b{"c":3}\x0c\n', {"a": 1, "b": 2, "c": 3}, []),
    ("CRLF", {}, b'{"a":1}\r\n{"b":{"c":2}}\r\n', {"a": 1, "b": {"c": 2}}, []),
    ("not json", {}, b'{not json}\n{"a":1\n{a:1}\n{"a":1}}\n', {}, []),
    ("plain output", {}, b"epoch 1 loss 0.5\n\n{\n}\nloss {x}\n", {}, []),
    ("empty object", {"a": 1}, b"{}", {"a": 1}, []),
    ("non-object JSON", {}, b'"str"\n123\nnull\ntrue\n', {}, []),
    ("invalid utf-8", {}, b'{"a":"\xff\xfe"}\n{"b":"ok"}\n', {"b": "ok"}, []),
    ("valid utf-8 kept", {}, '{"a":"héllo ✓"}\n'.encode(), {"a": "héllo ✓"}, []),
    ("Infinity accepted", {}, b'{"b":Infinity}\n{"c":-Infinity}\n{"ok":1}\n',
     {"b": float("inf"), "c": float("-inf"), "ok": 1}, []),
    ("constants only as JSON values", {}, b'{"a":nan}\n{"b":infinity}\n{"c":NaNa}\n', {}, []),
    ("trailing partial line", {}, b'log\n{"a":1}\n{"b":2}', {"a": 1, "b": 2}, []),
    ("trailing comma rejected", {}, b'{"a":1,}', {}, []),
    ("duplicate keys last wins", {}, b'{"a":1,"a":2}', {"a": 2}, []),
    ("patch candidates", {}, b'[{"op":"add","path":"/e","value":1}]\n  [1,2]  \n[not json]\n{"a":1}\n[]',
     {"a": 1}, [b'[{"op":"add","path":"/e","value":1}]', b"[1,2]", b"[not json]", b"[]"]),
    ("mixed brackets ignored", {}, b'{"a":1]\n[{"a":1}}\n', {}, []),
    ("empty chunk", {}, b"", {}, []),
    ("only newlines", {}, b"\n\n\r\n", {}, []),
    ("long fraction is a float", {}, b'{"f":0.0037716159341637523,"g":1.50000000000000000000001}',
     {"f": 0.0037716159341637523, "g": 1.5}, []),
    ("19-digit int exact", {}, b'{"a":1234567890123456789,"b":-9223372036854775809,"s":"12345678901234567890"}',
     {"a": 1234567890123456789, "b": -9223372036854775809, "s": "12345678901234567890"}, []),
    ("lone surrogate accepted", {}, b'{"a":"\\ud800","b":"\\uDC00x"}', {"a": "\ud800", "b": "\udc00x"}, []),
    ("surrogate pair", {}, b'{"a":"\\ud83d\\ude00"}', {"a": "\U0001f600"}, []),
    ("out-of-range float is inf", {}, b'{"a":1e400,"b":-1E400,"c":1e-400}',
     {"a": float("inf"), "b": float("-inf"), "c": 0.0}, []),
    ("too deep for json rejected", {}, b'{"a":' + b"[" * 1010 + b"]" * 1010 + b"}\n{\"ok\":1}", {"ok": 1}, []),
    ("deep nesting", {}, b'{"a":{"b":{"c":{"d":{"e":1}}}}}\n{"a":{"b":{"c":{"d":{"f":2}}}}}',
     {"a": {"b": {"c": {"d": {"e": 1, "f": 2}}}}}, []),
]


@pytest.mark.parametrize("name,initial,chunk,expected,patches", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_merge_lines_table(impl, name, initial, chunk, expected, patches):
    doc = copy.deepcopy(initial)
    got = impl.merge_lines(doc, chunk)
    assert doc == expected
    assert got == patches
    assert all(type(p) is bytes for p in got)


def test_nan_lines_are_merged_not_dropped(impl):
    """``json.dumps`` prints NaN for a diverged loss: the line is a metric, not plain output."""
    doc = {}
    impl.merge_lines(doc, b'{"experiment": {"loss": NaN, "step": 3}}\nlog\n{"a": [NaN, -Infinity]}')
    assert doc["experiment"]["step"] == 3 and math.isnan(doc["experiment"]["loss"])
    assert math.isnan(doc["a"][0]) and doc["a"][1] == float("-inf")


def test_big_int_accepted(impl):
    doc = {}
    impl.merge_lines(doc, b'{"big":%d,"x":1,"l":[-%d],"n":{"u":18446744073709551616}}' % (BIG, BIG))
    assert doc == {"big": BIG, "x": 1, "l": [-BIG], "n": {"u": 2**64}}  # exact ints, never floats
    assert type(doc["big"]) is int and type(doc["n"]["u"]) is int


def test_merge_lines_accepts_bytearray_and_memoryview(impl):
    for chunk in (bytearray(b'{"a":1}'), memoryview(b'{"a":1}')):
        doc = {}
        impl.merge_lines(doc, chunk)
        assert doc == {"a": 1}


def test_merge_object_direct(impl):
    doc = {"studioml": {"status": "running"}, "runner": {"h": 1}}
    impl.merge_object(doc, {"studioml": {"status": "x", "y": 1}, "runner": {}, "asset": 1, "e": {"a": [1]}})
    assert doc == {"studioml": {"status": "running", "y": 1}, "runner": {"h": 1}, "e": {"a": [1]}}


def test_merge_type_errors(impl):
    with pytest.raises(TypeError):
        impl.merge_lines([], b"{}")
    with pytest.raises(TypeError):
        impl.merge_object({}, [])


def _stream(seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    keys = ["a", "b", "c", "loss", "acc", "studioml", "runner", "asset", "experiment", "x y", "ü"]

    def value(depth):
        r = rng.random()
        if depth < 3 and r < 0.35:
            return {rng.choice(keys): value(depth + 1) for _ in range(rng.randint(0, 4))}
        if r < 0.45:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))] if depth < 3 else []
        if r < 0.55:
            return None
        if r < 0.7:
            return rng.randint(-(2**40), 2**40)
        if r < 0.85:
            return rng.random()
        return rng.choice(["s", "", "é", True, False])

    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            out.append(b"step %d loss %f" % (rng.randint(0, 999), rng.random()))
        elif r < 0.85:
            obj = {rng.choice(keys): value(0) for _ in range(rng.randint(1, 5))}
            line = orjson.dumps(obj)
            if rng.random() < 0.2:
                line = b"  " + line + b" \r"
            out.append(line)
        elif r < 0.9:
            out.append(b'[{"op":"add","path":"/a","value":%d}]' % rng.randint(0, 9))
        elif r < 0.95:
            out.append(b'{"broken": ' + str(rng.random()).encode())
        elif r < 0.98:
            out.append(b'{"n":NaN}' if rng.random() < 0.5 else b'{"u":"\xc3"}')
        else:  # where orjson alone would differ from json: wide ints, lone surrogates, 1e400
            out.append(rng.choice([
                b'{"big":%d,"neg":-%d}' % (rng.randint(2**63, 2**80), rng.randint(2**63, 2**80)),
                b'{"l":[1,%d],"f":0.%019d}' % (rng.randint(10**18, 10**25), rng.randint(0, 10**18)),
                b'{"s":"\\ud8%02x","t":"\\udfff"}' % rng.randint(0, 255),
                b'{"inf":%de%d}' % (rng.randint(1, 9), rng.randint(300, 500)),
                b'{"deep":' + b"[" * rng.randint(900, 1100) + b"]" * 1100 + b"}",
            ]))
    return b"\n".join(out)


@pytest.mark.parametrize("seed", range(5))
def test_compiled_and_pure_agree_on_random_stream(seed):
    compiled = _compiled_or_fail()
    pure = IMPLS["pure"]
    stream = _stream(seed, 3000)
    rng = random.Random(seed)
    # feed in line-aligned chunks of random sizes, as the reader does
    lines = stream.split(b"\n")
    chunks, i = [], 0
    while i < len(lines):
        k = rng.randint(1, 50)
        chunks.append(b"\n".join(lines[i:i + k]))
        i += k
    docs = {"pure": {"studioml": {"status": "running"}}, "compiled": {"studioml": {"status": "running"}}}
    got = {"pure": [], "compiled": []}
    for ch in chunks:
        got["pure"] += pure.merge_lines(docs["pure"], ch)
        got["compiled"] += compiled.merge_lines(docs["compiled"], ch)
    # json.dumps tells int from float, keeps wide ints and lone surrogates (orjson.dumps cannot)
    assert json.dumps(docs["pure"], sort_keys=True) == json.dumps(docs["compiled"], sort_keys=True)
    assert docs["pure"] == docs["compiled"]
    assert got["pure"] == got["compiled"]
    assert docs["pure"]["studioml"]["status"] == "running"
    assert "runner" not in docs["pure"] and "asset" not in docs["pure"]


def _raw_object(rng, depth, keys):
    """JSON text of an object over a tiny key space (so later lines overwrite earlier ones, and
    objects and scalars take turns at one path), with equal keys in one object now and then."""
    fields = []
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if depth < 3 and r < 0.4:
            value = _raw_object(rng, depth + 1, keys)
        elif r < 0.5:
            value = "[{}]".format(",".join(_raw_object(rng, 3, keys) if rng.random() < 0.3 else "1"
                                      for _ in range(rng.randint(0, 2))))
        elif r < 0.6:
            value = rng.choice(["null", "true", "false", '"s"', '"\\u00e9"', "-0", "1.5e3"])
        else:
            value = str(rng.randint(-5, 5))
        fields.append(f'"{rng.choice(keys)}":{value}')
    return "{" + ",".join(fields) + "}"


@pytest.mark.parametrize("seed", range(40))
def test_compiled_keeps_the_rule_and_key_order_when_lines_overwrite(seed):
    """The compiled merge applies a chunk's lines newest first (runner/_fast/sjmerge.h); the
    document must equal the twin's, key order included, on streams made of overwrites."""
    compiled = _compiled_or_fail()
    pure = IMPLS["pure"]
    rng = random.Random(1000 + seed)
    keys = ["a", "b", "c", "d"] + (["studioml", "runner", "asset"] if seed % 2 else [])
    lines = []
    for _ in range(rng.randint(1, 300)):
        r = rng.random()
        if r < 0.8:
            lines.append(_raw_object(rng, 0, keys).encode())
        elif r < 0.85:
            lines.append(b'{"a": 1, "b": {"c": 2}, "a": {"d": 3}}')  # equal keys: last wins
        elif r < 0.9:
            lines.append(b'{"b":%d}' % (10**20 + rng.randint(0, 9)))  # the stdlib rule decides
        elif r < 0.95:
            lines.append(b'{"c": 1, broken')
        else:
            lines.append(b"plain output %d" % rng.randint(0, 99))
    docs = {"pure": {}, "compiled": {}}
    i = 0
    while i < len(lines):
        k = rng.randint(1, 120)
        chunk = b"\n".join(lines[i:i + k])
        for name, impl_ in (("pure", pure), ("compiled", compiled)):
            impl_.merge_lines(docs[name], chunk)
        i += k
        assert json.dumps(docs["compiled"]) == json.dumps(docs["pure"])  # order too


# ---------------------------------------------------------------- the switch


def _implementation_in_subprocess(env_value):
    env = dict(os.environ)
    env.pop("RUNNER_PUREPYTHON", None)
    if env_value is not None:
        env["RUNNER_PUREPYTHON"] = env_value
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", "import runner._fast as f; print(f.IMPLEMENTATION, f.b62encode(1546495043))"],
        env=env, capture_output=True, text=True, check=True, cwd=root,
    )
    return out.stdout.split()


def test_env_forces_pure():
    assert _implementation_in_subprocess("1") == ["pure", "1gew0R"]


def test_default_is_compiled_when_built():
    _compiled_or_fail()
    assert _implementation_in_subprocess(None) == ["compiled", "1gew0R"]


def test_module_exports():
    assert fast.IMPLEMENTATION in ("compiled", "pure")
    for name in ("b62encode", "b62decode", "content_hash", "hash_bytes", "merge_object", "merge_lines"):
        assert callable(getattr(fast, name))
    assert IMPLS["pure"].IMPLEMENTATION == "pure"


# ---------------------------------------------------------------------------------------------
# mask_hits: where runner.redact must look
# ---------------------------------------------------------------------------------------------

MASK_HITS_CASES = [
    ("nothing", b"epoch 1 loss=0.5\n", (), []),
    ("keywords any case", b"KEY Token sEcReT PassW passw", (),
     [(0, 0), (4, 0), (10, 0), (17, 0), (23, 0)]),
    ("keyword cut at the end", b"ke tok secre pass", (), []),
    ("url", b"a://b x:/ ://", (), [(1, 1), (10, 1)]),
    ("literals overlapping and at one place", b"abab abcd", (b"abab", b"ab", b"ba"),
     [(0, 2), (0, 3), (1, 4), (2, 3), (5, 3)]),
    ("one-byte and empty literals", b"xyx", (b"x", b""), [(0, 2), (2, 2)]),
    ("literal at the very end", b"....zz", (b"zz",), [(4, 2)]),
    ("keyword inside a literal", b"-monkey-", (b"monkey",), [(1, 2), (4, 0)]),
]


@pytest.mark.parametrize("name,data,literals,expected", MASK_HITS_CASES,
                         ids=[c[0] for c in MASK_HITS_CASES])
def test_mask_hits_table(impl, name, data, literals, expected):
    assert impl.mask_hits(data, literals) == sorted(expected)


@pytest.mark.parametrize("seed", range(5))
def test_compiled_and_pure_agree_on_mask_hits(seed):
    compiled = _compiled_or_fail()
    rng = random.Random(seed)
    alphabet = b"keyKEYtokenTOKENsecretpasswPASSW:/ab\n\r\x00\xff"
    literals = tuple(bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
                     for _ in range(rng.randint(0, 6)))
    for _ in range(50):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        assert compiled.mask_hits(data, literals) == IMPLS["pure"].mask_hits(data, literals)
