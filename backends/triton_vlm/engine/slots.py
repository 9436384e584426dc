"""The KV-cache slot ledger: which slots running sequences hold and how many tokens each has cached.

The engine thread takes and releases slots; other threads read the counts (stats, metrics), so every
access holds the ledger's lock. Slots are handed out lowest first, so running sequences tend to sit in
a row and decode reads their cache as a view.
"""

from __future__ import annotations

import threading


class SlotLedger:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._held: dict[int, int] = {}  # slot -> tokens cached there
        self._lock = threading.Lock()

    def take(self) -> int:
        """A free slot, now held with nothing cached. Raises RuntimeError when none is free."""
        with self._lock:
            slot = next((s for s in range(self.slots) if s not in self._held), None)
            if slot is None:
                raise RuntimeError("no free KV-cache slot")
            self._held[slot] = 0
            return slot

    def cached(self, slot: int, tokens: int) -> None:
        with self._lock:
            if slot in self._held:
                self._held[slot] = tokens

    def release(self, slot: int) -> None:
        with self._lock:
            self._held.pop(slot, None)

    @property
    def free(self) -> int:
        with self._lock:
            return self.slots - len(self._held)

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)

    @property
    def tokens(self) -> int:
        with self._lock:
            return sum(self._held.values())
