"""The delivery book: which queue deliveries this runner holds, and for which attempt.

Pure state, no broker calls: the fetcher asks the book what to do and applies it to the back
ends itself.  Every method that ages something takes the clock (``now``, monotonic seconds).
The back end a delivery came from is kept as an opaque handle (only its ``kind`` is read).

* **held**: each attempt in flight holds its delivery (:class:`Held`), from the moment it is
  taken (:meth:`DeliveryBook.hold`) or re-held after a fetcher restart
  (:meth:`DeliveryBook.adopt`) until its end (:meth:`DeliveryBook.end`).
* **redeliveries**: a broker that lost a delivery (its connection dropped, its channel was
  closed) hands the message out again.  A request is identified by its queue, project, key
  and ``time_added`` (:func:`request_identity`); a redelivery of a request that runs here is
  attached to the running attempt and settled with it (:meth:`DeliveryBook.redelivered`).
* **tombstones**: when an attempt ends while none of its deliveries is held any more, its
  decision is kept for :data:`TOMBSTONE_TTL` (:meth:`DeliveryBook.lost`) and applied to the
  redelivered copy when it is taken again, so the request is not run twice by this runner.
* **deleted queues** and **cancels** mark held attempts (:meth:`DeliveryBook.deletion_suspects`,
  :meth:`DeliveryBook.cancel`); a cancel of a request not held here waits for it
  (:meth:`DeliveryBook.cancelled_on_take`, :data:`CANCEL_TTL`).
* **hand-back counts** per request for ``--max-requeues`` (:meth:`DeliveryBook.counted`).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import fates, protocol
from .queues.base import Delivery

TOMBSTONE_TTL = 24 * 3600.0
TOMBSTONES_MAX = 10_000
REQUEUES_KEPT = 10_000  # hand-back counts remembered per request
CANCEL_TTL = 24 * 3600.0  # how long a cancel of a request not held here waits for it


def request_identity(queue: str, project: str | None, key: str, request: dict) -> tuple:
    """What makes two deliveries the same request: queue, project, key and ``time_added``."""
    experiment = request.get("experiment") or {}
    return (queue, project or "", key, repr(experiment.get("time_added")))


def identity_of(attempt: protocol.Attempt) -> tuple:
    """:func:`request_identity` of the request ``attempt`` runs."""
    return request_identity(attempt.queue, attempt.project, attempt.key, attempt.request)


@dataclass(frozen=True)
class Settle:
    """Apply ``action`` (``fates.ACK``, ``fates.DEAD`` or ``fates.REQUEUE``) to ``delivery``
    of ``backend``; ``attempts`` is the count a requeue records, ``reason`` the dead letter's."""

    backend: Any
    delivery: Delivery
    action: str
    reason: str
    attempts: int


@dataclass
class Held:
    """An attempt in flight and the deliveries of its request that this runner holds.

    ``redeliveries`` are copies the broker handed out again while the attempt ran;
    ``queue_deleted`` and ``cancelled`` say what stopped the run (for ``fates.decide``).
    """

    backend: Any
    delivery: Delivery
    attempt: protocol.Attempt
    identity: tuple
    redeliveries: list[Delivery] = field(default_factory=list)
    queue_deleted: bool = False
    cancelled: bool = False

    @property
    def deliveries(self) -> list[Delivery]:
        """The first delivery, then every redelivery attached since."""
        return [self.delivery] + self.redeliveries

    def settlement(self, decision: fates.Decision) -> list[Settle]:
        """How to apply ``decision`` to every delivery held (none for ``fates.DROP``)."""
        if decision.action == fates.DROP:
            return []
        return [Settle(self.backend, d, decision.action, decision.reason, decision.attempts)
                for d in self.deliveries]


class DeliveryBook:
    """The held deliveries of one fetcher, keyed by attempt id (see the module doc)."""

    def __init__(self) -> None:
        self.held: dict[str, Held] = {}
        self.running: dict[tuple, str] = {}  # request identity -> attempt id
        self.tombstones: dict[tuple, tuple[fates.Decision, float]] = {}  # -> (decision, expires)
        self.requeues: dict[tuple, int] = {}  # request identity -> hand-backs so far
        self.cancel_on_take: dict[tuple[str, str], float] = {}  # (project, key) -> lapses at

    def __len__(self) -> int:
        return len(self.held)

    def hold(self, backend: Any, delivery: Delivery, attempt: protocol.Attempt) -> Held:
        """``attempt`` was started from ``delivery``: hold it until :meth:`end`."""
        held = Held(backend, delivery, attempt, identity_of(attempt))
        self.held[attempt.attempt_id] = held
        self.running[held.identity] = attempt.attempt_id
        return held

    def adopt(self, backend: Any, attempt: protocol.Attempt) -> Held | None:
        """Hold again an attempt a previous fetcher process handed out (its delivery is
        rebuilt from ``attempt``: queue, token, attempts); None when it is held already."""
        if attempt.attempt_id in self.held:
            return None
        delivery = Delivery(queue=attempt.queue, token=attempt.token, body=b"",
                            attempts=attempt.attempts)
        return self.hold(backend, delivery, attempt)

    def redelivered(self, backend: Any, delivery: Delivery, identity: tuple,
                    now: float) -> Held | Settle | None:
        """A delivery of request ``identity`` was taken.  Returns the :class:`Held` it was
        attached to when the request runs here; the :class:`Settle` of the decision kept
        when its attempt ended while the delivery was lost (the tombstone is used up); None
        when it is new here (or its tombstone expired)."""
        attempt_id = self.running.get(identity)
        if attempt_id is not None and attempt_id in self.held:
            held = self.held[attempt_id]
            held.redeliveries.append(delivery)
            return held
        entry = self.tombstones.pop(identity, None)
        if entry is None or entry[1] < now:
            return None
        decision = entry[0]
        return Settle(backend, delivery, decision.action, decision.reason, decision.attempts)

    def end(self, attempt_id: str) -> Held | None:
        """The attempt ended: stop holding it; None when it was not held here."""
        held = self.held.pop(attempt_id, None)
        if held is not None and self.running.get(held.identity) == attempt_id:
            del self.running[held.identity]
        return held

    def lost(self, held: Held, decision: fates.Decision, now: float) -> None:
        """None of ``held``'s deliveries could be settled (the broker took them back): keep
        ``decision`` for the redelivered copy (a tombstone, :data:`TOMBSTONE_TTL`)."""
        for old in [k for k, (_, expires) in self.tombstones.items() if expires < now]:
            del self.tombstones[old]
        while len(self.tombstones) >= TOMBSTONES_MAX:
            self.tombstones.pop(next(iter(self.tombstones)))
        self.tombstones[held.identity] = (decision, now + TOMBSTONE_TTL)

    # -- hand-back counts ---------------------------------------------------------------
    def requeues_of(self, identity: tuple) -> int:
        """How often request ``identity`` was handed back for the host's fault here."""
        return self.requeues.get(identity, 0)

    def counted(self, identity: tuple, decision: fates.Decision) -> int:
        """Count ``decision`` against the request: a final one forgets the count, a back-off
        adds one (at most :data:`REQUEUES_KEPT` requests are remembered, oldest dropped).
        Returns the count now."""
        if decision.action in (fates.ACK, fates.DEAD, fates.DROP):
            self.requeues.pop(identity, None)
            return 0
        count = self.requeues.get(identity, 0)
        if decision.backoff:
            self.requeues.pop(identity, None)
            while len(self.requeues) >= REQUEUES_KEPT:
                self.requeues.pop(next(iter(self.requeues)))
            count += 1
            self.requeues[identity] = count
        return count

    def forget_request(self, identity: tuple) -> None:
        """The request was settled for good outside an attempt (stale): drop its count."""
        self.requeues.pop(identity, None)

    # -- stops ----------------------------------------------------------------------------
    def cancel(self, key: str, project: str, now: float) -> list[Held]:
        """``runner-ctl cancel``: mark and return the held attempts of ``key`` (of
        ``project`` unless it is ""); when none is held, remember the cancel for
        :data:`CANCEL_TTL` so that :meth:`cancelled_on_take` acks the request when taken."""
        matched = [held for held in self.held.values() if held.attempt.key == key
                   and (not project or held.attempt.project == project)]
        for held in matched:
            held.cancelled = True
        if not matched:
            for old in [k for k, until in self.cancel_on_take.items() if until < now]:
                del self.cancel_on_take[old]
            self.cancel_on_take[(project, key)] = now + CANCEL_TTL
        return matched

    def cancelled_on_take(self, project: str | None, key: str, now: float) -> bool:
        """True (and the cancel used up) when ``runner-ctl cancel`` named this request."""
        for name in ((project or "", key), ("", key)):
            until = self.cancel_on_take.pop(name, None)
            if until is not None and until >= now:
                return True
        return False

    def deletion_suspects(self, served: Iterable[str], listed_kinds: Iterable[str]) -> list[Held]:
        """Held attempts whose queue a successful listing of their back end's kind no longer
        names (and not already marked deleted): ask the back end whether it was deleted,
        then :meth:`queue_deleted`."""
        served, listed_kinds = set(served), set(listed_kinds)
        return [held for held in self.held.values()
                if not held.queue_deleted and held.delivery.queue not in served
                and held.backend.kind in listed_kinds]

    def queue_deleted(self, held: Held) -> None:
        """The queue of ``held`` was deleted while it ran (the user's abort)."""
        held.queue_deleted = True
