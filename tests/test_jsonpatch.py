"""runner.jsonpatch: RFC 6902 subset with the runner's ownership rules."""
from __future__ import annotations

import copy

import pytest

from runner.jsonpatch import PatchRejected, apply_patch, parse_patch

BASE = {
    "runner": {"host": "h", "exit": 0},
    "asset": "uuid",
    "studioml": {"status": "running", "tags": ["a"], "experiment": {"key": "k"}},
    "experiment": {"loss": 1.0, "l": [1, 2, 3], "a/b": 1, "m~n": 2, "nested": {"x": 1}},
}

# (name, ops, expected doc) -- accepted patches
OK_CASES = [
    ("add new key", [{"op": "add", "path": "/experiment/acc", "value": 0.9}],
     {"acc": 0.9}),
    ("add replaces existing outside studioml", [{"op": "add", "path": "/experiment/loss", "value": 0.5}],
     {"loss": 0.5}),
    ("add top-level", [{"op": "add", "path": "/other", "value": {"a": 1}}], None),
    ("remove", [{"op": "remove", "path": "/experiment/loss"}], {"loss": None}),
    ("replace", [{"op": "replace", "path": "/experiment/loss", "value": 2}], {"loss": 2}),
    ("array insert", [{"op": "add", "path": "/experiment/l/0", "value": 0}], {"l": [0, 1, 2, 3]}),
    ("array append", [{"op": "add", "path": "/experiment/l/-", "value": 4}], {"l": [1, 2, 3, 4]}),
    ("array insert at end index", [{"op": "add", "path": "/experiment/l/3", "value": 4}], {"l": [1, 2, 3, 4]}),
    ("array remove", [{"op": "remove", "path": "/experiment/l/1"}], {"l": [1, 3]}),
    ("array replace", [{"op": "replace", "path": "/experiment/l/2", "value": 9}], {"l": [1, 2, 9]}),
    ("escape ~1", [{"op": "replace", "path": "/experiment/a~1b", "value": 5}], {"a/b": 5}),
    ("escape ~0", [{"op": "replace", "path": "/experiment/m~0n", "value": 6}], {"m~n": 6}),
    ("test passes", [{"op": "test", "path": "/experiment/loss", "value": 1.0},
                     {"op": "add", "path": "/experiment/t", "value": 1}], {"t": 1}),
    ("test on runner-free studioml path", [{"op": "test", "path": "/studioml/status", "value": "running"}], {}),
    ("move", [{"op": "move", "from": "/experiment/loss", "path": "/experiment/old_loss"}],
     {"loss": None, "old_loss": 1.0}),
    ("copy", [{"op": "copy", "from": "/experiment/nested", "path": "/experiment/n2"}], {"n2": {"x": 1}}),
    ("studioml add new key", [{"op": "add", "path": "/studioml/note", "value": "hi"}], None),
    ("studioml add nested new key", [{"op": "add", "path": "/studioml/experiment/extra", "value": 1}], None),
    ("studioml append", [{"op": "add", "path": "/studioml/tags/-", "value": "b"}], None),
    ("copy from studioml", [{"op": "copy", "from": "/studioml/status", "path": "/experiment/s"}], {"s": "running"}),
    ("empty patch", [], {}),
]


@pytest.mark.parametrize("name,ops,exp_changes", OK_CASES, ids=[c[0] for c in OK_CASES])
def test_patch_ok(name, ops, exp_changes):
    doc = copy.deepcopy(BASE)
    apply_patch(doc, ops)
    if exp_changes is not None:
        want = copy.deepcopy(BASE)
        for k, v in exp_changes.items():
            if v is None:
                want["experiment"].pop(k)
            else:
                want["experiment"][k] = v
        assert doc == want
    assert doc["runner"] == BASE["runner"] and doc["asset"] == BASE["asset"]
    assert doc["studioml"]["status"] == "running"


def test_studioml_adds_land():
    doc = copy.deepcopy(BASE)
    apply_patch(doc, [{"op": "add", "path": "/studioml/note", "value": "hi"},
                      {"op": "add", "path": "/studioml/tags/-", "value": "b"},
                      {"op": "add", "path": "/studioml/experiment/extra", "value": 1}])
    assert doc["studioml"] == {"status": "running", "tags": ["a", "b"], "note": "hi",
                               "experiment": {"key": "k", "extra": 1}}


def test_added_value_is_copied():
    v = {"a": [1]}
    doc = {}
    apply_patch(doc, [{"op": "add", "path": "/x", "value": v}])
    v["a"].append(2)
    assert doc == {"x": {"a": [1]}}


REJECT_CASES = [
    ("runner add", [{"op": "add", "path": "/runner/x", "value": 1}], "runner"),
    ("runner root replace", [{"op": "replace", "path": "/runner", "value": {}}], "runner"),
    ("runner remove", [{"op": "remove", "path": "/runner/host"}], "runner"),
    ("runner as copy source", [{"op": "copy", "from": "/runner/host", "path": "/experiment/h"}], "runner"),
    ("runner test", [{"op": "test", "path": "/runner/host", "value": "h"}], "runner"),
    ("asset replace", [{"op": "replace", "path": "/asset", "value": "x"}], "runner"),
    ("asset move into", [{"op": "move", "from": "/experiment/loss", "path": "/asset"}], "runner"),
    ("studioml replace", [{"op": "replace", "path": "/studioml/status", "value": "completed"}], "only 'add'"),
    ("studioml remove", [{"op": "remove", "path": "/studioml/status"}], "only 'add'"),
    ("studioml add existing", [{"op": "add", "path": "/studioml/status", "value": "x"}], "add-only"),
    ("studioml add existing nested", [{"op": "add", "path": "/studioml/experiment/key", "value": "x"}],
     "add-only"),
    ("studioml add root", [{"op": "add", "path": "/studioml", "value": {}}], "/studioml"),
    ("studioml array insert", [{"op": "add", "path": "/studioml/tags/0", "value": "z"}], "appends"),
    ("studioml copy into", [{"op": "copy", "from": "/experiment/loss", "path": "/studioml/loss"}], "only 'add'"),
    ("studioml move out", [{"op": "move", "from": "/studioml/status", "path": "/experiment/s"}], "move out"),
    ("unknown op", [{"op": "frobnicate", "path": "/x"}], "unknown op"),
    ("missing path", [{"op": "add", "value": 1}], "path"),
    ("missing value", [{"op": "add", "path": "/x"}], "value"),
    ("missing from", [{"op": "move", "path": "/x"}], "from"),
    ("bad pointer", [{"op": "add", "path": "x", "value": 1}], "does not start"),
    ("missing parent", [{"op": "add", "path": "/nope/x", "value": 1}], "does not exist"),
    ("remove missing", [{"op": "remove", "path": "/experiment/nope"}], "does not exist"),
    ("replace missing", [{"op": "replace", "path": "/experiment/nope", "value": 1}], "does not exist"),
    ("index out of range", [{"op": "add", "path": "/experiment/l/9", "value": 1}], "out of range"),
    ("bad index", [{"op": "add", "path": "/experiment/l/01", "value": 1}], "bad array index"),
    ("remove dash", [{"op": "remove", "path": "/experiment/l/-"}], "'-'"),
    ("through scalar", [{"op": "add", "path": "/experiment/loss/x", "value": 1}], "scalar"),
    ("test fails", [{"op": "test", "path": "/experiment/loss", "value": 2.0}], "test failed"),
    ("test bool vs int", [{"op": "test", "path": "/experiment/l/0", "value": True}], "test failed"),
    ("whole document", [{"op": "replace", "path": "", "value": {}}], "whole document"),
    ("move into own child", [{"op": "move", "from": "/experiment", "path": "/experiment/x"}], "own child"),
    ("op not object", ["add"], "not an object"),
]


@pytest.mark.parametrize("name,ops,reason", REJECT_CASES, ids=[c[0] for c in REJECT_CASES])
def test_patch_rejected(name, ops, reason):
    doc = copy.deepcopy(BASE)
    with pytest.raises(PatchRejected, match=reason.replace("(", r"\(")) as ei:
        apply_patch(doc, ops)
    assert isinstance(ei.value, ValueError)
    assert ei.value.reason
    assert doc == BASE  # untouched


def test_atomic_when_a_later_op_fails():
    doc = copy.deepcopy(BASE)
    ops = [
        {"op": "add", "path": "/experiment/a", "value": 1},
        {"op": "remove", "path": "/experiment/loss"},
        {"op": "add", "path": "/studioml/x", "value": 1},
        {"op": "replace", "path": "/runner/host", "value": "evil"},
    ]
    with pytest.raises(PatchRejected) as ei:
        apply_patch(doc, ops)
    assert ei.value.op_index == 3
    assert doc == BASE


def test_identity_of_doc_kept():
    doc = copy.deepcopy(BASE)
    same = doc
    apply_patch(doc, [{"op": "add", "path": "/experiment/z", "value": 1}])
    assert same is doc and doc["experiment"]["z"] == 1


def test_not_a_list():
    with pytest.raises(PatchRejected):
        apply_patch({}, {"op": "add"})


PARSE_CASES = [
    (b'[{"op":"add","path":"/a","value":1}]', [{"op": "add", "path": "/a", "value": 1}]),
    (b'  [{"op":"remove","path":"/a"},{"op":"test","path":"/b","value":null}]\r\n',
     [{"op": "remove", "path": "/a"}, {"op": "test", "path": "/b", "value": None}]),
    (b"[]", None),
    (b"[1,2]", None),
    (b'[{"op":"add"}]', None),
    (b'[{"path":"/a"}]', None),
    (b'[{"op":1,"path":"/a"}]', None),
    (b'[{"op":"add","path":"/a","value":Infinity}]',
     [{"op": "add", "path": "/a", "value": float("inf")}]),
    (b"[not json]", None),
    (b'{"op":"add","path":"/a"}', None),
    (b'[{"op":"add","path":"/\xff"}]', None),
    (b"plain", None),
]


@pytest.mark.parametrize("line,want", PARSE_CASES)
def test_parse_patch(line, want):
    assert parse_patch(line) == want


def test_parse_then_apply_round_trip():
    doc = {"experiment": {}}
    ops = parse_patch(b'[{"op":"add","path":"/experiment/e","value":[1]},{"op":"add","path":"/experiment/e/-","value":2}]')
    apply_patch(doc, ops)
    assert doc == {"experiment": {"e": [1, 2]}}
