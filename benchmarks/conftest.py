"""Fixtures for the storage benchmarks: a real moto_server (see tests/support.py)."""
from __future__ import annotations

import pytest

from tests.support import MotoServer, short_tempdir


@pytest.fixture(scope="session")
def moto():
    server = MotoServer(short_tempdir("motob")).start()
    yield server
    server.stop()
