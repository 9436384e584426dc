"""M-RoPE positions for Qwen-VL and GLM-V prompts, as transformers' `get_rope_index` computes them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Block = tuple[int, int, int, np.ndarray | None]  # (t, h, w) in patches, and the time position of each t


def mrope_positions(input_ids: np.ndarray, blocks: Sequence[Block], media_token_ids: Sequence[int],
                    merge_size: int) -> tuple[np.ndarray, int]:
    """input_ids: [S]; blocks: the vision blocks in prompt order, each a run of t*h*w/merge**2 media tokens
    (an image; a video, or one of its temporal patches), with its time positions (None: all at the start).
    Returns positions [3, S] (t, h, w) and the delta such that a token at sequence index i >= S has
    position i + delta on all three axes."""
    ids = np.asarray(input_ids)
    positions = np.empty((3, len(ids)), dtype=np.int64)
    is_media = np.isin(ids, media_token_ids)
    nxt, i, block = 0, 0, 0
    while i < len(ids):
        if not is_media[i]:
            run = np.argmax(is_media[i:]) if is_media[i:].any() else len(ids) - i
            positions[:, i:i + run] = np.arange(nxt, nxt + run)
            nxt, i = nxt + run, i + run
            continue
        t, h, w, times = blocks[block]
        h, w = h // merge_size, w // merge_size
        times = np.zeros(t, np.int64) if times is None else np.asarray(times, np.int64)
        tt, hh, ww = np.meshgrid(times, np.arange(h), np.arange(w), indexing="ij")
        grid = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + nxt
        positions[:, i:i + grid.shape[1]] = grid
        nxt, i, block = int(grid.max()) + 1, i + grid.shape[1], block + 1
    return positions, nxt - len(ids)
