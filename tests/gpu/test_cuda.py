"""On CUDA (the `gpu` marker; skipped cleanly without CUDA): every family's vision tower and decoder on the GPU,
greedy ids equal to transformers' own generate on the same GPU (fp32), and the tensor-parallel layers with
CUDA tensors. `scripts/gpu-check.sh` runs these on a lent GPU machine (docs/gpu.md)."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pytest
import torch

from tests.integration.families import PROMPT, images
from tests.reference import reference_generate
from tests.unit.test_family_parity import colocated
from triton_vlm.config import EncoderConfig, PreprocessConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm.models import FAMILIES
from triton_vlm.models.tiny_model import make_tiny_model
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = "cuda:0"


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_path(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "model", family=request.param)


def test_greedy_ids_on_cuda_equal_transformers_on_cuda(family_path):
    """Preprocess, our vision encoder and our paged decoder on the GPU, against transformers' generate on
    the same GPU; cold, then warm (the prompt's blocks from the prefix cache)."""
    with colocated(family_path, device=CUDA) as ours:
        for case in ("one-image", "four-images"):
            expected = reference_generate(family_path, PROMPT, images(case), max_new_tokens=12, device=CUDA)
            assert ours(images(case)) == expected, case
            assert ours(images(case)) == expected, f"{case}, warm"


def test_vision_tower_on_cuda_matches_the_cpu(family_path):
    pre = Preprocessor(PreprocessConfig(model_path=family_path))
    p = pre(GenerateRequest(text_input=PROMPT, images=images("four-images"), sampling=SamplingParams(max_tokens=1)))
    on_cpu = VisionEncoder(EncoderConfig(model_path=family_path, dtype="float32"))
    on_gpu = VisionEncoder(EncoderConfig(model_path=family_path, device=CUDA, dtype="float32"))
    expected = on_cpu.encode(p.pixel_values, p.image_grid_thw)
    embeds = on_gpu.encode(p.pixel_values, p.image_grid_thw)
    assert embeds.is_cuda, "the embeddings stay on the GPU they were computed on"
    # cuDNN runs the patch-embedding convolution in TF32 by default: one element of 150k was 1.1e-3 off (GLM-4.5V)
    torch.testing.assert_close(embeds.cpu(), expected, atol=5e-3, rtol=1e-2)


def prefill_logits(path: Path, device: str, rank: int = 0, size: int = 1, init: str = "") -> torch.Tensor:
    """Our decoder's logits of the last token of a 40-token prompt, prefilled into a fresh paged cache on
    `device`; with `size` 2, as rank `rank` of a gloo group (gloo all-reduces CUDA tensors too, and NCCL
    refuses two ranks on one GPU, which is all a one-GPU machine has)."""
    import torch.distributed as dist

    from triton_vlm.models import load_family
    from triton_vlm.models.paged_attention import PrefillBatch
    from triton_vlm.models.tp import TensorParallel

    if size > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        model = load_family(path).load_decoder(device, torch.float32, TensorParallel(rank, size))
        n, block = 40, 16
        with torch.inference_mode():
            embeds = model.embed(torch.arange(3, 3 + n, device=device))[None]
            positions = torch.arange(n, device=device)[None, None, :].expand(3, 1, n)
            batch = PrefillBatch([[0, 1, 2]], [0], [n], block, device)
            return model.prefill(embeds, positions, model.new_cache(4, block), batch, None).float().cpu()
    finally:
        if size > 1:
            dist.destroy_process_group()


def _rank(rank: int, path: str, device: str, init: str, out: str) -> None:
    logits = prefill_logits(Path(path), device, rank, 2, init)
    torch.save(logits, f"{out}.{rank}")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl_moe", "glm4v"])
def test_tensor_parallel_layers_on_cuda_equal_one_rank(tmp_path, family):
    """Two ranks (column- and row-parallel attention and MLP, experts split by their intermediate size,
    GLM's fused gate_up) with CUDA tensors give the logits one rank gives."""
    import torch.multiprocessing as mp

    path = make_tiny_model(tmp_path / family, family=family)
    init = f"file://{tempfile.gettempdir()}/triton-vlm-gpu-test-{uuid.uuid4().hex}"
    out = str(tmp_path / "logits")
    mp.start_processes(_rank, args=(str(path), CUDA, init, out), nprocs=2, start_method="spawn")
    one = prefill_logits(path, CUDA)
    for rank in range(2):
        torch.testing.assert_close(torch.load(f"{out}.{rank}"), one, atol=1e-4, rtol=1e-4)
