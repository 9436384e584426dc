"""The sparse MLPs, each expert's intermediate dimension split over the ranks (every rank holds a slice of
every expert, and one all-reduce sums them):

- `MoE`: softmax top-k routing over fused expert weights (HF's layout), the k best renormalized (Qwen3's
  rule);
- `SharedMoE`: a router the family supplies (transformers' own), routed experts as separate MLPs plus
  shared experts every token goes through.

Only the experts some token chose run. Which layers are sparse is the family's rule (`DecoderSpec.mlp`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP
from .tp import TensorParallel


class Experts(nn.Module):
    """Fused expert weights, HF's layout: gate_up_proj [E, H, 2*I] (gate then up), down_proj [E, I, H];
    this rank holds I/tp of each."""

    def __init__(self, config, tp: TensorParallel) -> None:
        super().__init__()
        inter = config.moe_intermediate_size // tp.size
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, 2 * inter))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, inter, config.hidden_size))


def _mix(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, expert) -> torch.Tensor:
    """x [n, H], each token's chosen experts and their weights [n, k] -> sum over its k experts of
    expert(e, its rows) * weight, in the weights' dtype; only the experts some token chose run."""
    out = torch.zeros_like(x, dtype=weights.dtype)
    for e in chosen.unique().tolist():
        token, slot = torch.where(chosen == e)
        out.index_add_(0, token, expert(e, x[token]) * weights[token, slot, None])
    return out


class MoE(nn.Module):
    """Top-k routing (softmax, the k best renormalized: Qwen3's rule); only the experts some token chose run."""

    def __init__(self, config, tp: TensorParallel) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config, tp)
        self.tp = tp

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        return self.tp.all_reduce(_mix(x, chosen, weights, self._expert)).reshape(shape)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.experts.gate_up_proj[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.experts.down_proj[e]


class SharedMoE(nn.Module):
    """DeepSeek-V3's kind of MoE (GLM-4.5V's): the family's router module (replicated; x -> each token's
    chosen experts and their weights), routed experts as separate MLPs, and shared experts every token
    goes through; one all-reduce for both."""

    def __init__(self, config, tp: TensorParallel, router: nn.Module) -> None:
        super().__init__()
        self.gate = router
        inter = config.moe_intermediate_size
        self.experts = nn.ModuleList(MLP(config.hidden_size, inter, tp, reduce=False)
                                     for _ in range(config.n_routed_experts))
        self.shared_experts = MLP(config.hidden_size, inter * config.n_shared_experts, tp, reduce=False)
        self.tp = tp

    def forward(self, x):
        shape = x.shape
        chosen, weights = self.gate(x)
        x = x.reshape(-1, shape[-1])
        out = _mix(x, chosen, weights, lambda e, rows: self.experts[e](rows)).to(x.dtype) + self.shared_experts(x)
        return self.tp.all_reduce(out).reshape(shape)
