"""Both kinds of caller: streaming `vlm` (gRPC stream, HTTP generate_stream) and unary `vlm_unary`."""

from __future__ import annotations

import json
import urllib.request

from tests.conftest import make_image
from triton_vlm_clients.client import infer, stream

PROMPT = "What is in the picture?"


def test_grpc_stream_is_incremental_and_matches_unary(server):
    images = [make_image(320, 240)]
    streamed = stream(server.grpc_url, prompt=PROMPT, images=images, max_tokens=12)
    unary = infer(server.grpc_url, protocol="grpc", prompt=PROMPT, images=images, max_tokens=12)
    # one response per new token, or a few merged when the server's sender falls behind
    assert len(streamed.output_ids) > 1 and 1 < len(streamed.tokens_per_response) <= len(streamed.output_ids)
    assert sum(streamed.tokens_per_response) == len(streamed.output_ids)
    assert streamed.text == unary.text and streamed.output_ids == unary.output_ids
    assert streamed.finish_reason == unary.finish_reason


def test_http_and_grpc_infer_give_the_whole_answer(server):
    images = [make_image(300, 200), make_image(200, 300, seed=3)]
    over_http = infer(server.http_url, protocol="http", prompt=PROMPT, images=images, max_tokens=10)
    over_grpc = infer(server.grpc_url, protocol="grpc", prompt=PROMPT, images=images, max_tokens=10)
    assert over_http.output_ids == over_grpc.output_ids and len(over_http.output_ids) >= 1
    assert over_http.text == over_grpc.text
    assert over_http.finish_reason in ("stop", "length")


def test_messages_input_with_a_data_url_image(server):
    import base64

    url = "data:image/png;base64," + base64.b64encode(make_image(320, 240)).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": PROMPT}]}]
    via_messages = infer(server.grpc_url, protocol="grpc", messages=messages, max_tokens=8)
    via_images = infer(server.grpc_url, protocol="grpc", prompt=PROMPT, images=[make_image(320, 240)], max_tokens=8)
    assert via_messages.output_ids == via_images.output_ids


def test_http_generate_stream_sends_server_sent_events(server):
    body = json.dumps({"text_input": PROMPT, "max_tokens": 24, "stream": True}).encode()
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/vlm/generate_stream", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        events = [json.loads(line[5:]) for line in resp.read().decode().splitlines() if line.startswith("data:")]
    assert len(events) > 1
    assert events[-1]["finish_reason"] in ("stop", "length")
    text = "".join(e["text_output"] for e in events)
    assert text == infer(server.http_url, protocol="http", prompt=PROMPT, max_tokens=24).text
