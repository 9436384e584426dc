"""Every registered family through the same interface checks, on its tiny checkpoint, against transformers:
the layout from an image's size alone equals the image processor's; the expanded prompt has as many image
tokens as the encoder gives rows; positions equal the model's own `get_rope_index`; extras have the
embeddings' rows. And a family we do not serve fails at start, naming the ones we do."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import make_image
from tests.reference import reference_inputs
from triton_vlm.config import EncoderConfig, PreprocessConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm.errors import InvalidRequest
from triton_vlm.models import FAMILIES, load_family
from triton_vlm.models.tiny_model import make_tiny_model
from triton_vlm.preprocess.image_inputs import ImageProcessing
from triton_vlm.preprocess.images import ImageLimits
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest
from triton_vlm_clients.hf_baseline import HFInputs, HFModel

SIZES = [(1, 1), (28, 28), (64, 48), (100, 3), (3, 100), (300, 200), (640, 480), (1280, 720), (200, 1500),
         (2400, 1800)]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    return request.param, make_tiny_model(tmp_path_factory.mktemp(request.param) / "model", family=request.param)


def test_layout_from_size_equals_the_image_processor(family_model):
    """The layout from each size alone equals what the processor makes of the pixels, and each image gets
    as many tokens as transformers' own processing gives it. A size the family cannot use (GLM: a side
    under 28 pixels) is refused with a clear error, and transformers refuses it too."""
    _, path = family_model
    processing, family, reference = ImageProcessing(path), load_family(path), HFInputs(path)
    pictures = [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    usable = []
    for size, picture in zip(SIZES, pictures, strict=True):
        try:
            processing.grid([size])
        except InvalidRequest as e:
            assert "cannot be used" in str(e)
            with pytest.raises(ValueError):
                reference("", [picture])
        else:
            usable.append((size, picture))
    assert len(usable) >= 7
    _, decoded = processing.decode([p for _, p in usable], ImageLimits.of(PreprocessConfig(model_path=path)))
    assert np.array_equal(processing.grid([size for size, _ in usable]), decoded)
    for (size, picture), tokens in zip(usable, family.tokens_per_image(decoded), strict=True):
        ids = reference("", [picture])["input_ids"]
        assert int((ids == family.image_token_id).sum()) == tokens, size


def test_expanded_prompt_tokens_positions_and_extras_match_the_encoder_and_transformers(family_model):
    name, path = family_model
    family = load_family(path)
    pictures = [make_image(300, 200), make_image(100, 400, seed=1), make_image(64, 64, seed=2)]
    pre = Preprocessor(PreprocessConfig(model_path=path))(GenerateRequest(text_input="compare these", images=pictures))
    rows = VisionEncoder(EncoderConfig(model_path=path)).encode(pre.pixel_values, pre.image_grid_thw)
    assert int((pre.input_ids == family.image_token_id).sum()) == rows.shape[0]
    is_image = np.concatenate([[0], (pre.input_ids == family.image_token_id).astype(int), [0]])
    starts, ends = np.flatnonzero(np.diff(is_image) == 1), np.flatnonzero(np.diff(is_image) == -1)
    assert list(ends - starts) == list(family.tokens_per_image(pre.image_grid_thw)), "one run per image"
    embeds, extras = family.split_features(rows)
    assert embeds.shape == (rows.shape[0], family.hidden_size) and rows.shape[1] == family.embedding_width
    if family.extra_features:
        assert extras.shape == (family.extra_features, rows.shape[0], family.hidden_size)
    assert family.embedding_bytes(pre.image_grid_thw) == rows.numel() * 4

    model = HFModel(path).model
    inputs = reference_inputs(path, "compare these", pictures)
    assert np.array_equal(pre.input_ids, inputs["input_ids"][0].numpy()), "the same prompt as transformers builds"
    positions, our_delta = family.positions(pre.input_ids, pre.image_grid_thw)
    if hasattr(model.model, "get_rope_index"):  # 3D positions (Qwen, GLM)
        expected, delta = model.model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"])
        assert np.array_equal(positions, expected[:, 0].numpy()) and our_delta == int(delta[0, 0])
    else:  # plain 1D positions
        assert np.array_equal(positions, np.tile(np.arange(len(pre.input_ids)), (3, 1))) and our_delta == 0


def test_qwen3_vl_ships_its_three_deepstack_blocks_with_the_embeddings(tmp_path):
    """Memory sizing counts the extras: 3 deepstack layers are 4x the embeddings' bytes, in the E/PD
    shared-memory estimate and in the CUDA memory pool a GPU deployment asks for."""
    from triton_vlm.deploy.deployment import CUDA_MEMORY_POOL_MB, Deployment

    path = make_tiny_model(tmp_path / "q3", family="qwen3_vl")
    family = load_family(path)
    grid = np.array([[1, 30, 40]])
    assert family.extra_features == 3
    assert family.embedding_bytes(grid) == 4 * (4 * family.hidden_size * int(family.tokens_per_image(grid)[0]))
    pool = next(a for a in Deployment(path, gpus=(0,)).server_args() if a.startswith("--cuda-memory-pool"))
    assert pool.endswith(f":{4 * CUDA_MEMORY_POOL_MB * 2**20}")


def test_an_unsupported_family_fails_clearly_naming_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match=f"'llava' is not supported; supported families: {', '.join(FAMILIES)}$"):
        load_family(tmp_path)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_has_every_member_the_interface_declares(model_type, tmp_path):
    """What `Family` declares, each registered family has once it has loaded its checkpoint's config (some
    members come from it: `hidden_size`, InternVL's `decoder_spec`), and its tiny-checkpoint companion all
    that `TinyCheckpoint` declares, before any checkpoint exists."""
    from triton_vlm.models import family_class
    from triton_vlm.models.family import Family, TinyCheckpoint

    cls = family_class(model_type)
    family = load_family(make_tiny_model(tmp_path / "model", family=model_type))
    assert type(family) is cls and cls.model_type == model_type
    missing = [name for name in Family.__annotations__ if not hasattr(family, name)]
    assert not missing, f"{cls.__name__} lacks {missing}"
    tiny = cls.tiny
    assert issubclass(tiny, TinyCheckpoint) and tiny.write is not TinyCheckpoint.write
    assert all(hasattr(tiny, name) for name in TinyCheckpoint.__annotations__), tiny.__name__
