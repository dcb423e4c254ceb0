"""``runner-ctl``: ask a running ``runner-supervisor`` what it is doing, or tell it what to do.

Views (each one ``status`` request, shown in part; ``--json`` prints that part as JSON):

* ``status`` — everything below, plus the supervisor's state, drain and limits;
* ``roles`` — each role's pid, health, restarts and heartbeat stats;
* ``health`` — one line; exit status 1 when a role is down or silent;
* ``running`` — experiments in flight: key, project, queue, attempt, devices, phase,
  elapsed, last metric (JSON) line;
* ``queues`` — queues seen and the experiments waiting in each;
* ``free`` — free resources as the fetcher's ledger sees them, and the environment store's
  size against ``--env-cache-size``;
* ``watch [VIEW]`` — redraw a view in place every ``--interval`` seconds (Ctrl-C ends it).

Commands (the same code paths as the signals, see :mod:`runner.supervisor`):

* ``drain [--stay]`` — like SIGTERM: take no new work, let running experiments finish
  within ``--drain-timeout``, hand the rest back, then exit (``--stay``: stay up drained);
* ``resume`` — undo a ``runner-ctl drain``;
* ``cancel KEY [--project P]`` — stop experiment KEY (queued or running): it ends
  ``cancelled``, is acked and is not retried;
* ``stop`` — like a second SIGTERM: hand everything back now and exit;
* ``reload`` — like SIGHUP: read the options again and apply the live ones.

Exit status 1 when no supervisor answers within ``--timeout`` seconds or it refuses, and at
once when none runs under ``--runtime-dir`` (no such directory, no control socket in it, or
one nobody listens on: left by a supervisor that was killed).  Words after a view or a
command other than ``cancel KEY`` and ``watch VIEW`` are a usage error (exit 2), so a
mistyped line never acts; ``cancel`` always reads the next word as the KEY, so a key named
like a view (``runner-ctl cancel status``) can be cancelled.  Output cut short by a closed
pipe (``runner-ctl status | head -1``) ends quietly with exit status 141.
Times in ``--json`` output are ISO-8601 UTC strings.
"""
from __future__ import annotations

import argparse
import os
import socket as socket_module
import sys
import time

import zmq

from . import protocol, strict_json
from .bus import Endpoints, control_client, poll_ms
from .config import OptionParser, default_runtime_dir, env_value
from .errors import ProtocolError
from .units import describe_size


def free_lines(free: dict) -> list[str]:
    """The fetcher's ``ledger.free()`` as lines for a person."""
    def size(value) -> str:
        return "not accounted" if value is None else describe_size(value)

    if not free or free.get("slots") is None:
        return ["  not known yet: the fetcher has not reported (the runner is starting)"]

    lines = [f"  {free.get('slots')} slots, {free.get('cpus')} CPUs, RAM {size(free.get('ram'))}, "
             f"disk {size(free.get('disk'))}, {free.get('gpus', 0)} whole GPUs"
             + (f", GPU memory {size(free.get('gpu_mem'))}" if free.get("devices") else "")]
    for device in free.get("devices") or []:
        state = f"ECC errors {device['ecc_errors']}: not given out" if device["ecc_errors"] else (
            f"{device['holders']} runs" if device["holders"] else "free")
        lines.append(f"  gpu {device['index']} {device['name']} {device['uuid']}: "
                     f"{size(device['available'])} of {size(device['memory_total'])} "
                     f"available, {state}")
    return lines


def environment_store(data: dict) -> dict:
    """The environment store's figures from the cache manager's stats in a status reply:
    ``bytes`` (None until measured), ``environments``, ``cap`` (0: no cap); {} when the cache
    manager has not reported."""
    stats = ((data.get("roles") or {}).get("cache_manager") or {}).get("stats") or {}
    if "env_store_cap" not in stats:
        return {}
    return {"bytes": stats.get("env_store_bytes"),
            "environments": stats.get("env_store_environments"),
            "cap": stats["env_store_cap"]}


def store_line(store: dict) -> str:
    """``environment store: 1.2 GiB of 20 GiB (3 environments)`` for :func:`environment_store`."""
    if not store:
        return "  environment store: not known yet (the cache manager has not reported)"
    cap = f"of {describe_size(store['cap'])}" if store.get("cap") else "(no cap)"
    if store.get("bytes") is None:
        return ("  environment store: not measured yet "
                + (f"(cap {describe_size(store['cap'])})" if store.get("cap") else "(no cap)"))
    count = store.get("environments")
    return (f"  environment store: {describe_size(store['bytes'])} {cap}"
            + (f" ({count} environment{'s' if count != 1 else ''})" if count is not None else ""))


class NoSupervisor(TimeoutError):
    """No supervisor listens under the runtime directory (known without waiting)."""


VIEWS = ("status", "roles", "health", "running", "queues", "free")
COMMANDS = ("drain", "resume", "stop", "reload", "cancel")


def request(runtime_dir: str, command: str, timeout: float = 5.0,
            args: dict | None = None) -> protocol.CtlReply:
    """Send one control command and return the reply.

    Raises :class:`NoSupervisor` at once when no supervisor has its control socket under
    ``runtime_dir`` (nothing to wait for), TimeoutError when one is there but does not
    answer within ``timeout`` seconds.
    """
    endpoints = Endpoints(runtime_dir)
    control_path = endpoints.control_path
    if not os.path.isdir(runtime_dir):
        raise NoSupervisor(f"no runner-supervisor runs with --runtime-dir {runtime_dir}: "
                           "the directory does not exist")
    if not os.path.exists(control_path):
        raise NoSupervisor(f"no runner-supervisor runs with --runtime-dir {runtime_dir}: "
                           f"no control socket {control_path}")
    if not listening(control_path):
        raise NoSupervisor(f"no runner-supervisor runs with --runtime-dir {runtime_dir}: "
                           f"nothing listens on the control socket {control_path} (left "
                           "by a supervisor that was killed)")
    socket = control_client(endpoints)
    try:
        socket.send(protocol.encode(protocol.CtlRequest(command=command, args=args or {})))
        if not socket.poll(poll_ms(timeout)):
            raise TimeoutError(f"no runner-supervisor answered at {runtime_dir} "
                               f"within {timeout:.0f}s")
        reply = protocol.decode(socket.recv())
    finally:
        socket.close()
    if not isinstance(reply, protocol.CtlReply):
        raise ProtocolError(f"unexpected reply {reply.TYPE}")
    return reply


def listening(path: os.PathLike | str) -> bool:
    """Whether a process accepts connections on the Unix socket ``path``: a connection is
    refused at once when the file is left from a process that is gone.  Anything other
    than a refusal (a slow or busy listener) counts as listening."""
    probe = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        probe.close()
    return True


def render_supervisor(data: dict) -> list[str]:
    sup = data["supervisor"]
    lines = [f"supervisor pid {sup['pid']} {sup['state']}, up {sup['uptime']:.0f}s, "
             f"instance {sup['instance']}, hot path {sup['hot_path']}, "
             f"{'taking work' if sup['taking'] else 'not taking work'}"]
    drain = sup.get("drain")
    if drain:
        lines.append(f"draining ({drain['why']}) for {drain['elapsed']:.0f}s of "
                     f"{drain['timeout']:.0f}s"
                     + ("; handing running work back" if drain["handing_back"] else "")
                     + ("; exits when drained" if drain["exit"] else "; stays up when drained")
                     + ("; runner-ctl resume undoes it" if drain.get("resumable") else ""))
    limits = sup.get("limits") or {}
    if limits.get("tasks"):
        lines.append(f"task limit: {limits['tasks_taken']} of {limits['tasks']} taken")
    if limits.get("idle_duration"):
        lines.append(f"idle limit: {limits['idle_for']:.0f}s of {limits['idle_duration']:.0f}s")
    if sup.get("prom_address"):
        lines.append(f"metrics: http://{sup['prom_address']}/metrics")
    return lines


def render_health(data: dict) -> str:
    sup = data["supervisor"]
    return f"{'healthy' if sup.get('healthy') else 'UNHEALTHY'}: {sup.get('health', '?')}"


def render_roles(data: dict) -> list[str]:
    lines = ["roles:"]
    for name, role in data["roles"].items():
        health = "up" if role["alive"] and role["ready"] else ("booting" if role["alive"] else "DOWN")
        stats = " ".join(f"{k}={v}" for k, v in role["stats"].items()
                         if not isinstance(v, (dict, list)))
        lines.append(f"  {name:<14} {health:<8} pid {role['pid']}  restarts {role['restarts']}  "
                     f"heartbeat {role['heartbeat_age']:.0f}s ago  {stats}".rstrip())
    return lines


def render_running(data: dict) -> list[str]:
    lines = [f"running ({len(data['attempts'])}):"]
    for attempt in data["attempts"]:
        lines.append(f"  {attempt['key']}  project={attempt['project'] or '-'}  queue={attempt['queue']}  "
                     f"attempt={attempt['attempt']} (#{attempt['attempt_number']})  {attempt['phase']}  "
                     f"{attempt['elapsed']:.0f}s"
                     + (f"  gpus={attempt['devices']}" if attempt.get("devices", "-1") not in ("", "-1")
                        else "")
                     + (f"  pid {attempt['pid']}" if attempt.get("pid") else ""))
        if attempt.get("last_metric"):
            lines.append(f"      last metric: {attempt['last_metric']}")
    return lines


def render_queues(data: dict) -> list[str]:
    queued = sum(max(0, q.get("depth", 0)) for q in data["queues"].values())
    lines = [f"queued ({queued}):"]
    for name, queue in sorted(data["queues"].items()):
        lines.append(f"  {name}: {queue.get('depth')} waiting"
                     + (f" ({queue['error']})" if queue.get("error") else ""))
        for waiting in queue.get("waiting", []):
            lines.append(f"    {waiting['key']}  project={waiting['project'] or '-'}"
                         + (f"  ({waiting['reason']})" if waiting.get("reason") else ""))
    return lines


def render_free(data: dict) -> list[str]:
    return (["free resources:"] + free_lines(data.get("free") or {})
            + [store_line(environment_store(data))])


def render_status(data: dict) -> str:
    """The status reply as text for a person."""
    lines = render_supervisor(data) + [render_health(data), ""] + render_roles(data)
    lines += [""] + render_running(data) + [""] + render_queues(data) + [""] + render_free(data)
    finished = data.get("finished", {})
    lines += ["", "finished: " + ", ".join(f"{k} {v}" for k, v in finished.items())]
    return "\n".join(lines)


def view(data: dict, name: str) -> tuple[object, str]:
    """(the part of the status reply a view shows, as JSON data; the same as text)."""
    if name == "roles":
        return data["roles"], "\n".join(render_roles(data))
    if name == "health":
        sup = data["supervisor"]
        return ({"healthy": sup.get("healthy"), "health": sup.get("health"),
                 "roles": {n: {"alive": r["alive"], "ready": r["ready"],
                               "heartbeat_age": r["heartbeat_age"]}
                           for n, r in data["roles"].items()}},
                render_health(data))
    if name == "running":
        return data["attempts"], "\n".join(render_running(data))
    if name == "queues":
        return data["queues"], "\n".join(render_queues(data))
    if name == "free":
        return ({**(data.get("free") or {}), "environment_store": environment_store(data)},
                "\n".join(render_free(data)))
    return data, render_status(data)


def watch(args, name: str) -> int:
    """Redraw ``name`` in place until interrupted."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            try:
                reply = request(args.runtime_dir, "status", args.timeout)
                text = (strict_json.dumps(view(reply.data, name)[0], indent=2) if args.json
                        else view(reply.data, name)[1]) if reply.ok else reply.error
            except (TimeoutError, ProtocolError, zmq.ZMQError) as exc:
                text = f"runner-ctl: {exc}"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{clear}runner-ctl {name} at {stamp} (every {args.interval:g}s, "
                             f"Ctrl-C to stop)\n\n{text}\n")
            sys.stdout.flush()
            if args.count:
                args.count -= 1
                if args.count == 0:
                    return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _positive_seconds(text: str) -> float:
    """``--timeout``/``--interval``: seconds, a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text!r}")
    return value


def _count(text: str) -> int:
    """``--count``: 0 (no limit) or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run one view or command; a pipe closed early ends quietly (exit status 141)."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that it is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    parser = OptionParser(
        prog="runner-ctl", description="Talk to a running runner-supervisor.",
        epilog=f"views: {', '.join(VIEWS)}; watch [VIEW]; commands: {', '.join(COMMANDS)}")
    parser.add_argument("--runtime-dir", default=env_value("runtime-dir", str(default_runtime_dir())),
                        help="the supervisor's --runtime-dir [env RUNNER_RUNTIME_DIR]")
    parser.add_argument("--timeout", type=_positive_seconds, default=5.0,
                        help="seconds to wait for a reply (more than 0)")
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    parser.add_argument("--interval", type=_positive_seconds, default=2.0,
                        help="watch: seconds between redraws (more than 0)")
    parser.add_argument("--count", type=_count, default=0,
                        help="watch: stop after N redraws (0: never)")
    parser.add_argument("--stay", action="store_true",
                        help="drain: stay up once drained (runner-ctl resume to take work again)")
    parser.add_argument("--project", default="",
                        help="cancel: only the experiment KEY of this project")
    parser.add_argument("command", choices=VIEWS + COMMANDS + ("watch",), help="what to ask")
    parser.add_argument("view", nargs="?", default=None,
                        help="watch: the view to redraw (default status); cancel: the "
                             "experiment's KEY (any text, also a view's name)")
    args = parser.parse_args(argv)
    if args.command == "cancel" and args.view is None:
        parser.error("cancel needs the experiment's KEY")
    if args.command not in ("cancel", "watch") and args.view is not None:
        parser.error(f"{args.command} takes no further words, not {args.view!r}")
    if args.command == "watch":
        args.view = args.view or "status"
        if args.view not in VIEWS:
            parser.error(f"argument view: invalid choice: '{args.view}' (choose from "
                         f"{', '.join(repr(v) for v in VIEWS)})")
        return watch(args, args.view)
    command = args.command if args.command in COMMANDS else "status"
    extra = None
    if args.command == "drain" and args.stay:
        extra = {"stay": True}
    elif args.command == "cancel":
        extra = {"key": args.view, "project": args.project}
    try:
        reply = request(args.runtime_dir, command, args.timeout, args=extra)
    except (TimeoutError, ProtocolError, zmq.ZMQError) as exc:
        print(f"runner-ctl: {exc}", file=sys.stderr)
        return 1
    if not reply.ok:
        print(f"runner-ctl: {reply.error}", file=sys.stderr)
        return 1
    if args.command in COMMANDS:
        print(strict_json.dumps(reply.data, indent=2) if args.json
              else reply.data.get("message", "ok"))
        return 0
    data, text = view(reply.data, args.command)
    print(strict_json.dumps(data, indent=2) if args.json else text)
    if args.command == "health" and not reply.data["supervisor"].get("healthy"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
