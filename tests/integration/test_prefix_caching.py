"""The paged KV cache through the real server: prefix reuse across chat turns with transformers' ids, images
told apart by content (never by their placeholder ids), cold and warm answers alike, and a pool too small
for all sequences at once: preemption that loses and changes nothing, and a prompt that can never fit."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoConfig
from tritonclient.utils import InferenceServerException

from tests.conftest import make_image, server_metric, wait_until
from tests.reference import reference_generate, reference_inputs
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import TritonServer
from triton_vlm_clients.client import stream

BLOCK = 16  # the committed repository's block_size
QUERIES, HITS = "triton_vlm_prefix_cache_queries_total", "triton_vlm_prefix_cache_hits_total"


def prefix_counts(server, send) -> tuple[int, int, object]:
    """(prompt tokens looked up, tokens found cached, the answer) of the one request `send()` makes."""
    before = server_metric(server, QUERIES), server_metric(server, HITS)
    answer = send()
    wait_until(lambda: server_metric(server, QUERIES) - before[0] >= answer.num_input_tokens, 30, "the lookups")
    return server_metric(server, QUERIES) - before[0], server_metric(server, HITS) - before[1], answer


def conversation(turns: int, answers: list[str], seed: int) -> tuple[list[dict], list[bytes]]:
    """A chat of `turns` user turns, each with 2 new images and a question, with the earlier answers."""
    messages, images = [], []
    for t in range(turns):
        images += [make_image(160 + 32 * t, 120, seed=seed + 2 * t),
                   make_image(120, 160 + 32 * t, seed=seed + 1 + 2 * t)]
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                     {"type": "text", "text": f"what changed in turn {t + 1}?"}]})
        if t < turns - 1:
            messages.append({"role": "assistant", "content": answers[t]})
    return messages, images


def check_chat(server, model, seed: int) -> None:
    """3 turns, each resending the earlier images and answers and adding 2 new images: each turn's ids are
    transformers' for the whole conversation, and turn 2 finds all of turn 1's prompt cached, by whole blocks."""
    answers, prompts = [], []
    for turn in range(1, 4):
        messages, images = conversation(turn, answers, seed)
        queries, hits, answer = prefix_counts(server, lambda m=messages, i=images: stream(
            server.grpc_url, messages=json.dumps(m), images=i, max_tokens=8))
        assert answer.output_ids == reference_generate(model, "", images, 8, messages=messages), f"turn {turn}"
        assert queries == answer.num_input_tokens
        if turn == 2:
            assert hits >= prompts[0] // BLOCK * BLOCK
        prompts.append(answer.num_input_tokens)
        answers.append(answer.text)


def check_other_pixels_miss(server, model, seed: int) -> None:
    """Two requests with the same text and same-size images of other pixels: the second finds nothing cached
    from its first image token on, and gets transformers' ids; sent again, it is cached, with the same ids."""
    prompt = "Describe the picture."
    first, second = make_image(224, 168, seed=seed), make_image(224, 168, seed=seed + 1)
    stream(server.grpc_url, prompt=prompt, images=[first], max_tokens=4)
    ids = reference_inputs(model, prompt, [second])["input_ids"][0].tolist()
    image_token = ids.index(AutoConfig.from_pretrained(model).image_token_id)
    _, hits, cold = prefix_counts(server, lambda: stream(server.grpc_url, prompt=prompt, images=[second],
                                                         max_tokens=12))
    assert hits <= image_token // BLOCK * BLOCK, "KV of another image was reused"
    assert cold.output_ids == reference_generate(model, prompt, [second], 12)
    _, hits, warm = prefix_counts(server, lambda: stream(server.grpc_url, prompt=prompt, images=[second],
                                                         max_tokens=12))
    assert hits > image_token and warm.output_ids == cold.output_ids


def test_a_chat_reuses_its_earlier_turns_and_answers_as_transformers_does(server, tiny_model):
    check_chat(server, tiny_model, seed=500)


def test_same_size_images_with_other_pixels_are_never_served_from_the_cache(server, tiny_model):
    check_other_pixels_miss(server, tiny_model, seed=71)


@pytest.fixture(scope="module")
def small_pool(tiny_model, tmp_path_factory):
    """A pool of 128 blocks (2048 tokens: 1 MiB at 512 bytes a token) for up to 16 sequences, and steps of
    at most 32 tokens (long prompts are prefilled in many chunks)."""
    root = tmp_path_factory.mktemp("small-pool")
    repo = Deployment(tiny_model, minimal=True, kv_cache_mb=1, max_num_seqs=16, max_num_batched_tokens=32,
                      encoder_dp=1).render(root / "repository")
    triton = TritonServer(repo, graceful_stop=False, log_file=root / "tritonserver.log")
    try:
        yield triton.start().wait_ready(timeout_s=300)
    finally:
        triton.stop()


def test_more_sequences_than_the_pool_holds_all_finish_with_their_own_ids(small_pool):
    # Each request needs about 23 blocks (a 192-token image, 150 tokens out), so any 6 of the 12 at once
    # exhaust the 128 blocks, even when load on the machine staggers their arrival.
    requests = [dict(prompt=f"story number {i}", images=[make_image(448, 336, seed=600 + i)], max_tokens=150,
                     ignore_eos=True) for i in range(12)]
    alone = [stream(small_pool.grpc_url, **r).output_ids for r in requests]
    preempted = server_metric(small_pool, "triton_vlm_preemptions_total")
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: stream(small_pool.grpc_url, **r), requests))
    assert all(len(a.output_ids) == 150 and a.finish_reason == "length" for a in together)
    assert [a.output_ids for a in together] == alone
    wait_until(lambda: server_metric(small_pool, "triton_vlm_preemptions_total") > preempted, 30, "preemptions")
    assert server_metric(small_pool, "triton_vlm_kv_blocks_total") == 128
    wait_until(lambda: server_metric(small_pool, "triton_vlm_kv_blocks_in_use") == 0, 30, "the blocks back")


def test_a_prompt_larger_than_the_pool_is_refused_and_the_next_one_served(small_pool):
    with pytest.raises(InferenceServerException, match="the KV cache holds 2048 tokens") as e:
        stream(small_pool.grpc_url, prompt="red " * 2500, max_tokens=4)
    assert "invalid request" in str(e.value)
    assert stream(small_pool.grpc_url, prompt="hi", max_tokens=4).output_ids


class _Enough(Exception):
    pass


def test_a_larger_pool_runs_max_num_seqs_at_once(server):
    """12 long streams on the committed repository (max_num_seqs 8, a pool for 8 whole contexts): 8 run at
    once and the rest wait; then the clients leave, and every block comes back."""
    enough = threading.Event()

    def until_enough(text, ids):
        if enough.is_set():
            raise _Enough

    def one(i):
        with contextlib.suppress(_Enough):
            stream(server.grpc_url, prompt=f"count {i}", max_tokens=3000, ignore_eos=True, on_delta=until_enough)

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, i) for i in range(12)]
        wait_until(lambda: server_metric(server, "triton_vlm_running_sequences") == 8, 120, "8 running at once")
        assert server_metric(server, "triton_vlm_waiting_sequences") >= 1
        enough.set()
        for f in futures:
            f.result()
    wait_until(lambda: server_metric(server, "triton_vlm_kv_blocks_in_use") == 0, 60, "the blocks back")


def test_streams_keep_decoding_while_a_long_prompt_is_prefilled_in_chunks(small_pool):
    """4 streams decode; a 2-image prompt of L tokens arrives. From its admission (the running gauge reaches
    5) to its first token, each step has room for 28 of its tokens after the 4 decodes, so the streams
    produce tokens in every one of about L / 28 steps (unchunked, it would take one step: no tokens)."""
    images = [make_image(640, 480, seed=801), make_image(480, 640, seed=802)]
    # the images' embeddings cached first (text before them here, so no KV of theirs is): the prompt is
    # admitted a few steps after it arrives, long before the streams end
    warm = [{"role": "user", "content": [{"type": "text", "text": "first look"}, {"type": "image"}, {"type": "image"}]}]
    stream(small_pool.grpc_url, messages=json.dumps(warm), images=images, max_tokens=1)
    events, lock = [], threading.Lock()

    def note(what: str, n: int = 1) -> None:
        with lock:
            events.extend([what] * n)

    started = set()

    def decoded(i: int, ids) -> None:
        started.add(i)
        note("token", len(ids))

    with ThreadPoolExecutor(5) as pool:
        # 4 x (prompt + 250) + the long prompt's ~800 tokens fit the pool: nothing is preempted. The long
        # prompt comes as soon as every stream decodes, so that they are still running when it is admitted
        # (on a loaded machine, waiting for more tokens let the streams end before its admission)
        streams = [pool.submit(stream, small_pool.grpc_url, prompt=f"stream {i}", max_tokens=250, ignore_eos=True,
                               on_delta=lambda text, ids, i=i: decoded(i, ids)) for i in range(4)]
        wait_until(lambda: len(started) == 4, 60, "every stream to decode")
        long = pool.submit(stream, small_pool.grpc_url, prompt="compare them", images=images, max_tokens=2,
                           on_delta=lambda text, ids: note("first") if ids else None)
        while "first" not in events:
            if "admitted" not in events and server_metric(small_pool, "triton_vlm_running_sequences") >= 5:
                note("admitted")
            time.sleep(0.005)
        answer = long.result()
        assert all(len(s.result().output_ids) == 250 for s in streams)
    with lock:
        between = events[events.index("admitted"):events.index("first")].count("token")
    steps = answer.num_input_tokens // 28
    assert steps >= 20 and between >= 4 * (steps // 2), (answer.num_input_tokens, between)
