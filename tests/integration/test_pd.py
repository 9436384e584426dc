"""Prefill/decode disaggregation (E/P/D) through real servers on loopback: 1 prefill + 1 decode servers, and
the session's colocated server as the encoder server. The decode server is the entry point: its images are
encoded on the colocated server, its prompts prefilled on a `--mode prefill` server (listed in a file,
re-read while serving), the KV written into its memory by NIXL. (1P + 1D + 2E, with a `--mode encoder`
server, is Qwen3-VL's family test.) A second decode server, the same but for its prefill server's address
given on the command line, takes the KV inside the gRPC answer (the parity cases run on both). The two
decode servers' embedding caches share a Redis tier (a real redis-server, which one test starts and stops).
The per-family parity of E/P/D (Qwen3-VL's deepstack and M-RoPE, GLM-4.5V-MoE from TP 2 to TP 1, over gRPC
or NIXL) is in the family tests; the engine's hand-off rules without servers in
tests/unit/test_kv_handoff.py."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import make_image, redis_server, wait_until
from tests.integration.serve import encoder_shards, relist, serving
from tests.reference import reference_generate
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import free_port
from triton_vlm_clients.client import stream
from triton_vlm_clients.prometheus import server_metric

PROMPT = "Compare the pictures."
REMOTE, LOCAL = 'where="remote"', 'where="local"'
BYTES = "triton_vlm_kv_transfer_bytes_total"


class PD:
    def __init__(self, decode, grpc_decode, prefill, urls_file, redis_port: int) -> None:
        self.decode, self.prefill, self.urls_file, self.redis_port = decode, prefill, urls_file, redis_port
        self.by_transport = {"nixl": decode, "grpc": grpc_decode}

    def prefills(self, where: str) -> float:
        return server_metric(self.decode, "triton_vlm_prefills_total", where)

    def listed(self, *urls: str) -> None:
        relist(self.decode, self.urls_file, "prefill", list(urls))


@pytest.fixture(scope="module")
def pd(server, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pd")
    with serving((Deployment(tiny_model, mode="prefill", kv_transport="nixl"), root / "prefill")) as prefill:
        urls_file = root / "prefill.txt"
        urls_file.write_text(f"{prefill.grpc_url}\n")
        redis_port = free_port()  # the shared tier of both decode servers' embedding caches, started by a test
        common = dict(mode="decode", encoder_dp=1, minimal=True, encoder_fallback="none", preprocess_instances=1,
                      encoder_urls=(server.grpc_url,), embedding_cache_redis=f"redis://127.0.0.1:{redis_port}")
        decode = Deployment(tiny_model, prefill_urls_file=str(urls_file), kv_transport="nixl", **common)
        grpc_decode = Deployment(tiny_model, prefill_urls=(prefill.grpc_url,), kv_transport="grpc", **common)
        with serving((decode, root / "decode"), (grpc_decode, root / "grpc-decode")) as (d, g):
            yield PD(d, g, prefill, urls_file, redis_port)


def images(n: int, seed: int) -> list[bytes]:
    sizes = [(640, 480), (300, 200), (800, 600), (200, 500)]
    return [make_image(w, h, seed=60_000 + seed + i) for i, (w, h) in enumerate(sizes[:n])]


@pytest.mark.parametrize("transport", ["nixl", "grpc"])
@pytest.mark.parametrize("n_images", [0, 1, 4])
def test_greedy_ids_equal_transformers_and_the_kv_came_from_the_prefill_server(pd, tiny_model, n_images, transport):
    """Both decode servers prefill on the one prefill server; one takes the KV by NIXL, the other inside the
    gRPC answer."""
    imgs, decode = images(n_images, seed=10 * n_images), pd.by_transport[transport]
    metric = lambda name, labels: server_metric(decode, name, labels)  # noqa: E731
    remote, sent = metric("triton_vlm_prefills_total", REMOTE), metric(BYTES, f'transport="{transport}"')
    answer = stream(decode.grpc_url, prompt=PROMPT, images=imgs, max_tokens=16)
    assert answer.output_ids == reference_generate(tiny_model, PROMPT, imgs, max_new_tokens=16)
    assert metric("triton_vlm_prefills_total", REMOTE) == remote + 1
    assert metric(BYTES, f'transport="{transport}"') > sent
    assert server_metric(pd.prefill, "triton_vlm_finished_sequences_total", 'finish_reason="prefilled"') > 0


def test_seeded_sampling_continues_on_the_decode_server_as_on_one_server(pd, server):
    """The prefill server samples the first token; the sampler's state comes with the KV."""
    imgs, sampling = images(1, seed=100), dict(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    one = stream(server.grpc_url, prompt=PROMPT, images=imgs, **sampling)
    assert stream(pd.decode.grpc_url, prompt=PROMPT, images=imgs, **sampling).output_ids == one.output_ids


def test_a_second_turn_ships_only_the_kv_the_decode_server_lacks(pd, tiny_model):
    imgs = images(1, seed=200)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    sent = server_metric(pd.decode, BYTES)
    first = stream(pd.decode.grpc_url, messages=json.dumps(turn), images=imgs, max_tokens=8)
    first_bytes = server_metric(pd.decode, BYTES) - sent
    turn += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the colours?"}]
    second = stream(pd.decode.grpc_url, messages=json.dumps(turn), images=imgs, max_tokens=8)
    second_bytes = server_metric(pd.decode, BYTES) - sent - first_bytes
    assert second.output_ids == reference_generate(tiny_model, "", imgs, 8, messages=turn)
    per_token = first_bytes / first.num_input_tokens
    assert 0 < second_bytes < first_bytes / 4, "turn 1's prompt was cached on the decode server"
    assert second_bytes / per_token <= second.num_input_tokens - first.num_input_tokens + 16 + 1  # a block's slack


def test_the_prefill_servers_gauges_say_it_is_up_and_idle(pd):
    series = f'prefill="{pd.prefill.grpc_url}"'
    wait_until(lambda: (server_metric(pd.decode, "triton_vlm_remote_prefill_up", series),
                        server_metric(pd.decode, "triton_vlm_remote_prefill_in_flight_tokens", series)) == (1, 0),
               10, "up and idle")
    assert server_metric(pd.decode, "triton_vlm_kv_transfer_seconds_count") > 0


def test_a_prefill_server_refuses_a_bad_hand_off_request_and_keeps_serving(pd):
    ids = np.array([1, 2, 3], np.int64)
    tensors = {"_INPUT_IDS": ids, "_IMAGE_EMBEDS": np.zeros((0, 64), np.float32),
               "_IMAGE_LAYOUT": np.zeros((0, 3), np.int64), "_SAMPLING": np.array([b"{}"], np.object_),
               "_KV_FROM": np.array([7], np.int64)}
    errors = []
    with grpcclient.InferenceServerClient(pd.prefill.grpc_url) as client:
        client.start_stream(lambda result, error: errors.append(error))
        inputs = []
        for name, array in tensors.items():
            inputs.append(grpcclient.InferInput(name, list(array.shape), {np.int64: "INT64", np.float32: "FP32"}.get(
                array.dtype.type, "BYTES")))
            inputs[-1].set_data_from_numpy(array)
        client.async_stream_infer("language_model", inputs)
        wait_until(lambda: errors, 30, "the answer")
        client.stop_stream()
    assert isinstance(errors[0], InferenceServerException)
    assert "invalid request: kv_from 7 is outside the prompt's 3 tokens" in errors[0].message()
    answer = stream(pd.decode.grpc_url, prompt="Still there?", max_tokens=4)
    assert answer.output_ids


def test_with_every_prefill_server_down_the_decode_server_prefills_itself(pd, tiny_model):
    dead = f"127.0.0.1:{free_port()}"
    pd.listed(dead)
    try:
        imgs = images(2, seed=300)
        local = pd.prefills(LOCAL)
        answer = stream(pd.decode.grpc_url, prompt=PROMPT, images=imgs, max_tokens=10)
        assert answer.output_ids == reference_generate(tiny_model, PROMPT, imgs, max_new_tokens=10)
        assert pd.prefills(LOCAL) == local + 1
    finally:
        pd.listed(pd.prefill.grpc_url)


LOCAL_MISSES = ("triton_vlm_embedding_cache_misses_total", 'tier="local"')
REDIS_HITS = ("triton_vlm_embedding_cache_hits_total", 'tier="redis"')
REDIS_RETRY_S = 5  # RedisTier's bypass interval after a failure


def test_two_servers_share_embeddings_through_redis_and_survive_it_going_away(pd, server, tiny_model):
    """The decode servers' embedding caches share a real redis-server: what one had encoded on the encoder
    server, the other takes from Redis, sending no file. With Redis gone both keep serving (as misses); once
    it is back, and its bypass interval over, they share again. (Before this test it was down: the first
    share waits out the bypass too.)"""
    a, b = pd.decode, pd.by_transport["grpc"]
    answer = lambda s, imgs: stream(s.grpc_url, prompt=PROMPT, images=imgs, max_tokens=12).output_ids  # noqa: E731
    with redis_server(pd.redis_port):
        time.sleep(REDIS_RETRY_S + 1)  # each server's tier has been down for the tests before: bypassed a while
        imgs = images(2, seed=500)
        expected = reference_generate(tiny_model, PROMPT, imgs, max_new_tokens=12)
        assert answer(a, imgs) == expected
        hits, misses = server_metric(b, *REDIS_HITS), server_metric(b, *LOCAL_MISSES)
        sent = encoder_shards(server.grpc_url)
        assert answer(b, imgs) == expected
        assert server_metric(b, *REDIS_HITS) == hits + 2 and server_metric(b, *LOCAL_MISSES) == misses
        assert encoder_shards(server.grpc_url) == sent, "B sent a file to the encoder server"
    fresh = images(1, seed=510)
    for decode in (a, b):
        assert answer(decode, fresh) == reference_generate(tiny_model, PROMPT, fresh, max_new_tokens=12)
    with redis_server(pd.redis_port):
        time.sleep(REDIS_RETRY_S + 1)
        again, hits = images(1, seed=520), server_metric(b, *REDIS_HITS)
        assert answer(a, again) == answer(b, again)
        assert server_metric(b, *REDIS_HITS) == hits + 1


def test_killing_the_prefill_server_under_load_loses_no_request(pd, server):  # last: it kills the prefill server
    requests = [(f"Picture {i}: what is here?", images(1 + i % 2, seed=400 + 3 * i)) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:  # what one server answers (its parity is tested elsewhere)
        expected = list(pool.map(lambda r: stream(server.grpc_url, prompt=r[0], images=r[1], max_tokens=8).output_ids,
                                 requests))
    remote = pd.prefills(REMOTE)

    def killer():  # a crash: SIGKILL to the server and its stubs, once some prompts were prefilled there
        deadline = time.monotonic() + 60
        while pd.prefills(REMOTE) < remote + 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(pd.prefill.process.pid, signal.SIGKILL)
        pd.prefill.process.wait()

    kill = threading.Thread(target=killer)
    kill.start()
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda r: stream(pd.decode.grpc_url, prompt=r[0], images=r[1], max_tokens=8),
                                requests))
    kill.join()
    assert pd.prefill.process.poll() is not None, "the prefill server was not killed during the run"
    assert [a.output_ids for a in answers] == expected
    assert pd.prefills(REMOTE) >= remote + 4 and pd.prefills(LOCAL) > 0
    series = f'prefill="{pd.prefill.grpc_url}"'
    wait_until(lambda: server_metric(pd.decode, "triton_vlm_remote_prefill_up", series) == 0, 10, "its gauge")
