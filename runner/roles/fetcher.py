"""The fetcher: finds queues, takes requests that fit, and settles their fate.

It owns the queue back ends (built from the options by
:func:`runner.queues.build_backends`), the resource ledger and every held delivery.  A
request is taken only while the ledger has a free slot; once read it is opened when it is
an encrypted, signed envelope (:mod:`runner.envelope`) and validated (bad requests and
envelopes that cannot be opened are dead-lettered), checked for staleness (acked and
recorded ``expired``),
reserved (or put straight back when it does not fit, or names a container image no runtime
here runs: :mod:`runner.containers`), and handed to the cache manager.
When the uploader reports ``AttemptDone`` the fetcher asks :func:`runner.fates.decide` what to
do and acks, requeues or dead-letters the delivery, then releases the reservation.

Admission never throws: whatever goes wrong between a body and the ``AttemptAssigned`` it
becomes dead-letters that delivery with the reason.  A request that does not fit now, or
never fits this host, is *held aside* (:class:`Parked`) instead of going back to the head of
its queue, so the requests behind it are taken; a request handed back for the host's fault
is held aside for its back-off delay and counted against ``--max-requeues``
(``docs/fates.md``).

Redeliveries: a broker that lost a delivery (its connection dropped, its channel was
closed) hands the message out again.  A request is identified by its queue, project, key
and ``time_added``; a redelivery of a request this runner is running is attached to the
running attempt instead of starting a second copy, and settled with it.  When an attempt
ends while none of its deliveries is held any more, its decision is kept (a *tombstone*,
for ``TOMBSTONE_TTL``) and applied to the redelivered copy as soon as it is taken again,
so the finished run's result stands and the request is not run twice by this runner.

The fetcher ticks at the fastest ``Queue.poll_every`` of its back ends (50 ms for those that
must be asked: RabbitMQ, SQS, Pub/Sub, local queues without inotify).  A back end with a
``wait_fd()`` (local queues on Linux: inotify on the root and each queue folder) wakes the
loop when a message arrives, so with only such back ends the fetcher ticks every
``SAFETY_TICK`` when idle and takes work the moment it is published.

Every back end's ``service()`` runs on every tick (heartbeats, reconnects): back ends
that are not thread-safe (pika) are only ever touched from this loop's thread.  Held
deliveries are kept alive on each back end's own cadence (``Queue.keep_alive_every``: SQS
visibility and Pub/Sub ack deadlines need it well inside their timeouts).  A queue's back
end is the one whose discovery listed it (Pub/Sub names carry no kind prefix).
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from .. import (attempt_files, containers, envelope, fates, gpus, metadata, protocol,
               studio_db)
from ..errors import BadRequest, DeliveryLost, QueueError, RunnerError
from ..queues import Delivery, Queue, build_backends, kind_of, matches
from ..requests import MAX_BODY_BYTES, RequestFacts, parse_request, safe_path_part
from ..resources import Ledger
from ..units import describe_size
from .base import Role

DISCOVER_EVERY = 2.0
STATS_EVERY = 1.0
IDLE_STATS_EVERY = 10.0  # queue figures for ``runner-ctl status`` when nothing changed
SAFETY_TICK = 1.0  # the tick when every back end announces arrivals (wait_fd)
KEEP_ALIVE_EVERY = 30.0
NO_FIT_BACKOFF = 2.0
TAKE_ERROR_BACKOFF = 1.0
TOMBSTONE_TTL = 24 * 3600.0
TOMBSTONES_MAX = 10_000
PARK_MAX = 16           # requests held aside at once (not fitting now, never here, backing off)
NOT_NOW_HOLD = 10.0     # a request that does not fit now is held this long, then put back
NEVER_HOLD = 30.0       # one that never fits here is held this long, then put back
REQUEUES_KEPT = 10_000  # hand-back counts remembered per request
NOT_NOW, NEVER, BACKOFF = "not_now", "never", "backoff"  # why a request is held aside
CANCEL_TTL = 24 * 3600.0  # how long a cancel of a request not held here waits for it


@dataclass
class Parked:
    """A delivery held aside by the fetcher, so that the requests behind it are taken.

    ``why`` is ``not_now`` (retried when resources free up), ``never`` (cannot fit this
    host) or ``backoff`` (handed back for the host's fault, retried at ``until``).  At
    ``until`` (monotonic seconds) a ``not_now`` or ``never`` request goes back to its queue
    for any runner; a ``backoff`` one is tried here again.
    """

    backend: Queue
    delivery: Delivery
    request: dict
    facts: RequestFacts
    identity: tuple
    why: str
    until: float
    reason: str = ""


def request_identity(queue: str, project: str | None, key: str, request: dict) -> tuple:
    """What makes two deliveries the same request: queue, project, key and ``time_added``."""
    experiment = request.get("experiment") or {}
    return (queue, project or "", key, repr(experiment.get("time_added")))


class Fetcher(Role):
    name = "fetcher"

    def initialize(self) -> None:
        self.backends: dict[str, Queue] = build_backends(self.config)
        for backend in self.backends.values():
            recovered = backend.recover()
            if recovered:
                self.log.info("returned %d unfinished claims of stopped runners to their "
                              "%s queues", recovered, backend.kind)
        self.keys = envelope.Keys.from_config(self.config)  # envelopes (rescanned on use)
        self.studio_records = studio_db.RecordUpdater(lambda attempt_id, state: None,
                                                      lambda attempt_id: None)
        self.discovery = gpus.discover(os.environ)
        self.log.info("%s", gpus.describe(self.discovery))  # said once: CPU-only is no error
        if self.config.cpu_only and self.discovery.devices:
            self.log.info("--cpu-only: GPU requests are put back for other runners")
        self.runtimes, self.runtime_problems = containers.runtimes_for(
            self.config.container_runtime)
        Path(self.config.working_dir).mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(slots=self.config.executors, cpus=self.config.max_cores,
                             ram=self.config.max_mem, devices=list(self.discovery.devices),
                             gpu_share=self.config.gpu_share, cpu_only=self.config.cpu_only,
                             disk_path=self.config.working_dir, disk_keep=self.config.max_disk)
        self.log.info("resources: %d slots, %d CPUs, %s RAM, disk keeping %s free, %d GPUs%s",
                      self.config.executors, self.config.max_cores,
                      describe_size(self.config.max_mem) if self.config.max_mem else "unknown",
                      describe_size(self.config.max_disk), len(self.ledger.devices),
                      " (shared by gpuMem)" if self.config.gpu_share else "")
        self._next_gpu_refresh = time.monotonic() + self.config.gpu_refresh
        self.held: dict[str, tuple[Queue, Delivery, protocol.Attempt]] = {}
        self.extra: dict[str, list[Delivery]] = {}      # attempt id -> redeliveries attached
        self.running: dict[tuple, str] = {}             # request identity -> attempt id
        self.tombstones: dict[tuple, tuple[fates.Decision, float]] = {}
        self.queue_gone: set[str] = set()               # attempt ids whose queue was deleted
        self.cancelled: set[str] = set()                # attempt ids runner-ctl cancel stopped
        # (project or "", key) -> when a cancel of a request not held here lapses
        self.cancel_on_take: dict[tuple[str, str], float] = {}
        self.discovered: dict[str, list[str]] = {}      # kind -> last names it listed
        self.owner: dict[str, str] = {}                 # queue -> kind of its back end
        self.queues: list[str] = []
        self.backoff: dict[str, float] = {}
        self.parked: dict[str, Parked] = {}             # delivery token -> held aside
        self.requeues: dict[tuple, int] = {}            # request identity -> hand-backs
        self.said_never: dict[tuple, str] = {}          # (queue, key) -> why it never fits
        self.random = random.Random()
        self.taking = True
        self.taken_total = 0  # attempts taken by this process (for --limit-tasks)
        self.checked: dict[str, int] = {}  # queue -> times asked for work
        self.ignored: dict[str, int] = {}  # queue -> times left out by match/mismatch
        self.attempt_ids = metadata.AttemptIds(
            self.config.hostname, os.path.join(self.config.working_dir, ".attempt-clock"))
        self._next_discover = self._next_stats = 0.0
        self._next_keep_alive: dict[str, float] = {}   # kind -> when its holds are due
        self._rotation = 0
        self._stats_dirty = True
        for backend in self.backends.values():
            fd = backend.wait_fd()
            if fd is not None:
                self.watch(fd, lambda backend=backend: self.arrived(backend))

    # -- messages -------------------------------------------------------------------
    def arrived(self, backend: Queue) -> None:
        """``backend``'s descriptor is readable: messages (or queues) may have arrived."""
        if backend.changes():
            self._next_discover = 0.0
        self._stats_dirty = True
        self.wake(tick=True)

    def tick_interval(self) -> float:
        polls = [b.poll_every for b in self.backends.values() if b.poll_every is not None]
        return min(polls) if polls else SAFETY_TICK

    def handle(self, message: protocol.Message) -> None:
        self._stats_dirty = True
        if isinstance(message, protocol.AttemptDone):
            self.settle(message)
            self.wake(tick=True)  # a slot is free: take the next request now
        elif isinstance(message, protocol.RunEnded):
            if self.ledger.run_over(message.attempt_id):
                self.wake(tick=True)  # the run's slot, CPUs and GPUs are free: take now
        elif isinstance(message, protocol.StopTaking):
            self.log.info("taking no new requests")
            self.taking = False
            self.unpark_all("the runner takes no new requests")
            self.send_stats()
        elif isinstance(message, protocol.StartTaking):
            self.log.info("taking requests again")
            self.taking = True
            self.send_stats()
        elif isinstance(message, protocol.Adopt):
            self.adopt(protocol.attempts_from_maps(message.attempts))
        elif isinstance(message, protocol.Cancel):
            self.cancel(message.key, message.project)

    def cancel(self, key: str, project: str) -> None:
        """``runner-ctl cancel``: stop the held attempts of ``key``; when none is held here,
        ack the request as cancelled when it is taken (for :data:`CANCEL_TTL` seconds)."""
        matched = [attempt_id for attempt_id, (_, _, attempt) in self.held.items()
                   if attempt.key == key and (not project or attempt.project == project)]
        for attempt_id in matched:
            self.cancelled.add(attempt_id)
            self.log.warning("key=%s attempt=%s cancelled by runner-ctl cancel: stopping the run",
                             key, attempt_id)
            self.runner_log(attempt_id, "cancelled by runner-ctl cancel: stopping the run")
            stop = protocol.StopRuns(reason="cancelled by runner-ctl cancel", attempt_ids=[attempt_id],
                                     cause="cancelled")
            self.post("cache_manager", stop)
            self.post("executor", stop)
        if not matched:
            now = time.monotonic()
            for old in [k for k, until in self.cancel_on_take.items() if until < now]:
                del self.cancel_on_take[old]
            self.cancel_on_take[(project, key)] = now + CANCEL_TTL
            self.log.info("key=%s is not running here: cancelled when taken", key)

    def cancelled_on_take(self, project: str | None, key: str) -> bool:
        """True (and the cancel used up) when ``runner-ctl cancel`` named this request."""
        for name in ((project or "", key), ("", key)):
            until = self.cancel_on_take.pop(name, None)
            if until is not None and until >= time.monotonic():
                return True
        return False

    def reload(self, options: dict) -> None:
        super().reload(options)
        self._next_discover = 0.0  # apply a new queue match/mismatch at once

    def adopt(self, attempts: list[protocol.Attempt]) -> None:
        """Hold again the attempts a previous fetcher process had handed out."""
        for attempt in attempts:
            backend = self.backends.get(attempt.queue_type or kind_of(attempt.queue))
            if backend is None or attempt.attempt_id in self.held:
                continue
            delivery = Delivery(queue=attempt.queue, token=attempt.token, body=b"", attempts=attempt.attempts)
            self.held[attempt.attempt_id] = (backend, delivery, attempt)
            self.running[request_identity(attempt.queue, attempt.project, attempt.key, attempt.request)] = \
                attempt.attempt_id
            self.ledger.hold(attempt.attempt_id, attempt.resources)
        self.log.info("adopted %d attempts in flight", len(attempts))

    # -- periodic -------------------------------------------------------------------
    def tick(self) -> None:
        for backend in self.backends.values():
            try:
                backend.service()
            except (QueueError, OSError) as exc:
                self.log.warning("%s queue back end: %s", backend.kind, exc)
        now = time.monotonic()
        if now >= self._next_discover:
            self._next_discover = now + DISCOVER_EVERY
            self.discover()
        if self.parked:
            self.serve_parked()
        if self.taking:
            self.take_while_room()
        for kind, backend in self.backends.items():
            if now >= self._next_keep_alive.get(kind, 0.0):
                every = getattr(backend, "keep_alive_every", KEEP_ALIVE_EVERY) or \
                    KEEP_ALIVE_EVERY
                self._next_keep_alive[kind] = now + every
                self.keep_alive(backend)
        if self.discovery.devices and now >= self._next_gpu_refresh:
            self._next_gpu_refresh = now + self.config.gpu_refresh
            self.refresh_gpus()
        if now >= self._next_stats and (self._stats_dirty or self.held
                                        or now >= self._next_stats - STATS_EVERY
                                        + IDLE_STATS_EVERY):
            self.send_stats()

    def refresh_gpus(self) -> None:
        """Ask NVML again: free memory and ECC state change; reservations stay."""
        discovery = gpus.discover(os.environ)
        if not discovery.devices:
            self.log.warning("GPU refresh found none (%s); keeping the last view",
                             discovery.reason)
            return
        before = {d.uuid: d.healthy for d in self.ledger.devices}
        for device in discovery.devices:
            if before.get(device.uuid, True) and not device.healthy:
                self.log.error("GPU %d %s has %d uncorrected ECC errors; no longer given out",
                               device.index, device.uuid, device.ecc_errors)
        self.ledger.update_devices(discovery.devices)

    def discover(self) -> None:
        """Refresh the served queues; a back end that cannot list keeps its last list.

        Held attempts whose queue disappeared from a successful listing are checked with the
        back end: a queue deleted while its request runs stops the run (``QueueDeleted``).
        """
        listed_ok = set()
        for kind, backend in self.backends.items():
            try:
                names = backend.discover()
            except (QueueError, OSError) as exc:
                self.log.warning("cannot list %s queues: %s", backend.kind, exc)
                continue
            listed_ok.add(kind)
            served = []
            for name in names:
                if matches(name, self.config.queue_match, self.config.queue_mismatch or None):
                    served.append(name)
                else:
                    self.ignored[name] = self.ignored.get(name, 0) + 1
            self.discovered[kind] = served
        owner: dict[str, str] = {}
        for kind, names in self.discovered.items():
            for name in names:
                if name in owner and owner[name] != kind:
                    self.log.warning("queue %s is listed by both %s and %s; serving it "
                                     "from %s", name, owner[name], kind, owner[name])
                    continue
                owner[name] = kind
        self.owner = owner
        found = sorted(owner)
        if found != self.queues:
            self.log.info("serving queues: %s", ", ".join(found) or "(none)")
        self.queues = found
        self.check_deleted_queues(listed_ok)

    def check_deleted_queues(self, listed_ok: set) -> None:
        served = set(self.queues)
        for attempt_id, (backend, delivery, attempt) in list(self.held.items()):
            if (attempt_id in self.queue_gone or delivery.queue in served
                    or backend.kind not in listed_ok):
                continue
            deliveries = [delivery] + self.extra.get(attempt_id, [])
            try:
                deleted = any(backend.queue_deleted(d) for d in deliveries)
            except (QueueError, OSError) as exc:
                self.log.warning("cannot tell whether %s still exists: %s", delivery.queue, exc)
                continue
            if not deleted:
                continue
            self.queue_gone.add(attempt_id)
            reason = f"queue {delivery.queue} was deleted"
            self.log.warning("key=%s attempt=%s %s while its request was held: stopping the "
                             "run", attempt.key, attempt_id, reason)
            self.runner_log(attempt_id, f"{reason}: stopping the run (the user's abort)")
            stop = protocol.StopRuns(reason=reason, attempt_ids=[attempt_id], cause="queue_deleted")
            self.post("cache_manager", stop)
            self.post("executor", stop)

    def take_while_room(self) -> None:
        """Take requests round-robin across queues while the ledger has a free slot."""
        idle_rounds = 0
        limit = self.config.limit_tasks
        while self.ledger.has_slot() and self.queues and idle_rounds < len(self.queues):
            if limit and self.taken_total >= limit:
                return  # --limit-tasks: the supervisor drains once these are done
            self._rotation = (self._rotation + 1) % len(self.queues)
            queue = self.queues[self._rotation]
            if self.backoff.get(queue, 0.0) > time.monotonic():
                idle_rounds += 1
                continue
            backend = self.backend_of(queue)
            if backend is None:
                idle_rounds += 1
                continue
            self.checked[queue] = self.checked.get(queue, 0) + 1
            try:
                delivery = backend.take(queue)
            except (QueueError, OSError) as exc:
                self.log.warning("cannot take from %s: %s", queue, exc)
                self.backoff[queue] = time.monotonic() + TAKE_ERROR_BACKOFF
                delivery = None
            if delivery is None:
                idle_rounds += 1
                continue
            idle_rounds = 0
            self.accept(backend, delivery)

    def accept(self, backend: Queue, delivery: Delivery) -> None:
        """Admit one delivery: start it, hold it aside, or settle it at once.

        The boundary between the queues and the pipeline: whatever goes wrong while
        admitting a body ends in a dead letter with the reason, never in a crash."""
        try:
            self.admit(backend, delivery)
        except Exception as exc:  # noqa: BLE001 - no body may crash the fetcher
            reason = f"request could not be admitted: {type(exc).__name__}: {exc}"
            self.log.exception("%s (%s); dead-lettered", reason, delivery.queue)
            self.settle_delivery(backend, delivery, fates.DEAD, reason[:2000], 0)

    def admit(self, backend: Queue, delivery: Delivery) -> None:
        try:
            body = envelope.open_body(delivery.body, delivery.queue, self.keys)
            request, facts = parse_request(body, min_save_interval=self.config.min_save_interval)
            metadata.check_object_names(request, self.config.hostname,
                                        self.config.metadata_store)
        except BadRequest as exc:
            self.log.error("bad request in %s: %s; dead-lettered", delivery.queue, exc)
            self.settle_delivery(backend, delivery, fates.DEAD, str(exc), 0)
            return
        studio_db.add_output_artifact(request)  # CompletionService tasks have none
        identity = request_identity(delivery.queue, facts.project, facts.key, request)
        if self.redelivered(backend, delivery, identity, facts.key):
            return
        if self.cancelled_before_run(backend, delivery, request, facts):
            return
        if self.expired(backend, delivery, request, facts):
            return
        self.start_or_park(Parked(backend, delivery, request, facts, identity, "", 0.0))

    def cancelled_before_run(self, backend: Queue, delivery: Delivery, request: dict,
                             facts: RequestFacts) -> bool:
        """Ack a request ``runner-ctl cancel`` named before it ran (recorded ``cancelled``);
        True if so."""
        if not (self.cancel_on_take and self.cancelled_on_take(facts.project, facts.key)):
            return False
        self.log.warning("key=%s cancelled by runner-ctl cancel before it ran; acked as "
                         "cancelled", facts.key)
        try:
            self.record(request, fates.CANCELLED, "", delivery.attempts, final=True)
        except RunnerError as exc:
            self.log.error("key=%s metadata record not written: %s", facts.key, exc)
        self.settle_delivery(backend, delivery, fates.ACK, "cancelled", delivery.attempts)
        return True

    def expired(self, backend: Queue, delivery: Delivery, request: dict,
                facts: RequestFacts) -> bool:
        """Ack a request whose lifetime has ended (recorded ``expired``); True if so."""
        now = time.time()
        stale_at = facts.stale_at
        if stale_at is None or stale_at > now:
            return False
        self.log.warning("key=%s stale on arrival (lifetime ended %.0fs ago); acked as expired",
                         facts.key, now - stale_at)
        try:
            self.record(request, "expired", "", delivery.attempts, final=True)
        except RunnerError as exc:
            self.log.error("key=%s metadata record not written: %s", facts.key, exc)
        # The client's record ends too: nothing will run it (studio_db module doc).
        self.studio_records.submit(f"stale-{facts.key}", request, studio_db.ended(True))
        self.settle_delivery(backend, delivery, fates.ACK, "stale", delivery.attempts)
        self.forget_request(delivery.queue, facts.key, request)
        return True

    def start_or_park(self, item: Parked) -> None:
        """Start ``item`` now, or hold it aside (or put it back when too many are held)."""
        started, never, reason = self.try_start(item)
        if started:
            return
        key = item.facts.key
        if never:
            said = (item.delivery.queue, key)
            if said not in self.said_never:  # once per key, not on every retry
                while len(self.said_never) >= REQUEUES_KEPT:
                    self.said_never.pop(next(iter(self.said_never)))
                self.said_never[said] = reason
                self.log.warning("key=%s cannot run on this runner: %s; held aside, then put "
                                 "back for another runner", key, reason)
                try:
                    self.record(item.request, "waiting", "", item.delivery.attempts,
                                final=False, reason=f"{self.config.hostname}: {reason}")
                except RunnerError as exc:
                    self.log.error("key=%s metadata record not written: %s", key, exc)
                self._stats_dirty = True
        item.why = NEVER if never else NOT_NOW
        item.reason = reason
        item.until = time.monotonic() + (NEVER_HOLD if never else NOT_NOW_HOLD)
        if len(self.parked) < PARK_MAX:
            self.parked[item.delivery.token] = item
            if not never:
                self.log.info("key=%s needs %s, not free now; held aside while the requests "
                              "behind it are taken", key, describe_needs(item.facts.resources))
            return
        self.log.info("key=%s %s; put back (%d requests held aside already)", key, reason,
                      len(self.parked))
        self.settle_delivery(item.backend, item.delivery, fates.REQUEUE, reason,
                             item.delivery.attempts)
        self.backoff[item.delivery.queue] = time.monotonic() + NO_FIT_BACKOFF

    def try_start(self, item: Parked) -> tuple[bool, bool, str]:
        """Reserve and hand on ``item``: (started, never fits here, why not)."""
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
        self.held[attempt_id] = (item.backend, delivery, attempt)
        self.running[item.identity] = attempt_id
        self.said_never.pop((delivery.queue, facts.key), None)
        self.taken_total += 1
        self.log.info("key=%s attempt=%s taken from %s (attempt %d), devices %s", attempt.key,
                      attempt_id, delivery.queue, delivery.attempts + 1, reservation["devices"])
        self.phase(attempt, protocol.PHASE_TAKEN)
        self.post("cache_manager", protocol.AttemptAssigned(attempt=attempt))
        self.heartbeat(force=True)  # free resources changed: status shows them at once
        return True, False, ""

    def serve_parked(self) -> None:
        """Start held-aside requests that fit now (oldest first); put back those whose
        hold is over; apply lifetimes.  A failure with one never stops the others."""
        now = time.monotonic()
        for token, item in list(self.parked.items()):
            if token not in self.parked:
                continue
            try:
                if item.why == BACKOFF and item.until > now:
                    continue
                if self.expired(item.backend, item.delivery, item.request, item.facts):
                    del self.parked[token]
                    continue
                if item.why == BACKOFF or (item.why == NOT_NOW and item.until > now
                                             and self.taking and self.ledger.has_slot()):
                    started, never, reason = self.try_start(item)
                    if started:
                        del self.parked[token]
                        continue
                    if item.why == BACKOFF:  # its wait is over; now it waits for room
                        item.why, item.reason = (NEVER if never else NOT_NOW), reason
                        item.until = now + (NEVER_HOLD if never else NOT_NOW_HOLD)
                    continue
                if item.until <= now:
                    del self.parked[token]
                    self.log.info("key=%s %s; put back for another runner after being "
                                  "held aside", item.facts.key, item.reason)
                    self.settle_delivery(item.backend, item.delivery, fates.REQUEUE,
                                         item.reason, item.delivery.attempts)
            except Exception as exc:  # noqa: BLE001 - the boundary, as in accept()
                self.parked.pop(token, None)
                reason = f"request could not be admitted: {type(exc).__name__}: {exc}"
                self.log.exception("%s (%s); dead-lettered", reason, item.delivery.queue)
                self.settle_delivery(item.backend, item.delivery, fates.DEAD, reason[:2000], 0)

    def unpark_all(self, why: str) -> None:
        """Put every held-aside request back in its queue at once (drain, shutdown)."""
        for item in list(self.parked.values()):
            self.settle_delivery(item.backend, item.delivery, fates.REQUEUE, why,
                                 item.delivery.attempts)
        if self.parked:
            self.log.info("put back %d requests held aside: %s", len(self.parked), why)
        self.parked.clear()

    def forget_request(self, queue: str, key: str, request: dict) -> None:
        """A request was settled for good: drop what was kept about it."""
        self.said_never.pop((queue, key), None)
        experiment = request.get("experiment") or {}
        self.requeues.pop(request_identity(queue, str(experiment.get("project") or ""), key,
                                           request), None)

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

    def redelivered(self, backend: Queue, delivery: Delivery, identity: tuple,
                    key: str) -> bool:
        """Handle a delivery of a request this runner runs or has just finished; True if so."""
        attempt_id = self.running.get(identity)
        if attempt_id is not None and attempt_id in self.held:
            self.extra.setdefault(attempt_id, []).append(delivery)
            self.log.warning("key=%s attempt=%s redelivered by %s while it runs here: holding "
                             "the new delivery with the running attempt, not starting a "
                             "second copy", key, attempt_id, delivery.queue)
            self.runner_log(attempt_id, f"the broker redelivered this request ({delivery.queue}); "
                                    "the new delivery is held with this attempt")
            return True
        entry = self.tombstones.pop(identity, None)
        if entry is None:
            return False
        decision, expires = entry
        if expires < time.monotonic():
            return False
        self.log.warning("key=%s redelivered after its attempt ended while the delivery was "
                         "lost; settling it as decided then: %s (%s)", key, decision.action,
                         decision.reason)
        self.settle_delivery(backend, delivery, decision.action, decision.reason,
                             decision.attempts)
        return True

    def settle_delivery(self, backend: Queue, delivery: Delivery, action: str, reason: str,
                        attempts: int) -> bool:
        """Apply ``action`` to one delivery; False when the back end had lost it."""
        try:
            if action == fates.ACK:
                backend.ack(delivery)
            elif action == fates.DEAD:
                backend.dead_letter(delivery, reason)
            elif action == fates.REQUEUE:
                backend.requeue(delivery, attempts=attempts)
            return True
        except DeliveryLost as exc:
            self.log.warning("could not %s a delivery of %s: %s", action, delivery.queue, exc)
            return False
        except (QueueError, OSError) as exc:
            self.log.error("could not %s a delivery of %s: %s", action, delivery.queue, exc)
            return True  # the back end still has it; nothing better to do here

    def backend_of(self, queue: str) -> Queue | None:
        """The back end serving ``queue``: the one that listed it, else by its prefix."""
        return self.backends.get(self.owner.get(queue) or kind_of(queue))

    def keep_alive(self, only: Queue | None = None) -> None:
        """Extend the holds of the deliveries of ``only`` (every back end when None)."""
        for token, item in list(self.parked.items()):
            if only is not None and item.backend is not only:
                continue
            try:
                item.backend.keep_alive(item.delivery)
            except (QueueError, OSError) as exc:
                self.log.warning("key=%s held aside lost its delivery: %s", item.facts.key,
                                 exc)
                self.parked.pop(token, None)
        for attempt_id, (backend, delivery, attempt) in list(self.held.items()):
            if only is not None and backend is not only:
                continue
            for d in [delivery] + self.extra.get(attempt_id, []):
                try:
                    backend.keep_alive(d)
                except DeliveryLost as exc:
                    self.log.warning("key=%s attempt=%s: %s (the run goes on)", attempt.key,
                                     attempt.attempt_id, exc)
                except (QueueError, OSError) as exc:
                    self.log.error("key=%s attempt=%s lost its delivery: %s", attempt.key,
                                   attempt.attempt_id, exc)

    # -- the end of an attempt ------------------------------------------------------
    def settle(self, done: protocol.AttemptDone) -> None:
        entry = self.held.pop(done.attempt.attempt_id, None)
        if entry is None:
            # An attempt left by a runner that died (the supervisor ended it on recovery):
            # its request is in its queue again or with another runner; nothing to settle.
            self.log.warning("attempt %s finished but is not held here", done.attempt.attempt_id)
            attempt_files.forget(self.config.runtime_dir, done.attempt.attempt_id)
            self.phase(done.attempt, protocol.PHASE_FINISHED, fate=fates.DROP, status=done.outcome.status,
                       reason="not held by this runner: nothing to settle")
            return
        backend, delivery, attempt = entry
        extra = self.extra.pop(attempt.attempt_id, [])
        identity = request_identity(attempt.queue, attempt.project, attempt.key, attempt.request)
        if self.running.get(identity) == attempt.attempt_id:
            del self.running[identity]
        queue_deleted = attempt.attempt_id in self.queue_gone
        self.queue_gone.discard(attempt.attempt_id)
        cancelled = attempt.attempt_id in self.cancelled
        self.cancelled.discard(attempt.attempt_id)
        try:
            decision = self.decide_and_settle(done, backend, delivery, attempt, extra, identity,
                                              queue_deleted, cancelled)
            attempt_files.forget(self.config.runtime_dir, attempt.attempt_id)  # settled: nothing to recover
        finally:  # whatever happened above, the attempt's resources are free again
            if not self.ledger.release(attempt.attempt_id):
                self.log.warning("key=%s attempt=%s held no reservation at settle", attempt.key,
                                 attempt.attempt_id)
            self.heartbeat(force=True)  # free resources changed: status shows them at once
        self.log.info("key=%s attempt=%s %s: %s", attempt.key, attempt.attempt_id, decision.action,
                      decision.reason)
        self.phase(attempt, protocol.PHASE_FINISHED, fate=decision.action, status=decision.final_status,
                   reason=decision.reason)

    def decide_and_settle(self, done: protocol.AttemptDone, backend: Queue, delivery: Delivery,
                          attempt: protocol.Attempt, extra: list[Delivery], identity: tuple,
                          queue_deleted: bool, cancelled: bool = False) -> fates.Decision:
        """Ask :func:`fates.decide`, record the result and apply it to the deliveries."""
        requeues = self.requeues.get(identity, 0)
        decision = fates.decide(done.outcome, delivery.attempts, self.config.max_attempts,
                                done.upload_error, done.upload_error_kind, queue_deleted=queue_deleted,
                                requeues_before=requeues,
                                max_requeues=self.config.max_requeues, cancelled=cancelled)
        final = decision.action in (fates.ACK, fates.DEAD, fates.DROP)
        if final:
            self.requeues.pop(identity, None)
        elif decision.backoff:
            while len(self.requeues) >= REQUEUES_KEPT:
                self.requeues.pop(next(iter(self.requeues)))
            self.requeues[identity] = requeues + 1
        try:
            self.record(attempt.request, decision.final_status, attempt.attempt_id, decision.attempts, final)
        except RunnerError as exc:
            self.log.error("key=%s metadata record not written: %s", attempt.key, exc)
        if (decision.backoff and self.taking and not extra
                and len(self.parked) < PARK_MAX):
            self.hold_for_backoff(backend, delivery, attempt, identity, decision, requeues + 1)
        elif decision.action != fates.DROP:
            settled = [self.settle_delivery(backend, d, decision.action, decision.reason,
                                            decision.attempts)
                       for d in [delivery] + extra]
            if not any(settled):
                self.remember(identity, decision, attempt)
            if decision.backoff:  # too many held aside: rest the queue instead
                self.backoff[delivery.queue] = time.monotonic() + NO_FIT_BACKOFF
        return decision

    def hold_for_backoff(self, backend: Queue, delivery: Delivery, attempt: protocol.Attempt,
                         identity: tuple, decision: fates.Decision, requeues: int) -> None:
        """Keep a request handed back for the host's fault aside for its back-off delay,
        then try it again (the delivery stays held: no other runner takes it meanwhile,
        and no new attempt or metadata file is made while it waits)."""
        delay = fates.backoff_delay(requeues, self.random)
        moved = Delivery(queue=delivery.queue, token=delivery.token, body=delivery.body,
                         attempts=decision.attempts)
        try:
            _, facts = parse_request(json_body(attempt.request),
                                     min_save_interval=self.config.min_save_interval)
        except BadRequest:  # it was admitted once; cannot happen, but never lose it
            self.settle_delivery(backend, delivery, decision.action, decision.reason,
                                 decision.attempts)
            return
        self.parked[delivery.token] = Parked(backend, moved, attempt.request, facts, identity,
                                             BACKOFF, time.monotonic() + delay,
                                             decision.reason)
        self.log.info("key=%s hand-back %d of at most %d: tried again in %.1fs", attempt.key,
                      requeues, self.config.max_requeues, delay)

    def remember(self, identity: tuple, decision: fates.Decision, attempt: protocol.Attempt) -> None:
        """Keep ``decision`` for the redelivered copy of a request whose delivery was lost."""
        self.log.warning("key=%s attempt=%s ended but its delivery was lost with the broker "
                         "connection or channel; its result is kept and the redelivered copy "
                         "will be settled as %s", attempt.key, attempt.attempt_id, decision.action)
        now = time.monotonic()
        for old in [k for k, (_, expires) in self.tombstones.items() if expires < now]:
            del self.tombstones[old]
        while len(self.tombstones) >= TOMBSTONES_MAX:
            self.tombstones.pop(next(iter(self.tombstones)))
        self.tombstones[identity] = (decision, now + TOMBSTONE_TTL)

    def record(self, request: dict, status: str, attempt_id: str, attempts: int,
               final: bool, reason: str = "") -> None:
        metadata.write_record(request, status=status, attempt_id=attempt_id, attempts=attempts,
                              final=final, hostname=self.config.hostname,
                              override=self.config.metadata_store, reason=reason)

    # -- reporting ------------------------------------------------------------------
    def send_stats(self) -> None:
        self._stats_dirty = False
        self._next_stats = time.monotonic() + STATS_EVERY
        stats = {}
        for queue in self.queues:
            backend = self.backend_of(queue)
            if backend is None:
                continue
            try:
                waiting = []
                for body in backend.peek(queue, 20):
                    experiment = protocol_safe_experiment(body)
                    reason = self.said_never.get((queue, experiment["key"]))
                    if reason:
                        experiment["reason"] = f"cannot run on {self.config.hostname}: {reason}"
                    waiting.append(experiment)
                held = [item for item in self.parked.values() if item.delivery.queue == queue]
                for item in held:
                    entry = {"key": item.facts.key, "project": item.facts.project,
                             "held": item.why}
                    if item.why == NEVER:
                        entry["reason"] = f"cannot run on {self.config.hostname}: {item.reason}"
                    elif item.why == BACKOFF:
                        entry["reason"] = (f"backing off after hand-back "
                                           f"{self.requeues.get(item.identity, 0)}: "
                                           f"{item.reason}")
                    waiting.append(entry)
                stats[queue] = {"depth": backend.depth(queue) + len(held), "waiting": waiting}
            except (QueueError, OSError) as exc:
                stats[queue] = {"depth": -1, "waiting": [], "error": str(exc)}
        self.post("supervisor", protocol.QueueStats(queues=stats, taking=self.taking))

    def stats(self) -> dict:
        return {"held": len(self.held), "free": self.ledger.free(), "taking": self.taking,
                "queue_checked": dict(self.checked), "queue_ignored": dict(self.ignored),
                "queue_types": dict(self.owner),
                "reserved": len(self.ledger.held), "released": self.ledger.releases,
                "settling": len(self.ledger.settling)}

    def shutdown(self) -> None:
        self.unpark_all("the runner is stopping")
        for backend in self.backends.values():
            backend.close()
        self.studio_records.close(timeout=2.0)


def protocol_safe_experiment(body: bytes) -> dict:
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
    """``resources`` for a log line: "2 CPUs, 100.00 MB RAM, 1 GPU"."""
    parts = [f"{resources.get('cpus', 0)} CPUs"]
    if resources.get("ram"):
        parts.append(f"{describe_size(resources['ram'])} RAM")
    if resources.get("gpus"):
        parts.append(f"{resources['gpus']} GPUs")
    return ", ".join(parts)


def json_body(request: dict) -> bytes:
    """``request`` as a body again (for requests already admitted once)."""
    return json.dumps(request).encode()
