"""Slack notices (``--slack-hook``, ``--slack-room``) that never slow or fail experiments.

:meth:`Slack.post` only puts the message on a bounded in-memory queue and returns at once;
one daemon thread sends them to the incoming webhook with a short timeout.  When Slack is
slow or down, notices are dropped (counted in :attr:`Slack.dropped`) rather than piling up;
a failed post is logged and not retried.  Notice texts never carry credentials: the
experiment's output tail has been masked by the scraper and is masked again here with the
request's own secrets, and the webhook URL itself is never logged.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request

from .redact import Masker, secrets_of

log = logging.getLogger(__name__)

POST_TIMEOUT = 5.0
MAX_PENDING = 100
TAIL_LIMIT = 3000  # characters of output in a notice (Slack cuts long messages)


class Slack:
    """A fire-and-forget poster to one incoming webhook."""

    def __init__(self, hook: str, room: str = "", username: str = "studioml-runner",
                 timeout: float = POST_TIMEOUT, max_pending: int = MAX_PENDING):
        self.hook = hook
        self.room = room
        self.username = username
        self.timeout = timeout
        self.sent = self.failed = self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="slack", daemon=True)
        self._thread.start()

    def post(self, text: str) -> bool:
        """Queue ``text`` for posting; False (and dropped) when the queue is full."""
        try:
            self._queue.put_nowait(text)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _run(self) -> None:
        while True:
            text = self._queue.get()
            if text is None:
                return
            payload = {"text": text, "username": self.username}
            if self.room:
                payload["channel"] = self.room
            request = urllib.request.Request(
                self.hook, data=json.dumps(payload).encode(), method="POST",
                headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read(1024)
                self.sent += 1
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self.failed += 1
                reason = getattr(exc, "reason", exc)
                log.warning("Slack notice not delivered (%s: %s)", type(exc).__name__, reason)

    def close(self, wait: float = 2.0) -> None:
        """Stop the thread after what is queued, waiting at most ``wait`` seconds."""
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(wait)

    def stats(self) -> dict:
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped,
                "pending": self._queue.qsize()}


def started_notice(host: str, instance: str, version: str, queues: list[str]) -> str:
    return (f":rocket: studioml-runner {version} started on *{host}* (instance {instance}); "
            f"serving {', '.join(queues) or 'no queues yet'}")


def experiment_notice(host: str, attempt, status: str, reason: str, tail: str,
                      final: bool = True) -> str:
    """The notice for an attempt that ended ``status``, with its masked output ``tail``."""
    icon = {"completed": ":white_check_mark:", "expired": ":hourglass:"}.get(status, ":x:")
    text = (f"{icon} experiment *{attempt.key}* (project {attempt.project or '-'}, queue {attempt.queue}) "
            f"{status} on {host}, attempt {attempt.attempt_id} (#{attempt.attempts + 1})"
            + ("" if final else ", will be retried") + (f": {reason}" if reason else ""))
    if tail:
        tail = Masker(secrets_of(attempt.request)).mask_text(tail)
        if len(tail) > TAIL_LIMIT:
            tail = "…" + tail[-TAIL_LIMIT:]
        text += "\n```\n" + tail.replace("```", "'''") + "\n```"
    return text

