"""What the supervisor tells the world: health, systemd, metrics, Slack, the status document.

* Health: every role alive, ready and heartbeating (:meth:`RoleProcesses.health`); served on
  ``/healthz`` and gating systemd's ``WATCHDOG``.
* systemd (:mod:`runner.systemd`): ``READY`` once every role is up and the queues were
  listed, ``STATUS`` lines (at most every :data:`STATUS_EVERY` seconds, when they change),
  ``WATCHDOG`` only while healthy, ``STOPPING`` when an exiting drain begins.
* ``--prom-address``: ``/metrics`` and ``/healthz`` (:mod:`runner.metrics`, imported only
  then), fed from the registry's :class:`runner.registry.Tracked` results.
* Slack (:mod:`runner.slack`, on a background thread): the start notice, final failures and
  expiries with the output tail, completions with ``--slack-completed``.
* :meth:`Observability.status` — the document ``runner-ctl status`` shows.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Callable

from . import __version__, fates, metadata, protocol, slack as slack_module
from .drain import Drain
from .registry import Registry, Tracked
from .role_processes import RoleProcesses
from .systemd import Notifier

if TYPE_CHECKING:
    from .metrics import Metrics, MetricsServer

log = logging.getLogger("runner.supervisor")

STATUS_EVERY = 2.0  # seconds between two systemd STATUS lines


class Observability:
    """Health, systemd notices, metrics and Slack for one supervisor."""

    def __init__(self) -> None:
        self.notifier = Notifier()
        self.metrics: Metrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.slack: slack_module.Slack | None = None
        self.health: tuple[bool, str] = (False, "starting")
        self.ready_sent = False
        self._last_status = ("", 0.0)

    def start(self, config, role_stats: Callable[[], dict], queues: Callable[[], dict],
              ) -> None:
        """Serve metrics and health on ``--prom-address`` (OSError when it cannot bind) and
        start the Slack poster, when configured."""
        if config.prom_address:
            from .metrics import Metrics, MetricsServer  # prometheus-client only when asked
            metrics = Metrics(config.hostname, role_stats, queues)
            server = MetricsServer(config.prom_address, metrics, lambda: self.health).start()
            self.metrics, self.metrics_server = metrics, server
            log.info("metrics on http://%s/metrics, health on /healthz", server.address)
        self.configure_slack(config)

    def configure_slack(self, config) -> None:
        """(Re)start the Slack poster when its hook, room or timeout changed."""
        hook, room, timeout = config.slack_hook, config.slack_room, config.slack_timeout
        if self.slack is not None and (self.slack.hook, self.slack.room,
                                       self.slack.timeout) == (hook, room, timeout):
            return
        if self.slack is not None:
            self.slack.close(wait=0)
            self.slack = None
        if hook:
            self.slack = slack_module.Slack(hook, room, timeout=timeout)

    def stop(self) -> None:
        if self.slack is not None:
            self.slack.close(wait=2.0)  # bounded: a dead Slack never holds the exit up
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.notifier.close()

    def draining(self, on: bool) -> None:
        if self.metrics is not None:
            self.metrics.draining.set(1 if on else 0)

    # -- the attempts ---------------------------------------------------------------------
    def tracked(self, tracked: Tracked, phase: protocol.AttemptPhase, config) -> None:
        """Metrics (and Slack, for a finished attempt) of one tracked ``AttemptPhase``."""
        if self.metrics is not None:
            for span, seconds in tracked.spans:
                self.metrics.observe(span, seconds)
            if tracked.taken:
                self.metrics.attempt_started(phase.attempt)
            if tracked.finished:
                self.metrics.attempt_finished(phase.attempt, tracked.status or "unknown",
                                              started=tracked.started)
        if tracked.finished:
            self.notify_finished(tracked.entry.detail.get("tail", ""), phase, config)

    def notify_finished(self, tail: str, phase: protocol.AttemptPhase, config) -> None:
        """Slack: final failures and expiries (with the output tail), completions if asked."""
        if self.slack is None:
            return
        fate, status = phase.detail.get("fate"), phase.detail.get("status", "")
        final = fate in (fates.ACK, fates.DEAD)
        if fate == fates.DEAD:
            status = "dead-lettered"
        wanted = (final and status in (fates.FAILED, fates.EXPIRED, "dead-lettered")) or (
            status == fates.COMPLETED and config.slack_completed)
        if wanted:
            self.slack.post(slack_module.experiment_notice(
                config.hostname, phase.attempt, status, phase.detail.get("reason", ""),
                tail if status != fates.COMPLETED else "", final=final))

    # -- health and systemd ---------------------------------------------------------------
    def report(self, roles: RoleProcesses, summary: Callable[[], str], queues: dict,
               ready: bool, config) -> None:
        """Health, systemd READY/STATUS/WATCHDOG, and the start notice (once ``ready``: the
        queues were listed)."""
        healthy, reason, up = roles.health()
        self.health = (healthy, reason)
        if self.metrics is not None:
            for name, role_up in up.items():
                self.metrics.role_up.labels(name).set(1 if role_up else 0)
            self.metrics.healthy.set(1 if healthy else 0)
        if not self.ready_sent and ready:
            self.ready_sent = True
            self.notifier.ready(summary())
            log.info("ready: %d queues listed", len(queues))
            if self.slack is not None:
                self.slack.post(slack_module.started_notice(
                    config.hostname, config.instance, __version__, sorted(queues)))
        self.notifier.watchdog(healthy and self.ready_sent)
        text, at = self._last_status
        now = time.monotonic()
        current = summary()
        if self.ready_sent and current != text and now - at >= STATUS_EVERY:
            self._last_status = (current, now)
            self.notifier.status(current)

    def summary(self, drain: Drain, registry: Registry, queues: dict) -> str:
        """One line for systemd's STATUS."""
        head = {"running": "serving", "starting": "starting"}.get(drain.state, drain.state)
        if drain.limit_stopped and drain.current is None:
            head = "task limit reached"
        healthy, reason = self.health
        return (f"{head}: {len(registry)} in flight, {sum(registry.finished.values())} "
                f"finished, {len(queues)} queues" + ("" if healthy else f"; unhealthy: {reason}"))

    # -- runner-ctl status ----------------------------------------------------------------
    def status(self, *, config, started: float, roles: RoleProcesses, registry: Registry,
               drain: Drain, queues: dict, taking: bool, reloads: int) -> dict:
        """The status document (see :mod:`runner.ctl` for its views)."""
        now = time.time()
        healthy, reason = self.health
        supervisor = {
            "pid": os.getpid(), "instance": config.instance, "host": config.hostname,
            "state": drain.state, "started": metadata.iso_utc(started),
            "uptime": round(now - started, 1), "version": __version__,
            "hot_path": roles.hot_path(), "taking": taking, "healthy": healthy,
            "health": reason, "drain": drain_document(drain, config, now),
            "limits": {"tasks": config.limit_tasks, "tasks_taken": registry.taken,
                       "idle_duration": config.limit_idle_duration,
                       "idle_for": round(drain.idle_for(now, len(registry)), 1)},
            "queue_match": config.queue_match, "queue_mismatch": config.queue_mismatch,
            "log_level": config.log_level, "reloads": reloads,
            "prom_address": self.metrics_server.address if self.metrics_server else "",
            "systemd": self.notifier.enabled,
            "slack": self.slack.stats() if self.slack else None}
        return {"supervisor": supervisor, "roles": roles.document(),
                "attempts": attempts_document(registry, roles, now), "queues": queues,
                "free": roles["fetcher"].stats.get("free") or {},
                "finished": dict(registry.finished)}


def drain_document(drain: Drain, config, now: float) -> dict | None:
    """The drain in progress, for ``runner-ctl status`` (None when none is)."""
    current = drain.current
    if current is None:
        return None
    return {"why": current.why, "origin": current.origin,
            "elapsed": round(now - current.since, 1), "timeout": config.drain_timeout,
            "exit": current.exit, "stop_now": current.stop_now,
            "handing_back": current.handing_back_since is not None,
            "resumable": current.resumable}


def attempts_document(registry: Registry, roles: RoleProcesses, now: float) -> list[dict]:
    """The attempts in flight, for ``runner-ctl running``, sorted by attempt id."""
    last_metric = roles["scraper"].stats.get("last_metric") or {}
    found = []
    for entry in registry:
        attempt = entry.attempt
        found.append({"attempt": attempt.attempt_id, "key": attempt.key,
                      "project": attempt.project, "queue": attempt.queue,
                      "attempt_number": attempt.attempts + 1, "phase": entry.phase,
                      "pid": entry.detail.get("pid"),
                      "devices": (attempt.resources or {}).get("devices") or "-1",
                      "started": metadata.iso_utc(attempt.taken_at),
                      "elapsed": round(now - attempt.taken_at, 1),
                      "last_metric": last_metric.get(attempt.attempt_id, "")})
    return found
