"""The resource ledger: what the runner has given out and what is left.

One ledger decides whether a request fits before the fetcher takes it for good.  A
reservation is keyed by attempt id and released exactly once (a second release is a
no-op), whatever ended the attempt.  This holds executor slots, CPUs and RAM; GPU and
disk accounting plug in here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


def machine_memory() -> int:
    """Total RAM in bytes (``/proc/meminfo``), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Ledger:
    """Capacity and the reservations held against it."""

    slots: int
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    ram: int = field(default_factory=machine_memory)
    held: dict = field(default_factory=dict)  # attempt id -> resources dict

    def _used(self, name: str) -> int:
        return sum(int(r.get(name, 0)) for r in self.held.values())

    def free(self) -> dict:
        """Free slots, CPUs and RAM bytes."""
        return {"slots": self.slots - len(self.held), "cpus": self.cpus - self._used("cpus"),
                "ram": (self.ram - self._used("ram")) if self.ram else None}

    def has_slot(self) -> bool:
        return len(self.held) < self.slots

    def could_ever_fit(self, resources: dict) -> bool:
        """Whether an empty ledger could hold ``resources`` (else another host must run it)."""
        if int(resources.get("cpus", 0)) > self.cpus:
            return False
        return not (self.ram and int(resources.get("ram", 0)) > self.ram)

    def try_reserve(self, attempt_id: str, resources: dict) -> bool:
        """Reserve ``resources`` for ``attempt_id`` if they fit now; True on success."""
        if attempt_id in self.held:
            return True
        free = self.free()
        if free["slots"] < 1 or int(resources.get("cpus", 0)) > free["cpus"]:
            return False
        if free["ram"] is not None and int(resources.get("ram", 0)) > free["ram"]:
            return False
        self.held[attempt_id] = dict(resources)
        return True

    def release(self, attempt_id: str) -> bool:
        """Give back what ``attempt_id`` held; False when it held nothing (already released)."""
        return self.held.pop(attempt_id, None) is not None
