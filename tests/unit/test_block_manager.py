"""The KV blocks' bookkeeping and the scheduler, without a model: hash chains over full blocks, reference
counts, LRU eviction, image-aware keys, preemption, and the prefix-hit + chunked-prefill cases that broke
nano-vllm (a whole prompt cached; a budget counted before the hit; a preempted sequence prefilling again)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from triton_vlm.engine.block_manager import BlockManager
from triton_vlm.engine.scheduler import Scheduler
from triton_vlm.engine.sequence import LanguageRequest, Sequence, Status
from triton_vlm.models import load_family

BS = 4


@pytest.fixture(scope="module")
def make(tiny_model):
    family, tokenizer = load_family(tiny_model), AutoTokenizer.from_pretrained(tiny_model)

    def make(ids, images=(), keys=()):
        """A sequence of these token ids; images: (index of its first token, its layout row), each image's
        tokens the image token repeated as its layout says."""
        ids = list(ids)
        for at, row in images:
            n = int(family.tokens_per_image(np.array([row]))[0])
            ids[at:at + n] = [family.image_token_id] * n
        layout = np.array([row for _, row in images], np.int64).reshape(-1, 3)
        rows = torch.zeros((ids.count(family.image_token_id), family.embedding_width))
        request = LanguageRequest("r", np.array(ids), rows, layout, image_keys=tuple(keys))
        return Sequence(request, lambda out: None, family, tokenizer, BS, 4096)

    return make


def computed(blocks, seq, n=None):
    """As if the runner computed the sequence's next n tokens (all by default)."""
    seq.num_computed += seq.num_tokens - seq.num_computed if n is None else n
    blocks.commit(seq)


def test_a_shared_prefix_is_reused_by_whole_blocks_and_counted_by_references(make):
    blocks = BlockManager(16, BS)
    a, b = make(range(10, 20)), make([*range(10, 19), 99, 98])
    assert blocks.match(a) == 0
    blocks.allocate(a, a.num_tokens)
    computed(blocks, a)
    assert blocks.match(b) == 8  # two full blocks; the third differs in its last token
    assert b.block_table == a.block_table[:2] and [blocks.ref[i] for i in a.block_table] == [2, 2, 1]
    blocks.release(a)
    assert [blocks.ref[i] for i in b.block_table] == [1, 1] and blocks.in_use == 2


def test_a_wholly_cached_prompt_still_computes_its_last_token(make):
    blocks = BlockManager(16, BS)
    a = make(range(30, 38))  # exactly two blocks
    blocks.allocate(a, a.num_tokens)
    computed(blocks, a)
    table = list(a.block_table)
    blocks.release(a)
    again = make(range(30, 38))
    assert blocks.match(again) == 4  # not 8: the last token's logits give the next token
    blocks.allocate(again, again.num_tokens)
    assert again.block_table[0] == table[0] and again.block_table[1] != table[1]


def test_free_blocks_keep_their_prefix_until_reused_oldest_first(make):
    blocks = BlockManager(4, BS)
    old, new = make(range(0, 9)), make(range(50, 59))
    for seq in (old, new):
        blocks.allocate(seq, seq.num_tokens - 1)
        computed(blocks, seq, seq.num_tokens - 1)
        blocks.release(seq)
    assert len(blocks.cached) == 4 and blocks.in_use == 0  # both prefixes outlive their sequences
    taker = make(range(200, 204))
    blocks.allocate(taker, 8)  # two blocks: the least recently freed go, the tail of a chain first
    probe_old, probe_new = make(range(0, 9)), make(range(50, 59))
    assert (blocks.match(probe_old), blocks.match(probe_new)) == (0, 8)


def test_equal_placeholder_ids_with_other_pixels_never_share_a_block(make):
    """Two images of one size have identical placeholder ids: only their content keys tell them apart."""
    blocks = BlockManager(64, BS)
    image = [(5, (1, 4, 4))]  # 4 tokens at 5..8
    first = make(range(100, 120), image, keys=[b"cat"])
    blocks.allocate(first, first.num_tokens)
    computed(blocks, first)
    assert first.token_ids == make(range(100, 120), image, keys=[b"dog"]).token_ids
    assert blocks.match(make(range(100, 120), image, keys=[b"dog"])) == 4  # the block before the image only
    assert blocks.match(make(range(100, 120), image, keys=[b"cat"])) == 16
    assert blocks.match(make(range(100, 120), image)) == 4  # no key: never cached past the image
    assert blocks.match(make(range(100, 120), [(5, (1, 4, 8))], keys=[b"cat"])) == 4  # another layout


def test_the_last_admitted_is_preempted_and_comes_back_first(make):
    blocks = BlockManager(6, BS)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    first, second = make(range(0, 10)), make(range(40, 50))
    scheduler.add(first)
    scheduler.add(second)
    steps = 0
    while scheduler.preemptions == 0:
        scheduled, _ = scheduler.schedule()
        for seq, n in scheduled:
            computed(blocks, seq, n)
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append(7)  # its next token
        steps += 1
        assert steps < 20
    assert second.status is Status.WAITING and scheduler.waiting[0] is second and not second.block_table
    assert second.num_computed == 0 and first.status is Status.RUNNING
    assert blocks.in_use == len(first.block_table)
    scheduler.finish(first)
    scheduled, _ = scheduler.schedule()
    # the preempted sequence prefills again (prompt and what it generated), starting at its cached prefix
    [(seq, n)] = scheduled
    assert seq is second and seq.num_computed == 8 and n == second.num_tokens - 8 and n > 1


def test_a_prefix_hit_counts_before_the_budget_is_cut(make):
    """The chunk is what is left after the hit, within the budget: never past the prompt's end."""
    blocks = BlockManager(32, BS)
    scheduler = Scheduler(blocks, max_num_seqs=2, max_num_batched_tokens=6)
    warm = make(range(0, 21))
    blocks.allocate(warm, warm.num_tokens)
    computed(blocks, warm)
    blocks.release(warm)
    seq = make(range(0, 21))
    scheduler.add(seq)
    chunks = []
    while seq.num_computed < seq.num_tokens:
        [(got, n)], _ = scheduler.schedule()
        chunks.append((got.num_computed, n))
        computed(blocks, got, n)
    assert chunks == [(20, 1)] and scheduler.prefix_hits == 20


def test_chunks_and_decodes_share_one_budget_decodes_first(make):
    blocks = BlockManager(64, BS)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=8)
    running = make(range(300, 303))
    scheduler.add(running)
    [(seq, n)], _ = scheduler.schedule()
    computed(blocks, seq, n)
    running.token_ids.append(5)
    long = make(range(400, 420))
    scheduler.add(long)
    sizes = []
    while long.num_computed < long.num_tokens:
        scheduled, _ = scheduler.schedule()
        assert scheduled[0] == (running, 1)  # the decode goes first, every step
        sizes.append(dict(scheduled)[long])
        for seq, n in scheduled:
            computed(blocks, seq, n)
        running.token_ids.append(5)
    assert sizes == [7, 7, 6]
