"""The OpenAI API (`triton-vlm openai`, in front of the session's separately started server), called with
the official `openai` package: same answers as the `vlm` ensemble, OpenAI's stream format and errors,
cancellation and concurrency."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.conftest import make_image, server_metric, wait_until
from tests.reference import reference_generate, reference_inputs, reference_video_generate
from triton_vlm.deploy.server import free_port, stop_process_group
from triton_vlm_clients.client import stream
from triton_vlm_clients.clips import make_clip

BIN = Path(sys.executable).parent
PROMPT = "Compare the two pictures."
SERVED = "vlm"  # the committed repository names no model_path: the id is the ensemble's name


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def chat(prompt: str, images: list[bytes]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


def start_frontend(triton_url: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`triton-vlm openai` as a user runs it; ready when /v1/models answers 200."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen([str(BIN / "triton-vlm"), "openai", "--triton-url", triton_url, "--host",
                                    "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def wait_status(url: str, status: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, "the front end exited"
        if _status(url) == status:
            return
        assert time.monotonic() < deadline, f"{url} never answered {status}"
        time.sleep(0.2)


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


@pytest.fixture(scope="module")
def api(server, tmp_path_factory):
    process, base = start_frontend(server.grpc_url, tmp_path_factory.mktemp("openai") / "frontend.log")
    try:
        wait_status(f"{base}/v1/models", 200, process)
        yield base
    finally:
        stop_process_group(process, timeout_s=10)


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    # the committed repository names no model_path (the server has $TRITON_VLM_MODEL): the id is the
    # ensemble's name; `serve --openai-port` lists the model's folder (test_commands.py)
    assert [m.id for m in client.models.list().data] == [SERVED]


def test_a_model_it_does_not_serve_is_not_found_and_the_next_request_served(client):
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=chat("hi", []), max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        list(client.chat.completions.create(model="other/vlm", messages=chat("hi", []), max_tokens=2, stream=True))
    assert client.chat.completions.create(model=SERVED, messages=chat("hi", []), max_tokens=2).choices


def test_chat_with_two_images_equals_the_vlm_ensemble(client, server, tiny_model):
    images = [make_image(160, 120, seed=1), make_image(90, 140, seed=2)]
    messages = chat(PROMPT, images)
    direct = stream(server.grpc_url, messages=messages, max_tokens=16, temperature=0.0)
    whole = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=SERVED, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert whole.choices[0].message.content == direct.text
    assert "".join(c.choices[0].delta.content or "" for c in content) == direct.text
    assert len(content) > 1 and content[0].choices[0].delta.role == "assistant"
    assert whole.model == SERVED and whole.choices[0].finish_reason == direct.finish_reason
    assert content[-1].choices[0].finish_reason == direct.finish_reason
    # usage: the real counts, against transformers' own prompt and answer
    expected = reference_generate(tiny_model, PROMPT, images, max_new_tokens=16)
    prompt_tokens = reference_inputs(tiny_model, PROMPT, images)["input_ids"].shape[1]
    assert direct.output_ids == expected
    for usage in (whole.usage, chunks[-1].usage):
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, len(expected))
        assert usage.total_tokens == prompt_tokens + len(expected)


def test_a_video_url_streams_and_its_tokens_count_in_usage(client, server, tiny_model):
    """vLLM's `video_url` part with a data: URL, and `mm_processor_kwargs`: the same answer as the ensemble's,
    streamed, and the prompt's tokens (the video's among them, as transformers counts them) in usage."""
    clip = make_clip(seed=61)
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    kwargs = {"mm_processor_kwargs": {"fps": 4}}
    direct = stream(server.grpc_url, messages=[{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": "What happens?"}]}], videos=[clip], max_tokens=10, **kwargs)
    chunks = list(client.chat.completions.create(model=SERVED, messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.text
    reference = [{"role": "user", "content": [{"type": "video", "file": "v.mp4"},
                                              {"type": "text", "text": "What happens?"}]}]
    prompt, expected = reference_video_generate(tiny_model, reference, {"v.mp4": clip}, 10, fps=4)
    assert direct.output_ids == expected
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), len(expected))
    assert usage.prompt_tokens > 3 * 15  # 3 s at 4 fps: 6 temporal patches of 15 tokens each


def test_the_stream_is_openai_server_sent_events(api):
    body = {"model": SERVED, "messages": chat("hi", [make_image(64, 64)]), "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    request = urllib.request.Request(f"{api}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.read().decode().splitlines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content, usage = chunks[:-1], chunks[-1]
    assert content[0]["choices"][0]["delta"]["role"] == "assistant" and content[0]["choices"][0]["delta"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * (len(content) - 1) + ["length"]
    assert all(c["usage"] is None and c["object"] == "chat.completion.chunk" for c in content)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert len({c["id"] for c in chunks}) == 1
    # vLLM's continuous_usage_stats (AIPerf's --per-chunk-usage): the running count on every chunk
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    with urllib.request.urlopen(urllib.request.Request(f"{api}/v1/chat/completions", json.dumps(body).encode(),
                                                       {"Content-Type": "application/json"}), timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.read().decode().splitlines() if line and "[DONE]" not in line]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == 6


def test_completions_take_the_prompt_as_it_is(client, server):
    whole = client.completions.create(model=SERVED, prompt="Once upon a time", max_tokens=8)
    direct = stream(server.grpc_url, prompt="Once upon a time", chat_template=False, max_tokens=8)
    templated = stream(server.grpc_url, prompt="Once upon a time", max_tokens=8)
    assert whole.choices[0].text == direct.text
    assert whole.usage.prompt_tokens == direct.num_input_tokens < templated.num_input_tokens
    assert whole.usage.completion_tokens == len(direct.output_ids)


def test_ignore_eos_and_min_tokens_fix_the_output_length(client):
    for extra in ({"ignore_eos": True}, {"min_tokens": 12}):
        answer = client.chat.completions.create(model=SERVED, messages=chat("hi", []), max_tokens=12, extra_body=extra)
        assert answer.usage.completion_tokens == 12 and answer.choices[0].finish_reason == "length"


TOO_MANY = [make_image(32, 32, seed=i) for i in range(9)]
BAD = {
    "corrupt image": dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"x" * 99).decode()}},
        {"type": "text", "text": "what"}]}]),
    "corrupt video": dict(messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(b"x" * 99).decode()}},
        {"type": "text", "text": "what"}]}]),
    "video from a private address": dict(messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "http://10.0.0.1/a.mp4"}}]}]),
    "bad mm_processor_kwargs": dict(extra_body={"mm_processor_kwargs": {"fps": -1}}),
    "not an image url": dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]),
    "private address": dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/a.png"}}]}]),
    "too many images": dict(messages=chat("what", TOO_MANY)),
    "too long a prompt": dict(messages=chat("word " * 40000, [])),
    "temperature": dict(temperature=-0.5),
    "top_p": dict(top_p=1.5),
    "max_tokens": dict(max_tokens=0),
    "n": dict(n=2),
    "min_tokens over max_tokens": dict(max_tokens=4, extra_body={"min_tokens": 5}),
    "bad message role": dict(messages=[{"role": "robot", "content": "hi"}]),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_400_and_the_next_request_succeeds(client, case, streaming):
    request = {"model": SERVED, "messages": chat("hi", [make_image(48, 48)]), "max_tokens": 4, **BAD[case]}
    with pytest.raises(openai.BadRequestError) as e:
        answer = client.chat.completions.create(**request, stream=streaming)
        list(answer) if streaming else None
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    good = client.chat.completions.create(model=SERVED, messages=chat("hi", [make_image(48, 48)]), max_tokens=3)
    assert good.usage.completion_tokens >= 1


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"messages": "hi"}', b'{"messages": [], "model": "vlm"}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "stop": 3}'])
def test_a_malformed_body_is_an_openai_400(api, body):
    request = urllib.request.Request(f"{api}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400
    error = json.loads(e.value.read())["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


CANCELLED = ("triton_vlm_finished_sequences_total", 'finish_reason="cancelled"')


def test_a_client_that_disconnects_frees_its_kv_blocks(client, server):
    cancelled = server_metric(server, *CANCELLED)
    answer = client.chat.completions.create(model=SERVED, messages=chat("tell a long story", []), stream=True,
                                            extra_body={"ignore_eos": True})  # until the context is full
    chunks = iter(answer)
    for _ in range(3):
        next(chunks)
    # no scrape of the blocks here: a scrape delayed by load outlasted the whole stream once (its ~4000 tokens
    # take ~7 s); the cancelled count below shows the sequence still ran when the client left
    answer.close()  # the connection goes: the front end cancels the Triton request
    wait_until(lambda: server_metric(server, "triton_vlm_kv_blocks_in_use") == 0, 60, "the blocks to come back")
    # ended by the cancel, not by a full context (the engine's gauge and the stream's counter are published
    # apart: the counter may come a moment after the blocks)
    wait_until(lambda: server_metric(server, *CANCELLED) == cancelled + 1, 10, "a cancelled sequence")
    assert client.chat.completions.create(model=SERVED, messages=chat("hi", []), max_tokens=2).usage.completion_tokens


def test_32_concurrent_streams(api, server):
    prompts = [f"count the number {i}" for i in range(4)]
    solo = {p: stream(server.grpc_url, messages=chat(p, []), max_tokens=8, ignore_eos=True).text for p in prompts}

    async def one(client, prompt):
        chunks = [c async for c in await client.chat.completions.create(
            model=SERVED, messages=chat(prompt, []), max_tokens=8, stream=True, extra_body={"ignore_eos": True})]
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, prompts[i % 4]) for i in range(32)))

    # (under this load the server may merge a stream's deltas into one chunk: the count is not checked here)
    assert asyncio.run(all_of_them()) == [solo[prompts[i % 4]] for i in range(32)]


def test_unready_server_is_a_503(tmp_path):
    process, base = start_frontend(f"127.0.0.1:{free_port()}", tmp_path / "frontend.log")  # nothing listens there
    try:
        wait_status(f"{base}/health", 503, process)
        assert _status(f"{base}/v1/models") == 503
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=SERVED, messages=chat("hi", []), max_tokens=2)
        assert e.value.status_code == 503
    finally:
        stop_process_group(process, timeout_s=10)


def test_a_client_that_drips_its_headers_is_disconnected_and_others_are_served(api, client):
    """One header byte a second (the default head deadline is 10 s): closed well before a minute, and the
    front end answers others meanwhile and after."""
    url = urllib.parse.urlsplit(api)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.settimeout(1)
        start = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        closed = False
        while not closed and time.monotonic() - start < 40:
            try:
                sock.sendall(b"X")
                closed = sock.recv(1024) == b""
            except TimeoutError:
                if time.monotonic() - start < 2:
                    assert client.chat.completions.create(model=SERVED, messages=chat("hi", []), max_tokens=2).choices
            except OSError:
                closed = True
    assert closed and 9 < time.monotonic() - start < 20
    assert client.chat.completions.create(model=SERVED, messages=chat("hi", []), max_tokens=2).choices
