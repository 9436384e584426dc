"""E/PD image handling without Triton: the language server's grids from image sizes alone match the
image processor's, `Images` shards carry the right images, and remote preprocessing sends the files."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from tests.conftest import make_image
from triton_vlm.config import PreprocessConfig
from triton_vlm.errors import InvalidRequest
from triton_vlm.preprocess.image_inputs import ImageProcessing, Images
from triton_vlm.preprocess.images import ImageLimits
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest

SIZES = [(640, 480), (300, 200), (1280, 720), (100, 100), (29, 31), (1, 150), (3000, 40), (4000, 3000), (57, 1999)]


@pytest.fixture(scope="module")
def processing(tiny_model):
    return ImageProcessing(tiny_model)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_the_grid_from_the_size_alone_is_the_processors(processing, width, height):
    pixels, grid = processing.decode([make_image(width, height, fmt="JPEG")], ImageLimits())
    assert processing.grid([(width, height)]).tolist() == grid.tolist()
    assert pixels.shape == (int(np.prod(grid)), processing.patch_dim)


def test_an_aspect_ratio_the_processor_refuses_is_a_request_error(processing):
    with pytest.raises(InvalidRequest, match="image 0 \\(1x300\\) cannot be used: .*aspect ratio"):
        processing.grid([(1, 300)])


def test_select_takes_pixel_rows_or_files_per_image(processing):
    grid = np.array([[1, 2, 2], [1, 4, 2], [1, 2, 4]])
    pixels = torch.arange(4 + 8 + 8).float()[:, None].repeat(1, 3)
    part = Images.of(processing.family, grid, pixel_values=pixels).select([2, 0])
    assert part.layout.tolist() == [[1, 2, 4], [1, 2, 2]] and part.tokens.tolist() == [2, 1]
    assert part.pixel_values[:, 0].tolist() == list(range(12, 20)) + list(range(0, 4))
    files = Images.of(processing.family, grid, files=(b"a", b"b", b"c")).select([1, 2])
    assert files.files == (b"b", b"c") and files.pixel_values is None and files.pixel_rows.tolist() == [8, 8]


def test_remote_preprocessing_sends_the_files_and_the_same_prompt(tiny_model):
    images = [make_image(640, 480, seed=1), base64.b64encode(make_image(300, 200, seed=2))]
    sources = [images[0], b"data:image/png;base64," + images[1]]
    local = Preprocessor(PreprocessConfig(model_path=tiny_model))(GenerateRequest(text_input="hi", images=sources))
    remote = Preprocessor(PreprocessConfig(model_path=tiny_model, image_processing="remote"))(
        GenerateRequest(text_input="hi", images=sources))
    assert remote.input_ids.tolist() == local.input_ids.tolist()
    assert remote.image_grid_thw.tolist() == local.image_grid_thw.tolist()
    assert remote.image_files == (images[0], base64.b64decode(images[1])), "the decoded file, not the data: URL"
    assert remote.pixel_values.shape == (0, local.pixel_values.shape[1]) and local.image_files == ()


def test_remote_preprocessing_checks_headers_and_limits(tiny_model):
    remote = Preprocessor(PreprocessConfig(model_path=tiny_model, image_processing="remote", max_image_pixels=10_000))
    with pytest.raises(InvalidRequest, match="image 0 could not be decoded"):
        remote(GenerateRequest(text_input="hi", images=[b"not an image"]))
    with pytest.raises(InvalidRequest, match="image 1 is 200x100; the limit is 10000 pixels"):
        remote(GenerateRequest(text_input="hi", images=[make_image(50, 50), make_image(200, 100)]))
