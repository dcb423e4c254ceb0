"""Encrypted, signed request envelopes (SPEC section 2), as the StudioML client and the go
runner 0.10–0.14 make and read them.

An envelope is ``{"message": {"experiment": {...summary}, "time_added", …,
"payload": "<b64 RSA-OAEP(SHA-256) session key>,<b64 NaCl SecretBox(nonce+ciphertext)>",
"signature": "<b64 ed25519 over the payload string>", "fingerprint": "SHA256:…"}}``.

Keys (:class:`Keys`), read again whenever their files change, so that keys can be added,
replaced or removed while the runner runs:

* ``--encrypt-key-dir``: the runner's RSA private key in ``ssh-privatekey`` (PEM, as the
  go runner's Kubernetes secret holds it, or OpenSSH), encrypted with the passphrase in
  ``ssh-passphrase`` of ``--encrypt-passphrase-dir`` (default: the same directory); an
  unencrypted key needs no passphrase file;
* ``--signing-keys-dir``: one file per queue-name prefix (``rmq_cpu_andrei_``), each
  holding the sender's ed25519 public key as an OpenSSH line (``ssh-ed25519 AAAA… who``).
  The longest prefix of the queue's name wins.

Rules (:func:`open_envelope`), each failure a :class:`~runner.errors.BadRequest` (the
fetcher dead-letters it with the reason):

* no private key configured: ``no decryption key configured``;
* with ``--signing-keys-dir`` set, an envelope must carry a signature that verifies with the
  key of its queue's prefix; a queue without a key refuses envelopes; without the option
  signatures are not checked (the runner's operator chose not to);
* the payload must decrypt, and the plain request must be JSON.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadRequest
from .requests import MAX_BODY_BYTES

if TYPE_CHECKING:  # the crypto libraries load on first use: most runners never see an envelope
    import nacl.signing
    from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger(__name__)

PRIVATE_KEY_FILE = "ssh-privatekey"
PASSPHRASE_FILE = "ssh-passphrase"


def is_envelope(request: object) -> bool:
    """True for a decoded body that is an envelope (``message`` without ``experiment``)."""
    return (isinstance(request, dict) and "message" in request
            and "experiment" not in request)


def _signature(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class _Loaded:
    signature: tuple | None  # None: the file was gone when it was looked at
    value: object


class Keys:
    """The runner's private key and the signing keys, reloaded when their files change."""

    def __init__(self, encrypt_key_dir: str = "", passphrase_dir: str = "",
                 signing_keys_dir: str = ""):
        self.encrypt_key_dir = encrypt_key_dir
        self.passphrase_dir = passphrase_dir or encrypt_key_dir
        self.signing_keys_dir = signing_keys_dir
        self._lock = threading.Lock()
        self._private: _Loaded | None = None
        self._signing: dict[str, _Loaded] = {}

    @classmethod
    def from_config(cls, config) -> Keys:
        return cls(getattr(config, "encrypt_key_dir", ""),
                   getattr(config, "encrypt_passphrase_dir", ""),
                   getattr(config, "signing_keys_dir", ""))

    def private_key(self) -> rsa.RSAPrivateKey | None:
        """The RSA private key, or None when none is configured (or the file is gone).

        Raises :class:`BadRequest` when the file cannot be read as a key.
        """
        if not self.encrypt_key_dir:
            return None
        key_path = Path(self.encrypt_key_dir) / PRIVATE_KEY_FILE
        phrase_path = Path(self.passphrase_dir) / PASSPHRASE_FILE
        signature = (_signature(key_path), _signature(phrase_path))
        if signature[0] is None:
            return None
        with self._lock:
            if self._private is not None and self._private.signature == signature:
                return self._private.value  # type: ignore[return-value]
            key = _load_private_key(key_path, phrase_path)
            self._private = _Loaded(signature, key)
            log.info("loaded the envelope decryption key from %s", key_path)
            return key

    def verify_key(self, queue: str) -> tuple[str, nacl.signing.VerifyKey] | None:
        """``(prefix, key)`` of the longest signing-key prefix of ``queue``, or None."""
        folder = Path(self.signing_keys_dir)
        try:
            names = sorted((e.name for e in os.scandir(folder)
                            if e.is_file() and not e.name.startswith(".")),
                           key=len, reverse=True)
        except OSError as exc:
            raise BadRequest(f"signing keys directory {folder} cannot be read: {exc}") from exc
        for name in names:
            if queue.startswith(name):
                path = folder / name
                signature = _signature(path)
                with self._lock:
                    loaded = self._signing.get(name)
                    if loaded is None or loaded.signature != signature:
                        loaded = _Loaded(signature, _load_verify_key(path))
                        self._signing[name] = loaded
                return name, loaded.value  # type: ignore[return-value]
        return None


def _load_private_key(key_path: Path, phrase_path: Path) -> rsa.RSAPrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    try:
        data = key_path.read_bytes()
        phrase = phrase_path.read_bytes().strip() if phrase_path.exists() else None
    except OSError as exc:
        raise BadRequest(f"decryption key {key_path} cannot be read: {exc}") from exc
    key: object
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=phrase or None)
        else:
            key = serialization.load_pem_private_key(data, password=phrase or None)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"decryption key {key_path} cannot be loaded (wrong passphrase or "
                         f"not an RSA private key): {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BadRequest(f"decryption key {key_path} is not an RSA key")
    return key


def _load_verify_key(path: Path) -> nacl.signing.VerifyKey:
    import nacl.signing
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    try:
        line = path.read_text().strip().splitlines()[0]
        public = serialization.load_ssh_public_key(line.encode())
    except (OSError, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"signing key {path} is not an OpenSSH public key line: {exc}") from exc
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise BadRequest(f"signing key {path} is not an ed25519 key")
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return nacl.signing.VerifyKey(raw)


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"envelope {what} is not base64: {exc}") from exc


def open_envelope(envelope: dict, queue: str, keys: Keys) -> bytes:
    """The plain request body inside ``envelope`` (taken from ``queue``).

    Raises :class:`BadRequest` with the reason when it cannot be opened (module doc).
    """
    import nacl.exceptions
    import nacl.secret
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    message = envelope.get("message")
    if not isinstance(message, dict):
        raise BadRequest("envelope: message is not an object")
    payload = message.get("payload")
    if not isinstance(payload, str) or payload.count(",") != 1:
        raise BadRequest("envelope: payload is not '<key>,<data>'")
    private = keys.private_key()
    if private is None:
        raise BadRequest("encrypted request envelope: no decryption key configured")
    if keys.signing_keys_dir:
        found = keys.verify_key(queue)
        if found is None:
            raise BadRequest(f"envelope signature: no signing key for queue {queue!r}")
        prefix, verify = found
        signature = message.get("signature")
        if not isinstance(signature, str) or not signature:
            raise BadRequest("envelope signature: missing (queue prefix "
                             f"{prefix!r} needs signed requests)")
        try:
            verify.verify(payload.encode("utf-8"), _b64(signature, "signature"))
        except (nacl.exceptions.BadSignatureError, ValueError) as exc:
            raise BadRequest(f"envelope signature does not verify with the key for "
                             f"{prefix!r}: {exc}") from exc
    encrypted_key, encrypted_data = payload.split(",")
    try:
        session_key = private.decrypt(
            _b64(encrypted_key, "session key"),
            padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()),
                         algorithm=hashes.SHA256(), label=None))
    except ValueError as exc:
        raise BadRequest(f"envelope session key does not decrypt with this runner's key: "
                         f"{exc}") from exc
    try:
        plain = nacl.secret.SecretBox(session_key).decrypt(_b64(encrypted_data, "data"))
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise BadRequest(f"envelope payload does not decrypt: {exc}") from exc
    try:
        json.loads(plain)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"envelope payload is not JSON: {exc}") from exc
    return plain


def open_body(body: bytes, queue: str, keys: Keys) -> bytes:
    """``body`` itself, or the request inside it when it is an envelope."""
    if (len(body) > MAX_BODY_BYTES or not body.lstrip().startswith(b"{")
            or b'"message"' not in body):
        return body  # parse_request reports what is wrong with it
    try:
        decoded = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body  # parse_request reports it
    if not is_envelope(decoded):
        return body
    return open_envelope(decoded, queue, keys)
