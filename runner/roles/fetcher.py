"""The fetcher: finds queues, takes requests that fit, and settles their fate.

It owns the queue back ends (built from the options by
:func:`runner.queues.build_backends`), the resource ledger (:mod:`runner.resources`), the
delivery book (:mod:`runner.deliveries`: held deliveries, redeliveries, tombstones) and the
requests held aside (:mod:`runner.held_aside`); the book and the held-aside list are pure
state, and every broker call is made here.  A request is taken only while the ledger has a
free slot and handed to admission (:mod:`runner.admission`: body → parsed request →
reservation → ``AttemptAssigned``, or the delivery's fate).  When the uploader reports
``AttemptDone`` the fetcher asks :func:`runner.fates.decide` what to do, acks, requeues or
dead-letters every delivery the book holds for the attempt (or holds a hand-back aside for
its back-off), then releases the reservation.

The fetcher ticks at the fastest ``Queue.poll_every`` of its back ends (50 ms for those that
must be asked: SQS, Pub/Sub, local queues without inotify).  A back end with a
``wait_fd()`` (local queues on Linux: inotify on the root and each queue folder; RabbitMQ:
the consumer connection's socket) wakes the loop when a message arrives, so with only such
back ends the fetcher ticks every ``SAFETY_TICK`` when idle and takes work the moment it is
published.  After taking, each tick tells every back end how many requests it may push
(``Queue.offer``: the free slots, 0 while not taking), which is RabbitMQ's prefetch.

Every back end's ``service()`` runs on every tick (heartbeats, reconnects): back ends
that are not thread-safe (pika) are only ever touched from this loop's thread.  Held
deliveries are kept alive on each back end's own cadence (``Queue.keep_alive_every``: SQS
visibility and Pub/Sub ack deadlines need it well inside their timeouts).  A queue's back
end is the one whose discovery listed it (Pub/Sub names carry no kind prefix).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .. import attempt_files, fates, gpus, metadata, protocol, studio_db
from ..admission import Admission
from ..deliveries import DeliveryBook, Held, Settle
from ..errors import DeliveryLost, QueueError, RunnerError
from ..held_aside import HeldAside
from ..queues import Queue, build_backends, kind_of, matches, owners
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


class Fetcher(Role):
    name = "fetcher"

    def initialize(self) -> None:
        self.backends: dict[str, Queue] = build_backends(self.config)
        for backend in self.backends.values():
            recovered = backend.recover()
            if recovered:
                self.log.info("returned %d unfinished claims of stopped runners to their "
                              "%s queues", recovered, backend.kind)
        self.studio_records = studio_db.RecordUpdater(lambda attempt_id, state: None,
                                                      lambda attempt_id: None)
        self.discovery = gpus.discover(os.environ)
        self.log.info("%s", gpus.describe(self.discovery))  # said once: CPU-only is no error
        if self.config.cpu_only and self.discovery.devices:
            self.log.info("--cpu-only: GPU requests are put back for other runners")
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
        self.book = DeliveryBook()
        self.aside = HeldAside()
        self.admission = Admission(self.config, self.ledger, self.book, self.aside, self,
                                   self.log)
        self.discovered: dict[str, list[str]] = {}      # kind -> last names it listed
        self.owner: dict[str, str] = {}                 # queue -> kind of its back end
        self.queues: list[str] = []
        self.backoff: dict[str, float] = {}             # queue -> rested until
        self.taking = True
        self.checked: dict[str, int] = {}  # queue -> times asked for work
        self.ignored: dict[str, int] = {}  # queue -> times left out by match/mismatch
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
            self.attempt_done(message)
            self.wake(tick=True)  # a slot is free: take the next request now
        elif isinstance(message, protocol.RunEnded):
            if self.ledger.run_over(message.attempt_id):
                self.wake(tick=True)  # the run's slot, CPUs and GPUs are free: take now
        elif isinstance(message, protocol.StopTaking):
            self.log.info("taking no new requests")
            self.taking = False
            self.offer_slots()  # consumers stop now, not at the next tick
            self.admission.put_all_back("the runner takes no new requests")
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
        the book acks the request as cancelled when it is taken (for a day)."""
        matched = self.book.cancel(key, project, time.monotonic())
        for held in matched:
            said = "cancelled by runner-ctl cancel: stopping the run"
            self.stop_run(held, "cancelled", "cancelled by runner-ctl cancel", said, said)
        if not matched:
            self.log.info("key=%s is not running here: cancelled when taken", key)

    def stop_run(self, held: Held, cause: str, reason: str, logged: str, told: str) -> None:
        """Stop ``held``'s run (``StopRuns`` to the cache manager and the executor), saying
        ``logged`` in the runner's log and ``told`` in the attempt's."""
        attempt = held.attempt
        self.log.warning("key=%s attempt=%s %s", attempt.key, attempt.attempt_id, logged)
        self.runner_log(attempt.attempt_id, told)
        stop = protocol.StopRuns(reason=reason, attempt_ids=[attempt.attempt_id], cause=cause)
        self.post("cache_manager", stop)
        self.post("executor", stop)

    def reload(self, options: dict) -> None:
        super().reload(options)
        self._next_discover = 0.0  # apply a new queue match/mismatch at once

    def adopt(self, attempts: list[protocol.Attempt]) -> None:
        """Hold again the attempts a previous fetcher process had handed out."""
        for attempt in attempts:
            backend = self.backends.get(attempt.queue_type or kind_of(attempt.queue))
            if backend is not None and self.book.adopt(backend, attempt) is not None:
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
        if self.aside:
            self.admission.serve_held_aside(self.taking)
        if self.taking:
            self.take_while_room()
        self.offer_slots()
        for kind, backend in self.backends.items():
            if now >= self._next_keep_alive.get(kind, 0.0):
                every = getattr(backend, "keep_alive_every", KEEP_ALIVE_EVERY) or \
                    KEEP_ALIVE_EVERY
                self._next_keep_alive[kind] = now + every
                self.keep_alive(backend)
        if self.discovery.devices and now >= self._next_gpu_refresh:
            self._next_gpu_refresh = now + self.config.gpu_refresh
            found = gpus.discover(os.environ)  # free memory and ECC state change
            self.ledger.refresh_devices(found.devices, found.reason, self.log)
        if now >= self._next_stats and (self._stats_dirty or self.book.held
                                        or now >= self._next_stats - STATS_EVERY
                                        + IDLE_STATS_EVERY):
            self.send_stats()

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
        self.owner = owners(self.discovered, self.log)
        found = sorted(self.owner)
        if found != self.queues:
            self.log.info("serving queues: %s", ", ".join(found) or "(none)")
        self.queues = found
        self.check_deleted_queues(listed_ok)

    def check_deleted_queues(self, listed_ok: set) -> None:
        """Stop the runs whose queue the back end says was deleted (``QueueDeleted``)."""
        for held in self.book.deletion_suspects(self.queues, listed_ok):
            try:
                deleted = any(held.backend.queue_deleted(d) for d in held.deliveries)
            except (QueueError, OSError) as exc:
                self.log.warning("cannot tell whether %s still exists: %s", held.delivery.queue,
                                 exc)
                continue
            if deleted:
                self.book.queue_deleted(held)
                reason = f"queue {held.delivery.queue} was deleted"
                self.stop_run(held, "queue_deleted", reason,
                              f"{reason} while its request was held: stopping the run",
                              f"{reason}: stopping the run (the user's abort)")

    def take_while_room(self) -> None:
        """Take requests round-robin across queues while the ledger has a free slot."""
        idle_rounds = 0
        limit = self.config.limit_tasks
        while self.ledger.has_slot() and self.queues and idle_rounds < len(self.queues):
            if limit and self.admission.taken >= limit:
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
            self.admission.accept(backend, delivery)

    def offer_slots(self) -> None:
        """Tell each back end how many requests it may push now (``Queue.offer``): the free
        slots while taking (within ``--limit-tasks``), else 0; backed-off queues are left out."""
        slots = self.ledger.free_slots() if self.taking else 0
        if self.config.limit_tasks:
            slots = min(slots, max(0, self.config.limit_tasks - self.admission.taken))
        now = time.monotonic()
        for kind, backend in self.backends.items():
            queues = [q for q in self.queues
                      if self.owner.get(q) == kind and self.backoff.get(q, 0.0) <= now]
            try:
                backend.offer(queues, slots)
            except (QueueError, OSError) as exc:
                self.log.warning("%s queue back end: %s", backend.kind, exc)

    # -- effects (what admission asks of the fetcher, runner.admission.Effects) ---------
    def settle_delivery(self, settle: Settle) -> bool:
        """Apply ``settle`` to its back end; False when the back end had lost the delivery."""
        action, delivery = settle.action, settle.delivery
        try:
            if action == fates.ACK:
                settle.backend.ack(delivery)
            elif action == fates.DEAD:
                settle.backend.dead_letter(delivery, settle.reason)
            elif action == fates.REQUEUE:
                settle.backend.requeue(delivery, attempts=settle.attempts)
            return True
        except DeliveryLost as exc:
            self.log.warning("could not %s a delivery of %s: %s", action, delivery.queue, exc)
            return False
        except (QueueError, OSError) as exc:
            self.log.error("could not %s a delivery of %s: %s", action, delivery.queue, exc)
            return True  # the back end still has it; nothing better to do here

    def record(self, request: dict, status: str, attempt_id: str, attempts: int,
               final: bool, reason: str = "") -> None:
        """Write the request's metadata record; a failure is logged."""
        try:
            metadata.write_record(request, status=status, attempt_id=attempt_id,
                                  attempts=attempts, final=final, hostname=self.config.hostname,
                                  override=self.config.metadata_store, reason=reason)
        except RunnerError as exc:
            key = (request.get("experiment") or {}).get("key")
            self.log.error("key=%s metadata record not written: %s", key, exc)

    def start(self, attempt: protocol.Attempt) -> None:
        self.phase(attempt, protocol.PHASE_TAKEN)
        self.post("cache_manager", protocol.AttemptAssigned(attempt=attempt))
        self.heartbeat(force=True)  # free resources changed: status shows them at once

    def end_client_record(self, key: str, request: dict) -> None:
        self.studio_records.submit(f"stale-{key}", request, studio_db.ended(True))

    def rest(self, queue: str) -> None:
        self.backoff[queue] = time.monotonic() + NO_FIT_BACKOFF

    def stats_changed(self) -> None:
        self._stats_dirty = True

    def backend_of(self, queue: str) -> Queue | None:
        """The back end serving ``queue``: the one that listed it, else by its prefix."""
        return self.backends.get(self.owner.get(queue) or kind_of(queue))

    def keep_alive(self, only: Queue | None = None) -> None:
        """Extend the holds of the deliveries of ``only`` (every back end when None)."""
        for token, item in list(self.aside.items.items()):
            if only is not None and item.backend is not only:
                continue
            try:
                item.backend.keep_alive(item.delivery)
            except (QueueError, OSError) as exc:
                self.log.warning("key=%s held aside lost its delivery: %s", item.facts.key,
                                 exc)
                self.aside.remove(token)
        for held in list(self.book.held.values()):
            if only is not None and held.backend is not only:
                continue
            attempt = held.attempt
            for d in held.deliveries:
                try:
                    held.backend.keep_alive(d)
                except DeliveryLost as exc:
                    self.log.warning("key=%s attempt=%s: %s (the run goes on)", attempt.key,
                                     attempt.attempt_id, exc)
                except (QueueError, OSError) as exc:
                    self.log.error("key=%s attempt=%s lost its delivery: %s", attempt.key,
                                   attempt.attempt_id, exc)

    # -- the end of an attempt ------------------------------------------------------
    def attempt_done(self, done: protocol.AttemptDone) -> None:
        """Decide the fate of the attempt ``done`` reports, settle it, free its resources."""
        held = self.book.end(done.attempt.attempt_id)
        if held is None:
            # An attempt left by a runner that died (the supervisor ended it on recovery):
            # its request is in its queue again or with another runner; nothing to settle.
            self.log.warning("attempt %s finished but is not held here", done.attempt.attempt_id)
            attempt_files.forget(self.config.runtime_dir, done.attempt.attempt_id)
            self.phase(done.attempt, protocol.PHASE_FINISHED, fate=fates.DROP,
                       status=done.outcome.status,
                       reason="not held by this runner: nothing to settle")
            return
        attempt = held.attempt
        try:
            decision = self.decide_and_settle(done, held)
            attempt_files.forget(self.config.runtime_dir, attempt.attempt_id)  # settled: nothing to recover
        finally:  # whatever happened above, the attempt's resources are free again
            if not self.ledger.release(attempt.attempt_id):
                self.log.warning("key=%s attempt=%s held no reservation at settle", attempt.key,
                                 attempt.attempt_id)
            self.heartbeat(force=True)  # free resources changed: status shows them at once
        self.phase(attempt, protocol.PHASE_FINISHED, fate=decision.action,
                   status=decision.final_status, reason=decision.reason)

    def decide_and_settle(self, done: protocol.AttemptDone, held: Held) -> fates.Decision:
        """Ask :func:`fates.decide`, record the result and apply it to the deliveries: a
        hand-back is held aside for its back-off; when no delivery could be settled (the
        broker took them back) the book keeps the decision for the redelivered copy."""
        decision = fates.decide(done.outcome, held.delivery.attempts, self.config.max_attempts,
                                done.upload_error, done.upload_error_kind,
                                queue_deleted=held.queue_deleted,
                                requeues_before=self.book.requeues_of(held.identity),
                                max_requeues=self.config.max_requeues, cancelled=held.cancelled)
        requeues = self.book.counted(held.identity, decision)
        final = decision.action in (fates.ACK, fates.DEAD, fates.DROP)
        # Logged before the record shows it: whoever sees the fate can read why in the log.
        self.log.info("key=%s attempt=%s %s: %s", held.attempt.key, held.attempt.attempt_id,
                      decision.action, decision.reason)
        self.record(held.attempt.request, decision.final_status, held.attempt.attempt_id,
                    decision.attempts, final,
                    reason="" if decision.reason == decision.final_status else decision.reason)
        if (decision.backoff and self.taking and not held.redeliveries
                and self.admission.back_off(held, decision, requeues)):
            return decision
        settles = held.settlement(decision)
        if settles and not any([self.settle_delivery(s) for s in settles]):
            self.log.warning("key=%s attempt=%s ended but its delivery was lost with the broker "
                             "connection or channel; its result is kept and the redelivered "
                             "copy will be settled as %s", held.attempt.key,
                             held.attempt.attempt_id, decision.action)
            self.book.lost(held, decision, time.monotonic())
        if decision.backoff:  # too many held aside: rest the queue instead
            self.rest(held.delivery.queue)
        return decision

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
                waiting, held = self.admission.queue_view(queue, backend.peek(queue, 20))
                stats[queue] = {"depth": backend.depth(queue) + held, "waiting": waiting}
            except (QueueError, OSError) as exc:
                stats[queue] = {"depth": -1, "waiting": [], "error": str(exc)}
        self.post("supervisor", protocol.QueueStats(queues=stats, taking=self.taking))

    def stats(self) -> dict:
        return {"held": len(self.book), "free": self.ledger.free(), "taking": self.taking,
                "queue_checked": dict(self.checked), "queue_ignored": dict(self.ignored),
                "queue_types": dict(self.owner),
                "reserved": len(self.ledger.held), "released": self.ledger.releases,
                "settling": len(self.ledger.settling)}

    def shutdown(self) -> None:
        self.admission.put_all_back("the runner is stopping")
        for backend in self.backends.values():
            backend.close()
        self.studio_records.close(timeout=2.0)
