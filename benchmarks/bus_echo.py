"""The far end of the bus benchmark, run as its own process.

``python -m benchmarks.bus_echo runner DIR``: a real :class:`runner.roles.base.Role` on a real
:class:`runner.bus.Bus` inbox (``DIR/echo.in``) that posts every message back to ``bench``
with ``Role.post``, the way roles send (the bus batches what is posted).
``python -m benchmarks.bus_echo bare DIR``: bare pyzmq, a PULL bound at the same kind of
address that pushes every frame back unchanged.  Both stop on the frame ``b"stop"`` / a
``Shutdown`` message.
"""
from __future__ import annotations

import sys
import time

import zmq

from runner import protocol
from runner.bus import Bus, Endpoints
from runner.roles.base import Role


class Echo(Role):
    name = "echo"

    def handle(self, message: protocol.Message) -> None:
        self.post("bench", message)

    def heartbeat(self, force: bool = False, early: float = 0.0) -> None:
        """No supervisor here: keep the loop's timing (it waits between beats), send nothing."""
        self._last_heartbeat = time.monotonic()
        self._active = False


def main(mode: str, runtime_dir: str) -> int:
    endpoints = Endpoints(runtime_dir)
    if mode == "runner":
        bus = Bus(endpoints, "echo")
        role = Echo(None, bus)  # type: ignore[arg-type]  # the loop needs no options
        print("ready", flush=True)
        role.loop()
        bus.close()
        return 0
    context = zmq.Context.instance()
    inbox = context.socket(zmq.PULL)
    inbox.bind(endpoints.inbox("echo"))
    out = context.socket(zmq.PUSH)
    out.connect(endpoints.inbox("bench"))
    print("ready", flush=True)
    while True:
        frame = inbox.recv(copy=False)
        if frame.bytes == b"stop":
            break
        out.send(frame, copy=False)
    inbox.close(0)
    out.close(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
