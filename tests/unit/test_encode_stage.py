"""The encode stage as a server wires it (`encode/stage.py`): local replicas, or encoder servers with the
local replicas as the fallback, told at start which servers are unreachable."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_image
from triton_vlm.config import EncodeConfig, EncoderConfig, PreprocessConfig
from triton_vlm.deploy.server import free_port
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm.encode.stage import ImageEncoderStage, encode_stage
from triton_vlm.errors import InvalidRequest
from triton_vlm.preprocess.image_inputs import Images
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest


@pytest.fixture(scope="module")
def parts(tiny_model):
    pre = Preprocessor(PreprocessConfig(model_path=tiny_model))
    files = [make_image(300, 200), make_image(640, 480, seed=1), make_image(90, 150, seed=2)]
    p = pre(GenerateRequest(text_input="hi", images=files))
    return VisionEncoder(EncoderConfig(model_path=tiny_model)), files, p


def test_local_replicas_get_balanced_shards_and_give_the_whole_encoding(tiny_model, parts):
    encoder, _, p = parts
    calls = []

    def replicas(pixels, grid):
        calls.append(grid.tolist())
        return encoder.encode(pixels, grid)

    config = EncodeConfig(model_path=tiny_model, data_parallel=2, embedding_cache_mb=0)
    stage, remote = encode_stage(config, encoder.family, replicas)
    rows = stage.encode(Images.of(encoder.family, p.image_grid_thw, pixel_values=torch.as_tensor(p.pixel_values)))
    assert remote is None and len(calls) == 2
    torch.testing.assert_close(rows, encoder.encode(p.pixel_values, p.image_grid_thw), rtol=0, atol=1e-5)
    stage.shutdown()


@pytest.mark.parametrize(("fallback", "elsewhere"), [("local", "the other encoders or the local encoder"),
                                                     ("none", "the others")])
def test_an_unreachable_encoder_server_is_reported_and_the_local_replicas_take_over(tiny_model, parts, fallback,
                                                                                    elsewhere):
    encoder, files, p = parts
    dead = f"127.0.0.1:{free_port()}"
    warnings = []
    config = EncodeConfig(model_path=tiny_model, encoder_urls=dead, encoder_fallback=fallback, encoder_timeout_s=2)
    stage, remote = encode_stage(config, encoder.family, encoder.encode, warn=warnings.append)
    assert warnings == [f"encoder server {dead} is unreachable at start; its shards go to {elsewhere}"]
    assert remote.state() == {dead: (0, False)}
    if fallback == "local":  # the files are decoded and encoded here
        rows = stage.encode(Images.of(encoder.family, p.image_grid_thw, files=tuple(files)))
        torch.testing.assert_close(rows, encoder.encode(p.pixel_values, p.image_grid_thw), rtol=0, atol=1e-5)
    stage.shutdown()
    remote.close()


def test_the_servers_of_a_watched_list_are_probed_at_start_too(tiny_model, parts, tmp_path):
    encoder, _, _ = parts
    dead, urls = f"127.0.0.1:{free_port()}", tmp_path / "encoders.txt"
    urls.write_text(f"{dead}  # nothing listens here\n")
    warnings, lists = [], []
    config = EncodeConfig(model_path=tiny_model, encoder_urls_file=str(urls), encoder_timeout_s=2)
    stage, remote = encode_stage(config, encoder.family, encoder.encode, warn=warnings.append, info=lists.append)
    assert warnings == [f"encoder server {dead} is unreachable at start; its shards go to the other encoders or "
                        "the local encoder"]
    assert remote.state() == {dead: (0, False)}
    stage.shutdown()
    remote.close()


def test_an_encoder_servers_stage_encodes_files_as_preprocess_and_one_encoder_do(tiny_model, parts):
    """`image_encoder`'s stage: layouts from the headers, the files decoded and split over the replicas,
    the same rows as preprocess + one encoder; a bad file or too many files fail that request alone."""
    encoder, files, p = parts
    calls = []

    def replicas(pixels, grid):
        calls.append(len(grid))
        return encoder.encode(pixels, grid)

    stage = ImageEncoderStage(PreprocessConfig(model_path=tiny_model, max_images=3),
                              EncodeConfig(model_path=tiny_model, data_parallel=2), encoder.family, replicas)
    try:
        rows, layout = stage(files, [])
        assert layout.tolist() == p.image_grid_thw.tolist() and sorted(calls) == [1, 2]
        torch.testing.assert_close(rows, encoder.encode(p.pixel_values, p.image_grid_thw), rtol=0, atol=1e-5)
        with pytest.raises(InvalidRequest, match="image 1 could not be decoded"):
            stage([files[0], b"not an image"], [])
        with pytest.raises(InvalidRequest, match="4 images sent; the limit is 3"):
            stage(files + files[:1], [])
    finally:
        stage.shutdown()
