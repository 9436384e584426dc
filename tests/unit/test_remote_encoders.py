"""How a language server splits a request over its encoder servers (no servers needed for these)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triton_vlm.encode.remote_encoders import LOCAL, RemoteEncoders
from triton_vlm.errors import Unavailable
from triton_vlm.preprocess.image_inputs import Images


def weights(tokens: list[int], keys: tuple[bytes, ...] = ()) -> Images:
    """Images of these tokens (and as many pixel rows), by file: what `split` reads."""
    n = len(tokens)
    return Images(np.ones((n, 3), np.int64), np.array(tokens), np.array(tokens), files=(b"x",) * n, keys=keys)


def test_each_healthy_encoder_gets_a_shard_weighted_by_its_load():
    remote = RemoteEncoders(["a:1", "b:2"])
    assert remote.split(weights([1000, 100, 200, 50])) == [("a:1", [0]), ("b:2", [2, 1, 3])]
    remote.in_flight["a:1"] = 5000  # a is busy: everything goes to b
    assert remote.split(weights([1000, 100, 200, 50])) == [("b:2", [0, 2, 1, 3])]
    remote.in_flight["a:1"] = 800
    assert remote.split(weights([1000, 100, 200, 50])) == [("a:1", [2, 1]), ("b:2", [0, 3])]  # a: 800+300


def test_down_and_removed_encoders_get_nothing():
    remote = RemoteEncoders(["a:1", "b:2"])
    remote.down_until["a:1"] = float("inf")
    assert remote.split(weights([10, 10])) == [("b:2", [0, 1])]
    remote.set_urls(["c:3", "b:2"])
    assert remote.split(weights([10, 10])) == [("c:3", [0]), ("b:2", [1])]
    remote.down_until.update({"b:2": float("inf"), "c:3": float("inf")})
    assert remote.split(weights([10, 10])) == [(None, [0, 1])], "no healthy encoder: the call finds what is left"


def test_small_requests_stay_local_only_with_a_local_encoder():
    local_calls = []

    def local(images):
        local_calls.append(images.layout.tolist())
        return torch.zeros((1, 4))

    remote = RemoteEncoders(["a:1"], fallback=local, local_below=100)
    assert remote.split(weights([64, 32])) == [(LOCAL, [0, 1])]
    assert remote.split(weights([64, 64])) == [("a:1", [0, 1])]
    remote(Images(np.array([[1, 8, 8]]), np.array([16]), np.array([64]), files=(b"x",)), LOCAL)
    assert local_calls == [[[1, 8, 8]]]
    assert RemoteEncoders(["a:1"], local_below=100).split(weights([64])) == [("a:1", [0])], "no local encoder to use"


def test_every_encoder_down_falls_back_or_is_unavailable():
    images = Images(np.array([[1, 2, 2]]), np.array([1]), np.array([4]), files=(b"x",))
    remote = RemoteEncoders(["127.0.0.1:1"], timeout_s=2)  # nothing listens on port 1
    with pytest.raises(Unavailable, match="no encoder could encode the images: 127.0.0.1:1"):
        remote(images, "127.0.0.1:1")
    assert remote.healthy() == [] and remote.state() == {"127.0.0.1:1": (0, False)}
    fallback = RemoteEncoders(["127.0.0.1:1"], fallback=lambda images: torch.ones((1, 4)), timeout_s=2)
    assert fallback(images, "127.0.0.1:1").tolist() == [[1.0] * 4]


def test_shared_memory_goes_to_encoders_on_this_host_only():
    size = lambda images: 4 * 8 * int(images.tokens.sum())  # noqa: E731
    auto = RemoteEncoders(["127.0.0.1:1", "localhost:2", "10.0.0.7:3"], transport="auto", embedding_bytes=size)
    assert [auto.uses_shm(u) for u in auto.urls] == [True, True, False]
    assert not RemoteEncoders(["127.0.0.1:1"]).uses_shm("127.0.0.1:1"), "grpc: never"
    assert RemoteEncoders(["10.0.0.7:3"], transport="shm", embedding_bytes=size).uses_shm("10.0.0.7:3")
    with pytest.raises(ValueError, match="embedding_bytes"):
        RemoteEncoders(["127.0.0.1:1"], transport="auto")
    auto.close()


def test_an_image_goes_back_to_the_encoder_that_has_it_while_the_balance_allows():
    remote = RemoteEncoders(["a:1", "b:2"])
    remote._remember("b:2", (b"x",))
    assert remote.split(weights([100, 100], (b"x", b"y"))) == [("a:1", [1]), ("b:2", [0])]
    assert remote.split(weights([100, 100], (b"y", b"x"))) == [("a:1", [0]), ("b:2", [1])]
    remote.in_flight["b:2"] = 500  # far busier than a: the cached image goes elsewhere
    assert remote.split(weights([100], (b"x",))) == [("a:1", [0])]
