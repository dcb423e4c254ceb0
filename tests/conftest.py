"""Fixtures for tests that need real storage servers (see tests/support.py)."""
from __future__ import annotations

import pytest

from .support import GcsEmulator, MotoServer, short_tempdir


@pytest.fixture(scope="session")
def moto():
    """One ``moto_server`` for the session (each test makes its own buckets)."""
    server = MotoServer(short_tempdir("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs():
    """One ``gcp-storage-emulator`` for the session (each test makes its own buckets)."""
    server = GcsEmulator(short_tempdir("gcs")).start()
    yield server
    server.stop()


@pytest.fixture()
def gcs_env(gcs, monkeypatch):
    """Point google-cloud-storage in this process at the emulator."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint)
    return gcs
