"""Encoder disaggregation through real servers on loopback: 1 language server + 2 encoder servers, a
`--mode encoder` one and the session's colocated server (which keeps `image_encoder`, its embedding cache
and two replicas: an encoder server, as a family's colocated server is its E/P/D's).

One language server takes every E/PD setting at once: its encoder list is a file (re-read while serving)
that names, at start, the two encoder servers and a third address where nothing listens (then only the
two: a down encoder is tried again every few seconds, which would move the shards the tests count); it
keeps its own embedding cache, encodes requests under 500 pixel rows itself, and takes embeddings back
through shared memory.
Each routing rule is pinned down without servers in tests/unit/test_remote_encoders.py; here they are
seen end to end. The gRPC transport is the E/PD of GLM-4.1V and Qwen3-VL (their family tests)."""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import make_image, server_metric, server_series, wait_until
from tests.integration.serve import encoder_shards, relist, serving
from tests.reference import reference_generate
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import free_port
from triton_vlm_clients.client import stream
from triton_vlm_clients.clips import make_clip, y4m

MIXED = [(640, 480), (300, 200), (800, 600), (200, 500)]
LOCAL_BELOW = 500  # pixel rows: 640x480 alone is 1564
VIDEO_BYTES, VIDEO_TOKENS = 2**21, 1000  # the language server's video limits (the others keep the defaults)


def images(n, seed):
    """`n` images over LOCAL_BELOW pixel rows in all; each test's seeds are its own (the caches are on), and
    none is another module's (the colocated `server` is the session's)."""
    return [make_image(w, h, seed=50_000 + seed + i) for i, (w, h) in enumerate(MIXED[:n])]


class EPD:
    """The language server, its two encoder servers (the `--mode encoder` one first: a test kills it), the
    address where nothing listens (listed at start only), and the list file."""

    def __init__(self, language, encoders, dead: str, urls_file) -> None:
        self.language, self.encoders, self.dead, self.urls_file = language, encoders, dead, urls_file
        self.dead_up_at_start: float | None = None  # its gauge, before the fixture lists the two alone

    def shards(self) -> list[int]:
        return [encoder_shards(e.grpc_url) for e in self.encoders]

    def listed(self, *urls: str) -> None:
        relist(self.language, self.urls_file, "encoder", list(urls))

    def both_listed(self) -> None:
        self.listed(*(e.grpc_url for e in self.encoders))


@pytest.fixture(scope="module")
def epd(server, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("epd")
    encoder = Deployment(tiny_model, embedding_cache_mb=0, mode="encoder", encoder_dp=1)
    with serving((encoder, root / "encoder")) as own:
        dead, urls_file = f"127.0.0.1:{free_port()}", root / "encoders.txt"
        urls_file.write_text(f"{own.grpc_url}\n{server.grpc_url}\n{dead}\n")
        language = Deployment(tiny_model, mode="language", encoder_dp=1, minimal=True, encoder_urls_file=str(urls_file),
                              local_encode_below=LOCAL_BELOW, max_video_bytes=VIDEO_BYTES,
                              max_video_tokens=VIDEO_TOKENS, preprocess_instances=1)
        with serving((language, root / "language")) as language_server:
            epd = EPD(language_server, [own, server], dead, urls_file)
            dead_series = f'encoder="{dead}"'
            wait_until(lambda: server_series(language_server, "triton_vlm_remote_encoder_up", dead_series), 10,
                       "its gauge")
            epd.dead_up_at_start = server_metric(language_server, "triton_vlm_remote_encoder_up", dead_series)
            epd.both_listed()
            yield epd


def test_an_encoder_that_is_down_at_start_is_said_so(epd):
    assert f"encoder server {epd.dead} is unreachable at start" in epd.language.log_file.read_text()
    assert epd.dead_up_at_start == 0


def test_a_language_server_sends_no_file_for_an_image_it_has_cached(server, epd):
    fresh = images(2, seed=73)
    before = epd.shards()
    first = stream(epd.language.grpc_url, prompt="Compare the pictures.", images=fresh, max_tokens=8).output_ids
    sent = epd.shards()
    assert sent != before, "the first time, the files went to the encoders"
    hits = server_metric(epd.language, "triton_vlm_embedding_cache_hits_total", 'tier="local"')
    again = stream(epd.language.grpc_url, prompt="Compare the pictures.", images=fresh, max_tokens=8).output_ids
    assert again == first and epd.shards() == sent, "no encoder traffic"
    assert first == stream(server.grpc_url, prompt="Compare the pictures.", images=fresh, max_tokens=8).output_ids
    assert server_metric(epd.language, "triton_vlm_embedding_cache_hits_total", 'tier="local"') == hits + 2


def test_remote_encoder_gauges_say_both_are_up_and_idle(epd):
    stream(epd.language.grpc_url, prompt="Compare.", images=images(4, seed=90), max_tokens=2)
    for e in epd.encoders:  # published every second
        series = f'encoder="{e.grpc_url}"'
        wait_until(lambda s=series: (server_metric(epd.language, "triton_vlm_remote_encoder_up", s),
                                     server_metric(epd.language, "triton_vlm_remote_encoder_in_flight_tokens", s))
                   == (1, 0), 10, f"{e.grpc_url} up and idle")


def test_encoder_servers_hold_only_the_encoder(epd):
    with grpcclient.InferenceServerClient(epd.encoders[0].grpc_url) as client:
        models = {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]}
    assert models == {"image_encoder", "vision_encoder"}


@pytest.mark.parametrize("n_images", [1, 3, 4])
def test_disaggregated_ids_equal_colocated(server, epd, n_images):
    before = epd.shards()
    imgs = images(n_images, seed=100 * n_images)
    colocated = stream(server.grpc_url, prompt="Compare the pictures.", images=imgs, max_tokens=16)
    disaggregated = stream(epd.language.grpc_url, prompt="Compare the pictures.", images=imgs, max_tokens=16)
    assert disaggregated.output_ids == colocated.output_ids and colocated.output_ids
    sent = [after - b for after, b in zip(epd.shards(), before, strict=True)]
    assert sum(sent) == min(n_images, 2) and all(sent) == (n_images > 1)  # a shard per server, none local


def test_with_no_encoder_server_listed_up_the_server_encodes_itself(epd, tiny_model):
    before = epd.shards()
    try:
        epd.listed(epd.dead)
        imgs = images(2, seed=200)
        answer = stream(epd.language.grpc_url, prompt="hi", images=imgs, max_tokens=4)
        assert answer.output_ids == reference_generate(tiny_model, "hi", imgs, max_new_tokens=4)
        assert epd.shards() == before
    finally:
        epd.both_listed()


def test_encoders_added_and_removed_while_serving(epd):
    (a, b), seeds = epd.encoders, itertools.count(1000, 10)

    def send(n_requests):
        for i in range(n_requests):
            answer = stream(epd.language.grpc_url, prompt=f"picture {i}", images=images(3, seed=next(seeds)),
                            max_tokens=3)
            assert answer.finish_reason in ("stop", "length") and answer.output_ids

    try:
        epd.listed(a.grpc_url)
        before_b = encoder_shards(b.grpc_url)
        send(2)
        assert encoder_shards(b.grpc_url) == before_b, "b is not listed"
        epd.listed(a.grpc_url, b.grpc_url)
        send(2)
        assert encoder_shards(b.grpc_url) > before_b, "the added encoder received no shard"
        epd.listed(b.grpc_url)
        before_a = encoder_shards(a.grpc_url)
        send(3)
        assert encoder_shards(a.grpc_url) == before_a, "the removed encoder still got traffic"
    finally:
        epd.both_listed()


def test_small_requests_are_encoded_locally_the_rest_remotely(epd, tiny_model):
    small, large = [make_image(100, 100, seed=50_300), make_image(100, 100, seed=50_301)], images(2, seed=302)
    for imgs, sent in ((small, 0), (large, 2)):  # 2 x 64 pixel rows; 1564 + 300
        before = sum(epd.shards())
        answer = stream(epd.language.grpc_url, prompt="What is it?", images=imgs, max_tokens=5)
        assert answer.output_ids == reference_generate(tiny_model, "What is it?", imgs, max_new_tokens=5)
        assert sum(epd.shards()) - before == sent


def test_a_corrupt_image_is_the_requests_fault_not_the_encoders(epd):
    """The header passes here; the encoder server finds the body broken: INVALID_ARG for this request,
    and no encoder is marked down (the next request still uses both)."""
    truncated = make_image(640, 480)[:2000]
    with pytest.raises(InferenceServerException, match="image 1 could not be decoded"):
        stream(epd.language.grpc_url, prompt="What is it?", images=[images(1, seed=400)[0], truncated], max_tokens=4)
    before = epd.shards()
    stream(epd.language.grpc_url, prompt="What is it?", images=images(2, seed=410), max_tokens=2)
    assert all(after > b for after, b in zip(epd.shards(), before, strict=True))


def shm_regions(url: str) -> set[str]:
    with grpcclient.InferenceServerClient(url) as client:
        return {r["name"] for r in client.get_system_shared_memory_status(as_json=True).get("regions", {}).values()}


def test_embeddings_come_back_through_shared_memory_on_one_host(server, epd):
    imgs = images(4, seed=500)
    by_shm = stream(epd.language.grpc_url, prompt="Compare the pictures.", images=imgs, max_tokens=8)
    # the loopback language server registered its regions with both encoders, which wrote into them
    assert all(any(name.startswith(f"{epd.language.shm_prefix}out") for name in shm_regions(e.grpc_url))
               for e in epd.encoders)
    colocated = stream(server.grpc_url, prompt="Compare the pictures.", images=imgs, max_tokens=8)
    assert by_shm.output_ids == colocated.output_ids and by_shm.output_ids


def test_an_encoder_server_refuses_too_many_images_and_keeps_serving(epd):
    encoder = epd.encoders[0]

    def call(files):
        tensor = grpcclient.InferInput("_IMAGES", [len(files)], "BYTES")
        tensor.set_data_from_numpy(np.array(files, dtype=np.object_))
        with grpcclient.InferenceServerClient(encoder.grpc_url) as client:
            return client.infer("image_encoder", [tensor])

    with pytest.raises(InferenceServerException, match="9 images sent; the limit is 8") as err:
        call([make_image(32, 32)] * 9)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert call(images(2, seed=600)).as_numpy("_IMAGE_LAYOUT").shape == (2, 3)


def test_killing_an_encoder_under_load_loses_no_request(epd, tiny_model):  # last: it kills an `epd` encoder
    language, encoders = epd.language, epd.encoders
    requests = [(f"Set {i}: what is here?", images(2 + i % 3, seed=2000 + 7 * i)) for i in range(24)]
    expected = [reference_generate(tiny_model, p, imgs, max_new_tokens=6) for p, imgs in requests]
    done = []

    def one(r):
        answer = stream(language.grpc_url, prompt=r[0], images=r[1], max_tokens=6)
        done.append(1)
        return answer

    def killer():  # a crash, not a graceful stop: SIGKILL to the server and its stubs
        while len(done) < 6:  # then 8 in flight (one per client thread) and 10 not yet sent
            time.sleep(0.05)
        os.killpg(encoders[0].process.pid, signal.SIGKILL)
        encoders[0].process.wait()

    kill = threading.Thread(target=killer)
    kill.start()
    before = encoder_shards(encoders[1].grpc_url)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, requests))
    kill.join()
    assert encoders[0].process.poll() is not None, "the encoder was not killed during the run"
    assert [a.output_ids for a in answers] == expected
    assert encoder_shards(encoders[1].grpc_url) > before
    wait_until(lambda: [server_metric(language, "triton_vlm_remote_encoder_up", f'encoder="{e.grpc_url}"')
                        for e in encoders] == [0, 1], 10, "the killed encoder's gauge to say so")
    wait_until(lambda: server_metric(language, "triton_vlm_remote_encoder_in_flight_tokens") == 0, 10, "idle")


def test_a_clip_on_an_encoder_server_is_split_over_its_replicas(server, epd, tiny_model):
    """Video through encoder servers: the session's colocated server (two replicas, and `image_encoder`)
    listed alone as the encoder; a 32-frame clip goes there as its file and plan, and its 16 temporal
    patches are split over that server's two replicas; the ids are the colocated server's."""
    clip = make_clip(seconds=4.0, fps=8.0, seed=3200)
    kwargs = {"prompt": "What happens in the video?", "videos": [clip], "mm_processor_kwargs": {"fps": 8},
              "max_tokens": 8}
    patches = lambda: {s["replica"]: v for s, v in server_series(server, "triton_vlm_encoder_patches_total")}  # noqa: E731
    try:
        epd.listed(server.grpc_url)
        before, sent = patches(), encoder_shards(server.grpc_url)
        disaggregated = stream(epd.language.grpc_url, **kwargs)
        grown = {r: v - before.get(r, 0) for r, v in patches().items()}
        assert encoder_shards(server.grpc_url) == sent + 1
        assert len(grown) == 2 and all(v > 0 for v in grown.values()) and sum(grown.values()) == 16 * 6 * 10, grown
    finally:
        epd.both_listed()
    assert disaggregated.output_ids == stream(server.grpc_url, **kwargs).output_ids


@pytest.mark.parametrize("case", ["bytes", "tokens"])
def test_the_video_limits_a_server_sets_are_400s_and_the_next_request_succeeds(epd, case):
    """The language server's own `--max-video-bytes` and `--max-video-tokens` (the two limits the session
    server's defaults leave out of reach of a test's clips)."""
    big = y4m(1024, 1024, 3)
    video, message = {
        "bytes": (big, re.escape(f"video 0 is {len(big)} bytes; the limit is {VIDEO_BYTES}")),
        # 64 frames sampled at 8 fps: 32 temporal patches of 54 tokens
        "tokens": (make_clip(seconds=8.0, fps=8.0, width=640, height=480, seed=4),
                   re.escape(f"the videos make {32 * 54} prompt tokens; the limit is {VIDEO_TOKENS}")),
    }[case]
    with pytest.raises(InferenceServerException, match=message):
        stream(epd.language.grpc_url, prompt="What happens?", videos=[video], mm_processor_kwargs={"fps": 8},
               max_tokens=4)
    assert stream(epd.language.grpc_url, prompt="What happens?", videos=[make_clip(seed=8)], max_tokens=4).output_ids
