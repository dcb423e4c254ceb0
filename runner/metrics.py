"""Prometheus metrics and the health endpoint (``--prom-address``).

``GET /metrics`` serves the Prometheus text format; ``GET /healthz`` answers ``200 ok`` while
every role is alive and heartbeating and ``503`` with the reason otherwise.

The classic names of the StudioML runner (SPEC section 10) keep their exact names and
labels, so dashboards written for it keep working:

==============================  =======  ==================================================
``runner_project_running``      gauge    attempts in flight (host, queue_type, queue_name,
                                         project)
``runner_project_completed``    counter  attempts ended (same labels)
``runner_queue_depth``          gauge    requests waiting in a queue the runner serves
                                         (host, queue_type, queue_name), as last counted by
                                         the fetcher; a queue it could not count is left out
``runner_queue_checked``        counter  times a queue was asked for work (host,
                                         queue_type, queue_name); from the fetcher's stats
``runner_queue_ignored``        counter  times a queue was left out by --queue-match/
                                         --queue-mismatch (same labels)
``runner_cache_hits``           counter  cache hits (host, cache), from the cache
``runner_cache_misses``         counter  manager's heartbeat stats when it reports them
``runner_resource_*_free*``     gauge    free resources from the fetcher's ledger (host,
                                         device): ``executor_free_slots``,
                                         ``cpu_free_slots``, ``cpu_free_mem`` (bytes),
                                         ``gpu_free_slots``, ``gpu_free_mem``, ``disk_free``
==============================  =======  ==================================================

No metric carries the experiment's key: one series per experiment would grow without
bound on a long-lived runner (``runner-ctl running`` and the logs name experiments).

Counters that come from a role's stats restart from 0 when that role restarts (Prometheus
treats that as a counter reset).  Newer metrics use the Python client's conventions:
``runner_phase_seconds`` (histogram by ``phase``: queue_wait, download, environment, run,
upload: :data:`runner.registry.SPANS`), ``runner_experiments_total`` (by final ``status``),
``runner_role_up`` (by ``role``), ``runner_draining`` and ``runner_healthy``.
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .queues import kind_of
from .registry import SPANS

log = logging.getLogger(__name__)

PHASE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400,
                 43200, 86400, 259200)
JOB_LABELS = ("host", "queue_type", "queue_name", "project")
QUEUE_LABELS = ("host", "queue_type", "queue_name")

# Ledger name -> classic resource metric name.
RESOURCE_NAMES = {
    "slots": "runner_resource_executor_free_slots",
    "cpus": "runner_resource_cpu_free_slots",
    "ram": "runner_resource_cpu_free_mem",
    "gpus": "runner_resource_gpu_free_slots",
    "gpu_slots": "runner_resource_gpu_free_slots",
    "gpu_mem": "runner_resource_gpu_free_mem",
    "hdd": "runner_resource_disk_free",
    "disk": "runner_resource_disk_free",
}


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def render_family(name: str, kind: str, help_text: str,
                  samples: list[tuple[dict, float]]) -> str:
    """One metric family in the text format, with its exact ``name`` (no suffix added)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {float(value)!r}" if text else f"{name} {float(value)!r}")
    return "\n".join(lines) + "\n"


def cache_counts(stats: dict) -> dict[str, dict[str, float]]:
    """``{cache: {"hits": n, "misses": n}}`` found in a cache manager's stats.

    Accepts ``hits``/``misses`` at the top, ``<cache>_hits``/``<cache>_misses`` keys, and
    either form one level down (``{"artifacts": {"hits": 3}}``), so the cache manager may
    report one cache or several.
    """
    found: dict[str, dict[str, float]] = {}

    def scan(node: dict, parent: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and not parent:
                scan(value, str(key))
                continue
            number = _number(value)
            if number is None:
                continue
            for kind in ("hits", "misses"):
                if key == kind or str(key).endswith("_" + kind):
                    prefix = str(key)[:-len(kind)].rstrip("_")
                    cache = parent or (prefix if prefix not in ("", "cache") else "")
                    found.setdefault(cache or "cache", {})[kind] = number

    scan(stats or {}, "")
    return found


def free_resources(free: dict) -> list[tuple[str, dict, float]]:
    """``(metric name, extra labels, value)`` for the fetcher's ``free`` stats."""
    result: list[tuple[str, dict, float]] = []
    for key, value in (free or {}).items():
        name = RESOURCE_NAMES.get(key, f"runner_resource_{key}_free")
        number = _number(value)
        if number is not None:
            result.append((name, {}, number))
        elif isinstance(value, dict):  # per device, e.g. {"0": bytes, "1": bytes}
            for device, amount in value.items():
                number = _number(amount)
                if number is not None:
                    result.append((name, {"device": str(device)}, number))
    return result


class Metrics:
    """Everything ``/metrics`` shows; fed by the supervisor's loop (thread-safe)."""

    def __init__(self, host: str, role_stats: Callable[[], dict],
                 queue_stats: Callable[[], dict] = dict):
        self.host = host
        self.role_stats = role_stats  # () -> {role name: stats dict}
        self.queue_stats = queue_stats  # () -> {queue: {"depth": n, ...}} (QueueStats)
        self.registry = CollectorRegistry(auto_describe=True)
        self.phase_seconds = Histogram(
            "runner_phase_seconds", "Seconds an attempt spent in each phase "
            "(queue_wait: from time_added to taken)", ["phase"], buckets=PHASE_BUCKETS,
            registry=self.registry)
        self.experiments = Counter(
            "runner_experiments", "Attempts ended, by final status (completed, failed, "
            "expired, dead) or requeued", ["status"], registry=self.registry)
        self.running = Gauge("runner_project_running",
                             "Number of experiments being actively worked on per queue",
                             list(JOB_LABELS), registry=self.registry)
        self.role_up = Gauge("runner_role_up", "1 while the role is alive and heartbeating",
                             ["role"], registry=self.registry)
        self.draining = Gauge("runner_draining", "1 while the runner takes no new work",
                              registry=self.registry)
        self.healthy = Gauge("runner_healthy", "1 while every role is healthy",
                             registry=self.registry)
        for phase in SPANS:
            self.phase_seconds.labels(phase)
        self._lock = threading.Lock()
        self._completed: dict[tuple, float] = {}

    def attempt_labels(self, attempt) -> tuple:
        queue_type = getattr(attempt, "queue_type", "") or kind_of(attempt.queue)
        return (self.host, queue_type, attempt.queue, attempt.project or "")

    def attempt_started(self, attempt) -> None:
        self.running.labels(*self.attempt_labels(attempt)).inc()

    def attempt_finished(self, attempt, status: str, started: bool = True) -> None:
        """An attempt ended; ``started``: it was counted by :meth:`attempt_started`."""
        labels = self.attempt_labels(attempt)
        with self._lock:
            if started:
                self.running.labels(*labels).dec()
            self._completed[labels] = self._completed.get(labels, 0.0) + 1
        self.experiments.labels(status).inc()

    def observe(self, phase: str, seconds: float) -> None:
        if seconds >= 0:
            self.phase_seconds.labels(phase).observe(seconds)

    def exposition(self) -> bytes:
        """The whole ``/metrics`` page."""
        parts = [generate_latest(self.registry).decode()]
        with self._lock:
            completed = [(dict(zip(JOB_LABELS, k)), v) for k, v in self._completed.items()]
        parts.append(render_family("runner_project_completed", "counter",
                                   "Number of experiments that have been run per queue",
                                   completed))
        stats = self.role_stats()
        fetcher = stats.get("fetcher") or {}
        for name, key, help_text in (
                ("runner_queue_checked", "queue_checked",
                 "Number of times a queue is queried for work"),
                ("runner_queue_ignored", "queue_ignored",
                 "Number of times a queue is intentionally not queried")):
            types = fetcher.get("queue_types") or {}
            samples = [({"host": self.host, "queue_type": types.get(q) or kind_of(q),
                         "queue_name": q}, n)
                       for q, n in sorted((fetcher.get(key) or {}).items())
                       if _number(n) is not None]
            parts.append(render_family(name, "counter", help_text, samples))
        types = fetcher.get("queue_types") or {}
        depths = []
        for q, queue in sorted((self.queue_stats() or {}).items()):
            depth = _number(queue.get("depth")) if isinstance(queue, dict) else None
            if depth is not None and depth >= 0:  # -1: the fetcher could not count it
                depths.append(({"host": self.host, "queue_type": types.get(q) or kind_of(q),
                                "queue_name": q}, depth))
        parts.append(render_family("runner_queue_depth", "gauge",
                                   "Requests waiting in the queue (last count)", depths))
        caches = cache_counts(stats.get("cache_manager") or {})
        for kind in ("hits", "misses"):
            samples = [({"host": self.host, "cache": cache}, counts[kind])
                       for cache, counts in sorted(caches.items()) if kind in counts]
            parts.append(render_family(f"runner_cache_{kind}", "counter",
                                       f"Number of cache {kind}", samples))
        families: dict[str, list] = {}
        for name, extra, value in free_resources(fetcher.get("free") or {}):
            families.setdefault(name, []).append(({"host": self.host, **extra}, value))
        for name, samples in sorted(families.items()):
            parts.append(render_family(name, "gauge", "Free resources on this runner",
                                       samples))
        return "".join(parts).encode()


class MetricsServer:
    """``/metrics`` and ``/healthz`` on a daemon thread; ``health()`` -> (ok, reason)."""

    def __init__(self, address: str, metrics: Metrics, health: Callable[[], tuple[bool, str]]):
        host, _, port = address.rpartition(":")
        metrics_ref, health_ref = metrics, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body, code, kind = metrics_ref.exposition(), 200, CONTENT_TYPE_LATEST
                    except Exception as exc:  # a scrape must never take the runner down
                        log.exception("rendering /metrics failed")
                        body, code, kind = f"error: {exc}\n".encode(), 500, "text/plain"
                elif path == "/healthz":
                    ok, reason = health_ref()
                    body = (reason or ("ok" if ok else "unhealthy")).encode() + b"\n"
                    code, kind = (200 if ok else 503), "text/plain; charset=utf-8"
                else:
                    body, code, kind = b"see /metrics and /healthz\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # noqa: A002 - keep scrapes out of the log
                log.debug("http %s", format % args)

        self.server = ThreadingHTTPServer((host, int(port)), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-http",
                                       daemon=True)

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        if isinstance(host, bytes):  # typeshed allows it; a TCP server's host is a str
            host = host.decode()
        return f"{host}:{port}"

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
