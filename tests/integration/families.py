"""What the family tests through the server share: the cases, their images, starting every deployment
at once, checking every mode's answers, and (`conftest.py`) the module's tiny checkpoint, its servers
and transformers' answers for it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from tests.conftest import make_image
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import TritonServer
from triton_vlm_clients.client import stream

PROMPT = "Describe the pictures."
CASES = {"text-only": [], "one-image": [(640, 480)], "two-sizes": [(300, 200), (200, 500)],
         "four-images": [(640, 480), (300, 200), (800, 600), (200, 500)]}


def images(case: str) -> list[bytes]:
    return [make_image(w, h, seed=i, fmt="PNG" if i % 2 else "JPEG") for i, (w, h) in enumerate(CASES[case])]


def assert_every_mode_equals(servers: dict[str, TritonServer], expected: dict[str, list[int]], case: str) -> None:
    """Each server's greedy ids for `case` equal transformers' (`expected`)."""
    for name, server in servers.items():
        answer = stream(server.grpc_url, prompt=PROMPT, images=images(case), max_tokens=12)
        assert answer.output_ids == expected[case], name


def epd_pair(model, transport: str = "grpc", encoder_dp: int = 1) -> tuple[Deployment, Callable]:
    """E/PD for `deployments`: the encoder servers' deployment (`encoder_dp` replicas each), and encoder
    URLs -> the language server's (no local fallback, no caches: every image is encoded remotely)."""
    encoder = Deployment(model, mode="encoder", encoder_dp=encoder_dp, embedding_cache_mb=0)
    return encoder, lambda urls: Deployment(model, mode="language", encoder_dp=1, minimal=True, embedding_cache_mb=0,
                                            encoder_urls=urls, encoder_transport=transport, encoder_fallback="none")


class Servers(dict):
    """name -> the running server of each deployment; `encoders`: E/PD name -> its two encoder servers."""

    encoders: dict[str, list[TritonServer]]


@contextlib.contextmanager
def deployments(root, colocated: dict[str, Deployment], epd: dict[str, tuple[Deployment, Callable]]):
    """Servers of every deployment, started together (`Servers`). `epd`: name -> (the encoder servers'
    deployment, encoder URLs -> the language server's); two encoder servers each, shared by the language
    servers whose encoder deployments are equal (Qwen3-VL's gRPC and shared-memory E/PD)."""
    with contextlib.ExitStack() as stack:

        def start(name: str, deployment: Deployment) -> TritonServer:
            server = TritonServer(deployment.render(root / name), graceful_stop=False, log_file=root / f"{name}.log")
            stack.callback(server.stop)
            return server.start()

        started = {name: start(name, d) for name, d in colocated.items()}
        pools: dict[Deployment, list[TritonServer]] = {}  # language servers of equal encoders share them
        for name, (encoder, _) in epd.items():
            if encoder not in pools:
                pools[encoder] = [start(f"{name}-encoder{i}", encoder) for i in range(2)]
        encoders = {name: pools[encoder] for name, (encoder, _) in epd.items()}
        for name, pair in epd.items():
            for server in encoders[name]:
                server.wait_ready(300)
            urls = tuple(e.grpc_url for e in encoders[name])
            started[name] = start(name, pair[1](urls))
        for server in started.values():
            server.wait_ready(300)
        servers = Servers(started)
        servers.encoders = encoders
        yield servers
