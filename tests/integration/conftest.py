from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.integration.families import CASES, PROMPT, deployments, epd_pair, images
from tests.reference import reference_generate
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.repository import COMMITTED
from triton_vlm.deploy.server import TritonServer
from triton_vlm.models.tiny_model import make_tiny_model


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


@pytest.fixture(scope="module")
def family_model(request, tmp_path_factory):
    """The tiny checkpoint of the test module's FAMILY (a model_type)."""
    family = request.module.FAMILY
    return make_tiny_model(tmp_path_factory.mktemp(family) / "model", family=family)


@pytest.fixture(scope="module")
def family_expected(family_model) -> dict[str, list[int]]:
    """transformers' greedy ids for each of `families.CASES`."""
    return {case: reference_generate(family_model, PROMPT, images(case), max_new_tokens=12) for case in CASES}


@pytest.fixture(scope="module")
def family_servers(request, family_model, tmp_path_factory):
    """The test module's deployments of its FAMILY's tiny checkpoint, started together: COLOCATED (name ->
    `Deployment` keyword arguments, minimal repositories) and EPD (name -> `families.epd_pair` keyword
    arguments: one language server and two encoder servers each), as `families.Servers`; all stopped
    after."""
    module = request.module
    colocated = {name: Deployment(family_model, minimal=True, **kwargs) for name, kwargs in module.COLOCATED.items()}
    epd = {name: epd_pair(family_model, **kwargs) for name, kwargs in getattr(module, "EPD", {}).items()}
    with deployments(tmp_path_factory.mktemp(f"{module.FAMILY}-servers"), colocated, epd) as started:
        yield started
