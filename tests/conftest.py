"""Shared fixtures: a real runner-supervisor harness and real storage servers (tests/support.py)."""
from __future__ import annotations

import pytest

from .support import GcsEmulator, MotoServer, Runner, short_tempdir


@pytest.fixture()
def runner(request):
    """A real ``runner-supervisor`` harness on a private root (not started yet).

    Options come from ``@pytest.mark.runner_options(name=value, …)``.
    """
    marker = request.node.get_closest_marker("runner_options")
    options = marker.kwargs if marker else {}
    harness = Runner(short_tempdir(), **options)
    yield harness
    harness.cleanup()


@pytest.fixture()
def runners():
    """A list to append harnesses to; every one is cleaned up after the test."""
    made: list[Runner] = []
    yield made
    for harness in made:
        harness.cleanup()


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


@pytest.fixture
def context():
    """A private ZeroMQ context, destroyed after the test."""
    import zmq

    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture()
def broker():
    """The shared RabbitMQ broker (127.0.0.1:5672, management API); skips when absent."""
    from .rabbitmq_support import shared_broker

    return shared_broker()
