"""M-RoPE positions for Qwen-VL prompts, as transformers' `get_rope_index` computes them for images."""

from __future__ import annotations

import numpy as np


def mrope_positions(
    input_ids: np.ndarray, grid_thw: np.ndarray, image_token_id: int, merge_size: int
) -> tuple[np.ndarray, int]:
    """input_ids: [S]; grid_thw: [N, 3] in patches. Returns positions [3, S] (t, h, w) and the delta
    such that a token at sequence index i >= S has position i + delta on all three axes."""
    ids = np.asarray(input_ids)
    positions = np.empty((3, len(ids)), dtype=np.int64)
    is_image = ids == image_token_id
    nxt, i, image = 0, 0, 0
    while i < len(ids):
        if not is_image[i]:
            run = np.argmax(is_image[i:]) if is_image[i:].any() else len(ids) - i
            positions[:, i:i + run] = np.arange(nxt, nxt + run)
            nxt, i = nxt + run, i + run
            continue
        t, h, w = (int(x) for x in grid_thw[image])
        h, w = h // merge_size, w // merge_size
        # images have no time axis: second_per_grid_t is 0, so the t position stays at the start
        tt, hh, ww = np.meshgrid(np.zeros(t, np.int64), np.arange(h), np.arange(w), indexing="ij")
        block = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + nxt
        positions[:, i:i + block.shape[1]] = block
        nxt, i, image = int(block.max()) + 1, i + block.shape[1], image + 1
    return positions, nxt - len(ids)
