"""The benchmark tools against the real server: `triton-vlm bench` and perf_analyzer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from triton_vlm_clients.bench import ROWS
from triton_vlm_clients.perf_inputs import encoder_input_data, input_data

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_bench_reports_every_field_and_no_failures(server, tiny_model, tmp_path):
    out = subprocess.run(
        [str(BIN / "triton-vlm"), "bench", "--url", server.grpc_url, "--model", str(tiny_model),
         "--num-prompts", "6", "--image-count", "3", "--random-image-count", "--image-resolution", "320x240",
         "--input-len", "16", "--output-len", "6", "--request-rate", "20", "--max-concurrency", "4",
         "--output-json", str(tmp_path / "out.json"), "--disable-tqdm"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "out.json").read_text())["results"]["triton-vlm"]
    assert {key for key, _ in ROWS} <= set(result)
    assert result["successful_requests"] == 6 and result["failed_requests"] == 0, result["errors"]
    assert result["total_vision_input_tokens"] > 0 and result["total_output_tokens"] > 0
    assert result["mean_ttft_ms"] > 0 and result["p99_e2e_latency_ms"] >= result["median_e2e_latency_ms"]
    assert "Successful requests" in out.stdout


def test_bench_counts_failed_requests(server, tiny_model, tmp_path):
    # nine images per request: over the server's limit of eight, so every request fails, and says so
    out = subprocess.run(
        [str(BIN / "triton-vlm"), "bench", "--url", server.grpc_url, "--model", str(tiny_model),
         "--num-prompts", "2", "--image-count", "9", "--image-resolution", "64x64", "--output-len", "2",
         "--warmup", "0", "--output-json", str(tmp_path / "out.json"), "--disable-tqdm"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 1
    result = json.loads((tmp_path / "out.json").read_text())["results"]["triton-vlm"]
    assert result["failed_requests"] == 2 and result["successful_requests"] == 0
    assert any("the limit is 8 per request" in e for e in result["errors"]), result["errors"]


@pytest.fixture(scope="module")
def perf_analyzer():
    setup = subprocess.run(["bash", str(ROOT / "scripts" / "setup-perf-analyzer.sh")], capture_output=True,
                           text=True, timeout=900)
    if setup.returncode != 0:
        pytest.skip(f"perf_analyzer could not be installed: {setup.stderr.strip()[-500:]}")
    return ROOT / ".tools" / "bin" / "perf_analyzer"


def _perf(perf_analyzer, *args):
    out = subprocess.run([str(perf_analyzer), *args, "--measurement-mode=count_windows",
                          "--measurement-request-count=4", "--max-trials=3", "--stability-percentage=999"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_perf_analyzer_streams_the_ensemble(server, perf_analyzer, tmp_path):
    data = tmp_path / "inputs.json"
    data.write_text(json.dumps(input_data(entries=2, image_count=2, resolution="128x96", max_tokens=4)))
    stdout = _perf(perf_analyzer, "-m", "vlm", "-u", server.grpc_url, "-i", "grpc", "--async", "--streaming",
                   f"--input-data={data}", "--concurrency-range=2")
    assert "Throughput:" in stdout and "Composing models:" in stdout and "preprocess" in stdout


def test_perf_analyzer_measures_the_encoder_over_system_shared_memory(server, tiny_model, perf_analyzer, tmp_path):
    data = tmp_path / "inputs.json"
    data.write_text(json.dumps(encoder_input_data(tiny_model, entries=2, image_count=2, resolution="128x96")))
    stdout = _perf(perf_analyzer, "-m", "vision_encoder", "-u", server.grpc_url, "-i", "grpc",
                   f"--input-data={data}", "--shared-memory=system", "--output-shared-memory-size=4194304")
    assert "Throughput:" in stdout


def test_perf_analyzer_measures_preprocess(server, perf_analyzer, tmp_path):
    data = tmp_path / "inputs.json"
    data.write_text(json.dumps(input_data(entries=2, image_count=1, resolution="128x96")))
    stdout = _perf(perf_analyzer, "-m", "preprocess", "-u", server.grpc_url, "-i", "grpc", "--async", "--streaming",
                   f"--input-data={data}")
    assert "Throughput:" in stdout


def test_bench_compares_a_started_deployment_with_plain_transformers(tiny_model, tmp_path):
    # an E/PD deployment (1 encoder server + 1 language server); with no local fallback, the image
    # embeddings behind outputs equal to transformers' can only come from the encoder server
    epd = ("epd=--encoder-servers 1 --encoder-dp 1 --encoder-fallback none --gpus none --minimal "
           "--preprocess-instances 1")
    out = subprocess.run(
        [str(BIN / "triton-vlm"), "bench", "--model", str(tiny_model), "--compare", epd,
         "--transformers-baseline", "--num-prompts", "3", "--image-count", "2", "--image-resolution", "160x120",
         "--input-len", "8", "--output-len", "4", "--output-json", str(tmp_path / "out.json"), "--disable-tqdm"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert list(results) == ["epd", "transformers"]
    for result in results.values():
        assert result["successful_requests"] == 3 and result["failed_requests"] == 0
    # the same prompts and images, and greedy on both sides: the same inputs counted, the same tokens out
    for key in ("total_text_input_tokens", "total_vision_input_tokens", "total_output_tokens"):
        assert results["epd"][key] == results["transformers"][key], key
    assert "| Output throughput (tok/s) |" in out.stdout and "transformers/epd" in out.stdout
