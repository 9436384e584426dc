"""What the family tests through the server share: the cases, their images, the two deployments every
family is served in, and checking both deployments' answers; (`conftest.py`) the module's tiny checkpoint,
its servers and transformers' answers for it."""

from __future__ import annotations

import contextlib

from tests.conftest import make_image
from tests.integration.serve import serving
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import TritonServer
from triton_vlm_clients.client import stream
from triton_vlm_clients.prometheus import server_metric

PROMPT = "Describe the pictures."
CASES = {"text-only": [], "one-image": [(640, 480)], "two-sizes": [(300, 200), (200, 500)],
         "four-images": [(640, 480), (300, 200), (800, 600), (200, 500)]}


def images(case: str, seed: int = 0) -> list[bytes]:
    """The case's images; another `seed` gives images of the same sizes that no cache has seen."""
    return [make_image(w, h, seed=seed + i, fmt="PNG" if i % 2 else "JPEG") for i, (w, h) in enumerate(CASES[case])]


def assert_every_mode_equals(servers: dict[str, TritonServer], expected: dict[str, list[int]], case: str) -> None:
    """Each server's greedy ids for `case` equal transformers' (`expected`); the disaggregated server's prompt
    was prefilled on the colocated one, and its KV came over."""
    disaggregated, remote, kv = servers["disaggregated"], 'where="remote"', "triton_vlm_kv_transfer_bytes_total"
    before = server_metric(disaggregated, "triton_vlm_prefills_total", remote), server_metric(disaggregated, kv)
    for name, server in servers.items():
        answer = stream(server.grpc_url, prompt=PROMPT, images=images(case), max_tokens=12)
        assert answer.output_ids == expected[case], name
    assert server_metric(disaggregated, "triton_vlm_prefills_total", remote) == before[0] + 1
    assert server_metric(disaggregated, kv) > before[1]


@contextlib.contextmanager
def family_deployments(root, model, transport: str):
    """A family's two deployments, -> {"colocated": server, "disaggregated": server}:
    - colocated: encoder DP 2 (a request's images split over two replicas) and tensor parallelism 2 in one
      server, with the default caches. It keeps `image_encoder` and has a `language_model`, so it is also
      an encoder server and a prefill server:
    - disaggregated (E/P/D): a decode server whose every image is encoded by the colocated server (no local
      encoder, no embedding cache of its own), the embeddings coming back by `transport` (grpc | shm), and
      whose every prompt is prefilled there too (TP 2), its KV coming back to this server's TP 1 engine
      inside the answer (grpc) or, with shm, the other one-host path, written by NIXL."""
    kv_transport = "nixl" if transport == "shm" else "grpc"
    colocated = Deployment(model, encoder_dp=2, tensor_parallel=2, kv_transport=kv_transport)
    with contextlib.ExitStack() as stack:
        encoder = stack.enter_context(serving((colocated, root / "colocated")))
        decode = Deployment(model, mode="decode", encoder_dp=1, minimal=True, embedding_cache_mb=0,
                            encoder_urls=(encoder.grpc_url,), encoder_transport=transport, encoder_fallback="none",
                            prefill_urls=(encoder.grpc_url,), kv_transport=kv_transport)
        yield {"colocated": encoder, "disaggregated": stack.enter_context(serving((decode, root / "disaggregated")))}
