"""Stop strings on streamed text: cut the output before the first stop string, and hold back the few
characters that could still turn into one, so a streamed delta never shows part of a stop string."""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, delta: str, final: bool = False, check: bool = True) -> tuple[str, bool]:
        """New text in -> (text to emit now, whether a stop string was hit). After a hit, stop feeding.
        `check` False (before min_tokens): the text goes out as it is, never searched for stop strings."""
        self.pending += delta
        if not check:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = 0 if final else min(self.hold, len(self.pending))
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out, False
