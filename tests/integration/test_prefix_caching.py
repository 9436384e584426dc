"""The paged KV cache through the real server: prefix reuse across chat turns with transformers' ids, images
told apart by content (never by their placeholder ids), cold and warm answers alike, and a pool that runs
max_num_seqs at once. A pool too small for all its sequences (preemption, chunked prefill, a prompt that
never fits) is the engine's alone: tests/unit/test_small_pool.py."""

from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

from transformers import AutoConfig

from tests.conftest import make_image, server_metric, wait_until
from tests.reference import reference_generate, reference_inputs
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
        # read together, and waited for: under load the last 4 may still be on their way to the language model
        wait_until(lambda: (server_metric(server, "triton_vlm_running_sequences"),
                            server_metric(server, "triton_vlm_waiting_sequences") >= 1) == (8, True), 120,
                   "8 running at once and the rest waiting")
        enough.set()
        for f in futures:
            f.result()
    wait_until(lambda: server_metric(server, "triton_vlm_kv_blocks_in_use") == 0, 60, "the blocks back")
