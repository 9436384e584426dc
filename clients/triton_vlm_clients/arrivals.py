"""When each request of a benchmark is sent: a seeded Poisson process, or all at once."""

from __future__ import annotations

import math

import numpy as np


def arrival_times(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """Send offsets in seconds for n requests at `rate` requests/s (exponential gaps); inf: all at 0."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps)
