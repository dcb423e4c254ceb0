"""Logging set-up shared by the supervisor and every role process.

Two formats (``--log-format``):

* ``text`` (default): ``time level host role: message``;
* ``json``: one JSON object per line with ``time`` (ISO 8601, UTC), ``level``, ``host``,
  ``role``, ``logger``, ``message`` and, for lines about an experiment, ``key`` and
  ``attempt``; an exception adds ``exception``.

Lines about an attempt carry ``key=<key> attempt=<attempt id>`` in the message itself
(see :func:`attempt_tag`); in JSON those two are also lifted into their own fields, so a log
pipeline can select every line of one attempt.  The level changes live with
:func:`set_level` (SIGHUP / ``Reload``).
"""
from __future__ import annotations

import logging
import re
import sys
import time

from . import strict_json
from .config import Config

_FORMAT = "%(asctime)s %(levelname)-7s {host} {role}: %(message)s"
_KEY = re.compile(r"(?:^|\s)key=(\S+)")
_ATTEMPT = re.compile(r"(?:^|\s)attempt=(\S+)")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``key``/``attempt`` lifted from the message."""

    def __init__(self, host: str, role: str):
        super().__init__()
        self.host = host
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "host": self.host,
            "role": self.role,
            "logger": record.name,
            "message": message,
        }
        for name, pattern in (("key", _KEY), ("attempt", _ATTEMPT)):
            value = getattr(record, name, None)
            if value is None:
                found = pattern.search(message)
                value = found.group(1) if found else None
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return strict_json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(config: Config, role: str) -> None:
    """Configure the root logger once for this process."""
    handler = logging.StreamHandler(sys.stderr)
    if getattr(config, "log_format", "text") == "json":
        handler.setFormatter(JsonFormatter(config.hostname, role))
    else:
        handler.setFormatter(logging.Formatter(_FORMAT.format(host=config.hostname, role=role)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(config.log_level)


def set_level(level: str) -> None:
    """Change this process's log level (``debug``, ``info``, ``warning``, ``error``)."""
    logging.getLogger().setLevel(level.upper())
    # pika logs every expected broker reply (a passive declare's 404, a reconnect) at
    # WARNING/ERROR; the RabbitMQ back end reports what matters itself.
    logging.getLogger("pika").setLevel(logging.WARNING if level == "debug" else logging.CRITICAL)


def attempt_tag(key: str, attempt_id: str) -> str:
    """The prefix every log line about one attempt carries."""
    return f"key={key} attempt={attempt_id}"
