"""Keeping secrets out of everything the runner writes.

Two tools: :func:`redact_request` removes credential values from a request before it is
logged or stored, and :class:`Masker` hides secrets in output text: the credential values
found in the request, ``KEY=``/``TOKEN=``/``SECRET=``/``PASSWORD=`` style assignments and
passwords in URLs.
"""
from __future__ import annotations

import copy
import re
from typing import Iterable

MASK = "***"
_SECRET_NAME = re.compile(r"(secret|token|passw|credential|private|api_?key|access_?key|session)",
                          re.IGNORECASE)
_ASSIGNMENT = re.compile(
    rb"(?i)\b([A-Z0-9_.-]*(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD))(\s*[=:]\s*)"
    rb"(\"[^\"]*\"|'[^']*'|[^\s,;&\"']+)")
_JSON_SECRET = re.compile(
    rb'(?i)("(?:[A-Z0-9_.-]+KEY|[A-Z0-9_.-]*(?:TOKEN|SECRET|PASSWORD|PASSWD))"\s*:\s*)'
    rb'("(?:[^"\\]|\\.)*")')
_URL_PASSWORD = re.compile(rb"([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)([^@\s/]+)(@)")
_CREDENTIAL_KEYS = ("credentials",)
_MIN_SECRET_LENGTH = 4


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


class Masker:
    """Masks secrets in bytes of output; build one per attempt from its request."""

    def __init__(self, secrets: Iterable[str] = ()):
        values = [s.encode() for s in secrets if len(s) >= _MIN_SECRET_LENGTH]
        self._literal = (re.compile(b"|".join(re.escape(v) for v in values)) if values else None)

    def mask(self, data: bytes) -> bytes:
        """``data`` with every secret replaced by ``***``."""
        if self._literal is not None:
            data = self._literal.sub(MASK.encode(), data)
        data = _ASSIGNMENT.sub(lambda m: m.group(1) + m.group(2) + MASK.encode(), data)
        data = _JSON_SECRET.sub(lambda m: m.group(1) + b'"' + MASK.encode() + b'"', data)
        return _URL_PASSWORD.sub(lambda m: m.group(1) + MASK.encode() + m.group(3), data)

    def mask_text(self, text: str) -> str:
        return self.mask(text.encode("utf-8", "surrogateescape")).decode("utf-8", "replace")


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and error messages)."""
    return _URL_PASSWORD.sub(lambda m: m.group(1) + MASK.encode() + m.group(3),
                             url.encode("utf-8", "surrogateescape")).decode("utf-8", "replace")

