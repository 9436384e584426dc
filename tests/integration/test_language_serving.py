"""The language model as a serving engine through the real server: tensor parallelism over gloo (the
session's `tp2_server`, conftest.py), continuous batching under concurrent streams, stop strings,
cancellation, and no process left behind by a killed server. (A crashed rank 0 is test_isolation's; a
stopped `triton-vlm serve --tp 2`, test_commands'.)"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import make_image, server_metric, wait_until
from tests.integration.processes import alive, children, engine, ranks
from tests.integration.test_prefix_caching import prefix_counts
from tests.reference import reference_generate
from triton_vlm_clients.client import stream

CASES = {"text-only": [], "one-image": [(640, 480)], "three-images": [(300, 200), (800, 600), (200, 500)]}


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_give_the_same_ids_as_one(server, tp2_server, case):
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(CASES[case])]
    one = stream(server.grpc_url, prompt="Describe the pictures.", images=images, max_tokens=16)
    two = stream(tp2_server.grpc_url, prompt="Describe the pictures.", images=images, max_tokens=16)
    assert two.output_ids == one.output_ids and one.output_ids


def test_two_ranks_reuse_cached_blocks_with_the_ids_of_one(server, tp2_server):
    """Paged KV over two ranks: a repeated three-image prompt is served from the prefix cache (each rank
    holds its heads of the same blocks) and answers as one rank does, cold and warm."""
    images = [make_image(w, h, seed=90 + i) for i, (w, h) in enumerate(CASES["three-images"])]
    one = stream(server.grpc_url, prompt="Compare the pictures.", images=images, max_tokens=16)
    send = functools.partial(stream, tp2_server.grpc_url, prompt="Compare the pictures.", images=images, max_tokens=16)
    _, _, cold = prefix_counts(tp2_server, send)
    _, hits, warm = prefix_counts(tp2_server, send)
    assert hits >= (warm.num_input_tokens - 1) // 16 * 16 and cold.output_ids == warm.output_ids == one.output_ids


def test_eight_concurrent_streams_equal_transformers(tp2_server, tiny_model):
    prompts = [("hi", 0), ("describe the picture in detail", 1), ("what color is the sky", 0), ("one two", 2),
               ("is there a cat here", 1), ("compare both images", 2), ("the road", 0), ("why", 1)]
    requests = [(p, [make_image(160, 120, seed=10 * i + j) for j in range(n)], 10 + i)
                for i, (p, n) in enumerate(prompts)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: stream(tp2_server.grpc_url, prompt=r[0], images=r[1], max_tokens=r[2]),
                                requests))
    assert [a.output_ids for a in answers] == [reference_generate(tiny_model, p, imgs, n) for p, imgs, n in requests]


def test_stop_strings_through_the_server(server):
    full = stream(server.grpc_url, prompt="describe the picture", max_tokens=24)
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = stream(server.grpc_url, prompt="describe the picture", max_tokens=24, stop=[stop, "never there"])
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"


def test_engine_metrics_count_a_request(server):
    """Prefill tokens are the prompt's that the prefix cache did not have, decode tokens the rest of the
    output; TTFT is observed once, within what the client saw; the batch is empty again afterwards."""
    names = ("triton_vlm_prefill_tokens_total", "triton_vlm_decode_tokens_total",
             "triton_vlm_time_to_first_token_seconds_count", "triton_vlm_time_to_first_token_seconds_sum",
             "triton_vlm_prefix_cache_queries_total", "triton_vlm_prefix_cache_hits_total")
    busy = ("triton_vlm_running_sequences", "triton_vlm_waiting_sequences")
    wait_until(lambda: all(server_metric(server, g) == 0 for g in busy), 60, "no other module's request in flight")
    before = [server_metric(server, name) for name in names]
    answer = stream(server.grpc_url, prompt="Describe it.", images=[make_image(200, 150, seed=41)], max_tokens=12,
                    ignore_eos=True)
    assert len(answer.output_ids) == 12

    def grown():
        return [server_metric(server, name) - b for name, b in zip(names, before, strict=True)]

    wait_until(lambda: grown()[1] >= 11 and grown()[2] >= 1, 30, "the metrics of the request")
    prefill, decode, _, ttft_s, queries, hits = grown()
    assert queries == answer.num_input_tokens and prefill == queries - hits and decode == 11
    assert 0 < ttft_s <= answer.ttft_s
    for gauge in ("triton_vlm_running_sequences", "triton_vlm_waiting_sequences", "triton_vlm_kv_blocks_in_use"):
        assert server_metric(server, gauge) == 0, gauge


class _Enough(Exception):
    pass


def test_an_abandoned_stream_ends_its_generation_and_the_next_request_succeeds(server):
    cancelled = server_metric(server, "triton_vlm_finished_sequences_total", 'finish_reason="cancelled"')
    deltas = []

    def three_deltas(text, ids):
        deltas.append(ids)
        if len(deltas) == 3:
            raise _Enough

    with pytest.raises(_Enough):  # the client stops reading: it cancels the stream and ends the request by id
        stream(server.grpc_url, prompt="go on and on", max_tokens=3000, ignore_eos=True, on_delta=three_deltas)
    wait_until(lambda: server_metric(server, "triton_vlm_kv_blocks_in_use") == 0, 60, "the blocks to come back")
    wait_until(lambda: server_metric(server, "triton_vlm_finished_sequences_total", 'finish_reason="cancelled"')
               == cancelled + 1, 10, "a cancelled sequence")  # the stream's counter may come after the gauge
    answer = stream(server.grpc_url, prompt="hi", max_tokens=4)
    assert answer.finish_reason in ("stop", "length") and answer.output_ids


def test_no_stub_rank_or_region_outlives_a_killed_server(tp2_server):  # last: it ends the session's tp2_server
    stubs = children(tp2_server.process.pid, "model.py")
    assert len(stubs) >= 6
    rank0 = engine(tp2_server)  # the language engine, the language_model stub's child, and its other rank
    processes = stubs | {rank0} | ranks(rank0)
    assert len(processes) == len(stubs) + 2
    tp2_server.process.kill()  # the server alone, as the OOM killer would: not its process group
    tp2_server.process.wait()
    wait_until(lambda: not any(map(alive, processes)), timeout_s=30, what="the stubs, the engine and its rank to exit")
    assert not list(Path("/dev/shm").glob(f"{tp2_server.shm_prefix}*"))
