"""The commands the README documents, run as a user runs them."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
from pathlib import Path

import openai
import tritonclient.http as httpclient

from tests.conftest import make_image, wait_until
from tests.integration.processes import alive, descendants
from triton_vlm.deploy.repository import COMMITTED
from triton_vlm.deploy.server import free_ports, stop_process_group, wait_ready
from triton_vlm.models import FAMILIES
from triton_vlm_clients.client import infer

BIN = Path(sys.executable).parent


def test_plain_tritonserver_serves_the_committed_repository(server):
    """The session's server is `tritonserver --model-repository model_repository` (conftest.py)."""
    assert server.repository == COMMITTED and server.executable == str(BIN / "tritonserver")
    answer = infer(server.http_url, protocol="http", prompt="hi", images=[make_image(64, 64)], max_tokens=3)
    assert len(answer.output_ids) >= 1


def test_serve_with_encoder_replicas_two_ranks_the_openai_api_and_infer_commands(tiny_model, tmp_path):
    http, grpc, metrics, api = free_ports(4)
    image = tmp_path / "cat.png"
    image.write_bytes(make_image(120, 90))
    with open(tmp_path / "log", "wb") as log:
        process = subprocess.Popen(
            [str(BIN / "triton-vlm"), "serve", "--model", str(tiny_model), "--http-port", str(http),
             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--encoder-dp", "3",
             "--encoder-threads", "1", "--tp", "2", "--gpus", "none", "--minimal", "--preprocess-instances", "1",
             "--openai-port", str(api), "--openai-host", "127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(process, f"127.0.0.1:{http}")
            with httpclient.InferenceServerClient(f"127.0.0.1:{http}") as client:
                encoder = client.get_model_config("vision_encoder")
                encode = client.get_model_config("encode")
                preprocess = client.get_model_config("preprocess")
            assert encoder["instance_group"][0]["count"] == 3 and preprocess["instance_group"][0]["count"] == 1
            assert encoder["parameters"]["threads"]["string_value"] == "1"
            assert encode["parameters"]["data_parallel"]["string_value"] == "3"
            out = subprocess.run(
                [str(BIN / "triton-vlm"), "infer", "--url", f"127.0.0.1:{grpc}", "--image", str(image),
                 "--prompt", "what is this", "--max-tokens", "4", "--stream"],
                capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            assert "output_ids: [" in out.stderr and "time to first token" in out.stderr
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{api}/v1", api_key="unused", max_retries=3)
            assert [m.id for m in client.models.list().data] == [str(Path(tiny_model).resolve())]
            url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
            answer = client.chat.completions.create(  # the model by its folder's name, an alias of its path
                model=Path(tiny_model).name, max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is this"}]}])
            assert answer.usage.completion_tokens >= 1 and answer.usage.prompt_tokens > 20
            below = descendants(process.pid)  # the server, its stubs, the language engine and its other rank
            assert any(b"triton_vlm.engine.tp_worker" in Path(f"/proc/{p}/cmdline").read_bytes() for p in below)
            process.send_signal(signal.SIGTERM)  # as `docker stop` or systemd stop it: it ends, and ends the server
            process.wait(timeout=60)
            wait_until(lambda: not any(map(alive, below)), 30, "every process of the server to exit")
        finally:
            stop_process_group(process)


def test_render_prints_the_tritonserver_arguments(tiny_model, tmp_path):
    out = subprocess.run([str(BIN / "triton-vlm"), "render", str(tmp_path / "repo"), "--model", str(tiny_model),
                          "--encoder-dp", "2", "--gpus", "0,1", "--preprocess-instances", "1"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"--model-repository={tmp_path / 'repo'}",
                                  "--model-control-mode=explicit", "--load-model=*", "--disable-auto-complete-config",
                                  "--cuda-memory-pool-byte-size=0:268435456",
                                  "--cuda-memory-pool-byte-size=1:268435456"]
    config = (tmp_path / "repo" / "vision_encoder" / "config.pbtxt").read_text()
    assert "{ count: 1 kind: KIND_GPU gpus: [ 0 ] }, { count: 1 kind: KIND_GPU gpus: [ 1 ] }" in config
    preprocess = (tmp_path / "repo" / "preprocess" / "config.pbtxt").read_text()
    assert "instance_group [ { count: 1 kind: KIND_CPU } ]" in preprocess


def test_serve_refuses_a_family_we_do_not_serve_naming_the_ones_we_do(tiny_model, tmp_path):
    model = tmp_path / "llava"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llava"}')
    out = subprocess.run([str(BIN / "triton-vlm"), "serve", "--model", str(model)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert f"model type 'llava' is not supported; supported families: {', '.join(FAMILIES)}" in out.stderr


def test_tritonserver_refuses_a_repository_with_a_setting_we_do_not_know(tiny_model, tmp_path):
    """A misspelt or retired config.pbtxt parameter stops the load with its name, instead of being ignored
    (the paged engine retired `max_prefill_tokens`; a repository that still sets it must not start)."""
    from triton_vlm.deploy.repository import render, set_parameter

    repo = render(tmp_path / "repo", tiny_model)
    for model in [p for p in repo.iterdir() if p.name != "preprocess"]:
        subprocess.run(["rm", "-rf", str(model)], check=True)
    config = repo / "preprocess" / "config.pbtxt"
    config.write_text(set_parameter(config.read_text(), "max_image_pixel", "1000"))
    http, grpc, metrics = free_ports(3)
    out = subprocess.run([str(BIN / "tritonserver"), f"--model-repository={repo}", f"--http-port={http}",
                          f"--grpc-port={grpc}", f"--metrics-port={metrics}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "unknown parameter 'max_image_pixel' in config.pbtxt; this model takes" in out.stdout + out.stderr
