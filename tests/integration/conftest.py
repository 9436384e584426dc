from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from triton_vlm.deploy.repository import COMMITTED
from triton_vlm.deploy.server import TritonServer


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """The committed repository, unchanged, served the way the README says (`tritonserver
    --model-repository model_repository` with $TRITON_VLM_MODEL), on free ports; always stopped."""
    root = tmp_path_factory.mktemp("server")
    triton = TritonServer(COMMITTED, log_file=root / "tritonserver.log", graceful_stop=False,
                          executable=str(Path(sys.executable).parent / "tritonserver"),
                          env={**os.environ, "TRITON_VLM_MODEL": str(tiny_model)})
    try:
        yield triton.start().wait_ready(timeout_s=300)
    finally:
        triton.stop()
