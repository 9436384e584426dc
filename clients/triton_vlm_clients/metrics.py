"""Serving metrics from per-request timelines, the way vLLM's and SGLang's serving benchmarks define them.

TTFT: request sent -> first token. TPOT: (end - first token) / (output tokens - 1), per request.
ITL: the gaps between successive token-carrying responses. E2E: request sent -> last response.
Throughputs divide by the wall time of the whole run. Failed requests are counted, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 99)


@dataclass
class Timeline:
    """One request as the client saw it; times in seconds from any fixed origin."""

    sent: float
    token_times: list[float] = field(default_factory=list)  # arrival of each token-carrying response
    tokens_per_response: list[int] = field(default_factory=list)
    end: float | None = None
    error: str | None = None
    text_tokens: int = 0  # prompt tokens that are not image placeholders
    image_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    @property
    def output_tokens(self) -> int:
        return sum(self.tokens_per_response)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return np.diff(self.token_times).tolist()

    @property
    def e2e(self) -> float | None:
        return self.end - self.sent if self.end is not None else None


def distribution(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """mean, median and p99 (of values * scale: ms by default); None for no values."""
    if not values:
        return {"mean": None, "median": None, "p99": None}
    a = np.asarray(values, dtype=np.float64) * scale
    return {"mean": float(a.mean()), "median": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def summarize(timelines: list[Timeline], duration_s: float) -> dict:
    ok = [t for t in timelines if t.ok]
    failed = [t for t in timelines if not t.ok]
    out_tokens = sum(t.output_tokens for t in ok)
    text_in = sum(t.text_tokens for t in ok)
    image_in = sum(t.image_tokens for t in ok)
    result = {
        "successful_requests": len(ok),
        "failed_requests": len(failed),
        "errors": sorted({t.error or "no final response" for t in failed}),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "total_text_input_tokens": text_in,
        "total_vision_input_tokens": image_in,
        "total_output_tokens": out_tokens,
        "text_input_throughput": text_in / duration_s if duration_s > 0 else 0.0,
        "vision_input_throughput": image_in / duration_s if duration_s > 0 else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else 0.0,
    }
    for name, values in (("ttft_ms", [t.ttft for t in ok if t.ttft is not None]),
                         ("tpot_ms", [t.tpot for t in ok if t.tpot is not None]),
                         ("itl_ms", [gap for t in ok for gap in t.itls]),
                         ("e2e_latency_ms", [t.e2e for t in ok])):
        for stat, value in distribution(values).items():
            result[f"{stat}_{name}"] = value
    return result
