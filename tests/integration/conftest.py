from __future__ import annotations

import pytest

from triton_vlm.repository import render
from triton_vlm.server import TritonServer


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """The committed repository rendered for the tiny model, on free ports; always stopped."""
    root = tmp_path_factory.mktemp("server")
    repo = render(root / "repository", tiny_model)
    triton = TritonServer(repo, graceful_stop=False, log_file=root / "tritonserver.log")
    try:
        yield triton.start().wait_ready(timeout_s=300)
    finally:
        triton.stop()
