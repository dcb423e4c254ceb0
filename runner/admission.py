"""Admission: from a taken delivery to an ``AttemptAssigned``, or to the delivery's fate.

A body is opened when it is an encrypted, signed envelope (:mod:`runner.envelope`), parsed
(:func:`runner.requests.parse_request`, the only judge of a body) and its object names
checked; then, in this order:

* a redelivery of a request running here is attached to its attempt, one whose attempt
  ended while its delivery was lost is settled as decided then (:mod:`runner.deliveries`);
* a request ``runner-ctl cancel`` named is acked ``cancelled`` without running (also one
  held aside when the cancel came);
* a stale request is acked and recorded ``expired``;
* a request that fits is reserved in the ledger, given an attempt id and started; one that
  does not fit now, never fits this host, or names a container image no runtime here runs
  (:mod:`runner.containers`) is held aside (:mod:`runner.held_aside`), or put back when
  too many are.

Admission never throws (:meth:`Admission.accept`): whatever goes wrong between a body and
the ``AttemptAssigned`` dead-letters that delivery with the reason (``docs/fates.md``).
Broker calls, records and messages go through the fetcher's :class:`Effects`.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from typing import Any, Protocol

from . import containers, envelope, fates, metadata, protocol, studio_db
from .deliveries import DeliveryBook, Held, Settle, request_identity
from .errors import BadRequest
from .held_aside import BACKOFF, PUT_BACK, TRY, HeldAside, Parked
from .queues.base import Delivery
from .requests import MAX_BODY_BYTES, parse_request, safe_path_part
from .resources import Ledger
from .units import describe_size


class Effects(Protocol):
    """What admission asks of the fetcher."""

    def settle_delivery(self, settle: Settle) -> bool:
        """Apply ``settle`` to its back end; False when the back end had lost the delivery."""

    def record(self, request: dict, status: str, attempt_id: str, attempts: int,
               final: bool, reason: str = "") -> None:
        """Write the request's metadata record (a failure is logged, never raised)."""

    def start(self, attempt: protocol.Attempt) -> None:
        """Hand ``attempt`` on (``AttemptAssigned``) and say so."""

    def end_client_record(self, key: str, request: dict) -> None:
        """End the StudioML client's record of a request nothing will run."""

    def rest(self, queue: str) -> None:
        """Take nothing from ``queue`` for a moment (too many requests held aside)."""

    def runner_log(self, attempt_id: str, text: str) -> None:
        """Add a line to the attempt's runner log."""

    def stats_changed(self) -> None:
        """What ``runner-ctl queues`` shows changed."""


def key_for_log(body: bytes) -> str:
    """The experiment key a refused body names, for log lines only: ``experiment.key`` when
    the body is a plain JSON request of at most 1 MiB naming a short string key, else "?"."""
    if not isinstance(body, (bytes, bytearray)) or len(body) > 1 << 20:
        return "?"
    try:
        key = json.loads(body)["experiment"]["key"]
    except Exception:  # noqa: BLE001 - any body: not JSON, an envelope, another shape
        return "?"
    return key if isinstance(key, str) and 0 < len(key) <= 200 else "?"


class Admission:
    """Admits deliveries for one fetcher: reserves in ``ledger``, holds attempts in ``book``
    and held-aside requests in ``aside`` (see the module doc)."""

    def __init__(self, config: Any, ledger: Ledger, book: DeliveryBook, aside: HeldAside,
                 effects: Effects, log: logging.Logger) -> None:
        self.config, self.ledger, self.book, self.aside = config, ledger, book, aside
        self.effects, self.log = effects, log
        self.keys = envelope.Keys.from_config(config)  # envelopes (rescanned on use)
        self.runtimes, self.runtime_problems = containers.runtimes_for(config.container_runtime)
        self.attempt_ids = metadata.AttemptIds(
            config.hostname, os.path.join(config.working_dir, ".attempt-clock"))
        self.random = random.Random()
        self.taken = 0  # attempts started by this process (for --limit-tasks)

    def accept(self, backend: Any, delivery: Delivery) -> None:
        """Admit one delivery: start it, hold it aside, or settle it at once.

        The boundary between the queues and the pipeline: whatever goes wrong while
        admitting a body ends in a dead letter with the reason, never in a crash."""
        try:
            self.admit(backend, delivery)
        except Exception as exc:  # noqa: BLE001 - no body may crash the fetcher
            self.dead_letter(backend, delivery, exc)

    def dead_letter(self, backend: Any, delivery: Delivery, exc: Exception) -> None:
        reason = f"request could not be admitted: {type(exc).__name__}: {exc}"
        self.log.exception("key=%s %s (%s); dead-lettered", key_for_log(delivery.body), reason,
                           delivery.queue)
        self.effects.settle_delivery(Settle(backend, delivery, fates.DEAD, reason[:2000], 0))

    def admit(self, backend: Any, delivery: Delivery) -> None:
        try:
            body = envelope.open_body(delivery.body, delivery.queue, self.keys)
            request, facts = parse_request(body, min_save_interval=self.config.min_save_interval)
            metadata.check_object_names(request, self.config.hostname,
                                        self.config.metadata_store)
        except BadRequest as exc:
            self.log.error("key=%s bad request in %s: %s; dead-lettered",
                           key_for_log(delivery.body), delivery.queue, exc)
            self.effects.settle_delivery(Settle(backend, delivery, fates.DEAD, str(exc), 0))
            return
        studio_db.add_output_artifact(request)  # CompletionService tasks have none
        item = Parked(backend, delivery, request, facts,
                      request_identity(delivery.queue, facts.project, facts.key, request))
        if self.redelivered(item) or self.cancelled_before_run(item) or self.expired(item):
            return
        self.start_or_hold(item)

    def redelivered(self, item: Parked) -> bool:
        """Handle a delivery of a request this runner runs or has just finished; True if so."""
        found = self.book.redelivered(item.backend, item.delivery, item.identity,
                                      time.monotonic())
        if isinstance(found, Held):
            attempt_id = found.attempt.attempt_id
            self.log.warning("key=%s attempt=%s redelivered by %s while it runs here: holding "
                             "the new delivery with the running attempt, not starting a "
                             "second copy", item.facts.key, attempt_id, item.delivery.queue)
            self.effects.runner_log(attempt_id, f"the broker redelivered this request "
                                    f"({item.delivery.queue}); the new delivery is held with "
                                    "this attempt")
        elif isinstance(found, Settle):
            self.log.warning("key=%s redelivered after its attempt ended while the delivery "
                             "was lost; settling it as decided then: %s (%s)", item.facts.key,
                             found.action, found.reason)
            self.effects.settle_delivery(found)
        return found is not None

    def cancelled_before_run(self, item: Parked) -> bool:
        """Ack a request ``runner-ctl cancel`` named before it ran (recorded ``cancelled``);
        True if so."""
        key, delivery = item.facts.key, item.delivery
        if not (self.book.cancel_on_take
                and self.book.cancelled_on_take(item.facts.project, key, time.monotonic())):
            return False
        self.log.warning("key=%s cancelled by runner-ctl cancel before it ran; acked as "
                         "cancelled", key)
        self.effects.record(item.request, fates.CANCELLED, "", delivery.attempts, final=True)
        self.effects.settle_delivery(Settle(item.backend, delivery, fates.ACK, "cancelled",
                                   delivery.attempts))
        return True

    def expired(self, item: Parked) -> bool:
        """Ack a request whose lifetime has ended (recorded ``expired``); True if so."""
        now, stale_at, key = time.time(), item.facts.stale_at, item.facts.key
        if stale_at is None or stale_at > now:
            return False
        self.log.warning("key=%s stale on arrival (lifetime ended %.0fs ago); acked as expired",
                         key, now - stale_at)
        self.effects.record(item.request, fates.EXPIRED, "", item.delivery.attempts, final=True)
        # The client's record ends too: nothing will run it (studio_db module doc).
        self.effects.end_client_record(key, item.request)
        self.effects.settle_delivery(Settle(item.backend, item.delivery, fates.ACK, "stale",
                                   item.delivery.attempts))
        self.aside.forget(item.delivery.queue, key)
        self.book.forget_request(item.identity)
        return True

    def start_or_hold(self, item: Parked) -> None:
        """Start ``item`` now, or hold it aside (or put it back when too many are held)."""
        started, never, reason = self.try_start(item)
        if started:
            return
        key, delivery = item.facts.key, item.delivery
        if never and self.aside.never_said(delivery.queue, key, reason):  # once per key
            self.log.warning("key=%s cannot run on this runner: %s; held aside, then put "
                             "back for another runner", key, reason)
            self.effects.record(item.request, "waiting", "", delivery.attempts, final=False,
                                reason=f"{self.config.hostname}: {reason}")
            self.effects.stats_changed()
        if self.aside.hold(item, never, reason, time.monotonic()):
            if not never:
                self.log.info("key=%s needs %s, not free now; held aside while the requests "
                              "behind it are taken", key, describe_needs(item.facts.resources))
            return
        self.log.info("key=%s %s; put back (%d requests held aside already)", key, reason,
                      len(self.aside))
        self.effects.settle_delivery(Settle(item.backend, delivery, fates.REQUEUE, reason,
                                   delivery.attempts))
        self.effects.rest(delivery.queue)

    def try_start(self, item: Parked) -> tuple[bool, bool, str]:
        """Reserve and hand on ``item``: (started, never fits here, why not).  Raises
        :class:`BadRequest` when the attempt cannot cross the runner's bus."""
        facts, delivery, request = item.facts, item.delivery, item.request
        never = self.ledger.why_never(facts.resources) or self.why_no_runtime(request)
        if never:
            return False, True, never
        provisional = f"pending-{delivery.token}"  # an attempt id only once it fits
        reservation = self.ledger.try_reserve(provisional, facts.resources)
        if reservation is None:
            return False, False, "does not fit now"
        attempt_id = self.attempt_ids.next()
        self.ledger.rename(provisional, attempt_id)
        workdir = os.path.join(self.config.working_dir, safe_path_part(facts.project or "_default"),
                               safe_path_part(facts.key), attempt_id)
        attempt = protocol.Attempt(
            attempt_id=attempt_id, queue=delivery.queue, token=delivery.token,
            attempts=delivery.attempts, key=facts.key, project=facts.project, request=request,
            workdir=workdir, resources=reservation, taken_at=time.time(),
            deadline=facts.stale_at, max_duration=facts.max_duration,
            save_frequency=facts.save_frequency, queue_type=item.backend.kind,
            artifact_save_frequency=facts.artifact_save_frequency)
        try:
            protocol.encode(protocol.AttemptAssigned(attempt=attempt))  # it must cross the bus
        except Exception as exc:
            self.ledger.release(attempt_id)
            raise BadRequest(f"the request cannot cross the runner's bus: {exc}") from exc
        self.book.hold(item.backend, delivery, attempt)
        self.aside.forget(delivery.queue, facts.key)
        self.taken += 1
        self.log.info("key=%s attempt=%s taken from %s (attempt %d), devices %s", attempt.key,
                      attempt_id, delivery.queue, delivery.attempts + 1, reservation["devices"])
        self.effects.start(attempt)
        return True, False, ""

    def serve_held_aside(self, taking: bool) -> None:
        """Start held-aside requests that fit now (oldest first); put back those whose
        hold is over; apply cancels and lifetimes.  A failure with one never stops the
        others."""
        now = time.monotonic()
        for token, item in list(self.aside.items.items()):
            if token not in self.aside.items or self.aside.resting(item, now):
                continue
            try:
                if self.cancelled_before_run(item) or self.expired(item):
                    self.aside.remove(token)
                    continue
                step = self.aside.step(item, now, taking and self.ledger.has_slot())
                if step == TRY:
                    started, never, reason = self.try_start(item)
                    if started:
                        self.aside.remove(token)
                    elif item.why == BACKOFF:  # its wait is over; now it waits for room
                        self.aside.wait_for_room(item, never, reason, now)
                elif step == PUT_BACK:
                    self.aside.remove(token)
                    self.log.info("key=%s %s; put back for another runner after being "
                                  "held aside", item.facts.key, item.reason)
                    self.effects.settle_delivery(Settle(item.backend, item.delivery, fates.REQUEUE,
                                               item.reason, item.delivery.attempts))
            except Exception as exc:  # noqa: BLE001 - the boundary, as in accept()
                self.aside.remove(token)
                self.dead_letter(item.backend, item.delivery, exc)

    def put_all_back(self, why: str) -> None:
        """Put every held-aside request back in its queue at once (drain, shutdown)."""
        items = self.aside.take_all()
        for item in items:
            self.effects.settle_delivery(Settle(item.backend, item.delivery, fates.REQUEUE, why,
                                       item.delivery.attempts))
        if items:
            self.log.info("put back %d requests held aside: %s", len(items), why)

    def back_off(self, held: Held, decision: fates.Decision, requeues: int) -> bool:
        """Keep a request handed back for the host's fault aside for its back-off delay,
        then try it again (the delivery stays held: no other runner takes it meanwhile,
        and no new attempt or metadata file is made while it waits).  False when no room
        is left: settle ``decision`` instead."""
        if not self.aside.has_room():
            return False
        attempt = held.attempt
        delay = fates.backoff_delay(requeues, self.random)
        moved = Delivery(queue=held.delivery.queue, token=held.delivery.token,
                         body=held.delivery.body, attempts=decision.attempts)
        try:
            _, facts = parse_request(json.dumps(attempt.request).encode(),
                                     min_save_interval=self.config.min_save_interval)
        except BadRequest:  # it was admitted once; cannot happen, but never lose it
            return False
        self.aside.back_off(Parked(held.backend, moved, attempt.request, facts, held.identity),
                            time.monotonic() + delay, decision.reason)
        self.log.info("key=%s hand-back %d of at most %d: tried again in %.1fs", attempt.key,
                      requeues, self.config.max_requeues, delay)
        return True

    def queue_view(self, queue: str, bodies: list[bytes]) -> tuple[list[dict], int]:
        """What ``runner-ctl queues`` shows of ``queue``: its waiting ``bodies`` (key,
        project, and why one never fits here), then its requests held aside here; and how
        many are held aside (not in the queue's depth)."""
        waiting = []
        for body in bodies:
            experiment = waiting_summary(body)
            reason = self.aside.said_never.get((queue, experiment["key"]))
            if reason:
                experiment["reason"] = f"cannot run on {self.config.hostname}: {reason}"
            waiting.append(experiment)
        held = self.aside.waiting(queue, self.config.hostname, self.book.requeues_of)
        return waiting + held, len(held)

    def why_no_runtime(self, request: dict) -> str:
        """Why no container runtime here runs the request's image ("" when one does, or
        when the request is in python mode)."""
        image = containers.image_of(request)  # parse_request accepted it
        if image is None:
            return ""
        try:
            containers.choose(self.runtimes, image, self.runtime_problems)
        except containers.ContainerUnavailable as exc:
            return str(exc)
        return ""


def waiting_summary(body: bytes) -> dict:
    """Key and project of a waiting request body, for status displays only; never raises
    (a body that is not a request shows as key ``?``)."""
    try:
        if len(body) > MAX_BODY_BYTES:
            raise ValueError("too large")
        experiment = json.loads(body).get("experiment") or {}
        return {"key": str(experiment.get("key", "?"))[:200],
                "project": str(experiment.get("project") or "")[:200]}
    except Exception:  # noqa: BLE001 - a display of anything a queue may hold
        return {"key": "?", "project": ""}


def describe_needs(resources: dict) -> str:
    """``resources`` for a log line: "2 CPUs, 100 MB RAM, 1 GPUs, 10 GB disk"."""
    parts = [f"{resources.get('cpus', 0)} CPUs"]
    if resources.get("ram"):
        parts.append(f"{describe_size(resources['ram'])} RAM")
    if resources.get("gpus"):
        parts.append(f"{resources['gpus']} GPUs")
    if resources.get("hdd"):
        parts.append(f"{describe_size(resources['hdd'])} disk")
    return ", ".join(parts)
