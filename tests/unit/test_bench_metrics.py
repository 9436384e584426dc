"""The serving benchmark's arithmetic on hand-made timelines, and its Poisson arrivals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from triton_vlm_clients.arrivals import arrival_times
from triton_vlm_clients.bench import compare_table, report
from triton_vlm_clients.metrics import Timeline, distribution, summarize


def test_ttft_tpot_itl_e2e_of_one_request():
    # sent at 1.0; tokens arrive at 1.5 (2 tokens in one response), 1.7, 2.1; final response at 2.2
    t = Timeline(sent=1.0, token_times=[1.5, 1.7, 2.1], tokens_per_response=[2, 1, 1], end=2.2)
    assert t.ttft == pytest.approx(0.5)
    assert t.output_tokens == 4
    assert t.tpot == pytest.approx((2.1 - 1.5) / 3)
    assert t.itls == pytest.approx([0.2, 0.4])
    assert t.e2e == pytest.approx(1.2)


def test_one_token_has_no_tpot_and_no_itl():
    t = Timeline(sent=0.0, token_times=[0.3], tokens_per_response=[1], end=0.3)
    assert t.tpot is None and t.itls == []


def test_percentiles_on_a_known_list():
    d = distribution([float(i) for i in range(1, 101)], scale=1.0)  # 1..100
    assert d["mean"] == pytest.approx(50.5)
    assert d["median"] == pytest.approx(50.5)
    assert d["p99"] == pytest.approx(99.01)
    assert distribution([]) == {"mean": None, "median": None, "p99": None}


def test_summary_counts_failures_and_divides_by_wall_time():
    ok1 = Timeline(sent=0.0, token_times=[0.1, 0.2, 0.3], tokens_per_response=[1, 1, 1], end=0.3,
                   text_tokens=10, image_tokens=100)
    ok2 = Timeline(sent=0.5, token_times=[0.9, 1.1], tokens_per_response=[1, 1], end=1.1,
                   text_tokens=20, image_tokens=200)
    failed = Timeline(sent=0.2, error="image 1: not a supported image")
    lost = Timeline(sent=0.3, token_times=[0.4], tokens_per_response=[1])  # never finished
    s = summarize([ok1, failed, ok2, lost], duration_s=2.0)
    assert s["successful_requests"] == 2 and s["failed_requests"] == 2
    assert s["errors"] == ["image 1: not a supported image", "no final response"]
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["total_output_tokens"] == 5 and s["output_throughput"] == pytest.approx(2.5)
    assert s["total_text_input_tokens"] == 30 and s["total_vision_input_tokens"] == 300
    assert s["vision_input_throughput"] == pytest.approx(150.0)
    assert s["mean_ttft_ms"] == pytest.approx((100 + 400) / 2)
    assert s["median_tpot_ms"] == pytest.approx((100 + 200) / 2)
    assert s["mean_itl_ms"] == pytest.approx((100 + 100 + 200) / 3)
    assert s["p99_e2e_latency_ms"] == pytest.approx(np.percentile([300, 600], 99))
    assert "Failed requests" in report(s) and "not a supported image" in report(s)
    table = compare_table({"a": s, "b": {**s, "mean_ttft_ms": 500.0}})
    assert "| Mean TTFT (ms) | 250.00 | 500.00 | 2.00x |" in table


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_arrivals_have_the_mean_rate_and_are_seeded(rate):
    times = arrival_times(4000, rate, seed=7)
    assert times[0] == 0 and np.all(np.diff(times) >= 0)
    assert len(times) / times[-1] == pytest.approx(rate, rel=0.05)
    gaps = np.diff(times)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.1)  # exponential: cv = 1
    assert np.array_equal(times, arrival_times(4000, rate, seed=7))
    assert not np.array_equal(times, arrival_times(4000, rate, seed=8))


def test_infinite_rate_sends_everything_at_once_and_bad_rates_are_refused():
    assert arrival_times(5, math.inf).tolist() == [0.0] * 5
    with pytest.raises(ValueError, match="must be > 0"):
        arrival_times(5, 0)
