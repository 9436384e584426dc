"""Patch-count balancing of images across encoder shards."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from triton_vlm.encode.balance import balance, gather


def test_the_architecture_example():
    assert balance([1000, 100, 200, 50], 2) == ([[0], [2, 1, 3]], [1000, 350])


def test_ties_go_to_the_lowest_shard_and_keep_image_order():
    assert balance([5, 5, 5, 5], 2) == ([[0, 2], [1, 3]], [10, 10])


def test_empty_input_and_one_image():
    assert balance([], 3) == ([[], [], []], [0, 0, 0])
    assert balance([64], 4) == ([[0], [], [], []], [64, 0, 0, 0])


def test_more_shards_than_images_leaves_shards_empty():
    shards, loads = balance([10, 30], 5)
    assert shards == [[1], [0], [], [], []] and loads == [30, 10, 0, 0, 0]


def test_zero_shards_is_an_error():
    with pytest.raises(ValueError):
        balance([1], 0)


@given(st.lists(st.integers(1, 10_000), max_size=40), st.integers(1, 8))
def test_every_image_once_and_max_load_within_the_greedy_bound(sizes, n):
    shards, loads = balance(sizes, n)
    assert sorted(i for shard in shards for i in shard) == list(range(len(sizes)))
    assert loads == [sum(sizes[i] for i in shard) for shard in shards]
    if sizes:
        # list scheduling: the last image placed on the fullest shard started below the average
        assert max(loads) <= sum(sizes) / n + max(sizes)


def test_gather_restores_image_order():
    sizes = [300, 40, 900, 120, 7]
    shards, _ = balance(sizes, 3)
    outputs = [[np.full((sizes[i], 2), i) for i in shard] for shard in shards]
    assert [int(x[0, 0]) for x in gather(outputs, shards)] == [0, 1, 2, 3, 4]


def test_base_loads_send_images_to_the_idle_shard():
    # an encoder with 2000 patches in flight gets nothing until the other has caught up
    assert balance([1000, 100, 200], 2, base=[2000, 0]) == ([[], [0, 2, 1]], [2000, 1300])
    assert balance([1000, 1000], 2, base=[500, 0]) == ([[1], [0]], [1500, 1000])
    with pytest.raises(ValueError, match="2 base loads for 3 shards"):
        balance([1], 3, base=[0, 0])
