"""Requests the fetcher holds aside, so that the requests behind them are taken.

Pure state, no broker calls (``docs/fates.md``, "No head-of-line blocking" and "Back-off").
A request that does not fit *now* (``not_now``) is tried again while resources free up and
put back for any runner after :data:`NOT_NOW_HOLD`; one that never fits this host
(``never``) is put back after :data:`NEVER_HOLD`; one handed back for the host's fault
(``backoff``) rests until its back-off ends and is then tried here again.  At most
:data:`PARK_MAX` are held at once.  Times are monotonic seconds, passed in as ``now``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .queues.base import Delivery
from .requests import RequestFacts

PARK_MAX = 16           # requests held aside at once
NOT_NOW_HOLD = 10.0     # a request that does not fit now is held this long, then put back
NEVER_HOLD = 30.0       # one that never fits here is held this long, then put back
SAID_KEPT = 10_000      # "never fits here" reasons remembered (said once per key)
NOT_NOW, NEVER, BACKOFF = "not_now", "never", "backoff"  # why a request is held aside
WAIT, TRY, PUT_BACK = "wait", "try", "put_back"          # what to do with one now


@dataclass
class Parked:
    """A delivery held aside, so that the requests behind it are taken.

    ``why`` is :data:`NOT_NOW`, :data:`NEVER` or :data:`BACKOFF` ("" before it is held);
    at ``until`` (monotonic seconds) a ``not_now`` or ``never`` request goes back to its
    queue for any runner, a ``backoff`` one is tried here again.  ``backend`` is the back
    end holding ``delivery`` (opaque here).
    """

    backend: Any
    delivery: Delivery
    request: dict
    facts: RequestFacts
    identity: tuple
    why: str = ""
    until: float = 0.0
    reason: str = ""


class HeldAside:
    """The requests held aside, keyed by delivery token, oldest first."""

    def __init__(self, capacity: int = PARK_MAX) -> None:
        self.capacity = capacity
        self.items: dict[str, Parked] = {}
        self.said_never: dict[tuple[str, str], str] = {}  # (queue, key) -> why it never fits

    def __len__(self) -> int:
        return len(self.items)

    def has_room(self) -> bool:
        return len(self.items) < self.capacity

    def hold(self, item: Parked, never: bool, reason: str, now: float) -> bool:
        """Hold ``item`` because it does not fit now (or ``never`` fits here), for
        :data:`NOT_NOW_HOLD` (:data:`NEVER_HOLD`); False when no room is left (put it back)."""
        self.wait_for_room(item, never, reason, now)
        if not self.has_room():
            return False
        self.items[item.delivery.token] = item
        return True

    def wait_for_room(self, item: Parked, never: bool, reason: str, now: float) -> None:
        """``item`` was tried and did not fit: from ``now`` it waits as ``not_now``/``never``."""
        item.why, item.reason = (NEVER if never else NOT_NOW), reason
        item.until = now + (NEVER_HOLD if never else NOT_NOW_HOLD)

    def back_off(self, item: Parked, until: float, reason: str) -> bool:
        """Hold ``item`` (handed back for the host's fault) until ``until``, then try it
        here again; False when no room is left."""
        if not self.has_room():
            return False
        item.why, item.until, item.reason = BACKOFF, until, reason
        self.items[item.delivery.token] = item
        return True

    def never_said(self, queue: str, key: str, reason: str) -> bool:
        """True the first time ``key`` of ``queue`` is found never to fit here (say it
        once per key; at most :data:`SAID_KEPT` are remembered)."""
        if (queue, key) in self.said_never:
            return False
        while len(self.said_never) >= SAID_KEPT:
            self.said_never.pop(next(iter(self.said_never)))
        self.said_never[(queue, key)] = reason
        return True

    def forget(self, queue: str, key: str) -> None:
        """``key`` was taken or settled for good: a later "never fits" is said again."""
        self.said_never.pop((queue, key), None)

    @staticmethod
    def resting(item: Parked, now: float) -> bool:
        """True while a ``backoff`` item's delay runs (nothing to look at yet)."""
        return item.why == BACKOFF and item.until > now

    @staticmethod
    def step(item: Parked, now: float, may_start: bool) -> str:
        """What to do with ``item`` now: :data:`TRY` to start it (a back-off that is over,
        or a ``not_now`` one while ``may_start``: taking, with a free slot), :data:`PUT_BACK`
        once its hold is over, else :data:`WAIT`."""
        if item.why == BACKOFF or (item.why == NOT_NOW and item.until > now and may_start):
            return TRY
        return PUT_BACK if item.until <= now else WAIT

    def remove(self, token: str) -> Parked | None:
        return self.items.pop(token, None)

    def take_all(self) -> list[Parked]:
        """Every item, oldest first; none is held afterwards (drain, shutdown)."""
        items = list(self.items.values())
        self.items.clear()
        return items

    def waiting(self, queue: str, hostname: str,
                requeues_of: Callable[[tuple], int]) -> list[dict]:
        """``runner-ctl queues`` entries for the items of ``queue``: key, project, ``held``
        (why) and, for ``never`` and ``backoff``, a reason."""
        entries = []
        for item in self.items.values():
            if item.delivery.queue != queue:
                continue
            entry = {"key": item.facts.key, "project": item.facts.project, "held": item.why}
            if item.why == NEVER:
                entry["reason"] = f"cannot run on {hostname}: {item.reason}"
            elif item.why == BACKOFF:
                entry["reason"] = (f"backing off after hand-back {requeues_of(item.identity)}: "
                                   f"{item.reason}")
            entries.append(entry)
        return entries
