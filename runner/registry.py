"""The supervisor's registry of attempts in flight, fed by the roles' ``AttemptPhase``.

* :class:`AttemptEntry` — one attempt: its ``Attempt``, its phase (a ``protocol.PHASE_*``
  name) and since when, the facts the roles reported (``detail``: ``pid``, ``tail``,
  ``status``…) and when it crossed each phase boundary (``times``, unix seconds).
* :class:`Registry` — the entries by attempt id, the counts a drain and the status need
  (in flight, taken, finished by status), the phase-owner table (which role holds an
  attempt in each phase) and the timing spans (how long an attempt spent in each phase,
  for ``runner_phase_seconds``).

Phases come from several roles over separate sockets, so the executor's ``ending`` may
arrive after the scraper's ``uploading``: a phase never goes back; and a role's phase
may arrive after the fetcher's ``finished`` (the uploader's ``uploading`` behind the
fetcher's ``finished``, or a dead executor's last report): the ids of finished attempts
are remembered (the last :data:`FINISHED_MEMORY`) and their late phases ignored, so that
no attempt is ever in flight again once finished (a drain would wait on it until
``--shutdown-timeout``).  When a role dies,
:meth:`Registry.hand_over` says what becomes of each attempt it held (see
``docs/architecture.md``, recovery when a role dies) and moves their phases on; carrying
that out (messages, killing runs) is the supervisor's.  Nothing here sends, sleeps or reads
the clock: times come in with the messages.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable

from . import fates, protocol
from .protocol import (PHASE_ENDING, PHASE_FINISHED, PHASE_PREPARING, PHASE_RUNNING,
                       PHASE_SETTLING, PHASE_TAKEN, PHASE_UPLOADING, STEP_DOWNLOAD,
                       STEP_ENVIRONMENT)

#: The role that holds an attempt in each phase (the one whose death strands it).  An
#: attempt that is ``settling`` is the fetcher's, whose replacement gets it with ``Adopt``.
PHASE_OWNER = {PHASE_TAKEN: "cache_manager", PHASE_PREPARING: "cache_manager",
               PHASE_RUNNING: "executor", PHASE_ENDING: "scraper",
               PHASE_UPLOADING: "uploader"}
PHASE_RANK = {name: rank for rank, name in enumerate(protocol.PHASES)}

#: The timing spans (``runner_phase_seconds``'s ``phase`` label), in order.
SPANS = ("queue_wait", "download", "environment", "run", "upload")
#: Which boundary ends which span: boundary -> (span, the boundary that started it; None:
#: the request's ``time_added``).  A boundary is a phase, or ``phase:step`` while preparing.
SPAN_ENDS = {PHASE_TAKEN: ("queue_wait", None),
             f"{PHASE_PREPARING}:{STEP_ENVIRONMENT}": (
                 "download", f"{PHASE_PREPARING}:{STEP_DOWNLOAD}"),
             PHASE_RUNNING: ("environment", f"{PHASE_PREPARING}:{STEP_ENVIRONMENT}"),
             PHASE_ENDING: ("run", PHASE_RUNNING),
             PHASE_FINISHED: ("upload", PHASE_UPLOADING)}

#: What :meth:`Registry.hand_over` asks of the supervisor for an attempt of a dead role.
END = "end"        # kill what is left of its run; AttemptEnded (RoleCrashed) to the scraper
CLOSE = "close"    # AttemptEnded (RoleCrashed) to the scraper again: it was being closed
UPLOAD = "upload"  # the final UploadRequest again, with the outcome the scraper kept
SETTLE = "settle"  # AttemptDone (RoleCrashed) to the fetcher: nothing else can end it
#: Fate keys of AttemptPhase(finished).detail["fate"] -> the count they go to (an ``ack``
#: counts under its final status).
FATE_COUNTS = {fates.REQUEUE: "requeued", fates.DEAD: "dead", fates.DROP: "cancelled"}
FINISHED_COUNTS = (fates.COMPLETED, fates.FAILED, fates.EXPIRED, fates.CANCELLED,
                   "requeued", "dead")
#: How many finished attempt ids are remembered to ignore their late phases (an attempt's
#: reports all arrive within moments of its end; ids are never reused).
FINISHED_MEMORY = 4096


@dataclass
class AttemptEntry:
    """One attempt in flight as the supervisor knows it."""

    attempt: protocol.Attempt
    phase: str = ""                # a protocol.PHASE_* name; "" until the first phase
    since: float = 0.0             # when it entered ``phase`` (unix seconds)
    detail: dict = field(default_factory=dict)     # facts the roles reported, merged
    times: dict[str, float] = field(default_factory=dict)  # boundary -> first crossed at

    @property
    def attempt_id(self) -> str:
        return self.attempt.attempt_id


@dataclass(frozen=True)
class Tracked:
    """What one ``AttemptPhase`` changed.

    ``entry`` is the attempt's entry (removed from the registry when ``finished``);
    ``taken`` is True for an attempt newly taken (counted in ``Registry.taken``); ``started``
    for a finished attempt the registry held (so it was counted as running); ``status`` its
    final status (``requeued``, ``dead`` or an acked status; None when not finished or the
    fate is unknown); ``spans`` the timing
    spans it closed, as ``(span, seconds)``."""

    entry: AttemptEntry
    taken: bool = False
    finished: bool = False
    started: bool = False
    status: str | None = None
    spans: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class HandOver:
    """What becomes of one attempt of a dead role: ``action`` is one of END, CLOSE, UPLOAD,
    SETTLE; ``outcome`` is the outcome the scraper kept (UPLOAD only)."""

    attempt: protocol.Attempt
    action: str
    outcome: protocol.Outcome | None = None


class Registry:
    """The attempts in flight by attempt id, with their counts."""

    def __init__(self) -> None:
        self.entries: dict[str, AttemptEntry] = {}
        self.taken = 0  # attempts taken since the supervisor started
        self.finished = {name: 0 for name in FINISHED_COUNTS}
        self.finished_ids: OrderedDict[str, None] = OrderedDict()  # the last FINISHED_MEMORY

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, attempt_id: str) -> bool:
        return attempt_id in self.entries

    def __iter__(self) -> Iterator[AttemptEntry]:
        """The entries, sorted by attempt id."""
        return iter([self.entries[attempt_id] for attempt_id in sorted(self.entries)])

    def get(self, attempt_id: str) -> AttemptEntry | None:
        return self.entries.get(attempt_id)

    def ids(self) -> list[str]:
        return sorted(self.entries)

    def of_key(self, key: str, project: str = "") -> list[str]:
        """Ids of the attempts of experiment ``key`` (of ``project`` when given), sorted."""
        return [entry.attempt_id for entry in self if entry.attempt.key == key
                and (not project or entry.attempt.project == project)]

    def track(self, phase: protocol.AttemptPhase) -> Tracked:
        """Record one phase report; a ``finished`` one removes the entry and counts it.

        A phase never goes back (a later-ranked phase already recorded stays); the detail
        is merged whatever the rank.  A phase of an attempt that has finished changes
        nothing (module doc)."""
        attempt_id = phase.attempt.attempt_id
        if phase.phase == PHASE_FINISHED:
            return self._finish(phase)
        if attempt_id in self.finished_ids:
            return Tracked(entry=AttemptEntry(attempt=phase.attempt, phase=PHASE_FINISHED))
        entry = self.entries.get(attempt_id)
        new = entry is None
        if entry is None:
            entry = self.entries[attempt_id] = AttemptEntry(attempt=phase.attempt)
        if PHASE_RANK.get(phase.phase, 0) >= PHASE_RANK.get(entry.phase, -1):
            entry.phase, entry.since = phase.phase, phase.at
        entry.detail.update(phase.detail)
        taken = new and phase.phase == PHASE_TAKEN
        if taken:
            self.taken += 1
        step = phase.detail.get("step")
        spans = self.observe(entry, f"{phase.phase}:{step}" if step else phase.phase, phase.at)
        return Tracked(entry=entry, taken=taken, spans=spans)

    def _finish(self, phase: protocol.AttemptPhase) -> Tracked:
        self.finished_ids[phase.attempt.attempt_id] = None
        self.finished_ids.move_to_end(phase.attempt.attempt_id)
        while len(self.finished_ids) > FINISHED_MEMORY:
            self.finished_ids.popitem(last=False)
        entry = self.entries.pop(phase.attempt.attempt_id, None)
        started = entry is not None
        if entry is None:
            entry = AttemptEntry(attempt=phase.attempt)
        entry.detail.update(phase.detail)
        fate, status = phase.detail.get("fate", ""), phase.detail.get("status")
        key = status if fate == fates.ACK else FATE_COUNTS.get(fate)
        if key in self.finished:
            self.finished[key] += 1
        spans = self.observe(entry, PHASE_FINISHED, phase.at)
        return Tracked(entry=entry, finished=True, started=started, status=key, spans=spans)

    def add(self, attempt: protocol.Attempt, phase: str, at: float, **detail) -> AttemptEntry:
        """Enter an attempt the supervisor itself hands on (one a dead runner left)."""
        entry = self.entries[attempt.attempt_id] = AttemptEntry(
            attempt=attempt, phase=phase, since=at, detail=dict(detail))
        return entry

    @staticmethod
    def observe(entry: AttemptEntry, boundary: str, at: float) -> tuple[tuple[str, float], ...]:
        """Record when ``boundary`` was first crossed; the span it ends as ``((span,
        seconds),)``, or ``()`` when it ends none or its start is unknown."""
        entry.times.setdefault(boundary, at)
        span = SPAN_ENDS.get(boundary)
        if span is None:
            return ()
        name, start_boundary = span
        if start_boundary is None:  # queue wait: from the request's time_added
            added = entry.attempt.request.get("experiment", {}).get("time_added")
            start = float(added) if isinstance(added, (int, float)) and added > 0 else None
        else:
            start = entry.times.get(start_boundary)
        return () if start is None else ((name, at - start),)

    def held_by(self, role: str) -> list[AttemptEntry]:
        """The entries whose phase ``role`` owns (:data:`PHASE_OWNER`), sorted by id."""
        return [entry for entry in self if PHASE_OWNER.get(entry.phase) == role]

    def hand_over(self, role: str,
                  ended: Callable[[str], protocol.Outcome | None]) -> list[HandOver]:
        """What becomes of each attempt the dead ``role`` held; moves their phases on.

        ``ended(attempt_id)`` is the outcome the scraper kept for a closed attempt (its
        ``<id>.ended`` file), None when it was not closed.  The cache manager's and the
        executor's attempts END (phase ``ending``); the scraper's CLOSE again, or, when
        closed, go to ``uploading`` with nothing to do (the uploader has their final
        request); the uploader's UPLOAD again when closed, else SETTLE (phase
        ``settling``).  The fetcher's attempts are all adopted by its replacement: [].
        """
        actions = []
        for entry in self.held_by(role):
            outcome = ended(entry.attempt_id) if role in ("scraper", "uploader") else None
            if role in ("cache_manager", "executor"):
                entry.phase = PHASE_ENDING
                actions.append(HandOver(entry.attempt, END))
            elif role == "scraper" and outcome is not None:
                entry.phase = PHASE_UPLOADING
            elif role == "scraper":
                actions.append(HandOver(entry.attempt, CLOSE))
            elif outcome is not None:
                actions.append(HandOver(entry.attempt, UPLOAD, outcome))
            else:
                entry.phase = PHASE_SETTLING
                actions.append(HandOver(entry.attempt, SETTLE))
        return actions
