"""``runner-ctl`` dispatch (runner/control.py) over a real ZeroMQ ROUTER/REQ pair, with a
handler table of the test's own and a real Registry for ``cancel``."""
from __future__ import annotations

import zmq

from runner import control, protocol
from runner.registry import Registry


def ask(router: zmq.Socket, request: zmq.Socket, frame: bytes, handlers: dict):
    request.send(frame)
    assert router.poll(2000), "the request never arrived"
    control.serve(router, handlers)
    assert request.poll(2000), "no reply"
    return protocol.decode(request.recv())


def test_requests_reach_their_handler_and_bad_ones_get_a_reason(tmp_path):
    context = zmq.Context()
    router, request = context.socket(zmq.ROUTER), context.socket(zmq.REQ)
    address = f"ipc://{tmp_path}/control"
    router.bind(address)
    request.connect(address)
    seen = []
    handlers = {"drain": lambda args: seen.append(args) or control.reply(True, "draining"),
                "resume": lambda args: control.reply(False, "not draining")}
    try:
        drain = protocol.encode(protocol.CtlRequest(command="drain", args={"stay": True}))
        assert ask(router, request, drain, handlers) == protocol.CtlReply(
            ok=True, data={"message": "draining"})
        assert seen == [{"stay": True}]
        resume = ask(router, request, protocol.encode(protocol.CtlRequest(command="resume")),
                     handlers)
        assert (resume.ok, resume.error) == (False, "not draining")
        unknown = ask(router, request, protocol.encode(protocol.CtlRequest(command="dance")),
                      handlers)
        assert not unknown.ok and unknown.error == \
            "unknown command 'dance' (known: drain, resume)"
        other = ask(router, request, protocol.encode(protocol.Shutdown(reason="x")), handlers)
        assert not other.ok and "expected ctl_request, got shutdown" in other.error
        garbage = ask(router, request, b"\x00not msgpack", handlers)
        assert not garbage.ok and garbage.error
    finally:
        router.close(0)
        request.close(0)
        context.term()


def test_cancel_tells_the_fetcher_and_names_the_attempts_in_flight():
    registry, sent = Registry(), []
    attempt = protocol.Attempt(attempt_id="host-1", queue="q", token="t", attempts=0,
                               key="exp-1", project="p", request={}, workdir="/tmp/w",
                               resources={}, taken_at=1.0)
    registry.track(protocol.AttemptPhase(attempt=attempt, phase=protocol.PHASE_RUNNING,
                                         role="executor", at=2.0))

    def send(name: str, message: protocol.Message) -> None:
        sent.append((name, message))

    reply = control.cancel({"key": "exp-1"}, registry, send)
    assert reply.ok and reply.data["attempts"] == ["host-1"]
    assert reply.data["message"] == "stopping exp-1: attempt host-1 ends cancelled"
    assert sent == [("fetcher", protocol.Cancel(key="exp-1", project=""))]
    elsewhere = control.cancel({"key": "exp-1", "project": "other"}, registry, send)
    assert elsewhere.ok and elsewhere.data["attempts"] == []
    assert "is not running here" in elsewhere.data["message"]
    missing = control.cancel({}, registry, send)
    assert not missing.ok and missing.error == "cancel needs the experiment's key"
    assert len(sent) == 2
