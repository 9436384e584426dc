"""Families whose images are t/h/w patch grids (Qwen-VL's layout, and GLM-4.1V's): an image is its grid of
patches, `merge_size**2` patches make one token, the slow image processor gives the pixel rows and the
grid (`image_grid_thw`), positions are 3D (M-RoPE), and the checkpoint names its parts `model.visual.*`
and `model.language_model.*` (or, saved before transformers 4.52, `visual.*` and `model.*`). Each such
family subclasses this with its own resize rule (`layout_from_sizes`), vision tower and decoder spec; none
inherits another family's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig
from transformers.modeling_utils import no_init_weights

from .decoder import load_decoder
from .family import Family
from .mrope import mrope_positions
from .tp import TensorParallel
from .weights import load_renamed

VISION_NAMES = {"visual.": "", "model.visual.": ""}
TEXT_NAMES = {"model.": "model.", "model.visual.": None, "model.language_model.": "model.", "lm_head.": "lm_head."}


class PatchGridFamily(Family):
    def __init__(self, model_path: str | Path) -> None:
        super().__init__(model_path)
        self.config = AutoConfig.from_pretrained(self.path)
        self.image_token_id: int = self.config.image_token_id
        self.video_token_id: int | None = getattr(self.config, "video_token_id", None) if self.video_placeholder \
            else None
        self.merge_size: int = self.config.vision_config.spatial_merge_size
        self.hidden_size: int = self.config.text_config.hidden_size
        self.max_model_len: int = self.config.text_config.max_position_embeddings
        self._video = None  # the video rules, read on first use

    @property
    def text_config(self):
        return self.config.text_config

    def tokens_per_image(self, layout: np.ndarray) -> np.ndarray:
        return self.pixel_rows(layout) // (self.merge_size**2)

    def pixel_rows(self, layout: np.ndarray) -> np.ndarray:
        return np.prod(np.asarray(layout, np.int64).reshape(-1, 3), axis=1)

    def pieces(self, layout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A video's temporal patches: the vision towers attend within each (`cu_seqlens` per t), so a video
        encodes as its t patches do, one by one. An image (t = 1) is one piece."""
        layout = np.asarray(layout, np.int64).reshape(-1, 3)
        rows = np.repeat(layout, layout[:, 0], axis=0)
        rows[:, 0] = 1
        return rows, np.repeat(np.arange(len(layout)), layout[:, 0])

    def pixel_dim(self, processor) -> int:
        return 3 * processor.temporal_patch_size * processor.patch_size**2

    def process(self, processor, pictures) -> tuple[np.ndarray, np.ndarray]:
        # RGB pictures are channels-last; left to guess, the processor takes a height of 1 or 3 for the
        # channels (a 1x1 image failed with "mean must have 1 elements", a 100x3 one got a transposed grid)
        out = processor(images=pictures, return_tensors="np", input_data_format="channels_last")
        return out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int64)

    def expand_placeholder(self, tokens: int) -> str:
        return self.image_placeholder * tokens

    def positions(self, input_ids: np.ndarray, layout: np.ndarray, video_fps: float = 0.0) -> tuple[np.ndarray, int]:
        ids, layout = np.asarray(input_ids), np.asarray(layout, np.int64).reshape(-1, 3)
        media = np.flatnonzero(np.isin(ids, self.media_token_ids))
        tokens = self.tokens_per_image(layout)
        first = np.cumsum(tokens) - tokens  # each row's first media token
        blocks = []
        for (t, h, w), start in zip(layout.tolist(), first.tolist(), strict=True):
            if start >= len(media) or ids[media[start]] != self.video_token_id:
                blocks.append((t, h, w, None))
                continue
            times = self.video_rules().time_positions(t, video_fps)
            blocks += [(t, h, w, times)] if times is not None else [(1, h, w, None)] * t
        return mrope_positions(ids, blocks, self.media_token_ids, self.merge_size)

    def video_rules(self):
        if self._video is None:
            self._video = self._video_rules()
        return self._video

    def _video_rules(self):
        raise NotImplementedError

    def _vision(self, cls, device: str, dtype: torch.dtype) -> torch.nn.Module:
        with no_init_weights():
            model = cls._from_config(self.config.vision_config)
        model.load_state_dict(load_renamed(self.path, VISION_NAMES), strict=True)
        return model.to(device=device, dtype=dtype).eval()

    @torch.inference_mode()
    def encode(self, vision: torch.nn.Module, pixel_values: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        """pixel_values: [P, C*T*14*14], layout (grid_thw): [N, 3] -> embeddings [sum tokens_per_image, H]."""
        return vision(pixel_values.to(vision.dtype), grid_thw=self.frame_rows(layout))

    def frame_rows(self, layout: torch.Tensor) -> torch.Tensor:
        """The layout as the vision towers take it: each video row as its temporal patches (`pieces`), (1, h, w)
        each (GLM's requires it; Qwen's attend within each patch anyway)."""
        return torch.as_tensor(self.pieces(layout.cpu().numpy())[0], device=layout.device)

    def load_decoder(self, device: str, dtype: torch.dtype, tp: TensorParallel):
        return load_decoder(self.text_config, self.decoder_spec,
                            lambda take: load_renamed(self.path, TEXT_NAMES, take=take), device, dtype, tp,
                            getattr(self.config, "tie_word_embeddings", False))  # e.g. Qwen2.5-VL-3B ties
