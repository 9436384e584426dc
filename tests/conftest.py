from __future__ import annotations

import pytest

from triton_vlm_clients.images import synthetic_image


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-weight Qwen2.5-VL checkpoint written by our own generator, loaded like a real one."""
    from triton_vlm.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


make_image = synthetic_image
