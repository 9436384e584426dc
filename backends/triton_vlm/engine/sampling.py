"""Pick the next token from logits: greedy, or temperature / top-k / top-p with a seeded generator."""

from __future__ import annotations

import torch

from ..protocol import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator()
    gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**31 - 1, ()).item()))
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: [V] float. Returns one token id. Never raises on odd values: logits that the temperature
    makes non-finite (or that came non-finite) fall back to the greedy choice."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    logits = torch.nan_to_num(logits.float().cpu(), nan=float("-inf")) / params.temperature
    if not torch.isfinite(logits.max()):  # every logit -inf, or one +inf: no distribution to sample
        return int(torch.argmax(logits).item())
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (always keeps the first token)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)  # finite: the max is finite, so exp(x - max) is in [0, 1]
    return int(torch.multinomial(probs, 1, generator=generator).item())


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, greedy: int,
               banned: set[int]) -> int:
    """A sequence's next token from its logits [V]; `greedy`: their argmax, computed for the whole batch at
    once; `banned`: tokens it may not pick yet (EOS before min_tokens, HF's and vLLM's rule)."""
    if banned:
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
        return sample(logits, params, generator)
    return greedy if params.greedy else sample(logits, params, generator)
