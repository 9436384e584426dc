"""What runs each step: waiting and running queues, one token budget per step, preemption, cancel.

Each step (vLLM V1's rule) first gives every running sequence its next tokens - decodes (one token each)
first, then the rest of unfinished prompts, chunk by chunk - and then admits waiting sequences, in
order, while the budget (`max_num_batched_tokens`), `max_num_seqs` and free blocks allow; an admitted
sequence first reuses the longest cached prefix it can. A long prompt is therefore prefilled over several
steps while the running streams keep producing tokens. When a running sequence needs a block and none is
free, the most recently admitted sequence is preempted: it gives back its blocks and goes back to the
front of the queue, to be recomputed later (prompt and all it generated; what it keyed stays in the
prefix cache, so that is mostly a hit). It is never failed, and its output is the same.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks, self.max_num_seqs, self.max_num_batched_tokens = blocks, max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preemptions = 0
        self.prefix_queries = self.prefix_hits = 0  # tokens of admitted sequences; those found cached

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """-> (this step's sequences with their number of new tokens, decodes first; the sequences cancelled
        since the last step, now ended and their blocks free)."""
        cancelled = [seq for seq in (*self.running, *self.waiting) if seq.cancelled]
        for seq in cancelled:
            self.finish(seq)
        budget = self.max_num_batched_tokens
        scheduled: dict[Sequence, int] = {}
        preempted = False
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1):  # decodes first
            n = min(seq.num_tokens - seq.num_computed, budget)
            if seq.status is not Status.RUNNING or n <= 0:
                continue
            while not self.blocks.can_allocate(seq, seq.num_computed + n):
                victim = self.running[-1]
                budget += scheduled.pop(victim, 0)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq, seq.num_computed + n)
                scheduled[seq] = n
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            hit = self.blocks.match(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if seq.prefilled is not None:  # a hand-off: its whole prompt is written at once, nothing computed
                n = seq.num_tokens - seq.num_computed
            if not self.blocks.can_allocate(seq, seq.num_computed + n):
                self.blocks.release(seq)
                break
            self.blocks.allocate(seq, seq.num_computed + n)
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += hit
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled[seq] = n
            budget -= 1 if seq.prefilled is not None else n
        return list(scheduled.items()), cancelled

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """The sequence leaves (ended, failed or cancelled) and gives back its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
