"""The GPU check: the whole GPU path in one command, for a GPU machine lent for minutes (docs/gpu.md).

    python -m triton_vlm_clients.gpu_check --out DIR [--dry-run] [--budget-s 480]

Each step runs in its own process with its own deadline (cut to what is left of the budget), so a step
that fails or hangs does not stop the next; the servers a step started are stopped after it whatever
happened. Writes DIR/gpu-check.json (each step: ok, seconds, its figures or its error), DIR/steps.log
and DIR/servers.log (the tail of every server's log).

1. environment: versions, the GPU, and whether the python backend stub finds every library it links.
2. server_parity: the real tritonserver with 2 KIND_GPU vision_encoder replicas and the language model on
   the GPU, fp32, against the same deployment on CPU: a 4-image request's greedy ids must be equal. And
   where the embeddings travel: the language model counts the memory its `_IMAGE_EMBEDS` arrived in
   (triton_vlm_image_embeds_received_total{memory}), and the encode and language_model stubs record their
   CUDA copies (TRITON_VLM_CUDA_COPY_TRACE): no device-to-host copy as large as the request's embeddings.
3. gpu_tests: pytest's `gpu` marker (tests/gpu): each family's vision tower, decoder and tensor-parallel
   layers on CUDA, greedy ids equal to transformers' generate on the same GPU.
4. bench_7b: Qwen2.5-VL-7B's shapes with random bf16 weights made on the GPU: TTFT, ITL and 8-stream
   throughput through the server, next to transformers' generate on the same GPU and weights.
5. encoder_dp: 4 x 1280x720 images through `image_encoder` with 1 vision_encoder replica and with 2 on
   the one GPU (the 7B-shaped vision tower).

--dry-run runs the same steps on CPU (--gpus none; the tiny model stands in for the 7B-shaped one, 320x180
images for the 1280x720 ones, one server answers as both of server_parity's (they are the same on CPU),
and the GPU-only assertions are reported, not required; each step may take DRY_RUN_SLOWER times its GPU
deadline): CI runs it, so the check's own logic is tested.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .images import synthetic_image

STEPS = {"environment": 30, "server_parity": 100, "gpu_tests": 120, "bench_7b": 260, "encoder_dp": 90}
# The deadlines above fit the GPU machine's minutes. A dry run tests the check's logic on a 2-core CI
# machine that can run several times slower than this one on a busy day: its steps get this much longer.
DRY_RUN_SLOWER = 4
PROMPT = "Describe the pictures."
FOUR_IMAGES = [(640, 480), (300, 200), (800, 600), (200, 500)]

# Qwen2.5-VL-7B-Instruct's config.json shapes (the vocabulary stays the small tokenizer's: see docs/gpu.md)
QWEN2_5_VL_7B = {
    "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, max_position_embeddings=128000, rope_theta=1000000.0, rms_norm_eps=1e-6,
                 initializer_range=0.02, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, tokens_per_second=2, initializer_range=0.02),
}


# ---------------------------------------------------------------------------------------------- the driver

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="on CPU, with the tiny model (what CI runs)")
    p.add_argument("--budget-s", type=float, default=480, help="the whole check ends within this")
    p.add_argument("--steps", default=",".join(STEPS), help="a subset, comma-separated")
    p.add_argument("--work", type=Path, default=None, help="models and repositories (default: a temp folder)")
    p.add_argument("--step", help=argparse.SUPPRESS)  # run one step in this process
    args = p.parse_args(argv)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"triton-vlm-gpu-check-{os.getpid()}"
    if args.step:
        return _run_step(args.step, work, args.dry_run)
    return _drive(args.out, work, args.dry_run, args.budget_s, args.steps.split(","))


def _drive(out: Path, work: Path, dry_run: bool, budget_s: float, steps: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "dry_run": dry_run, "host": platform.node(), "steps": {}}
    log = out / "steps.log"
    for name in steps:
        left = budget_s - (time.monotonic() - start)
        limit = STEPS[name] * (DRY_RUN_SLOWER if dry_run else 1)
        deadline = min(limit, left - 5)  # 5 s kept for stopping what it started
        if deadline < min(10, limit):
            summary["steps"][name] = {"ok": False, "error": "not run: the budget was spent"}
            continue
        result_file = work / f"{name}.json"
        result_file.unlink(missing_ok=True)
        t0 = time.monotonic()
        with open(log, "a") as f:
            f.write(f"\n===== {name} (deadline {deadline:.0f} s) =====\n")
            f.flush()
            process = subprocess.Popen([sys.executable, "-m", "triton_vlm_clients.gpu_check", "--out", str(out),
                                        "--work", str(work), "--step", name, *(["--dry-run"] if dry_run else [])],
                                       stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = process.wait(timeout=deadline)
                error = None if code == 0 else f"exited with {code}"
            except subprocess.TimeoutExpired:
                error = f"timed out after {deadline:.0f} s"
            _kill_group(process.pid)
            _stop_servers(work)
        step = json.loads(result_file.read_text()) if result_file.exists() else {}
        if error and "error" not in step:
            step["error"] = error
        step["ok"] = error is None and step.get("ok", False)
        step["seconds"] = round(time.monotonic() - t0, 1)
        summary["steps"][name] = step
        (out / "gpu-check.json").write_text(json.dumps(summary, indent=1) + "\n")  # a cut-off run keeps the rest
        print(f"{name}: {'ok' if step['ok'] else 'FAILED'} in {step['seconds']} s"
              + ("" if step["ok"] else f" ({step.get('error')})"), flush=True)
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["ok"] = all(s["ok"] for s in summary["steps"].values())
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=1) + "\n")
    _collect_server_logs(work, out / "servers.log")
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _stop_servers(work: Path) -> None:
    """Kill what a step left running: each server it started wrote its process group and shared memory prefix
    to servers.pids."""
    pids = work / "servers.pids"
    if pids.exists():
        for line in pids.read_text().splitlines():
            pid, shm_prefix = line.split()
            _kill_group(int(pid))
            for region in Path("/dev/shm").glob(f"{shm_prefix}*"):  # a killed server leaves them
                region.unlink(missing_ok=True)
        pids.unlink()


def _collect_server_logs(work: Path, dest: Path, tail_bytes: int = 400_000) -> None:
    with open(dest, "w") as f:
        for log in sorted(work.glob("**/*.server.log")):
            text = log.read_bytes()[-tail_bytes:].decode(errors="replace")
            f.write(f"\n===== {log.relative_to(work)} =====\n{text}")


# ----------------------------------------------------------------------------------------------- the steps

def _run_step(name: str, work: Path, dry_run: bool) -> int:
    result_file = work / f"{name}.json"
    try:
        result = globals()[f"step_{name}"](work, dry_run)
        result.setdefault("ok", True)
    except Exception as e:  # the step's failure is its result; the driver goes on
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    result_file.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0 if result["ok"] else 1


def step_environment(work: Path, dry_run: bool) -> dict:
    import torch
    import transformers

    from triton_vlm.deploy import launcher

    stub = launcher.backend_directory() / "python" / "triton_python_backend_stub"
    env = launcher.server_env()
    ldd = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=env).stdout
    missing = [line.split()[0] for line in ldd.splitlines() if "not found" in line]
    result = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
              "numpy": np.__version__, "cuda": torch.cuda.is_available(), "stub_missing_libraries": missing}
    if torch.cuda.is_available():
        result.update(gpu=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda,
                      gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    result["ok"] = not missing and (dry_run or result["cuda"])
    return result


def step_gpu_tests(work: Path, dry_run: bool) -> dict:
    import xml.etree.ElementTree as ET

    report = work / "gpu-tests.xml"
    root = Path(__file__).resolve().parents[2]
    code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           f"--junitxml={report}", str(root / "tests" / "gpu")], cwd=root).returncode
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or
              c.find("error") is not None]
    return {"ok": code == 0, "pytest_exit": code, **counts, "failed": failed, "seconds": float(suite.get("time", 0))}


def step_server_parity(work: Path, dry_run: bool) -> dict:
    from triton_vlm.deploy.deployment import Deployment
    from triton_vlm.models.tiny_model import make_tiny_model

    from .client import stream
    from .hf_baseline import HFInputs
    from .prometheus import server_series

    model = make_tiny_model(work / "tiny", family="qwen2_5_vl")
    gpus = () if dry_run else (0,)
    copies = work / "cuda-copies"
    copies.mkdir(exist_ok=True)
    images = [synthetic_image(w, h, seed=i, fmt="PNG" if i % 2 else "JPEG") for i, (w, h) in enumerate(FOUR_IMAGES)]
    # minimal: only what `vlm` needs (no image_encoder, no vlm_unary): fewer stubs to start in the budget
    deployments = {"cpu": Deployment(model, encoder_dp=2, gpus=(), dtype="float32", embedding_cache_mb=0, minimal=True),
                   "gpu": Deployment(model, encoder_dp=2, gpus=gpus, dtype="float32", embedding_cache_mb=0,
                                     minimal=True)}
    if dry_run:  # no GPU: the two are one deployment, and one server answers as both
        del deployments["cpu"]
    env = dict(os.environ, TRITON_VLM_CUDA_COPY_TRACE=str(copies))
    with _servers(work / "parity", deployments, dry_run, {"gpu": env}) as servers:
        answers = {name: stream(servers.get(name, servers["gpu"]).grpc_url, prompt=PROMPT, images=images,
                                max_tokens=16, ignore_eos=True) for name in ("cpu", "gpu")}
        received = {labels["memory"]: value for labels, value in
                    server_series(servers["gpu"], "triton_vlm_image_embeds_received_total")}
        servers["gpu"].stop(graceful=True)  # finalize writes the copy traces
    ids = {name: a.output_ids for name, a in answers.items()}
    hf = HFInputs(model)
    image_tokens = hf.image_tokens(images)
    embeds_bytes = image_tokens * hf.config.text_config.hidden_size * 4
    traces = {p.name: json.loads(p.read_text()) for p in copies.glob("*.json")}
    dtoh = max([kind["max_bytes"] for t in traces.values() for name, kind in t.items() if "DtoH" in name] or [0])
    evidence = {"embeds_received": received, "image_tokens": image_tokens, "embeddings_bytes": embeds_bytes,
                "copy_traces": traces, "largest_device_to_host_copy_bytes": dtoh}
    traced = {name.split("-")[0] for name in traces} >= {"encode", "language_model", "language_engine"}
    on_gpu = received.get("gpu", 0) >= 1 and not received.get("cpu") and traced and dtoh < embeds_bytes
    equal = ids["cpu"] == ids["gpu"] and len(ids["cpu"]) == 16
    return {"ok": equal and (dry_run or on_gpu), "ids_equal": equal, "ids": ids, "embeddings_stay_on_gpu": on_gpu,
            **evidence}


def step_bench_7b(work: Path, dry_run: bool) -> dict:
    from triton_vlm.deploy.deployment import Deployment

    model, weights = _model_7b(work, dry_run, keep=True)
    result = {"model": "tiny (dry run)" if dry_run else "Qwen2.5-VL-7B shapes, random bf16 weights"}
    result["transformers"] = _transformers_timings(model, dry_run, weights)
    weights = None  # noqa: F841 (freed before the server loads its own)
    deployments = {"triton-vlm": Deployment(model, encoder_dp=2, gpus=() if dry_run else (0,), embedding_cache_mb=0,
                                            enable_prefix_caching=False, minimal=True)}
    with _servers(work / "bench", deployments, dry_run) as servers:
        url = servers["triton-vlm"].grpc_url
        result["triton-vlm single stream"] = _bench(url, model, work / "single.json", prompts=4, concurrency=1,
                                                    output_len=8 if dry_run else 64, image=_image(dry_run))
        result["triton-vlm 8 streams"] = _bench(url, model, work / "eight.json", prompts=16, concurrency=8,
                                                output_len=8 if dry_run else 64, image=_image(dry_run))
    hf, one, eight = result["transformers"], result["triton-vlm single stream"], result["triton-vlm 8 streams"]
    if one["failed_requests"] or eight["failed_requests"]:
        return {**result, "ok": False, "error": "; ".join(one["errors"] + eight["errors"])}
    result["ratios"] = {
        "ttft transformers/triton-vlm": hf["ttft_ms"] / one["median_ttft_ms"],
        "itl transformers/triton-vlm": hf["itl_ms"] / one["median_itl_ms"],
        "8-stream throughput triton-vlm/transformers batch 8": eight["output_throughput"] / hf["batch8_tokens_per_s"],
    }
    return result


def step_encoder_dp(work: Path, dry_run: bool) -> dict:
    import tritonclient.grpc as grpcclient

    from triton_vlm.deploy.deployment import Deployment

    model, _ = _model_7b(work, dry_run)
    gpus = () if dry_run else (0,)
    width, height = _image(dry_run)
    images = [synthetic_image(width, height, seed=i, fmt="JPEG") for i in range(4)]
    deployments = {f"dp{n}": Deployment(model, mode="encoder", encoder_dp=n, gpus=gpus, embedding_cache_mb=0)
                   for n in (1, 2)}
    result: dict = {"images": f"4 x {width}x{height} JPEG", "repeats": 5}
    with _servers(work / "encoder_dp", deployments, dry_run) as servers:
        for name, server in servers.items():
            tensor = grpcclient.InferInput("_IMAGES", [len(images)], "BYTES")
            tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
            with grpcclient.InferenceServerClient(server.grpc_url) as client:
                times = []
                for i in range(6):  # one warm-up
                    t0 = time.perf_counter()
                    rows = client.infer("image_encoder", [tensor]).as_numpy("_IMAGE_EMBEDS").shape[0]
                    if i:
                        times.append(time.perf_counter() - t0)
            result[f"{name}_ms"] = statistics.median(times) * 1000
            result["image_tokens"] = rows
    result["dp1/dp2"] = result["dp1_ms"] / result["dp2_ms"]
    return result


# ---------------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _servers(root: Path, deployments: dict, dry_run: bool, envs: dict | None = None):
    """Each deployment's tritonserver, started together; their process groups noted for the driver. In a dry
    run, a server whose load hangs (once in CI: not ready after 240 s; both of encoder_dp's take 20-30 s
    here with both cores busy) has its stubs' stacks logged and starts again: twice 150 s fit the step."""
    from triton_vlm.deploy.server import TritonServer

    class Noted(TritonServer):
        def start(self) -> TritonServer:  # every start, a start again too (new ports, new prefix)
            super().start()
            with open(root.parent / "servers.pids", "a") as f:
                f.write(f"{self.process.pid} {self.shm_prefix}\n")
            return self

    root.mkdir(parents=True, exist_ok=True)
    servers = {}
    try:
        for name, deployment in deployments.items():
            servers[name] = Noted(deployment.render(root / name), log_file=root / f"{name}.server.log",
                                  extra_args=deployment.server_args(), env=(envs or {}).get(name),
                                  graceful_stop=False).start()
        for server in servers.values():
            server.wait_ready(timeout_s=150 if dry_run else 240, restart_hung=dry_run)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def _model_7b(work: Path, dry_run: bool, keep: bool = False):
    """The tiny checkpoint (dry run), or one with Qwen2.5-VL-7B's shapes: the tiny one's tokenizer, image
    processor and special tokens, random bf16 weights made on the GPU, saved as a checkpoint. -> (its path,
    with `keep` the transformers model just made, else None)."""
    from triton_vlm.models.tiny_model import make_tiny_model

    out = work / ("tiny" if dry_run else "qwen2_5_vl-7b-shapes")
    if (out / "done").exists() or (dry_run and (out / "config.json").exists()):
        return out, None
    make_tiny_model(out, family="qwen2_5_vl")
    if dry_run:
        return out, None
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = config_7b(json.loads((out / "config.json").read_text()))
    for name in out.glob("model*.safetensors*"):
        name.unlink()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)).eval()
    finally:
        torch.set_default_dtype(default)
    t0 = time.perf_counter()
    model.save_pretrained(out, safe_serialization=True)
    print(f"7B-shaped checkpoint saved in {time.perf_counter() - t0:.0f} s", flush=True)
    (out / "done").write_text("")
    return out, (model if keep else None)


def config_7b(tiny: dict) -> dict:
    """The tiny checkpoint's config.json with Qwen2.5-VL-7B's shapes (its special token ids kept)."""
    config = json.loads(json.dumps(tiny))
    for part in ("text_config", "vision_config"):
        for key in ("layer_types", "max_window_layers", "use_sliding_window", "sliding_window"):
            config[part].pop(key, None)  # per-layer lists sized for the tiny model: derived again
    config["text_config"].update(QWEN2_5_VL_7B["text"])
    config["vision_config"].update(QWEN2_5_VL_7B["vision"])
    config.update(initializer_range=0.02, torch_dtype="bfloat16")
    return config


def _transformers_timings(model: Path, dry_run: bool, weights=None) -> dict:
    """transformers' generate on the same device and weights: one image (`_image`) and a prompt, TTFT and ITL
    of one stream (median of 3 after a warm-up), and the tokens/s of 8 such requests as one batch."""
    import torch
    import transformers

    from .hf_baseline import HFInputs, _Clock

    device = "cpu" if dry_run else "cuda:0"
    dtype = torch.float32 if dry_run else torch.bfloat16
    n = 8 if dry_run else 64
    inputs = HFInputs(model)
    hf = weights or transformers.AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
    hf = hf.to(device).eval()
    images = [synthetic_image(*_image(dry_run), seed=i, fmt="JPEG") for i in range(8)]

    def run(batch: list[bytes]) -> tuple[list[float], float]:
        start = time.perf_counter()
        feats = [inputs(PROMPT, [image]) for image in batch]
        joined = {k: torch.cat([f[k] for f in feats]).to(device) for k in feats[0]}
        clock = _Clock(start)
        with torch.inference_mode():
            hf.generate(**joined, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
        if device != "cpu":
            torch.cuda.synchronize()
        return clock.times, time.perf_counter() - start

    run(images[:1])  # warm-up
    singles = [run(images[i:i + 1])[0] for i in range(3)]
    _, batch_s = run(images)
    hf = None  # noqa: F841 (frees the weights before the server loads its own)
    if device != "cpu":
        torch.cuda.empty_cache()
    return {"ttft_ms": statistics.median(t[0] for t in singles) * 1000,
            "itl_ms": statistics.median(np.diff(t).mean() for t in singles) * 1000,
            "batch8_tokens_per_s": 8 * n / batch_s, "output_len": n}


def _image(dry_run: bool) -> tuple[int, int]:
    """The bench's and encoder DP's image size; the dry run tests the check's logic, not the figures."""
    return (320, 180) if dry_run else (1280, 720)


def _bench(url: str, model: Path, out: Path, prompts: int, concurrency: int, output_len: int,
           image: tuple[int, int]) -> dict:
    """Our bench client against the server: one `image`-sized image and 64 prompt tokens a request."""
    code = subprocess.run([sys.executable, "-m", "triton_vlm_clients.bench", "--url", url, "--model", str(model),
                           "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--image-count", "1",
                           "--image-resolution", "{}x{}".format(*image), "--output-len", str(output_len),
                           "--ignore-eos", "--disable-tqdm", "--output-json", str(out)]).returncode
    results = json.loads(out.read_text())["results"]["triton-vlm"]
    keep = ("successful_requests", "failed_requests", "errors", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
            "median_itl_ms", "p99_itl_ms")
    return {"bench_exit": code, **{k: results.get(k) for k in keep}}


if __name__ == "__main__":
    sys.exit(main())
