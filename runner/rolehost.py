"""Hosts one role in its own process: ``python -m runner.rolehost <role>``.

The supervisor passes the validated configuration as JSON in ``RUNNER_ROLE_CONFIG``.
The supervisor starts it with ``-P`` (nothing is imported from the working directory,
which is the runtime directory) in a session (and process group) of its own, so that a signal sent to
the supervisor's group (a terminal's Ctrl-C, a container runtime's SIGTERM) reaches the
supervisor alone, which drains once.  The process dies with its parent
(``PR_SET_PDEATHSIG`` plus the role's parent check before each tick,
:meth:`~runner.roles.base.Role.die_with`); SIGINT and SIGTERM while the
supervisor lives are left to it (it sends ``Shutdown``).  Once the supervisor is gone
(SIGTERM from the parent-death signal, or the parent check) the role does no more work at
all: it kills every process it started (runs, environment builds) and exits at once
(after :meth:`~runner.roles.base.Role.abandon`: local state only),
without finishing what it had in hand, so that nothing it does races the next
supervisor's recovery (a final upload of an attempt that is about to be run again).  Its first heartbeat, sent right after ``initialize()``, tells the
supervisor it has booted; an exception before that exits with status 3 and the reason on
stderr.

:func:`run_in_thread` hosts a role in a thread of the calling process instead, on an
in-memory bus (:mod:`runner.bus_memory`): what tests use to drive one role through its
messages.
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
from typing import TypeVar

from . import proctree, storage
from .bus import BatchingBus, Bus, Endpoints
from .bus_memory import MemoryHub
from .config import Config
from .errors import RunnerError
from .logs import setup_logging

ROLE_CLASSES = {
    "fetcher": "runner.roles.fetcher:Fetcher",
    "cache_manager": "runner.roles.cache_manager:CacheManager",
    "executor": "runner.roles.executor:Executor",
    "scraper": "runner.roles.scraper:Scraper",
    "uploader": "runner.roles.uploader:Uploader",
}
EXIT_BOOT_FAILED = 3
EXIT_ORPHANED = 6
SUPERVISOR_PID_VARIABLE = "RUNNER_SUPERVISOR_PID"
_Host = TypeVar("_Host", bound="ThreadHost")  # typing.Self needs Python 3.11


def role_class(name: str):
    module_name, class_name = ROLE_CLASSES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ROLE_CLASSES:
        print(f"usage: python -m runner.rolehost {{{','.join(ROLE_CLASSES)}}}", file=sys.stderr)
        return 2
    name = argv[0]
    # The supervisor's pid from the supervisor itself: one that died before the line below
    # asked for the parent-death signal is noticed at the first tick.
    parent = int(os.environ.get(SUPERVISOR_PID_VARIABLE) or os.getppid())
    proctree.die_with_parent(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = Config.from_json(os.environ["RUNNER_ROLE_CONFIG"])
    setup_logging(config, role=name)
    storage.configure(s3_ca=config.s3_ca, s3_cert=config.s3_cert, s3_key=config.s3_key,
                      file_roots=config.file_roots())
    log = logging.getLogger(f"runner.{name}")
    try:
        bus = Bus(Endpoints(config.runtime_dir), name)
        role = role_class(name)(config, bus)
        role.own_process = True
        role.initialize()
    except RunnerError as exc:  # a cause a person can act on: its message, no traceback
        log.error("failed to boot: %s", exc)
        return EXIT_BOOT_FAILED
    except Exception as exc:
        log.exception("failed to boot")
        print(f"role {name} failed to boot: {exc}", file=sys.stderr, flush=True)
        return EXIT_BOOT_FAILED

    def orphaned() -> None:
        log.error("supervisor is gone; killing what this role started and exiting now")
        try:
            role.abandon()
            proctree.kill_descendants(os.getpid())
        finally:
            os._exit(EXIT_ORPHANED)

    def on_term(signum, frame):
        if role.parent_gone():  # the supervisor is gone (PR_SET_PDEATHSIG)
            orphaned()
        # else: a signal for the whole group or cgroup; the supervisor decides and tells us

    role.die_with(parent, orphaned)
    signal.signal(signal.SIGTERM, on_term)
    serve(role, bus)
    return 0


def serve(role, bus: BatchingBus) -> None:
    """Run an initialized ``role`` until it stops: first heartbeat, loop, ``shutdown()``,
    then what it posted is sent and ``bus`` closed (also when the loop or shutdown raise)."""
    role.heartbeat(force=True)
    try:
        role.loop()
    finally:
        try:
            role.shutdown()
        finally:
            role.flush_outbox()
            bus.close()


class ThreadHost:
    """A role served by a thread on a :class:`~runner.bus_memory.MemoryHub` (see
    :func:`run_in_thread`).  ``role``, ``hub`` and ``bus`` (the role's) are public."""

    def __init__(self, role, hub: MemoryHub, bus: BatchingBus):
        self.role = role
        self.hub = hub
        self.bus = bus
        self.error: BaseException | None = None  # what ended the thread, if it raised
        self.booted = threading.Event()
        self.thread = threading.Thread(target=self._serve, name=f"role-{role.name}",
                                       daemon=True)

    def _serve(self) -> None:
        try:
            try:
                self.role.initialize()
            finally:
                self.booted.set()
            serve(self.role, self.bus)
        except BaseException as exc:  # noqa: BLE001 - handed to run_in_thread's or stop()'s caller
            self.error = exc

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop, wait for ``shutdown()`` and raise what the thread raised.

        Raises :class:`TimeoutError` when the thread has not ended within ``timeout``
        seconds (the role is stuck in a handler or in ``shutdown()``)."""
        self.role.request_stop()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"role {self.role.name} did not stop within {timeout:g}s")
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def __enter__(self: _Host) -> _Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_in_thread(role, config: Config, hub: MemoryHub | None = None,
                  boot_timeout: float = 60.0) -> ThreadHost:
    """Host ``role`` (a name of :data:`ROLE_CLASSES` or a Role class) in a thread of this
    process, on ``hub`` (a new :class:`MemoryHub` when None) under the role's name, and
    return once it has booted.

    ``initialize()`` and the loop run on one daemon thread (as in a role process, so a
    back end bound to its thread stays on it) until :meth:`ThreadHost.stop`.  What
    ``initialize()`` raises is raised here (the role failed to boot); :class:`TimeoutError`
    when it has not returned within ``boot_timeout`` seconds.  The role keeps
    ``own_process`` False and has no parent check: it changes nothing process-wide.
    Storage options are left as the process has them."""
    cls = role_class(role) if isinstance(role, str) else role
    hub = hub if hub is not None else MemoryHub()
    bus = hub.bus(cls.name)
    host = ThreadHost(cls(config, bus), hub, bus)
    host.thread.start()
    if not host.booted.wait(boot_timeout):
        raise TimeoutError(f"role {cls.name} did not boot within {boot_timeout:g}s")
    if host.error is not None:
        host.thread.join()
        raise host.error
    return host


if __name__ == "__main__":
    sys.exit(main())
