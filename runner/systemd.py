"""The systemd notify protocol, spoken by the supervisor itself (no libsystemd needed).

systemd (``Type=notify``) passes ``NOTIFY_SOCKET``: a datagram Unix socket, a path or, with
a leading ``@``, an abstract name.  Each notice is one datagram of ``NAME=VALUE`` lines:

* ``READY=1`` once every role is up and the fetcher has listed the queues;
* ``STATUS=...`` a line for ``systemctl status`` with what the runner is doing;
* ``WATCHDOG=1`` every half ``WATCHDOG_USEC``, and only while the roles are healthy, so a
  runner whose roles are stuck is restarted by systemd (``WatchdogSec=`` in the unit);
* ``STOPPING=1`` when a drain that ends in an exit begins.

The socket is non-blocking: when the receiver's queue is full a notice is dropped rather than
stalling the supervisor.

Without ``NOTIFY_SOCKET`` every call is a no-op.  A send never raises: a broken notify
socket must not stop the runner.  The unit file and its companions live in ``packaging/``
and are installed with the package (:func:`packaged_file`).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

# Variables systemd sets for the supervisor only: never passed on to roles or experiments.
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
PACKAGING_FILES = ("studioml-runner.service", "runner.env", "studioml-runner.sysusers.conf")


class Notifier:
    """Sends notices to ``$NOTIFY_SOCKET`` and keeps the watchdog's rhythm."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or ""
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        elif address:
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket; not notifying systemd", address)
        self.watchdog_interval: float | None = None
        usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
        try:
            if usec and int(usec) > 0 and (not pid or int(pid) == os.getpid()):
                self.watchdog_interval = int(usec) / 1e6 / 2
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r WATCHDOG_PID=%r", usec, pid)
        self._next_watchdog = 0.0
        self._socket: socket.socket | None = None
        self.sent: list[str] = []  # the last few notices, for runner-ctl status

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str) -> bool:
        """Send one notice (``READY="1"``, ``STATUS="..."``); False when it could not go."""
        if self.address is None:
            return False
        text = "\n".join(f"{name}={str(value).replace(chr(10), ' ')}"
                         for name, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the supervisor's loop on a reader that is not reading: a
                # notice that does not fit is dropped (the next one carries the news).
                self._socket.setblocking(False)
            self._socket.sendto(text.encode("utf-8", "replace"), self.address)
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", text.splitlines()[0], exc)
            return False
        self.sent = (self.sent + [text])[-10:]
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY="1", STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.notify(STOPPING="1", STATUS=status)

    def watchdog(self, healthy: bool, now: float | None = None) -> bool:
        """Send ``WATCHDOG=1`` when one is due and ``healthy``; True when one was sent."""
        if self.watchdog_interval is None or not healthy:
            return False
        now = time.monotonic() if now is None else now
        if now < self._next_watchdog:
            return False
        self._next_watchdog = now + self.watchdog_interval
        return self.notify(WATCHDOG="1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def packaged_file(name: str) -> Path:
    """Path of a file of ``packaging/`` (unit, env file, sysusers): the copy installed with the
    package (``runner/_packaging/``), else the source tree's ``packaging/``."""
    if name not in PACKAGING_FILES:
        raise KeyError(name)
    here = Path(__file__).resolve().parent
    for candidate in (here / "_packaging" / name, here.parent / "packaging" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{name} is not installed with this copy of studioml-runner")


def main(argv: list[str] | None = None) -> int:
    """``python -m runner.systemd unit|env|sysusers``: print an installed packaging file."""
    import sys

    names = {"unit": PACKAGING_FILES[0], "env": PACKAGING_FILES[1], "sysusers": PACKAGING_FILES[2]}
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in names:
        print("usage: python -m runner.systemd {unit,env,sysusers}", file=sys.stderr)
        return 2
    sys.stdout.write(packaged_file(names[argv[0]]).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
