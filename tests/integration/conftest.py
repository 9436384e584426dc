from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.integration.families import CASES, PROMPT, family_deployments, images
from tests.integration.serve import serving
from tests.reference import reference_generate
from triton_vlm.deploy.repository import COMMITTED
from triton_vlm.models.tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """The committed repository, unchanged, served the way the README says (`tritonserver
    --model-repository model_repository` with $TRITON_VLM_MODEL), on free ports; always stopped."""
    tritonserver = str(Path(sys.executable).parent / "tritonserver")  # the command the README gives
    with serving((COMMITTED, tmp_path_factory.mktemp("server")), executable=tritonserver,
                 env={**os.environ, "TRITON_VLM_MODEL": str(tiny_model)}) as server:
        yield server


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
    """The test module's FAMILY in its two deployments (`families.family_deployments`): "colocated" and
    "disaggregated", whose embeddings come back by the module's EPD_TRANSPORT (grpc | shm); stopped after."""
    module = request.module
    with family_deployments(tmp_path_factory.mktemp(f"{module.FAMILY}-servers"), family_model,
                            module.EPD_TRANSPORT, full=getattr(module, "FULL_EPD", False)) as started:
        yield started
