"""OpenAI request bodies -> `vlm` tensors, and `vlm` errors -> OpenAI errors, without a server."""

from __future__ import annotations

import json

import pytest

from triton_vlm.openai_api.parse import UNTIL_CONTEXT_ENDS, APIError, chat_call, completion_call, parse_json
from triton_vlm.openai_api.upstream import api_error

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def test_a_chat_body_becomes_vlm_tensors():
    call = chat_call({"model": "/models/qwen", "messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 7,
                      "temperature": 0, "top_p": 0.5, "top_k": -1, "seed": 3, "stop": "END", "stream": True,
                      "stream_options": {"include_usage": True}, "ignore_eos": True, "min_tokens": 2})
    t = {k: v.tolist() for k, v in call.tensors.items()}
    assert json.loads(t.pop("messages")[0]) == MESSAGES
    assert t == {"max_tokens": [7], "temperature": [0.0], "top_p": [0.5], "top_k": [0], "seed": [3],
                 "min_tokens": [2], "ignore_eos": [True], "stream": [True], "stop": [b"END"]}
    assert (call.model, call.stream, call.include_usage) == ("/models/qwen", True, True)


def test_without_max_tokens_the_answer_may_run_to_the_context_end():
    assert chat_call({"messages": MESSAGES}).tensors["max_tokens"].tolist() == [UNTIL_CONTEXT_ENDS]
    assert not chat_call({"messages": MESSAGES, "stream_options": {"include_usage": True}}).include_usage


def test_a_completion_prompt_skips_the_chat_template():
    call = completion_call({"prompt": ["Once upon"], "max_tokens": 3})
    assert call.tensors["text_input"].tolist() == [b"Once upon"] and call.tensors["chat_template"].tolist() == [False]


@pytest.mark.parametrize("body", [
    {"messages": []}, {"messages": "hi"}, {"messages": MESSAGES, "n": 2}, {"messages": MESSAGES, "max_tokens": 1.5},
    {"messages": MESSAGES, "max_tokens": True}, {"messages": MESSAGES, "temperature": "hot"},
    {"messages": MESSAGES, "seed": 2**40}, {"messages": MESSAGES, "stop": ["a", 1]},
    {"messages": MESSAGES, "logprobs": True}, {"messages": MESSAGES, "tools": [{"type": "function"}]},
    {"messages": MESSAGES, "presence_penalty": 0.5}, {"messages": MESSAGES, "stream": "yes"},
])
def test_bad_bodies_are_400(body):
    with pytest.raises(APIError) as e:
        chat_call(body)
    assert e.value.status == 400 and e.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{", b"[]", b"\xff"])
def test_a_body_that_is_not_a_json_object_is_400(raw):
    with pytest.raises(APIError):
        parse_json(raw)


@pytest.mark.parametrize("message, status, text", [
    ("in ensemble 'vlm', invalid request: image 0 could not be decoded", 400, "image 0 could not be decoded"),
    ("unavailable: the language model is shutting down", 503, "the language model is shutting down"),
    ("internal error: boom", 500, "boom"),
    ("Stub process 'preprocess_0_0' is not healthy.", 500, "Stub process 'preprocess_0_0' is not healthy."),
])
def test_server_errors_keep_their_status(message, status, text):
    error = api_error(message)
    assert (error.status, str(error)) == (status, text)


def test_the_served_model_answers_to_its_name_its_path_and_its_folder_name_only():
    from triton_vlm.openai_api.app import serves

    assert serves("/models/qwen-7b", "/models/qwen-7b") and serves("/models/qwen-7b", "/models//qwen-7b/")
    assert serves("/models/qwen-7b", "qwen-7b") and serves("vlm", "vlm")
    assert not serves("/models/qwen-7b", "gpt-4o") and not serves("vlm", "other/vlm")
    assert not serves("/models/qwen-7b", "/other/qwen-7b") and not serves("vlm", "vlm2")
