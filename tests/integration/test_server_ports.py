"""Ports: a server whose chosen port another process took starts again on new ones, and what answers on
the taken port is never taken for it."""

from __future__ import annotations

import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from triton_vlm.deploy.repository import render
from triton_vlm.deploy.server import TritonServer, free_ports, listens_on


def test_free_ports_differ():
    for _ in range(20):
        ports = free_ports(3)
        assert len(set(ports)) == 3


class _AlwaysReady(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_server_that_loses_its_port_starts_again_on_new_ones(tiny_model, tmp_path):
    """tritonserver binds HTTP only once its models are loaded: until then whatever took the port answers
    there (another tritonserver answers `ready`). Ours is not called ready for it; it fails to bind and
    starts again on new ports."""
    repo = render(tmp_path / "repository", tiny_model)
    for model in repo.iterdir():  # vlm_unary alone: no torch, it starts in seconds
        if model.name != "vlm_unary":
            shutil.rmtree(model)
    triton = TritonServer(repo, graceful_stop=False, log_file=tmp_path / "tritonserver.log")
    taken = triton.http_port
    squatter = HTTPServer(("0.0.0.0", taken), _AlwaysReady)  # took the port before the server bound it
    threading.Thread(target=squatter.serve_forever, daemon=True).start()
    try:
        triton.start().wait_ready(timeout_s=120)
        assert triton.http_port != taken
        assert "already in use" in (tmp_path / "tritonserver.log").read_text()
        assert listens_on(triton.process.pid, triton.http_port) and not listens_on(triton.process.pid, taken)
    finally:
        triton.stop()
        squatter.shutdown()
        squatter.server_close()
