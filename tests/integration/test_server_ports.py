"""Ports: a server whose chosen port another process took starts again on new ones."""

from __future__ import annotations

import shutil
import socket

from triton_vlm.deploy.repository import render
from triton_vlm.deploy.server import TritonServer, free_ports


def test_free_ports_differ():
    for _ in range(20):
        ports = free_ports(3)
        assert len(set(ports)) == 3


def test_a_server_that_loses_its_port_starts_again_on_new_ones(tiny_model, tmp_path):
    repo = render(tmp_path / "repository", tiny_model)
    for model in repo.iterdir():  # vlm_unary alone: no torch, it starts in seconds
        if model.name != "vlm_unary":
            shutil.rmtree(model)
    triton = TritonServer(repo, graceful_stop=False, log_file=tmp_path / "tritonserver.log")
    taken = triton.http_port
    with socket.socket() as squatter:  # another process takes the HTTP port before the server binds it
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("0.0.0.0", taken))
        squatter.listen()
        try:
            triton.start().wait_ready(timeout_s=120)
            assert triton.http_port != taken
            assert "already in use" in (tmp_path / "tritonserver.log").read_text()
        finally:
            triton.stop()
