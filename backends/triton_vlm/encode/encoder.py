"""Vision encoder engine: pixel patches of one or more images in, image embeddings out."""

from __future__ import annotations

import numpy as np
import torch

from ..config import EncoderConfig, torch_dtype
from ..models import load_family


class VisionEncoder:
    def __init__(self, config: EncoderConfig) -> None:
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.config = config
        self.family = load_family(config.model_path)
        self.device = torch.device(config.device)
        self.model = self.family.load_vision(config.device, torch_dtype(config.dtype, config.device))

    def encode(self, pixel_values: np.ndarray | torch.Tensor, grid_thw: np.ndarray) -> torch.Tensor:
        """pixel_values: [P, D]; grid_thw: [N, 3] -> [sum tokens_per_image, embedding_width] (the embeddings
        and the family's extra features) on the encoder's device."""
        grid = torch.as_tensor(np.array(grid_thw, np.int64)).reshape(-1, 3)  # a copy: it may be read-only
        if grid.shape[0] == 0:
            return torch.zeros((0, self.family.embedding_width), dtype=torch.float32, device=self.device)
        pixels = torch.as_tensor(pixel_values).to(self.device)
        return self.family.encode(self.model, pixels, grid.to(self.device)).float()
