from __future__ import annotations

import compileall
import contextlib
import os
import sys
from pathlib import Path

import pytest

from tests.integration.families import CASES, PROMPT, family_deployments, images
from tests.integration.serve import serving
from tests.reference import reference_generate
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.repository import COMMITTED
from triton_vlm.models.tiny_model import make_tiny_model


def _claim_session_servers(tmp_path_factory, worker_id: str) -> None:
    """Under xdist, the tests that use the session's servers run on one worker (`tests/conftest.py`): on two,
    each would start them, and tests that end a server would race the other's. A module that uses them must
    not be in `OWN_SERVERS`."""
    if worker_id == "master":
        return
    claim, mine = (tmp_path_factory.getbasetemp().parent / f"session-servers-{name}" for name in ("claim", worker_id))
    mine.write_text(worker_id)
    with contextlib.suppress(FileExistsError):
        os.link(mine, claim)  # atomic: the first worker here claims the servers
    assert claim.read_text() == worker_id, f"the session's servers on {worker_id} and on {claim.read_text()}"


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory, worker_id):
    """The committed repository, unchanged, served the way the README says (`tritonserver
    --model-repository model_repository` with $TRITON_VLM_MODEL), on free ports; always stopped."""
    _claim_session_servers(tmp_path_factory, worker_id)
    tritonserver = str(Path(sys.executable).parent / "tritonserver")  # the command the README gives
    with serving((COMMITTED, tmp_path_factory.mktemp("server")), executable=tritonserver,
                 env={**os.environ, "TRITON_VLM_MODEL": str(tiny_model)}) as server:
        yield server


@pytest.fixture(scope="session")
def tp2_server(tiny_model, tmp_path_factory, worker_id):
    """The session's second server, the one tests may hurt: tensor parallelism 2, encoder DP 2 (a thread
    each), no embedding cache (every image reaches the encoders), private image URLs allowed (for
    test_isolation's dripping image server), `--minimal`. test_isolation kills its stubs and its engine (each
    test leaves it serving); test_language_serving compares its two ranks with the session server's one and,
    last, kills the server itself. Its repository is one served before (its `__pycache__` written before the
    load), where a reload that changes no file keeps a dead stub's instance."""
    _claim_session_servers(tmp_path_factory, worker_id)
    deployment = Deployment(tiny_model, tensor_parallel=2, encoder_dp=2, encoder_threads=1, embedding_cache_mb=0,
                            minimal=True)
    root = tmp_path_factory.mktemp("tp2")
    repository = deployment.render(root / "repository")
    compileall.compile_dir(repository, quiet=1)
    with serving((repository, root), env={**os.environ, "TRITON_VLM_ALLOW_PRIVATE_URLS": "1"}) as server:
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
