"""Shared fixtures: a real runner-supervisor harness and real storage servers (tests/support.py),
and the ``e2e`` marker (what ``scripts/test.sh --quick`` leaves out)."""
from __future__ import annotations

import fnmatch
from pathlib import Path

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


# -- the e2e marker ------------------------------------------------------------------------
# A test is end to end (marked ``e2e``; ``scripts/test.sh --quick`` runs ``-m "not e2e"``) when
# it uses one of E2E_FIXTURES (a real supervisor, broker, S3 or GCS server), carries one of
# E2E_MARKERS, or lies in one of E2E_FILES (files whose tests start such things on their own:
# module fixtures, a registry, a browser).  Everything else is a unit test and must stay fast.
E2E_FIXTURES = frozenset({"runner", "runners", "moto", "gcs", "gcs_env", "broker"})
E2E_MARKERS = ("integration", "interop")
E2E_FILES = (
    "test_e2e*.py",
    "test_chaos.py",            # SIGKILLs a whole runner
    "test_containers.py",       # a registry, skopeo, umoci and a supervisor
    "test_fuzz_admission.py",   # seeded requests through a supervisor
    "test_interop_studioml.py",
    "test_operations.py",
    "test_results.py",          # a sweep run by a supervisor (module fixture)
    "test_results_web.py",      # headless Chromium
    "test_run_lifetimes.py",
)


def is_e2e(item: pytest.Item) -> bool:
    """True when ``item`` is an end-to-end test by the rules above."""
    if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    if any(item.get_closest_marker(name) for name in E2E_MARKERS):
        return True
    name = Path(str(item.fspath)).name
    return any(fnmatch.fnmatch(name, pattern) for pattern in E2E_FILES)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_e2e(item):
            item.add_marker(pytest.mark.e2e)
