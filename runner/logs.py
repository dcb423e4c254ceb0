"""Logging set-up shared by the supervisor and every role process.

Lines go to stderr as ``time level host role: message``; lines about an experiment
carry ``key=<key> attempt=<attempt id>`` in the message itself (see :func:`job_tag`).
"""
from __future__ import annotations

import logging
import sys

from .config import Config

_FORMAT = "%(asctime)s %(levelname)-7s {host} {role}: %(message)s"


def setup_logging(config: Config, role: str) -> None:
    """Configure the root logger once for this process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT.format(host=config.hostname, role=role)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    # pika logs every expected broker reply (a passive declare's 404, a reconnect) at
    # WARNING/ERROR; the RabbitMQ back end reports what matters itself.
    logging.getLogger("pika").setLevel(logging.WARNING if config.log_level == "debug"
                                       else logging.CRITICAL)


def job_tag(key: str, job_id: str) -> str:
    """The prefix every log line about one attempt carries."""
    return f"key={key} attempt={job_id}"
