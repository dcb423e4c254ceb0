"""The supervisor's side of ``runner-ctl``: requests in, replies out, over its ROUTER socket.

:func:`serve` answers every request waiting on the socket (never blocks): each frame must be
a ``CtlRequest``; its ``command`` picks a handler from a table (name -> ``handler(args) ->
CtlReply``).  A frame that is not a ``CtlRequest`` and an unknown command get
``CtlReply(ok=False)`` with the reason; a malformed envelope is dropped.  :func:`commands`
is the supervisor's table: ``status``, ``drain`` (``stay``: do not exit once drained),
``resume``, ``stop``, ``reload`` and ``cancel`` (``key``, ``project``) call the same
supervisor methods as signals and limits do.  The client is :mod:`runner.ctl`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Callable

import zmq

from . import protocol
from .drain import CTL
from .errors import ProtocolError

log = logging.getLogger("runner.supervisor")
Handler = Callable[[dict], protocol.CtlReply]


def commands(supervisor) -> dict[str, Handler]:
    """The ``runner-ctl`` commands of a :class:`runner.supervisor.Supervisor`."""
    return {
        "status": lambda args: protocol.CtlReply(ok=True, data=supervisor.status()),
        "drain": lambda args: reply(True, supervisor.request_drain(
            "runner-ctl drain", origin=CTL, exit=not args.get("stay"))),
        "resume": lambda args: reply(*supervisor.request_resume("runner-ctl resume")),
        "stop": lambda args: reply(True, supervisor.request_stop_now("runner-ctl stop")),
        "reload": lambda args: reply(*supervisor.request_reload("runner-ctl reload")),
        "cancel": lambda args: cancel(args, supervisor.registry, supervisor.bus.send)}


def cancel(args: dict, registry, send: Callable[[str, protocol.Message], None],
           ) -> protocol.CtlReply:
    """``runner-ctl cancel KEY``: ``Cancel`` to the fetcher, which stops the key's attempts
    (or acks the request as cancelled when it takes it); the reply names the attempts
    being stopped (from ``registry``, a :class:`runner.registry.Registry`)."""
    key, project = str(args.get("key") or ""), str(args.get("project") or "")
    if not key:
        return protocol.CtlReply(ok=False, error="cancel needs the experiment's key")
    send("fetcher", protocol.Cancel(key=key, project=project))
    attempts = registry.of_key(key, project)
    if attempts:
        message = f"stopping {key}: attempt {', '.join(attempts)} ends cancelled"
    else:
        message = (f"{key} is not running here: it is acked as cancelled when this runner "
                   "takes it from its queue")
    log.warning("runner-ctl cancel %s%s: %s", f"{project}/" if project else "", key, message)
    return reply(True, message, attempts=attempts)


def serve(socket: zmq.Socket, handlers: Mapping[str, Handler]) -> None:
    """Answer every request waiting on ``socket`` with ``handlers``."""
    while True:
        try:
            identity, empty, frame = socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        except ValueError:  # not [identity, empty, frame]
            continue
        socket.send_multipart([identity, empty, protocol.encode(answer(frame, handlers))])


def answer(frame: bytes, handlers: Mapping[str, Handler]) -> protocol.CtlReply:
    """The reply to one request frame."""
    try:
        request = protocol.decode(frame)
        if not isinstance(request, protocol.CtlRequest):
            raise ProtocolError(f"expected ctl_request, got {request.TYPE}")
        handler = handlers.get(request.command)
        if handler is None:
            return protocol.CtlReply(ok=False, error=f"unknown command {request.command!r} "
                                                     f"(known: {', '.join(handlers)})")
        return handler(request.args)
    except ProtocolError as exc:
        return protocol.CtlReply(ok=False, error=str(exc))


def reply(ok: bool, message: str, **data) -> protocol.CtlReply:
    """A reply carrying ``message`` (as the error too when not ``ok``)."""
    return protocol.CtlReply(ok=ok, data={"message": message, **data},
                             error="" if ok else message)
