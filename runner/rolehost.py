"""Hosts one role in its own process: ``python -m runner.rolehost <role>``.

The supervisor passes the validated configuration as JSON in ``RUNNER_ROLE_CONFIG``.
The process dies with its parent (``PR_SET_PDEATHSIG`` plus a parent check each
heartbeat), ignores the terminal's SIGINT (the supervisor decides), and treats SIGTERM
as a request to stop.  Its first heartbeat, sent right after ``initialize()``, tells the
supervisor it has booted; an exception before that exits with status 3 and the reason on
stderr.
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import sys

from . import storage
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
PR_SET_PDEATHSIG = 1


def role_class(name: str):
    module_name, class_name = ROLE_CLASSES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ROLE_CLASSES:
        print(f"usage: python -m runner.rolehost {{{','.join(ROLE_CLASSES)}}}", file=sys.stderr)
        return 2
    name = argv[0]
    parent = os.getppid()
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = Config.from_json(os.environ["RUNNER_ROLE_CONFIG"])
    setup_logging(config, role=name)
    storage.configure(s3_ca=config.s3_ca, s3_cert=config.s3_cert, s3_key=config.s3_key)
    log = logging.getLogger(f"runner.{name}")
    try:
        bus = Bus(Endpoints(config.runtime_dir), name)
        role = role_class(name)(config, bus)
        role.initialize()
    except Exception as exc:
        log.exception("failed to boot")
        print(f"role {name} failed to boot: {exc}", file=sys.stderr, flush=True)
        return EXIT_BOOT_FAILED

    def on_term(signum, frame):
        role.request_stop()

    signal.signal(signal.SIGTERM, on_term)
    original_tick = role.tick

    def tick_with_parent_check():
        if os.getppid() != parent:
            log.error("supervisor is gone; stopping")
            role.request_stop()
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
