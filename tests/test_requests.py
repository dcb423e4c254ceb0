"""Reading a request body (SPEC section 2): runner.requests.parse_request."""
from __future__ import annotations

import copy
import json

import pytest

from runner.errors import BadRequest
from runner.requests import (DEFAULT_SAVE_FREQUENCY, MAX_SAVE_FREQUENCY, parse_request,
                             parse_resources, safe_path_part)

STORE = "file:///srv/studioml"


def artifact(label: str, mutable: bool = False) -> dict:
    key = f"experiments/exp-1/{label}.tar"
    return {"key": key, "bucket": "studioml", "qualified": f"{STORE}/{key}",
            "local": f"/home/client/.studioml/experiments/exp-1/{label}",
            "mutable": mutable, "unpack": True}


def minimal() -> dict:
    return {"experiment": {"key": "exp-1", "filename": "train.py",
                           "artifacts": {"workspace": artifact("workspace")}},
            "config": {}}


def body(request) -> bytes:
    return json.dumps(request).encode()


def bad(request_or_body, match: str) -> None:
    data = request_or_body if isinstance(request_or_body, bytes) else body(request_or_body)
    with pytest.raises(BadRequest, match=match):
        parse_request(data)


def test_valid_minimal_request() -> None:
    request, facts = parse_request(body(minimal()))
    assert request == minimal()
    assert facts.key == "exp-1"
    assert facts.filename == "train.py"
    assert facts.project == ""
    assert facts.resources == {"cpus": 1, "gpus": 0, "ram": 0, "hdd": 0, "gpuMem": 0}
    assert facts.max_duration is None
    assert facts.lifetime is None
    assert facts.time_added is None
    assert facts.stale_at is None
    assert facts.save_frequency == DEFAULT_SAVE_FREQUENCY == 60.0


def test_config_may_be_absent_and_str_body_is_fine() -> None:
    request = minimal()
    del request["config"]
    _, facts = parse_request(json.dumps(request))
    assert facts.key == "exp-1"


def test_full_request_and_unknown_fields_are_kept() -> None:
    request = minimal()
    exp = request["experiment"]
    exp.update({"project": "proj", "args": ["--name", "'two words'"], "pythonver": "3.11",
                "pythonenv": ["numpy==1.26.4", "studioml==0.0.48"], "status": "waiting",
                "time_added": 1700000000.5, "max_duration": "20m", "owner": "alice",
                "from_compl_service": False, "brand_new_field": {"x": [1, 2]}})
    exp["artifacts"]["modeldir"] = artifact("modeldir", mutable=True)
    exp["artifacts"]["data"] = {"url": "file:///srv/data.tar", "unpack": True, "mutable": False}
    request["config"] = {"env": {"A": "1"}, "experimentLifetime": "1h",
                         "saveWorkspaceFrequency": "5m", "cloud": {"queue": {"rmq": "amqp://x"}},
                         "something_else": True}
    request["top_level_extra"] = 42
    parsed, facts = parse_request(body(request))
    assert parsed == request
    assert parsed["top_level_extra"] == 42
    assert parsed["experiment"]["brand_new_field"] == {"x": [1, 2]}
    assert facts.project == "proj"
    assert facts.max_duration == 1200.0
    assert facts.lifetime == 3600.0
    assert facts.time_added == 1700000000.5
    assert facts.stale_at == 1700003600.5
    assert facts.save_frequency == 300.0


@pytest.mark.parametrize("data", [b"", b"not json", b"{\"experiment\": ", b"\xff\xfe\x00",
                                  b"{'single': 'quotes'}"])
def test_not_json(data: bytes) -> None:
    bad(data, "not JSON")


@pytest.mark.parametrize("value", [[], [minimal()], "a string", 5, None])
def test_not_an_object(value) -> None:
    bad(body(value), "not a JSON object")


def test_missing_experiment() -> None:
    bad({"config": {}}, "missing experiment")
    bad({"experiment": "exp-1"}, "missing experiment")


def test_config_not_an_object() -> None:
    request = minimal()
    request["config"] = ["x"]
    bad(request, "config must be an object")


@pytest.mark.parametrize("value", [None, "", "   ", 5])
def test_missing_key(value) -> None:
    request = minimal()
    if value is None:
        del request["experiment"]["key"]
    else:
        request["experiment"]["key"] = value
    bad(request, "missing experiment.key")


@pytest.mark.parametrize("value", [None, "", 3])
def test_missing_filename(value) -> None:
    request = minimal()
    if value is None:
        del request["experiment"]["filename"]
    else:
        request["experiment"]["filename"] = value
    bad(request, "missing experiment.filename")


@pytest.mark.parametrize("args", ["--lr 0.1", ["--lr", 0.1], [None], {"lr": "0.1"}])
def test_args_must_be_a_list_of_strings(args) -> None:
    request = minimal()
    request["experiment"]["args"] = args
    bad(request, "args must be a list of strings")


def test_module_mode_filename_is_accepted() -> None:
    request = minimal()
    request["experiment"].update({"filename": "-m", "args": ["pkg.train", "--epochs", "2"]})
    _, facts = parse_request(body(request))
    assert facts.filename == "-m"


def test_pythonenv_must_be_a_list_of_strings() -> None:
    request = minimal()
    request["experiment"]["pythonenv"] = "numpy==1"
    bad(request, "pythonenv must be a list of strings")


@pytest.mark.parametrize("url", ["ftp://host/x.tar", "nfs://server/x", "no-scheme/path.tar"])
def test_unsupported_artifact_scheme(url: str) -> None:
    request = minimal()
    request["experiment"]["artifacts"]["modeldir"] = {"key": "x", "qualified": url,
                                                      "mutable": True}
    bad(request, "modeldir.*unsupported storage URL")


def test_artifact_not_an_object() -> None:
    request = minimal()
    request["experiment"]["artifacts"]["tb"] = "s3://x"
    bad(request, "artifact 'tb' is not an object")


def test_artifacts_not_an_object() -> None:
    request = minimal()
    request["experiment"]["artifacts"] = ["workspace"]
    bad(request, "artifacts must be an object")


def test_artifact_local_path_is_not_a_source() -> None:
    request = minimal()
    request["experiment"]["artifacts"]["output"] = {"local": "/home/client/out", "mutable": True}
    parse_request(body(request))  # nothing to download, and not a bad request


def test_singularity_requests_are_container_mode_not_bad_requests() -> None:
    from runner.containers import ImageRef, image_of

    request = minimal()
    request["experiment"]["artifacts"]["_singularity"] = {
        "qualified": f"{STORE}/images/img.sif", "key": "images/img.sif"}
    parse_request(body(request))
    assert image_of(request) == ImageRef(storage_url=f"{STORE}/images/img.sif")
    del request["experiment"]["artifacts"]["workspace"]  # the image may carry the code
    parse_request(body(request))
    for reference in ("docker://127.0.0.1:5000/team/py:3", "oras://ghcr.io/x/y:1",
                      "library://lolcow"):
        request["experiment"]["artifacts"]["_singularity"] = {"qualified": reference}
        parse_request(body(request))
        assert image_of(request) == ImageRef(reference=reference)
    request["experiment"]["artifacts"]["_singularity"] = {"local": "docker://busybox:1"}
    assert image_of(request) == ImageRef(reference="docker://busybox:1")


def test_config_image_names_an_oci_image() -> None:
    from runner.containers import ImageRef, image_of

    request = minimal()
    request["config"]["image"] = "docker://localhost:5000/py:1"
    parse_request(body(request))
    assert image_of(request) == ImageRef(reference="docker://localhost:5000/py:1")
    assert image_of(minimal()) is None


@pytest.mark.parametrize("image, match", [
    ({"qualified": "ftp://host/img.sif"}, "no image reference"),
    ({"local": "/home/me/img.sif"}, "no image reference"),
    ({"qualified": "docker://"}, "names no image"),
])
def test_images_that_cannot_be_understood_are_bad_requests(image, match) -> None:
    request = minimal()
    request["experiment"]["artifacts"]["_singularity"] = image
    bad(request, match)
    request = minimal()
    request["config"]["image"] = "docker://x"
    request["experiment"]["artifacts"]["_singularity"] = {"qualified": "docker://y"}
    bad(request, "both")


def test_no_workspace_is_a_bad_request() -> None:
    request = minimal()
    request["experiment"]["artifacts"] = {"modeldir": artifact("modeldir", mutable=True)}
    bad(request, "no workspace")
    del request["experiment"]["artifacts"]
    bad(request, "no workspace")


def test_encrypted_envelope_is_a_bad_request() -> None:
    envelope = {"message": {"experiment": {"key": "exp-1", "project": "p"},
                            "time_added": 1700000000.0, "experiment_lifetime": "30m",
                            "resources_needed": {"cpus": 1},
                            "payload": "QUJD,REVG", "signature": "R0hJ",
                            "fingerprint": "SHA256:abc"}}
    bad(envelope, "encrypted")


def test_resources_from_experiment_with_sizes_parsed() -> None:
    request = minimal()
    request["experiment"]["resources_needed"] = {"cpus": 2, "gpus": 1, "ram": "2gb",
                                                 "hdd": "10GiB", "gpuMem": "500mb"}
    request["config"]["resources_needed"] = {"cpus": 16, "ram": "64gb"}
    _, facts = parse_request(body(request))
    assert facts.resources == {"cpus": 2, "gpus": 1, "ram": 2 * 10**9, "hdd": 10 * 2**30,
                               "gpuMem": 500 * 10**6}


def test_resources_from_config_when_experiment_has_none() -> None:
    request = minimal()
    request["config"]["resources_needed"] = {"cpus": "4", "ram": "2gib", "hdd": 1048576,
                                             "gpuCount": 2}
    _, facts = parse_request(body(request))
    assert facts.resources == {"cpus": 4, "gpus": 2, "ram": 2 * 2**30, "hdd": 1048576,
                               "gpuMem": 0}


@pytest.mark.parametrize("resources, match", [
    ({"ram": "lots"}, "resources_needed"),
    ({"cpus": "many"}, "resources_needed"),
    ({"cpus": -1}, "negative"),
    ({"hdd": "-5gb"}, "resources_needed"),
    ("2 cpus", "resources_needed must be an object"),
])
def test_bad_resources(resources, match) -> None:
    request = minimal()
    request["experiment"]["resources_needed"] = resources
    bad(request, match)


def test_parse_resources_direct() -> None:
    assert parse_resources(None) == {"cpus": 1, "gpus": 0, "ram": 0, "hdd": 0, "gpuMem": 0}
    assert parse_resources({"cpus": 2.0, "ram": "1kib"})["ram"] == 1024


@pytest.mark.parametrize("field, where, value, expected", [
    ("max_duration", "experiment", "90s", 90.0),
    ("max_duration", "experiment", "1h30m", 5400.0),
    ("max_duration", "experiment", 120, 120.0),
    ("max_duration", "experiment", None, None),
    ("max_duration", "experiment", "", None),
    ("max_duration", "experiment", "0", None),
    ("experimentLifetime", "config", "30m", 1800.0),
    ("experimentLifetime", "config", "1.5h", 5400.0),
    ("experimentLifetime", "config", 0, None),
])
def test_durations(field, where, value, expected) -> None:
    request = minimal()
    request[where][field] = value
    _, facts = parse_request(body(request))
    attr = "max_duration" if field == "max_duration" else "lifetime"
    assert getattr(facts, attr) == expected


@pytest.mark.parametrize("field, where", [("max_duration", "experiment"),
                                          ("experimentLifetime", "config"),
                                          ("saveWorkspaceFrequency", "config")])
def test_bad_durations(field, where) -> None:
    request = minimal()
    request[where][field] = "forever"
    bad(request, field)


@pytest.mark.parametrize("value, min_interval, expected", [
    (None, 10.0, 60.0),
    ("3m", 10.0, 180.0),
    ("1s", 10.0, 10.0),
    ("1s", 30.0, 30.0),
    ("45s", 30.0, 45.0),
    ("2h", 10.0, MAX_SAVE_FREQUENCY),
    ("1h", 10.0, 3600.0),
    (7200, 10.0, 3600.0),
    ("0", 10.0, 60.0),
])
def test_save_frequency_is_clamped(value, min_interval, expected) -> None:
    request = minimal()
    if value is not None:
        request["config"]["saveWorkspaceFrequency"] = value
    _, facts = parse_request(body(request), min_save_interval=min_interval)
    assert facts.save_frequency == expected


def test_stale_at() -> None:
    request = minimal()
    request["experiment"]["time_added"] = "1700000000"
    request["config"]["experimentLifetime"] = "20m"
    _, facts = parse_request(body(request))
    assert facts.time_added == 1700000000.0
    assert facts.stale_at == 1700001200.0
    no_lifetime = copy.deepcopy(request)
    del no_lifetime["config"]["experimentLifetime"]
    assert parse_request(body(no_lifetime))[1].stale_at is None
    no_time = copy.deepcopy(request)
    del no_time["experiment"]["time_added"]
    assert parse_request(body(no_time))[1].stale_at is None


@pytest.mark.parametrize("raw, match", [(b"\"soon\"", "not a number"),
                                        (b"NaN", "NaN, which is not JSON"),
                                        (b"Infinity", "Infinity, which is not JSON")])
def test_bad_time_added(raw: bytes, match: str) -> None:
    text = body(minimal()).decode().replace('"key": "exp-1"',
                                            '"key": "exp-1", "time_added": ' + raw.decode())
    bad(text.encode(), match)


@pytest.mark.parametrize("text, expected", [("exp-1", "exp-1"), ("a/b c", "a_b_c"),
                                            ("../..", "_"), ("", "_"), ("x" * 300, "x" * 100)])
def test_safe_path_part(text: str, expected: str) -> None:
    assert safe_path_part(text) == expected


@pytest.mark.parametrize("field, value", [
    ("key", "../../etc/passwd"), ("key", "/abs"), ("key", "a/../b"), ("key", "bad\nkey"),
    ("project", "../up"), ("project", "/root"),
])
def test_keys_and_projects_unusable_in_storage_paths(field: str, value: str) -> None:
    request = minimal()
    request["experiment"][field] = value
    bad(request, f"experiment.{field}")


@pytest.mark.parametrize("value, expected", [
    ("5m", 300.0), ("1s", 10.0), (2, 10.0), ("3h", MAX_SAVE_FREQUENCY), (45, 45.0)])
def test_per_artifact_save_frequency_is_read_and_clamped(value, expected) -> None:
    request = minimal()
    request["config"]["saveWorkspaceFrequency"] = "20m"
    request["experiment"]["artifacts"]["modeldir"] = dict(artifact("modeldir", mutable=True),
                                                          saveFrequency=value)
    request["experiment"]["artifacts"]["tb"] = artifact("tb", mutable=True)
    _, facts = parse_request(body(request), min_save_interval=10.0)
    assert facts.artifact_save_frequency == {"modeldir": expected}
    assert facts.save_frequency == 1200.0  # the others keep saveWorkspaceFrequency


def test_per_artifact_save_frequency_of_immutable_artifacts_is_ignored() -> None:
    request = minimal()
    request["experiment"]["artifacts"]["workspace"]["saveFrequency"] = "30s"
    _, facts = parse_request(body(request))
    assert facts.artifact_save_frequency == {}


def test_bad_per_artifact_save_frequency_is_a_bad_request() -> None:
    request = minimal()
    request["experiment"]["artifacts"]["tb"] = dict(artifact("tb", mutable=True),
                                                    saveFrequency="often")
    bad(request, "artifact 'tb': saveFrequency")


# -- the admission boundary: any body becomes a request or a BadRequest, nothing else ------

def _with(path: str, value) -> dict:
    """``minimal()`` with the field at ``path`` (dotted, from the top) set to ``value``."""
    request = minimal()
    node = request
    *parents, last = path.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    return request


def _nested(depth: int) -> dict:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return _with("experiment.info", value)


@pytest.mark.parametrize("request_or_body, match", [
    (b'{"experiment": ' + b"[" * 1200 + b"]" * 1200 + b"}", "nested deeper"),  # RecursionError
    (_nested(600), "nested deeper"),                      # msgpack's own limit (511)
    (_with("experiment.resources_needed", {"cpus": "inf"}), "cpus"),
    (_with("experiment.resources_needed", {"cpus": "1e400"}), "cpus"),
    (_with("experiment.resources_needed", {"cpus": [1]}), "cpus"),
    (_with("experiment.resources_needed", {"gpus": {"n": 1}}), "gpus"),
    (_with("experiment.resources_needed", {"ram": 10 ** 30}), "64 bits"),
    (_with("experiment.resources_needed", {"ram": 2 ** 60}), "ram"),
    (_with("experiment.resources_needed", {"hdd": [1]}), "hdd"),
    (_with("experiment.time_added", 10 ** 400), "64 bits"),
    (body(_with("experiment.time_added", "X")).replace(b'"X"', b"1e400"), "time_added"),
    (_with("experiment.time_added", True), "time_added"),
    (_with("experiment.info", 2 ** 64), "64 bits"),
    (_with("experiment.metric", -2 ** 63 - 1), "64 bits"),
    (_with("experiment.max_duration", ["1h"]), "max_duration"),
    (_with("experiment.max_duration", "1e400"), "max_duration"),
    (_with("config.experimentLifetime", {"h": 1}), "experimentLifetime"),
    (_with("config.saveWorkspaceFrequency", [60]), "saveWorkspaceFrequency"),
    (dict(minimal(), config=""), "config must be an object"),
    (dict(minimal(), config=[]), "config must be an object"),
    (dict(minimal(), config=False), "config must be an object"),
    (_with("config.env", ["A=1"]), "config.env must be an object"),
    (_with("config.env", "A=1"), "config.env must be an object"),
    (_with("config.env", {"A": {"nested": 1}}), "config.env.A"),
    (_with("config.env", {"A=B": "1"}), "not an environment variable name"),
    (_with("config.env", {"A": "x\0y"}), "NUL"),
    (_with("config.pip", "numpy"), "config.pip"),
    (_with("experiment.args", ["ok", "a\0b"]), "NUL"),
    (_with("experiment.args", ["'unbalanced"]), "unbalanced"),
    (_with("experiment.filename", "-m"), "module name"),
    (_with("experiment.pythonenv", ["numpy\0"]), "NUL"),
    (_with("experiment.pythonver", ["3.11"]), "pythonver"),
    (_with("experiment.project", {"p": 1}), "project"),
    (_with("experiment.filename", "/etc/passwd"), "inside the workspace"),
    (_with("experiment.filename", "../../../bin/sh"), "inside the workspace"),
    (_with("experiment.filename", "sub/../../x.py"), "inside the workspace"),
    (_with("experiment.filename", "~/x.py"), "inside the workspace"),
    (_with("experiment.filename", "a\0.py"), "NUL"),
    (_with("experiment.artifacts", {"workspace": artifact("workspace"),
                                    "../../escape": artifact("x")}), "folder name"),
    (_with("experiment.artifacts", {"workspace": dict(artifact("workspace"), key=7)}),
     "key must be text"),
    (_with("experiment.artifacts", {"workspace": dict(artifact("workspace"),
                                                      qualified=["s3://a/b"])}),
     "qualified must be text"),
    (b'{"experiment": {"key": "k", "filename": "f.py", "info": "\\ud800"}}',
     "cannot carry"),                                     # a lone surrogate
    (b"\xff\xfe{}", "not JSON"),
    (b'{"experiment": {"key": "k"' + b" " * 9_000_000 + b"}}", "exceeds"),
])
def test_every_hostile_body_is_a_bad_request(request_or_body, match: str) -> None:
    bad(request_or_body, match)


def test_a_null_config_is_read_as_an_empty_object() -> None:
    request, _ = parse_request(body(dict(minimal(), config=None)))
    assert request["config"] == {}


def test_nesting_and_integers_at_the_limits_are_accepted() -> None:
    request, _ = parse_request(body(_with("experiment.info", {
        "deep": _nested(40)["experiment"]["info"], "big": 2 ** 64 - 1, "small": -2 ** 63})))
    assert request["experiment"]["info"]["big"] == 2 ** 64 - 1


def test_filename_inside_the_workspace_and_module_mode_are_accepted() -> None:
    for filename in ("train.py", "sub/dir/train.py", "./train.py", "sub/../train.py", "-m"):
        request = _with("experiment.filename", filename)
        request["experiment"]["args"] = ["package.module", "--flag"]
        _, facts = parse_request(body(request))
        assert facts.filename == filename


def test_parse_request_raises_only_bad_request_for_random_bytes() -> None:
    import random

    rng = random.Random(13)
    good = body(minimal())
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            parse_request(bytes(data))
        except BadRequest:
            pass


# -- keys and projects name folders in storage --------------------------------------------

@pytest.mark.parametrize("key", [".", "..", "a/_metadata", "../x", "a/b", "a\nb", "a\tb",
                                 "a\x7fb"])
def test_a_key_that_is_not_one_path_component_is_refused(key) -> None:
    request = minimal()
    request["experiment"]["key"] = key
    bad(request, "experiment.key .* one path component")


@pytest.mark.parametrize("key", ["1701234567_0b5a1f2e-8d4c-4b8e-9e2f-3c1d2b3a4f5e",
                                 "hyperparam_abc__opt__Zq3xY8__1701234567",
                                 "1701234567_abc_rerun0b5a1f2e", "lr-0.01", "résumé", "a b",
                                 "x.y", "...", "k" * 500, "a:b@c+d=e"])
def test_keys_studioml_clients_make_are_accepted(key) -> None:
    request = minimal()
    request["experiment"]["key"] = key
    assert parse_request(body(request))[1].key == key


@pytest.mark.parametrize("project", [".", "..", "a/b", "p\0", "p\n"])
def test_a_project_that_is_not_one_path_component_is_refused(project) -> None:
    request = minimal()
    request["experiment"]["project"] = project
    bad(request, "experiment.project")


@pytest.mark.parametrize("project", ["sweep", "hyperparam_0b5a1f2e", "my project", 42])
def test_projects_clients_make_are_accepted(project) -> None:
    request = minimal()
    request["experiment"]["project"] = project
    assert parse_request(body(request))[1].project == str(project)


# -- pythonver and requirement lines ------------------------------------------------------

@pytest.mark.parametrize("version", ["3.11; rm -rf /", "3.11 && true", "latest", "3.x",
                                     "../../bin/sh", "$(id)"])
def test_a_pythonver_that_is_no_version_is_refused(version) -> None:
    request = minimal()
    request["experiment"]["pythonver"] = version
    bad(request, "pythonver .* is not a version")


@pytest.mark.parametrize("version", ["3.11", "3.11.7", "python3.11", "3", 3.6, 3, "",
                                     "3.13.0rc1"])
def test_pythonver_forms_clients_send_are_accepted(version) -> None:
    request = minimal()
    request["experiment"]["pythonver"] = version
    parse_request(body(request))


@pytest.mark.parametrize("where", ["pythonenv", "pip"])
@pytest.mark.parametrize("line", [
    "--index-url http://127.0.0.1:1/simple", "-i http://127.0.0.1:1/simple",
    "--extra-index-url=http://evil/simple", "-f http://evil/links", "--find-links /tmp",
    "-r /etc/other.txt", "-c constraints.txt", "--requirement x.txt", "--trusted-host evil",
    "--no-index", "  --index-url http://x", "numpy==1.0 --install-option=--prefix=/",
    "numpy==1.0 --config-settings=x=y", "-e git+https://h/r.git#egg=x --index-url http://x"])
def test_installer_option_lines_are_refused(where, line) -> None:
    request = minimal()
    if where == "pip":
        request["config"]["pip"] = ["numpy==1.26.0", line]
    else:
        request["experiment"]["pythonenv"] = ["numpy==1.26.0", line]
    bad(request, "installer option")


def test_what_pip_freeze_writes_is_accepted() -> None:
    request = minimal()
    request["experiment"]["pythonenv"] = [
        "numpy==1.26.0", "Pillow>=9", "studioml==0.0.49", "pkg-resources==0.0.0",
        "tinypkg @ file:///home/me/tinypkg", "-e git+https://github.com/o/r.git@abc#egg=r",
        "--editable=git+https://github.com/o/r.git@abc#egg=r", "-e /home/me/checkout",
        "# Editable install with no version control (r==0.1)",
        "## !! Could not determine repository location", "",
        "six==1.16.0 --hash=sha256:8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254",
        "requests[socks]==2.31 ; python_version >= \"3.8\"  # a comment -x",
        "idna==3.6 \\", "--hash=sha256:9ecdbbd0 \\", "    --hash=sha256:c05567e9"]
    parse_request(body(request))


# -- what a process can be started with ---------------------------------------------------

def test_an_environment_too_large_to_start_a_process_with_is_refused() -> None:
    request = minimal()
    request["config"]["env"] = {"BIG": "x" * (200 * 1024)}
    bad(request, "at most 131072 per value")
    request["config"]["env"] = {f"V{i}": "x" * (100 * 1024) for i in range(12)}
    bad(request, "fit a process's start")
    request["config"]["env"] = {}
    request["experiment"]["args"] = ["y" * (200 * 1024)]
    bad(request, "per value")


# -- file:// artifacts stay inside the configured roots -----------------------------------

@pytest.fixture()
def file_roots(tmp_path):
    """Storage confined to ``tmp_path/store`` (as the runner's roles are), then unconfined."""
    from runner import storage
    from runner.storage.file import real_roots

    store = tmp_path / "store"
    (store / "experiments").mkdir(parents=True)
    saved = storage.base.SETTINGS
    storage.configure(file_roots=real_roots([store]))
    yield store
    storage.base.SETTINGS = saved


def with_url(label: str, url: str, mutable: bool = False, root=None) -> dict:
    """A request whose workspace lies in the store at ``root`` and whose ``label`` is at
    ``url``."""
    request = minimal()
    artifacts = request["experiment"]["artifacts"]
    if root is not None:
        artifacts["workspace"]["qualified"] = f"file://{root}/blobstore/ws.tar"
    artifacts[label] = {"qualified": url, "mutable": mutable, "unpack": False}
    return request


def test_file_artifacts_outside_the_roots_are_refused(file_roots, tmp_path) -> None:
    secret = tmp_path / "victim" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("TOPSECRET")
    outside = "artifact '{}': file:// path .* is outside the runner's file stores"
    bad(with_url("data", secret.as_uri(), root=file_roots), outside.format("data"))
    bad(with_url("modeldir", (tmp_path / "victim" / "modeldir.tar").as_uri(), True,
                 root=file_roots), outside.format("modeldir"))
    bad(with_url("data", "file:///etc/passwd", root=file_roots), outside.format("data"))
    bad(with_url("data", f"file://{file_roots}/../victim/secret.txt", root=file_roots),
        "artifact 'data': .*'..'")
    bad(with_url("data", f"file://{file_roots}-sibling/x.tar", root=file_roots),  # no prefix
        outside.format("data"))
    (file_roots / "link").symlink_to(tmp_path / "victim")
    bad(with_url("data", f"file://{file_roots}/link/secret.txt", root=file_roots),
        "artifact 'data': .*really .*victim")
    bad(with_url("data", f"file://{file_roots}/x.tar"), "artifact 'workspace'")
    parse_request(body(with_url("data", f"file://{file_roots}/experiments/x/data.tar",
                                    root=file_roots)))
    parse_request(body(with_url("modeldir", f"file://{file_roots}/new/modeldir.tar", True,
                                    root=file_roots)))


def test_an_image_file_outside_the_roots_is_refused(file_roots) -> None:
    request = with_url("workspace", f"file://{file_roots}/blobstore/ws.tar")
    request["experiment"]["artifacts"]["_singularity"] = {"qualified": "file:///etc/img.sif"}
    bad(request, "artifact '_singularity': file:// path /etc/img.sif is outside")
    request["experiment"]["artifacts"]["_singularity"]["qualified"] = \
        f"file://{file_roots}/images/img.sif"
    parse_request(body(request))


def test_the_file_store_refuses_paths_that_escape_later(file_roots, tmp_path) -> None:
    """A symlink made after admission still cannot lead a read or write out of the roots."""
    from runner.errors import PermanentStorageError
    from runner.storage.file import FileStore

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOPSECRET")
    (file_roots / "experiments" / "k").symlink_to(outside)
    store = FileStore()
    with pytest.raises(PermanentStorageError, match="outside"):
        store.get(f"file://{file_roots}/experiments/k/secret.txt", tmp_path / "got")
    with pytest.raises(PermanentStorageError, match="outside"):
        store.put_bytes(f"file://{file_roots}/experiments/k/modeldir.tar", b"clobber")
    assert not (tmp_path / "got").exists()
    assert not (outside / "modeldir.tar").exists()
    store.put_bytes(f"file://{file_roots}/experiments/ok/modeldir.tar", b"fine")
    assert store.stat(f"file://{file_roots}/experiments/ok/modeldir.tar").size == 4
