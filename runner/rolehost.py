"""Hosts one role in its own process: ``python -m runner.rolehost <role>``.

The supervisor passes the validated configuration as JSON in ``RUNNER_ROLE_CONFIG``.
The supervisor starts it with ``-P`` (nothing is imported from the working directory,
which is the runtime directory) in a session (and process group) of its own, so that a signal sent to
the supervisor's group (a terminal's Ctrl-C, a container runtime's SIGTERM) reaches the
supervisor alone, which drains once.  The process dies with its parent
(``PR_SET_PDEATHSIG`` plus a parent check each heartbeat); SIGINT and SIGTERM while the
supervisor lives are left to it (it sends ``Shutdown``).  Once the supervisor is gone
(SIGTERM from the parent-death signal, or the parent check) the role does no more work at
all: it kills every process it started (runs, environment builds) and exits at once
(after :meth:`~runner.roles.base.Role.abandon`: local state only),
without finishing what it had in hand, so that nothing it does races the next
supervisor's recovery (a final upload of an attempt that is about to be run again).  Its first heartbeat, sent right after ``initialize()``, tells the
supervisor it has booted; an exception before that exits with status 3 and the reason on
stderr.
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import sys

from . import proctree, storage
from .bus import Bus, Endpoints
from .config import Config
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
    storage.configure(s3_ca=config.s3_ca, s3_cert=config.s3_cert, s3_key=config.s3_key)
    log = logging.getLogger(f"runner.{name}")
    try:
        bus = Bus(Endpoints(config.runtime_dir), name)
        role = role_class(name)(config, bus)
        role.own_process = True
        role.initialize()
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
        if os.getppid() != parent:  # the supervisor is gone (PR_SET_PDEATHSIG)
            orphaned()
        # else: a signal for the whole group or cgroup; the supervisor decides and tells us

    signal.signal(signal.SIGTERM, on_term)
    original_tick = role.tick

    def tick_with_parent_check():
        if os.getppid() != parent:
            orphaned()
        original_tick()

    role.tick = tick_with_parent_check
    role.heartbeat(force=True)
    try:
        role.loop()
    finally:
        try:
            role.shutdown()
        finally:
            role.flush_outbox()
            bus.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
