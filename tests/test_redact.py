"""Secrets are kept out of everything the runner writes (runner.redact)."""
from __future__ import annotations

import json

import pytest

from runner.redact import MASK, Masker, redact_request, secrets_of

AWS_ID = "AKIAEXAMPLEID0001"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_SESSION = "FQoGZXIvYXdzEXAMPLESESSION"
GCP_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEexample\n-----END PRIVATE KEY-----\n"
ENV_SECRET = "env-secret-value-123"
ENV_TOKEN = "hf_tokenvalue456"


def make_request() -> dict:
    creds = {"aws": {"access_key": AWS_ID, "secret_access_key": AWS_SECRET,
                     "session_token": AWS_SESSION, "region": "us-west-2"}}
    return {
        "experiment": {
            "key": "exp-1700000000-abc",
            "project": "proj",
            "filename": "train.py",
            "args": ["--lr", "0.1"],
            "artifacts": {
                "workspace": {"key": "experiments/exp-1/workspace.tar", "bucket": "bkt",
                              "qualified": "s3://minio:9000/bkt/experiments/exp-1/workspace.tar",
                              "mutable": False, "unpack": True, "credentials": creds},
                "modeldir": {"key": "experiments/exp-1/modeldir.tar", "bucket": "bkt",
                             "qualified": "gs://bkt/experiments/exp-1/modeldir.tar",
                             "mutable": True, "unpack": True,
                             "credentials": {"gcp": {"type": "service_account",
                                                     "project_id": "my-proj",
                                                     "private_key": GCP_KEY,
                                                     "client_email": "sa@my-proj.iam"}}},
            },
        },
        "config": {
            "env": {"AWS_SECRET_ACCESS_KEY": ENV_SECRET, "HF_TOKEN": ENV_TOKEN,
                    "PATH": "/usr/local/bin:/usr/bin", "LEARNING_RATE": "0.1"},
            "saveWorkspaceFrequency": "3m",
        },
    }


def test_redact_request_masks_credentials_and_keeps_the_rest() -> None:
    request = make_request()
    original = json.dumps(request, sort_keys=True)
    redacted = redact_request(request)
    text = json.dumps(redacted)
    for secret in (AWS_ID, AWS_SECRET, AWS_SESSION, "MIIEexample", "sa@my-proj.iam",
                   ENV_SECRET, ENV_TOKEN):
        assert secret not in text, secret
    ws = redacted["experiment"]["artifacts"]["workspace"]
    assert ws["credentials"]["aws"]["secret_access_key"] == MASK
    assert ws["credentials"]["aws"]["access_key"] == MASK
    assert redacted["experiment"]["artifacts"]["modeldir"]["credentials"]["gcp"]["private_key"] \
        == MASK
    # not secrets
    assert redacted["experiment"]["key"] == "exp-1700000000-abc"
    assert redacted["experiment"]["filename"] == "train.py"
    assert ws["key"] == "experiments/exp-1/workspace.tar"
    assert ws["qualified"] == "s3://minio:9000/bkt/experiments/exp-1/workspace.tar"
    assert ws["bucket"] == "bkt"
    assert redacted["config"]["env"]["PATH"] == "/usr/local/bin:/usr/bin"
    assert redacted["config"]["env"]["LEARNING_RATE"] == "0.1"
    assert redacted["config"]["env"]["AWS_SECRET_ACCESS_KEY"] == MASK
    assert redacted["config"]["env"]["HF_TOKEN"] == MASK
    assert redacted["config"]["saveWorkspaceFrequency"] == "3m"
    # the input is untouched
    assert json.dumps(request, sort_keys=True) == original


def test_secrets_of_lists_credential_values_longest_first() -> None:
    secrets = secrets_of(make_request())
    for secret in (AWS_ID, AWS_SECRET, AWS_SESSION, GCP_KEY, ENV_SECRET, ENV_TOKEN):
        assert secret in secrets
    assert "exp-1700000000-abc" not in secrets
    assert "train.py" not in secrets
    assert "/usr/local/bin:/usr/bin" not in secrets
    assert [len(s) for s in secrets] == sorted((len(s) for s in secrets), reverse=True)


def test_masker_masks_request_secrets_literally() -> None:
    masker = Masker(secrets_of(make_request()))
    line = f"connecting with {AWS_SECRET} and token {ENV_TOKEN} done\n".encode()
    masked = masker.mask(line)
    assert AWS_SECRET.encode() not in masked and ENV_TOKEN.encode() not in masked
    assert masked == f"connecting with {MASK} and token {MASK} done\n".encode()


def test_masker_ignores_tiny_secrets() -> None:
    masker = Masker(["abc"])
    assert masker.mask(b"abcdef abc") == b"abcdef abc"


@pytest.mark.parametrize("line, expected", [
    ("AWS_SECRET_ACCESS_KEY=abc", f"AWS_SECRET_ACCESS_KEY={MASK}"),
    ("export AWS_SECRET_ACCESS_KEY=abc123 && run", f"export AWS_SECRET_ACCESS_KEY={MASK} && run"),
    ("API_TOKEN: xyz", f"API_TOKEN: {MASK}"),
    ("password=hunter2", f"password={MASK}"),
    ("DB_PASSWORD = 's3 cr3t'", f"DB_PASSWORD = {MASK}"),
    ('GITHUB_TOKEN="ghp_abc"', f"GITHUB_TOKEN={MASK}"),
    ("MY_SECRET=abc; next=1", f"MY_SECRET={MASK}; next=1"),
    ("cloning https://user:pw@host/repo.git", f"cloning https://user:{MASK}@host/repo.git"),
    ("amqp://guest:guest@rabbit:5672/", f"amqp://guest:{MASK}@rabbit:5672/"),
    ('{"AWS_SECRET_ACCESS_KEY": "abc", "loss": 1}', f'{{"AWS_SECRET_ACCESS_KEY": "{MASK}", "loss": 1}}'),
    ('{"cfg": {"api_key": "a\\"b"}}', f'{{"cfg": {{"api_key": "{MASK}"}}}}'),
])
def test_masker_masks_assignments_and_url_passwords(line: str, expected: str) -> None:
    masker = Masker()
    assert masker.mask(line.encode()) == expected.encode()
    assert masker.mask_text(line) == expected


@pytest.mark.parametrize("line", [
    "epoch 3 loss=0.25 accuracy=0.91",
    '{"experiment": {"loss": 0.5, "step": 10}}',
    "Downloading https://example.com/data.tar.gz (3.2 MB)",
    "http://localhost:8080/metrics",
    "user@example.com sent 3 files",
    '{"key": "exp-1", "keys": 3}',
    "Successfully installed numpy-1.26.4",
    "",
])
def test_masker_leaves_ordinary_lines_unchanged(line: str) -> None:
    masker = Masker(secrets_of(make_request()))
    assert masker.mask(line.encode()) == line.encode()


def test_masker_keeps_undecodable_bytes() -> None:
    data = b"\xff\xfe raw PASSWORD=x \x00\n"
    assert Masker().mask(data) == b"\xff\xfe raw PASSWORD=*** \x00\n"


def test_masker_masks_base64_forms_of_request_secrets() -> None:
    import base64
    masker = Masker(secrets_of(make_request()))
    secret = AWS_SECRET.encode()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(secret)
        for text in (whole, whole.rstrip(b"=")):
            masked = masker.mask(b"blob " + text + b" end\n")
            assert masked == b"blob " + MASK.encode() + b" end\n", (encode, text)
        # inside a longer encoded value, at each of the three byte alignments
        for prefix in (b"", b"u", b"us", b"user:"):
            encoded = encode(prefix + secret + b"/tail")
            masked = masker.mask(b"Authorization: Basic " + encoded + b"\n")
            assert MASK.encode() in masked and encoded not in masked, (encode, prefix)
            decodable = masked.split(b" ")[-1].strip()
            assert AWS_SECRET.encode()[:-2] not in decodable
    # HTTP basic auth of the access key pair, as a client library prints it
    header = base64.b64encode(f"{AWS_ID}:{AWS_SECRET}".encode())
    assert header not in masker.mask(b"Basic " + header)


def test_encoded_core_never_masks_short_or_unrelated_text() -> None:
    import base64
    masker = Masker(["abcd"])
    assert masker.mask(b"YWJjZA== YWJjZA") == b"*** ***"
    unrelated = base64.b64encode(bytes(range(256)))
    assert masker.mask(unrelated) == unrelated


@pytest.mark.parametrize("line, expected", [
    ("redis://:pw0rd@cache:6379/0", f"redis://:{MASK}@cache:6379/0"),
    ("amqp://user:p@ss@rabbit/", f"amqp://user:{MASK}@rabbit/"),
    ('PASSWORD="unterminated value', f"PASSWORD={MASK}"),
    ('{"db_password": "unterminated', f'{{"db_password": "{MASK}"'),
    ("a.b.c.monkey-key: value", f"a.b.c.monkey-key: {MASK}"),
    ("MY_SECRET_KEY=abc SECRET=x", f"MY_SECRET_KEY={MASK} SECRET={MASK}"),
])
def test_masker_edge_shapes(line: str, expected: str) -> None:
    assert Masker().mask(line.encode()) == expected.encode()


def _mask_seconds(masker: Masker, data: bytes) -> float:
    """The best of five CPU times (a loaded machine), with the collector off (a full
    collection in one of them says nothing about masking)."""
    import gc
    import time
    best = float("inf")
    gc.disable()
    try:
        for _ in range(5):
            started = time.process_time()
            masker.mask(data)
            best = min(best, time.process_time() - started)
    finally:
        gc.enable()
    return best


@pytest.mark.parametrize("unit", [
    b"a1B2c3D4",                 # one long token / DNA-like run
    b"a.",                       # name characters that are not word characters
    b"x://",                     # URL starts with nothing after them
    b"key",                      # keywords back to back
    b'"api_key": "',             # JSON secret members that never close
    b"https://u:",               # URL users whose password never ends
])
def test_masking_time_grows_linearly(unit: bytes) -> None:
    """Eight times the input costs about eight times the time (a quadratic pattern: 64)."""
    masker = Masker(secrets_of(make_request()))
    small = unit * (4000 // len(unit))
    large = unit * (32000 // len(unit))
    _mask_seconds(masker, small)  # warm up
    ratio = _mask_seconds(masker, large) / max(_mask_seconds(masker, small), 1e-6)
    assert ratio < 24, f"{unit!r}: 8x the input took {ratio:.1f}x the time"


def test_lines_of_a_multi_line_secret_are_masked_on_their_own() -> None:
    body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"
    key = f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"
    masker = Masker([key])
    assert masker.mask(f"{body}\n".encode()) == b"***\n"
    assert masker.mask(b"short\n") == b"short\n"
