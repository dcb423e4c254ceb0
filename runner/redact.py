"""Keeping secrets out of everything the runner writes.

Two tools: :func:`redact_request` removes credential values from a request before it is
logged or stored, and :class:`Masker` hides secrets in output text: the credential values
found in the request (as written, and their standard and URL-safe base64 encodings, also
inside a longer encoded text such as an HTTP ``Basic`` header), ``KEY=``/``TOKEN=``/
``SECRET=``/``PASSWORD=`` style assignments (also as JSON members) and passwords in URLs.

Masking runs in time linear in the input, whatever its shape: every pattern starts at a
fixed keyword (``key``, ``token``, ``secret``, ``passw``, ``://``), found with the credential
forms in one compiled pass (:func:`runner._fast.mask_hits`), and scans forward only over text
that ends at the first delimiter (see ``docs/operations.md``, "Masking").
"""
from __future__ import annotations

import base64
import copy
import re
from collections.abc import Iterable

from . import _fast

MASK = "***"
_MASK = MASK.encode()
_SECRET_NAME = re.compile(r"(secret|token|passw|credential|private|api_?key|access_?key|session)",
                          re.IGNORECASE)
# A name ending in KEY/TOKEN/SECRET/PASSWORD/PASSWD, a ``=`` or ``:``, and its value.  The
# pattern starts at the keyword: what comes before it in the name changes nothing (the value
# is what is masked), and a pattern that started at the name would try every position of a
# long run of name characters again.
_ASSIGNMENT = re.compile(
    rb"(?i)(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD)(\s*[=:]\s*)"
    rb"(?:\"[^\"\n]*\"?|'[^'\n]*'?|[^\s,;&\"']+)")
# The same as a JSON member: ``"db_password": "…"``.  A bare ``"key"`` is an ordinary field
# (experiment keys): KEY needs a name character before it.
_JSON_SECRET = re.compile(
    rb'(?i)(?:(?<=[A-Z0-9_.-])KEY|TOKEN|SECRET|PASSWORD|PASSWD)("\s*:\s*)'
    rb'"(?:[^"\\\n]|\\.)*"?')
# ``scheme://user:password@host``: starts at ``://`` (a scheme character before it); the
# password runs to the last ``@`` before the path.
_URL_PASSWORD = re.compile(rb"(?<=[A-Za-z0-9+.-])(://[^:/@\s]*:)[^\s/]*@")
_CREDENTIAL_KEYS = ("credentials",)
_MIN_SECRET_LENGTH = 4
# Shortest base64 text masked for a secret that sits inside a longer encoded value: shorter
# ones would hide unrelated text.
_MIN_ENCODED_CORE = 8
# Shortest line of a multi-line secret masked on its own.
_MIN_LINE_OF_SECRET = 16


def _secret_values(node, inside_secret: bool = False) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            secret = inside_secret or key in _CREDENTIAL_KEYS or bool(_SECRET_NAME.search(str(key)))
            yield from _secret_values(value, secret)
    elif isinstance(node, list):
        for item in node:
            yield from _secret_values(item, inside_secret)
    elif inside_secret and isinstance(node, str) and len(node) >= _MIN_SECRET_LENGTH:
        yield node


def is_secret_name(name: str) -> bool:
    """Whether a key or variable named ``name`` holds a secret by its name."""
    return bool(_SECRET_NAME.search(name))


def secrets_of(request: dict) -> list[str]:
    """Every credential value in ``request`` (artifact credentials, secret-named keys)."""
    return sorted(set(_secret_values(request)), key=len, reverse=True)


def _redact(node, inside_secret: bool = False):
    if isinstance(node, dict):
        return {key: _redact(value, inside_secret or key in _CREDENTIAL_KEYS
                             or bool(_SECRET_NAME.search(str(key))))
                for key, value in node.items()}
    if isinstance(node, list):
        return [_redact(item, inside_secret) for item in node]
    if inside_secret and node not in (None, "", True, False):
        return MASK
    return node


def redact_request(request: dict) -> dict:
    """A deep copy of ``request`` with every credential value replaced by ``***``."""
    return _redact(copy.deepcopy(request))


def encoded_forms(value: bytes) -> set[bytes]:
    """The texts that stand for ``value`` in base64 output, standard and URL-safe alphabets.

    The whole encoding (with and without ``=`` padding), and, for each of the three byte
    alignments ``value`` can have inside a longer encoded text, the characters that depend on
    ``value``'s bytes alone (at least ``_MIN_ENCODED_CORE`` long)."""
    forms: set[bytes] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(value)
        forms.update((whole, whole.rstrip(b"=")))
        for shift in range(3):
            encoded = encode(bytes(shift) + value)
            start = (8 * shift + 5) // 6  # the first character free of the prefix's bits
            end = (8 * (shift + len(value))) // 6  # past the last one holding only value bits
            core = encoded[start:end]
            if len(core) >= _MIN_ENCODED_CORE:
                forms.add(core)
    return forms


class Masker:
    """Masks secrets in bytes of output; build one per attempt from its request.

    ``secrets`` are literal values (shorter than 4 characters: ignored); each is masked as
    written, in its base64 forms (:func:`encoded_forms`) and, for a multi-line value, line by
    line (lines of 16 characters or more).  :meth:`mask` takes time linear
    in its input."""

    def __init__(self, secrets: Iterable[str] = ()):
        literals: set[bytes] = set()
        for secret in secrets:
            if len(secret) < _MIN_SECRET_LENGTH:
                continue
            value = secret.encode("utf-8", "surrogateescape")
            literals.add(value)
            literals.update(encoded_forms(value))
            # A multi-line secret (a PEM private key) may reach the scraper a line at a time.
            literals.update(line.strip() for line in value.splitlines()
                            if len(line.strip()) >= _MIN_LINE_OF_SECRET)
        # Longest first: where forms start at one place, the longest is masked.
        self._literals = tuple(sorted(literals, key=len, reverse=True))

    def mask(self, data: bytes) -> bytes:
        """``data`` with every secret replaced by ``***``.

        :func:`runner._fast.mask_hits` finds, in one pass, where a keyword, ``://`` or a
        credential form is; each pattern is tried only there, anchored, and scans forward to
        the end of its value at most (never past a line end), so the time is linear in
        ``len(data)`` whatever its shape, and output without any of them is left as it is."""
        hits = _fast.mask_hits(data, self._literals)
        if not hits:
            return data
        literals = self._literals
        pieces: list[bytes] = []
        done = 0  # data[:done] is in pieces
        for position, kind in hits:
            if position < done:
                continue  # inside a value masked already
            if kind >= 2:  # a credential form; the longest of those found here comes first
                pieces.append(data[done:position])
                pieces.append(_MASK)
                done = position + len(literals[kind - 2])
                continue
            if kind == 1:
                match = _URL_PASSWORD.match(data, position)
                replacement = _MASK + b"@"
            else:
                match = _ASSIGNMENT.match(data, position)
                replacement = _MASK
                if match is None:
                    match = _JSON_SECRET.match(data, position)
                    replacement = b'"' + _MASK + b'"'
            if match is None:
                continue
            pieces.append(data[done:match.end(1)])
            pieces.append(replacement)
            done = match.end()
        if not pieces:
            return data
        pieces.append(data[done:])
        return b"".join(pieces)

    def mask_text(self, text: str) -> str:
        return self.mask(text.encode("utf-8", "surrogateescape")).decode("utf-8", "replace")


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and error messages)."""
    return Masker().mask_text(url)
