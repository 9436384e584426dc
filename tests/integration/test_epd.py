"""Encoder disaggregation through real servers on loopback: 1 language server + 2 encoder servers."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import make_image, server_metric, wait_until
from tests.reference import reference_generate
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import TritonServer, free_port
from triton_vlm_clients.client import stream

MIXED = [(640, 480), (300, 200), (800, 600), (200, 500)]


def images(n, seed=0):
    return [make_image(w, h, seed=seed + i) for i, (w, h) in enumerate(MIXED[:n])]


def encoder_shards(url: str) -> int:
    """Shards an encoder server has encoded (requests to its image_encoder)."""
    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics("image_encoder", as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0))


@pytest.fixture(scope="module")
def epd(tiny_model, tmp_path_factory):
    """Two encoder servers and a language server that uses them (local fallback on)."""
    root = tmp_path_factory.mktemp("epd")
    started = []
    try:
        encoders = []
        for i in range(2):
            repo = Deployment(tiny_model, embedding_cache_mb=0,
                              mode="encoder", encoder_dp=1).render(root / f"encoder{i}")
            encoders.append(TritonServer(repo, graceful_stop=False, log_file=root / f"encoder{i}.log").start())
            started.append(encoders[-1])
        for e in encoders:
            e.wait_ready(300)
        repo = Deployment(tiny_model, embedding_cache_mb=0, mode="language", encoder_dp=1, minimal=True,
                          encoder_urls=tuple(e.grpc_url for e in encoders)).render(root / "language")
        language = TritonServer(repo, graceful_stop=False, log_file=root / "language.log").start()
        started.append(language)
        yield language.wait_ready(300), encoders
    finally:
        for s in started:
            s.stop()


def test_a_language_server_sends_no_file_for_an_image_it_has_cached(server, epd, tiny_model, tmp_path):
    _, encoders = epd
    # a language server with its own cache (the default) sends no file for an image it has cached
    repo = Deployment(tiny_model, mode="language", encoder_dp=1, minimal=True,
                      encoder_urls=tuple(e.grpc_url for e in encoders)).render(tmp_path / "cached")
    with TritonServer(repo, graceful_stop=False, log_file=tmp_path / "cached.log") as cached:
        fresh = [make_image(120, 120, seed=73), make_image(90, 150, seed=74)]
        first = stream(cached.grpc_url, prompt="Compare the pictures.", images=fresh, max_tokens=8).output_ids
        sent = [encoder_shards(e.grpc_url) for e in encoders]
        again = stream(cached.grpc_url, prompt="Compare the pictures.", images=fresh, max_tokens=8).output_ids
        assert again == first and [encoder_shards(e.grpc_url) for e in encoders] == sent, "no encoder traffic"
        assert first == stream(server.grpc_url, prompt="Compare the pictures.", images=fresh, max_tokens=8).output_ids
        assert server_metric(cached, "triton_vlm_embedding_cache_hits_total", 'tier="local"') == 2


def test_remote_encoder_gauges_say_both_are_up_and_idle(epd):
    language, encoders = epd
    stream(language.grpc_url, prompt="Compare.", images=images(4, seed=90), max_tokens=2)
    for e in encoders:  # published every second
        series = f'encoder="{e.grpc_url}"'
        wait_until(lambda s=series: (server_metric(language, "triton_vlm_remote_encoder_up", s),
                                     server_metric(language, "triton_vlm_remote_encoder_in_flight_tokens", s))
                   == (1, 0), 10, f"{e.grpc_url} up and idle")


def test_encoder_servers_hold_only_the_encoder(epd):
    _, encoders = epd
    with grpcclient.InferenceServerClient(encoders[0].grpc_url) as client:
        models = {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]}
    assert models == {"image_encoder", "vision_encoder"}


@pytest.mark.parametrize("n_images", [1, 3, 4])
def test_disaggregated_ids_equal_colocated(server, epd, n_images):
    language, encoders = epd
    before = [encoder_shards(e.grpc_url) for e in encoders]
    imgs = images(n_images)
    colocated = stream(server.grpc_url, prompt="Compare the pictures.", images=imgs, max_tokens=16)
    disaggregated = stream(language.grpc_url, prompt="Compare the pictures.", images=imgs, max_tokens=16)
    assert disaggregated.output_ids == colocated.output_ids and colocated.output_ids
    sent = [encoder_shards(e.grpc_url) - b for e, b in zip(encoders, before, strict=True)]
    assert sum(sent) == min(n_images, 2) and all(sent) == (n_images > 1)  # a shard per server, none local


def test_unreachable_encoder_at_start_falls_back_to_local_and_says_so(tiny_model, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    repo = Deployment(tiny_model, embedding_cache_mb=0,
                      mode="language", encoder_dp=1, encoder_urls=(dead,), minimal=True).render(
        tmp_path / "repo")
    with TritonServer(repo, graceful_stop=False, log_file=tmp_path / "language.log") as language:
        answer = stream(language.grpc_url, prompt="hi", images=images(2), max_tokens=4)
        assert answer.output_ids == reference_generate(tiny_model, "hi", images(2), max_new_tokens=4)
        assert server_metric(language, "triton_vlm_remote_encoder_up", f'encoder="{dead}"') == 0
    log = (tmp_path / "language.log").read_text()
    assert f"encoder server {dead} is unreachable at start" in log


def test_encoders_added_and_removed_while_serving(epd, tiny_model, tmp_path):
    _, (a, b) = epd
    urls = tmp_path / "encoders.txt"
    urls.write_text(f"{a.grpc_url}\n")
    repo = Deployment(tiny_model, embedding_cache_mb=0,
                      mode="language", encoder_dp=1, encoder_urls_file=str(urls), minimal=True).render(
        tmp_path / "r")

    def send(n_requests):
        for i in range(n_requests):
            answer = stream(language.grpc_url, prompt=f"picture {i}", images=images(3, seed=i), max_tokens=3)
            assert answer.finish_reason in ("stop", "length") and answer.output_ids

    def wait_for(*listed):  # the server logs each list it switches to
        line = f'encoder servers now: {", ".join(u.grpc_url for u in listed)}"'
        deadline = time.monotonic() + 30
        while line not in (tmp_path / "language.log").read_text():
            assert time.monotonic() < deadline, f"the server never switched to: {line}"
            time.sleep(0.2)

    with TritonServer(repo, graceful_stop=False, log_file=tmp_path / "language.log") as language:
        wait_for(a)
        before_b = encoder_shards(b.grpc_url)
        send(2)
        assert encoder_shards(b.grpc_url) == before_b, "b is not listed yet"
        urls.write_text(f"{a.grpc_url}\n{b.grpc_url}  # added while serving\n")
        wait_for(a, b)
        send(2)
        assert encoder_shards(b.grpc_url) > before_b, "the added encoder received no shard"
        urls.write_text(f"{b.grpc_url}\n")
        wait_for(b)
        before_a = encoder_shards(a.grpc_url)
        send(3)
        assert encoder_shards(a.grpc_url) == before_a, "the removed encoder still got traffic"


@pytest.fixture(scope="module")
def local_below(epd, tiny_model, tmp_path_factory):
    """A language server on the two encoders that keeps requests under 500 patches to itself, and takes
    embeddings back as gRPC tensors (the `epd` one, on loopback, takes them through shared memory)."""
    _, encoders = epd
    root = tmp_path_factory.mktemp("local_below")
    repo = Deployment(tiny_model, embedding_cache_mb=0,
                      mode="language", encoder_dp=1, encoder_urls=tuple(e.grpc_url for e in encoders),
                      local_encode_below=500, encoder_transport="grpc", minimal=True).render(root / "language")
    with TritonServer(repo, graceful_stop=False, log_file=root / "language.log") as language:
        yield language


def test_small_requests_are_encoded_locally_the_rest_remotely(local_below, epd, tiny_model):
    _, encoders = epd
    small, large = [make_image(100, 100)] * 2, images(2)  # 2 x 64 patches; 1 x 1564 + 1 x 300 patches
    for imgs, sent in ((small, 0), (large, 2)):
        before = sum(encoder_shards(e.grpc_url) for e in encoders)
        answer = stream(local_below.grpc_url, prompt="What is it?", images=imgs, max_tokens=5)
        assert answer.output_ids == reference_generate(tiny_model, "What is it?", imgs, max_new_tokens=5)
        assert sum(encoder_shards(e.grpc_url) for e in encoders) - before == sent


def test_a_corrupt_image_is_the_requests_fault_not_the_encoders(local_below, epd):
    """The header passes here; the encoder server finds the body broken: INVALID_ARG for this request,
    and no encoder is marked down (the next request still uses both)."""
    _, encoders = epd
    truncated = make_image(640, 480)[:2000]
    with pytest.raises(InferenceServerException, match="image 1 could not be decoded"):
        stream(local_below.grpc_url, prompt="What is it?", images=[images(1)[0], truncated], max_tokens=4)
    before = [encoder_shards(e.grpc_url) for e in encoders]
    stream(local_below.grpc_url, prompt="What is it?", images=images(2), max_tokens=2)
    assert all(encoder_shards(e.grpc_url) > b for e, b in zip(encoders, before, strict=True))


def shm_regions(url: str) -> set[str]:
    with grpcclient.InferenceServerClient(url) as client:
        return {r["name"] for r in client.get_system_shared_memory_status(as_json=True).get("regions", {}).values()}


def test_embeddings_come_back_through_shared_memory_on_one_host(epd, local_below):
    language, encoders = epd
    imgs = images(4)
    by_shm = stream(language.grpc_url, prompt="Compare the pictures.", images=imgs, max_tokens=8)
    # the loopback language server registered its regions with both encoders, which wrote into them
    assert all(any(name.startswith(f"{language.shm_prefix}out") for name in shm_regions(e.grpc_url))
               for e in encoders)
    by_grpc = stream(local_below.grpc_url, prompt="Compare the pictures.", images=imgs, max_tokens=8)
    assert by_shm.output_ids == by_grpc.output_ids and by_shm.output_ids


def test_an_encoder_server_refuses_too_many_images_and_keeps_serving(epd):
    _, (encoder, _) = epd

    def call(files):
        tensor = grpcclient.InferInput("_IMAGES", [len(files)], "BYTES")
        tensor.set_data_from_numpy(np.array(files, dtype=np.object_))
        with grpcclient.InferenceServerClient(encoder.grpc_url) as client:
            return client.infer("image_encoder", [tensor])

    with pytest.raises(InferenceServerException, match="9 images sent; the limit is 8") as err:
        call([make_image(32, 32)] * 9)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert call(images(2)).as_numpy("_IMAGE_LAYOUT").shape == (2, 3)


def test_killing_an_encoder_under_load_loses_no_request(epd, tiny_model):  # last: it kills an `epd` encoder
    language, encoders = epd
    requests = [(f"Set {i}: what is here?", images(2 + i % 3, seed=7 * i)) for i in range(60)]
    expected = [reference_generate(tiny_model, p, imgs, max_new_tokens=6) for p, imgs in requests]
    done = []

    def one(r):
        answer = stream(language.grpc_url, prompt=r[0], images=r[1], max_tokens=6)
        done.append(1)
        return answer

    def killer():  # a crash, not a graceful stop: SIGKILL to the server and its stubs
        while len(done) < 10:
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
