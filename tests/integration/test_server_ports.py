"""Ports: a server whose chosen port another process took starts again on new ones."""

from __future__ import annotations

import shutil
import socket

from triton_vlm.deploy.repository import render
from triton_vlm.deploy.server import TritonServer, free_ports, listens_on


def test_free_ports_differ():
    for _ in range(20):
        ports = free_ports(3)
        assert len(set(ports)) == 3


def _unary_repository(tiny_model, tmp_path):
    repo = render(tmp_path / "repository", tiny_model)
    for model in repo.iterdir():  # vlm_unary alone: no torch, it starts in seconds
        if model.name != "vlm_unary":
            shutil.rmtree(model)
    return repo


def test_a_server_that_loses_its_port_starts_again_on_new_ones(tiny_model, tmp_path):
    repo = _unary_repository(tiny_model, tmp_path)
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


def test_another_server_on_the_port_we_chose_is_not_taken_for_ours(tiny_model, tmp_path):
    """tritonserver binds HTTP only once its models are loaded: until then another server that took the
    port answers ready there. Ours must not be called ready for it; it loses the port and starts again."""
    repo = _unary_repository(tiny_model, tmp_path)
    with TritonServer(repo, graceful_stop=False, log_file=tmp_path / "first.log") as first:
        second = TritonServer(repo, graceful_stop=False, log_file=tmp_path / "second.log")
        second.http_port = first.http_port  # chosen free, then bound by the first server before ours
        try:
            second.start().wait_ready(timeout_s=120)
            assert second.http_port != first.http_port
            assert "already in use" in (tmp_path / "second.log").read_text()
            assert listens_on(second.process.pid, second.http_port)
            assert not listens_on(second.process.pid, first.http_port)
        finally:
            second.stop()
