"""A request's images on their way to the vision encoder, and the image processing that makes patches.

`Images` carries them either as pixel patches (preprocessed here) or as the encoded files themselves
(E/PD: the encoder server decodes, resizes and patchifies, so only the files go out and only the
embeddings come back), with each image's layout as the family reads it (tokens, pixel rows). Either
way the layout is known up front: the placeholder tokens need it, and `ImageProcessing.grid` gets it
from each image's size alone, by the family's resize rule. On the wire it is `_IMAGE_LAYOUT` [N, 3].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidRequest
from .images import ImageLimits, decode_image


@dataclass(frozen=True)
class Images:
    """Images with their layout as the family reads it: `tokens` per image (the encoders' work: the
    balancing weight, and the rows of each image's embeddings) and `pixel_rows` per image (its rows of
    `pixel_values`). Make them with `of`."""

    layout: np.ndarray  # [N, 3] int64: the family's per-image layout (Qwen: t/h/w patch grids)
    tokens: np.ndarray  # [N]
    pixel_rows: np.ndarray  # [N]
    pixel_values: torch.Tensor | None = None  # [sum pixel_rows, D], image after image
    files: tuple[bytes, ...] | None = None  # or the encoded image files, checked by their headers
    keys: tuple[bytes, ...] = ()  # each image's content key (embedding cache), when known

    @classmethod
    def of(cls, family, layout, pixel_values: torch.Tensor | None = None, files: tuple[bytes, ...] | None = None,
           keys: tuple[bytes, ...] = ()) -> Images:
        layout = np.asarray(layout, np.int64).reshape(-1, 3)
        return cls(layout, np.asarray(family.tokens_per_image(layout), np.int64),
                   np.asarray(family.pixel_rows(layout), np.int64), pixel_values, files, tuple(keys))

    def __len__(self) -> int:
        return len(self.layout)

    def pieces(self, family, decode: Callable[[tuple[bytes, ...]], np.ndarray] | None = None
               ) -> tuple[Images, list[int]]:
        """The family's pieces of these images (InternVL: tiles; `Family.pieces`), which take the same pixel
        rows and give the same embedding rows in the same order, and each piece's image. Images a family
        encodes whole come back as they are; files are pieces only with `decode` (files -> pixel_values),
        else they travel whole (E/PD: to the encoder servers, which cut them up)."""
        layout, owner = family.pieces(self.layout)
        if len(layout) == len(self) or (self.pixel_values is None and decode is None):
            return self, list(range(len(self)))
        pixels = self.pixel_values if self.pixel_values is not None else torch.as_tensor(decode(self.files))
        return Images.of(family, layout, pixel_values=pixels), [int(i) for i in owner]

    def select(self, indices: Sequence[int]) -> Images:
        """The images at `indices`, in that order."""
        at = list(indices)
        keys = tuple(self.keys[i] for i in at) if self.keys else ()
        parts = dict(layout=self.layout[at], tokens=self.tokens[at], pixel_rows=self.pixel_rows[at], keys=keys)
        if self.files is not None:
            return Images(**parts, files=tuple(self.files[i] for i in at))
        rows = np.concatenate([[0], np.cumsum(self.pixel_rows)])
        return Images(**parts, pixel_values=torch.cat([self.pixel_values[rows[i]:rows[i + 1]] for i in at]))


class ImageProcessing:
    """The model's image processor (the slow one: the fast one needs torchvision), set up by the family to
    resize as the checkpoint's own processor does."""

    def __init__(self, model_path, family=None) -> None:
        from transformers import AutoImageProcessor  # here: the stages that only pass images on never load it

        from ..models import load_family

        self.family = family or load_family(model_path)
        self.processor = AutoImageProcessor.from_pretrained(model_path, use_fast=False,
                                                            **self.family.image_processor_kwargs())
        self.patch_dim = self.family.pixel_dim(self.processor)

    def grid(self, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """(width, height) per image -> image_grid_thw [N, 3], exactly as the processor would resize them."""
        rows = []
        for index, size in enumerate(sizes):
            try:
                rows.append(self.family.layout_from_sizes(self.processor, [size]))
            except ValueError as e:  # e.g. an aspect ratio over 200
                raise InvalidRequest(f"image {index} ({size[0]}x{size[1]}) cannot be used: {e}") from None
        return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)

    def pixels(self, pictures: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Decoded pictures -> (pixel_values [P, D] float32, image_grid_thw [N, 3] int64)."""
        if not pictures:
            return np.zeros((0, self.patch_dim), np.float32), np.zeros((0, 3), np.int64)
        self.grid([picture.size for picture in pictures])  # a clear error for sizes it cannot resize
        return self.family.process(self.processor, list(pictures))

    def decode(self, files: Sequence[bytes], limits: ImageLimits) -> tuple[np.ndarray, np.ndarray]:
        """Encoded image files -> (pixel_values, image_grid_thw)."""
        return self.pixels([decode_image(data, i, limits) for i, data in enumerate(files)])
