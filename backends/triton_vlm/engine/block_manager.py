"""KV-cache blocks (nano-vllm's block manager): a pool of fixed-size blocks, each sequence's block table,
reference counts, and the prefix cache, a map from block keys (`Sequence.block_key`) to blocks.

Bookkeeping only: it never touches a tensor (the runner does). A full block that a sequence computed is
keyed and stays findable after its sequence ends, until it is handed out again: free blocks go out least
recently freed first (LRU eviction), and a sequence frees its blocks tail first, so the end of a chain is
evicted before its beginning. Blocks are shared only when full, and a full block is never written again.
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.cached: dict[bytes, int] = {}  # key -> the block holding it

    @property
    def in_use(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def cached_chain(self, seq: Sequence) -> list[int]:
        """The longest chain of cached blocks the sequence's tokens begin with, leaving at least its last
        token to compute (its logits give the next token). Reads only: another thread may ask (a hint)."""
        chain: list[int] = []
        if self.prefix_caching:
            for i in range((seq.num_tokens - 1) // self.block_size):
                block = self.cached.get(seq.block_key(i) or b"")
                if block is None:
                    break
                chain.append(block)
        return chain

    def match(self, seq: Sequence) -> int:
        """Give a sequence that holds no blocks its `cached_chain`. -> tokens reused."""
        assert not seq.block_table, "a sequence matches its prefix before it holds blocks"
        for block in self.cached_chain(seq):
            if self.ref[block] == 0:
                del self.free[block]
            self.ref[block] += 1
            seq.block_table.append(block)
        seq.num_keyed = len(seq.block_table)
        seq.num_computed = seq.num_keyed * self.block_size
        return seq.num_computed

    def can_allocate(self, seq: Sequence, tokens: int) -> bool:
        """Whether the sequence can hold blocks for its first `tokens` tokens."""
        return self.blocks_for(tokens) - len(seq.block_table) <= len(self.free)

    def allocate(self, seq: Sequence, tokens: int) -> None:
        for _ in range(self.blocks_for(tokens) - len(seq.block_table)):
            block, _ = self.free.popitem(last=False)
            key = self.key[block]
            if key is not None:  # evicted: the prefix it held is gone
                if self.cached.get(key) == block:
                    del self.cached[key]
                self.key[block] = None
            self.ref[block] = 1
            seq.block_table.append(block)

    def commit(self, seq: Sequence) -> None:
        """Key the blocks the sequence's computed tokens have filled, so later sequences can reuse them."""
        if not self.prefix_caching:
            return
        for i in range(seq.num_keyed, seq.num_computed // self.block_size):
            key = seq.block_key(i)
            if key is None:
                break  # an uncacheable block: every later key is None too
            block = seq.block_table[i]
            self.key[block] = key
            self.cached.setdefault(key, block)  # an equal block computed twice: the first stays the one found
            seq.num_keyed = i + 1

    def release(self, seq: Sequence) -> None:
        """The sequence gives back its blocks (it ended, or was preempted: then it starts over)."""
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_computed = seq.num_keyed = 0
