"""Each family beyond Qwen2.5-VL (whose parity is `tests/integration/test_parity.py`) in-process
(preprocess, one vision encoder, the language engine: the colocated path without Triton) against
transformers' own generate, built without our code (`tests/reference.py`)."""

from __future__ import annotations

import contextlib

import pytest

from tests.integration.families import CASES, PROMPT, images
from tests.reference import reference_generate
from triton_vlm.config import EncoderConfig, LanguageConfig, PreprocessConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm.engine.language import LanguageEngine, LanguageRequest
from triton_vlm.models import FAMILIES
from triton_vlm.models.tiny_model import make_tiny_model
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest, SamplingParams


@contextlib.contextmanager
def colocated(path, prefix_caching: bool = True, device: str = "cpu"):
    """-> ours(images): greedy ids for PROMPT through preprocess, one vision encoder and the language engine
    (prompts prefilled in chunks of at most 64 tokens, so chunks end inside images), in fp32 on `device`."""
    engine = LanguageEngine(LanguageConfig(model_path=path, max_num_batched_tokens=64, device=device, dtype="float32",
                                           enable_prefix_caching=prefix_caching))
    pre = Preprocessor(PreprocessConfig(model_path=path))
    encoder = VisionEncoder(EncoderConfig(model_path=path, device=device, dtype="float32"))

    def ours(pictures: list[bytes]) -> list[int]:
        p = pre(GenerateRequest(text_input=PROMPT, images=pictures, sampling=SamplingParams(max_tokens=12)))
        request = LanguageRequest(str(len(pictures)), p.input_ids, encoder.encode(p.pixel_values, p.image_grid_thw),
                                  p.image_grid_thw, p.sampling, p.image_keys)
        return [t for out in engine.generate(request) for t in out.token_ids]

    try:
        yield ours
    finally:
        engine.shutdown()


@pytest.fixture(scope="module", params=[f for f in FAMILIES if f != "qwen2_5_vl"])  # its parity: test_parity.py
def family_path(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "model", family=request.param)


@pytest.fixture(scope="module", params=[True, False], ids=["prefix-caching", "no-prefix-caching"])
def pipeline(request, family_path):
    with colocated(family_path, prefix_caching=request.param) as ours:
        yield family_path, ours


@pytest.mark.parametrize("case", CASES)
def test_greedy_ids_equal_transformers(pipeline, case):
    path, ours = pipeline
    expected = reference_generate(path, PROMPT, images(case), max_new_tokens=12)
    assert ours(images(case)) == expected
    assert ours(images(case)) == expected  # warm: with prefix caching, the prompt's blocks come from the cache


def test_each_rank_reads_only_its_slice_of_every_expert(tmp_path):
    """MoE tensor parallelism splits each expert's intermediate dimension: rank r holds gate and up
    columns [r*I/2, (r+1)*I/2) of the fused gate_up_proj, and those rows of down_proj."""
    import torch
    from safetensors import safe_open

    from triton_vlm.models import load_family
    from triton_vlm.models.tp import TensorParallel

    path = make_tiny_model(tmp_path / "moe", family="qwen3_vl_moe")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        gate_up = f.get_tensor("model.language_model.layers.1.mlp.experts.gate_up_proj")  # [E, H, 2I]
        down = f.get_tensor("model.language_model.layers.1.mlp.experts.down_proj")  # [E, I, H]
    inter, half = gate_up.shape[2] // 2, gate_up.shape[2] // 4
    for rank in range(2):
        decoder = load_family(path).load_decoder("cpu", torch.float32, TensorParallel(rank, 2))
        experts = decoder.model.layers[1].mlp.experts
        mine = slice(rank * half, (rank + 1) * half)
        assert torch.equal(experts.gate_up_proj, torch.cat([gate_up[:, :, mine], gate_up[:, :, inter:][:, :, mine]], 2))
        assert torch.equal(experts.down_proj, down[:, mine])


def test_each_rank_reads_only_its_slice_of_glm4v_fused_gate_up(tmp_path):
    """GLM-4.1V's MLP holds gate and up as one gate_up_proj [2I, H]: rank r holds gate rows
    [r*I/2, (r+1)*I/2) and the same rows of up, so its local chunk(2) splits them right."""
    import torch
    from safetensors import safe_open

    from triton_vlm.models import load_family
    from triton_vlm.models.tp import TensorParallel

    path = make_tiny_model(tmp_path / "glm", family="glm4v")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        gate_up = f.get_tensor("model.language_model.layers.1.mlp.gate_up_proj.weight")
    inter, half = gate_up.shape[0] // 2, gate_up.shape[0] // 4
    for rank in range(2):
        mlp = load_family(path).load_decoder("cpu", torch.float32, TensorParallel(rank, 2)).model.layers[1].mlp
        mine = slice(rank * half, (rank + 1) * half)
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat([gate_up[mine], gate_up[inter:][mine]]))


def test_internvl_with_a_qwen3_language_model_equals_transformers(tmp_path):
    """InternVL3.5 pairs the vision tower with a Qwen3 language model (q/k norms, no qkv bias): the same
    tiny checkpoint with its language model swapped for a Qwen3 one, built by transformers."""
    import json

    from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration

    from triton_vlm.models.tiny_model import INIT_RANGE, save_random

    path = make_tiny_model(tmp_path / "internvl3_5", family="internvl")
    config = json.loads((path / "config.json").read_text())
    text = {k: v for k, v in config["text_config"].items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "bos_token_id",
        "eos_token_id")}
    config["text_config"] = dict(text, model_type="qwen3", head_dim=32, initializer_range=INIT_RANGE,
                                 tie_word_embeddings=False)
    save_random(InternVLForConditionalGeneration, InternVLConfig(**config), path, 1,
                GenerationConfig.from_pretrained(path))
    assert "q_norm" in (path / "model.safetensors").read_bytes()[:100_000].decode("latin-1")
    with colocated(path) as ours:
        ids = ours(images("two-sizes"))
    assert ids == reference_generate(path, PROMPT, images("two-sizes"), max_new_tokens=12)
