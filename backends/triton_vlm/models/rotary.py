"""Rotary position embeddings with transformers' own frequency and application code. A family names the
transformers module, its rotary embedding class and, for M-RoPE with sections, its apply function
(`RotarySpec`); positions are always [3, b, s] (1D RoPE reads the first row)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RotarySpec:
    module: str  # under transformers.models, e.g. "qwen2.modeling_qwen2"
    embedding: str  # its rotary embedding class
    apply: str | None = None  # its function applying cos/sin by M-RoPE sections; None: the plain
    # `apply_rotary_pos_emb` (1D RoPE, and interleaved M-RoPE whose cos/sin come interleaved already)
    one_d: bool = False  # the embedding takes one row of positions

    def _found(self, name: str):
        return getattr(importlib.import_module(f"transformers.models.{self.module}"), name)


class Rotary(nn.Module):
    """(cos, sin) of the positions, computed once a step for every layer."""

    def __init__(self, config, spec: RotarySpec) -> None:
        super().__init__()
        self.one_d = spec.one_d
        self.embedding = spec._found(spec.embedding)(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, b, s] -> (cos, sin) for `rotate`."""
        return self.embedding(x, positions[0] if self.one_d else positions)


def rotate(config, spec: RotarySpec):
    """The function that applies `Rotary`'s (cos, sin) to q and k ([b, heads, s, d]) (a partial rotary, as
    GLM's, rotates the first dimensions and passes the rest)."""
    if spec.apply is None:
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        return apply_rotary_pos_emb
    apply, section = spec._found(spec.apply), config.rope_scaling["mrope_section"]
    return lambda q, k, cos, sin: apply(q, k, cos, sin, section)
