"""The family interface: everything a stage needs to know about a model family, and nothing else.

Every stage reaches family specifics only through a `Family` (`models.load_family(path)`); a family
is one file that subclasses it. What crosses the stages per image is its *layout* (an int64 row, [N, 3]
for a request: Qwen's and GLM's t/h/w patch grid, InternVL's tile counts), from which the family says
how many tokens the image becomes and how many pixel rows it has.

Encoding returns the embeddings with the family's extra features (Qwen3-VL's deepstack features) as
more columns of one tensor, a row per image token ([tokens, hidden * (1 + extra_features)]): every path
that splits, sends, gathers and caches embeddings by rows (DP shards, BLS, E/PD gRPC and shared memory,
the cache) carries the extras with them, and sizes them by `embedding_width`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .tp import TensorParallel

if TYPE_CHECKING:
    from .layers import DecoderSpec


class Family:
    model_type: str  # config.json's model_type
    image_token_id: int  # the prompt token the image embeddings replace
    image_placeholder: str  # the chat template's text for one image, before expansion
    video_token_id: int | None = None  # the prompt token video embeddings replace; None: no video input
    video_placeholder: str = ""  # the chat template's text for one video, before expansion
    hidden_size: int  # the language model's width: one embedding row
    extra_features: int = 0  # hidden-wide feature blocks that ride with each embedding row
    max_model_len: int
    decoder_spec: DecoderSpec  # what its decoder is built from: rotary, attention options, each layer's MLP
    tiny: type[TinyCheckpoint]  # how `triton-vlm make-tiny-model` writes a random checkpoint of it

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)

    @property
    def embedding_width(self) -> int:
        """Columns of an encoded image's rows: the embedding and its extras."""
        return self.hidden_size * (1 + self.extra_features)

    def embedding_bytes(self, layout: np.ndarray) -> int:
        """Bytes of the images' encoded rows as they travel (float32), extras included."""
        return 4 * self.embedding_width * int(self.tokens_per_image(layout).sum())

    # --- layout -------------------------------------------------------------
    def tokens_per_image(self, layout: np.ndarray) -> np.ndarray:
        """layout [N, 3] -> [N] tokens (embedding rows) per image: the balancing weight and split sizes."""
        raise NotImplementedError

    def pixel_rows(self, layout: np.ndarray) -> np.ndarray:
        """layout [N, 3] -> [N] rows of pixel_values per image."""
        raise NotImplementedError

    def pieces(self, layout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An image's parts that encode independently (InternVL: its tiles), the units of encoder data
        parallelism: (layout rows of the pieces, image of each piece), in order, each piece's pixel rows
        and embedding rows consecutive within its image's. Qwen and GLM encode an image whole."""
        layout = np.asarray(layout, np.int64).reshape(-1, 3)
        return layout, np.arange(len(layout))

    def image_processor_kwargs(self) -> dict:
        """What `AutoImageProcessor.from_pretrained` must be told so that the slow processor resizes as
        the checkpoint's (fast) one would."""
        return {}

    def layout_from_sizes(self, processor, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """(width, height) per image -> layout [N, 3], by the family's own resize rule, without pixels
        (the E/PD language server reads only the headers). Raises ValueError for a size it cannot use."""
        raise NotImplementedError

    def pixel_dim(self, processor) -> int:
        """Columns of `pixel_values` (one row: a patch, or a whole tile, flattened)."""
        raise NotImplementedError

    def process(self, processor, pictures: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """Decoded RGB pictures -> (pixel_values [sum pixel_rows, pixel_dim] float32, layout [N, 3])."""
        raise NotImplementedError

    # --- prompt ---------------------------------------------------------------
    def expand_placeholder(self, tokens: int) -> str:
        """The text an image's placeholder becomes in the prompt, for an image of `tokens` tokens."""
        raise NotImplementedError

    @property
    def media_token_ids(self) -> tuple[int, ...]:
        """The prompt tokens that take encoded rows (images', then videos'), in prompt order."""
        return (self.image_token_id,) if self.video_token_id is None else (self.image_token_id, self.video_token_id)

    def positions(self, input_ids: np.ndarray, layout: np.ndarray, video_fps: float = 0.0) -> tuple[np.ndarray, int]:
        """Rotary positions [3, S] of a prompt (1D RoPE: three equal rows) and the delta: a token at index
        i >= S has position i + delta. `video_fps`: the rate the videos were sampled at (`VideoRules`)."""
        raise NotImplementedError

    # --- video (families that take it: `video_token_id` set) ------------------
    def video_rules(self):
        """The family's `video.VideoRules`: frame sampling, sizes and prompt text, as its transformers
        video processor and processor do."""
        raise NotImplementedError

    # --- models ---------------------------------------------------------------
    def load_vision(self, device: str, dtype: torch.dtype) -> torch.nn.Module:
        """The vision tower, with only its weights read."""
        raise NotImplementedError

    def encode(self, vision: torch.nn.Module, pixel_values: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        """-> [sum tokens, embedding_width]: embeddings, then the extras, as columns."""
        raise NotImplementedError

    def split_features(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoded rows [n, embedding_width] -> (embeddings [n, H], extras [extra_features, n, H] or None)."""
        if not self.extra_features:
            return rows, None
        h = self.hidden_size
        return rows[:, :h], rows[:, h:].reshape(rows.shape[0], self.extra_features, h).transpose(0, 1)

    def load_decoder(self, device: str, dtype: torch.dtype, tp: TensorParallel):
        """This rank's shard of the language model (`decoder.Decoder`), reading only its slices."""
        raise NotImplementedError

    def kv_bytes_per_token(self, dtype: torch.dtype, tp_size: int) -> int:
        """KV-cache bytes one token takes on one of `tp_size` ranks (keys and values of every layer)."""
        from .layers import head_dim

        text = self.text_config
        per_rank_heads = text.num_key_value_heads // tp_size
        return 2 * text.num_hidden_layers * per_rank_heads * head_dim(text) * torch.finfo(dtype).bits // 8

    @property
    def text_config(self):
        """The language model's config (sizes for the KV-cache budget: layers, kv heads, head_dim)."""
        raise NotImplementedError


class TinyCheckpoint:
    """A family's companion for tests and benchmarks (`triton-vlm make-tiny-model`, `tiny_model.py`): the
    tokenizer of its random checkpoints (`special_tokens`, `eos_token`, `pad_token`, `tokenizer_extras`,
    and the real chat template for the parts we use), and `write`. Serving never reads it."""

    chat_template: str
    special_tokens: tuple[str, ...]
    eos_token: str  # end of turn
    pad_token: str
    tokenizer_extras: dict = {}  # named special tokens (`extra_special_tokens`) a processor reads

    @classmethod
    def write(cls, out: Path, size: str, seed: int, ids: dict[str, int], vocab_size: int) -> None:
        """Write a random checkpoint of the family to `out`: its real config class and parameter names,
        `ids` (the tokenizer's ids of `special_tokens`) where the config names tokens, and a slow image
        processor config."""
        raise NotImplementedError
