"""Encrypted, signed request envelopes (runner/envelope.py).

Envelopes are built here the way the StudioML client's EncryptedPayloadBuilder builds them
(RSA-OAEP/SHA-256 session key, NaCl SecretBox payload, ed25519 signature over the payload
string); tests/test_interop_studioml.py has the client's own code make them.
"""
from __future__ import annotations

import base64
import json

import nacl.secret
import nacl.utils
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from runner.envelope import Keys, is_envelope, open_body, open_envelope
from runner.errors import BadRequest

REQUEST = {"experiment": {"key": "k", "filename": "train.py", "artifacts": {}}, "config": {}}


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_envelope(public_key, request: dict = REQUEST, signer=None) -> dict:
    session = nacl.utils.random(32)
    data = base64.b64encode(nacl.secret.SecretBox(session).encrypt(json.dumps(request).encode()))
    sealed = base64.b64encode(public_key.encrypt(session, padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)))
    payload = f"{sealed.decode()},{data.decode()}"
    message = {"experiment": {"status": "waiting", "pythonver": "3.11"}, "time_added": 1.0,
               "experiment_lifetime": None, "resources_needed": {}, "payload": payload}
    if signer is not None:
        message["signature"] = base64.b64encode(signer.sign(payload.encode())).decode()
        message["fingerprint"] = "SHA256:test"
    return {"message": message}


def write_private_key(folder, key, passphrase: bytes | None, fmt=None):
    folder.mkdir(parents=True, exist_ok=True)
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    (folder / "ssh-privatekey").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, fmt or serialization.PrivateFormat.TraditionalOpenSSL,
        encryption))


def write_signing_key(folder, prefix: str, signer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / prefix).write_bytes(signer.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" someone\n")


@pytest.fixture()
def keys(tmp_path, rsa_key):
    signer = ed25519.Ed25519PrivateKey.generate()
    write_private_key(tmp_path / "enc", rsa_key, b"PassPhrase")
    (tmp_path / "phrase").mkdir()
    (tmp_path / "phrase" / "ssh-passphrase").write_text("PassPhrase\n")
    write_signing_key(tmp_path / "sig", "rmq_team_", signer)
    return Keys(str(tmp_path / "enc"), str(tmp_path / "phrase"), str(tmp_path / "sig")), signer


def test_a_signed_envelope_opens_to_the_plain_request(keys, rsa_key):
    keyring, signer = keys
    envelope = make_envelope(rsa_key.public_key(), signer=signer)
    assert is_envelope(envelope) and not is_envelope(REQUEST)
    assert json.loads(open_envelope(envelope, "rmq_team_gpu", keyring)) == REQUEST
    body = json.dumps(envelope).encode()
    assert json.loads(open_body(body, "rmq_team_gpu", keyring)) == REQUEST
    plain = json.dumps(REQUEST).encode()
    assert open_body(plain, "rmq_team_gpu", keyring) is plain


def test_without_a_private_key_envelopes_are_refused(rsa_key):
    envelope = make_envelope(rsa_key.public_key())
    with pytest.raises(BadRequest, match="no decryption key configured"):
        open_envelope(envelope, "rmq_x", Keys())


@pytest.mark.parametrize("damage", ["payload", "signature", "unsigned"])
def test_a_tampered_or_unsigned_envelope_is_refused(keys, rsa_key, damage):
    keyring, signer = keys
    envelope = make_envelope(rsa_key.public_key(), signer=signer)
    message = envelope["message"]
    if damage == "payload":
        session, data = message["payload"].split(",")
        message["payload"] = f"{session},{data[:-8]}{'A' * 4}{data[-4:]}"
    elif damage == "signature":
        other = ed25519.Ed25519PrivateKey.generate()
        message["signature"] = base64.b64encode(other.sign(message["payload"].encode())).decode()
    else:
        del message["signature"]
    with pytest.raises(BadRequest, match="signature"):
        open_envelope(envelope, "rmq_team_gpu", keyring)


def test_a_queue_without_a_signing_key_refuses_envelopes(keys, rsa_key):
    keyring, signer = keys
    with pytest.raises(BadRequest, match="no signing key for queue 'rmq_other_q'"):
        open_envelope(make_envelope(rsa_key.public_key(), signer=signer), "rmq_other_q", keyring)


def test_keys_are_read_again_when_their_files_change(tmp_path, rsa_key):
    keyring = Keys(str(tmp_path / "enc"), "", str(tmp_path / "sig"))
    (tmp_path / "sig").mkdir()
    signer = ed25519.Ed25519PrivateKey.generate()
    envelope = make_envelope(rsa_key.public_key(), signer=signer)
    with pytest.raises(BadRequest, match="no decryption key configured"):
        open_envelope(envelope, "rmq_a_q", keyring)
    write_private_key(tmp_path / "enc", rsa_key, None)  # unencrypted: no passphrase file
    with pytest.raises(BadRequest, match="no signing key"):
        open_envelope(envelope, "rmq_a_q", keyring)
    write_signing_key(tmp_path / "sig", "rmq_", ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(BadRequest, match="does not verify with the key for 'rmq_'"):
        open_envelope(envelope, "rmq_a_q", keyring)
    write_signing_key(tmp_path / "sig", "rmq_a_", signer)  # the longer prefix wins
    assert json.loads(open_envelope(envelope, "rmq_a_q", keyring)) == REQUEST
    newer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_private_key(tmp_path / "enc", newer, None, serialization.PrivateFormat.OpenSSH)
    with pytest.raises(BadRequest, match="does not decrypt"):
        open_envelope(envelope, "rmq_a_q", keyring)
    fresh = make_envelope(newer.public_key(), signer=signer)
    assert json.loads(open_envelope(fresh, "rmq_a_q", keyring)) == REQUEST


def test_a_wrong_passphrase_is_reported(tmp_path, rsa_key):
    write_private_key(tmp_path / "enc", rsa_key, b"right")
    (tmp_path / "enc" / "ssh-passphrase").write_text("wrong")
    with pytest.raises(BadRequest, match="wrong passphrase"):
        open_envelope(make_envelope(rsa_key.public_key()), "rmq_q", Keys(str(tmp_path / "enc")))


def test_without_signing_keys_configured_signatures_are_not_checked(tmp_path, rsa_key):
    write_private_key(tmp_path / "enc", rsa_key, None)
    keyring = Keys(str(tmp_path / "enc"))
    opened = open_envelope(make_envelope(rsa_key.public_key()), "rmq_q", keyring)
    assert json.loads(opened) == REQUEST


def test_a_runner_without_keys_dead_letters_envelopes_with_the_reason(rsa_key):
    """The fetcher alone (in a thread, on the stub broker): admission refuses the envelope."""
    from .roles_support import RoleRig, eventually

    rig = RoleRig()
    try:
        rig.host("fetcher")
        rig.broker.publish("memory_q", json.dumps(make_envelope(rsa_key.public_key())).encode())
        assert eventually(lambda: rig.broker.dead("memory_q"))
        assert "no decryption key configured" in rig.broker.dead("memory_q")[0].reason
    finally:
        rig.close()


def test_a_body_that_only_looks_like_an_envelope_is_left_to_parse_request() -> None:
    """Deep nesting or a huge body with "message" in it never raises here (admission)."""
    from runner.requests import MAX_BODY_BYTES

    deep = b'{"message": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert open_body(deep, "rmq_x", Keys()) == deep
    huge = b'{"message": "' + b"x" * MAX_BODY_BYTES + b'"}'
    assert open_body(huge, "rmq_x", Keys()) is huge
