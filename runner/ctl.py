"""``runner-ctl``: ask a running ``runner-supervisor`` what it is doing.

``runner-ctl status`` prints the roles and their health, the experiments in flight (key,
project, queue, attempt, phase, elapsed) and the experiments waiting in each queue;
``--json`` prints the supervisor's reply as JSON for scripts.  Exit status 1 when no
supervisor answers within ``--timeout`` seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import zmq

from . import protocol
from .bus import Endpoints, control_client
from .config import default_runtime_dir
from .errors import ProtocolError
from .units import describe_size


def render_free(free: dict) -> list[str]:
    """The fetcher's ``ledger.free()`` as lines for a person."""
    def size(value) -> str:
        return "not accounted" if value is None else describe_size(value)

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


def request(runtime_dir: str, command: str, timeout: float = 5.0) -> protocol.CtlReply:
    """Send one control command and return the reply; raises TimeoutError."""
    socket = control_client(Endpoints(runtime_dir))
    try:
        socket.send(protocol.encode(protocol.CtlRequest(command=command)))
        if not socket.poll(int(timeout * 1000)):
            raise TimeoutError(f"no runner-supervisor answered at {runtime_dir} "
                               f"within {timeout:.0f}s")
        reply = protocol.decode(socket.recv())
    finally:
        socket.close()
    if not isinstance(reply, protocol.CtlReply):
        raise ProtocolError(f"unexpected reply {reply.TYPE}")
    return reply


def render_status(data: dict) -> str:
    """The status reply as text for a person."""
    sup = data["supervisor"]
    lines = [f"supervisor pid {sup['pid']} {sup['state']}, up {sup['uptime']:.0f}s, "
             f"instance {sup['instance']}, hot path {sup['hot_path']}, "
             f"{'taking work' if sup['taking'] else 'not taking work'}", "", "roles:"]
    for name, role in data["roles"].items():
        health = "up" if role["alive"] and role["ready"] else ("booting" if role["alive"] else "DOWN")
        stats = " ".join(f"{k}={v}" for k, v in role["stats"].items() if k != "free")
        lines.append(f"  {name:<14} {health:<8} pid {role['pid']}  restarts {role['restarts']}  "
                     f"{stats}")
    free = (data["roles"].get("fetcher", {}).get("stats") or {}).get("free")
    if free:
        lines += ["", "free resources:"] + render_free(free)
    lines += ["", f"running ({len(data['jobs'])}):"]
    for job in data["jobs"]:
        lines.append(f"  {job['key']}  project={job['project'] or '-'}  queue={job['queue']}  "
                     f"attempt={job['attempt']} (#{job['attempt_number']})  {job['phase']}  "
                     f"{job['elapsed']:.0f}s" + (f"  pid {job['pid']}" if job.get("pid") else "")
                     + (f"  gpus {job['devices']}" if job.get("devices", "-1") != "-1" else ""))
    queued = sum(max(0, q.get("depth", 0)) for q in data["queues"].values())
    lines += ["", f"queued ({queued}):"]
    for name, queue in sorted(data["queues"].items()):
        lines.append(f"  {name}: {queue.get('depth')} waiting"
                     + (f" ({queue['error']})" if queue.get("error") else ""))
        for waiting in queue.get("waiting", []):
            lines.append(f"    {waiting['key']}  project={waiting['project'] or '-'}")
    finished = data.get("finished", {})
    lines += ["", "finished: " + ", ".join(f"{k} {v}" for k, v in finished.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runner-ctl",
                                     description="Talk to a running runner-supervisor.")
    parser.add_argument("--runtime-dir", default=os.environ.get("RUNTIME_DIR",
                                                                str(default_runtime_dir())),
                        help="the supervisor's --runtime-dir [env RUNTIME_DIR]")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    parser.add_argument("command", choices=["status"], help="what to ask")
    args = parser.parse_args(argv)
    try:
        reply = request(args.runtime_dir, args.command, args.timeout)
    except (TimeoutError, ProtocolError, zmq.ZMQError) as exc:
        print(f"runner-ctl: {exc}", file=sys.stderr)
        return 1
    if not reply.ok:
        print(f"runner-ctl: {reply.error}", file=sys.stderr)
        return 1
    print(json.dumps(reply.data, indent=2) if args.json else render_status(reply.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
