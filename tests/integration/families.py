"""What the family tests through the server share: the cases, their images, the two deployments every
family is served in, and checking both deployments' answers; (`conftest.py`) the module's tiny checkpoint,
its servers and transformers' answers for it."""

from __future__ import annotations

import contextlib

from tests.conftest import make_image
from tests.integration.serve import serving
from tests.reference import reference_video_generate
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import TritonServer
from triton_vlm_clients.client import stream
from triton_vlm_clients.clips import make_clip
from triton_vlm_clients.prometheus import server_metric

PROMPT = "Describe the pictures."
CASES = {"text-only": [], "one-image": [(640, 480)], "two-sizes": [(300, 200), (200, 500)],
         "four-images": [(640, 480), (300, 200), (800, 600), (200, 500)]}


def images(case: str, seed: int = 0) -> list[bytes]:
    """The case's images; another `seed` gives images of the same sizes that no cache has seen."""
    return [make_image(w, h, seed=seed + i, fmt="PNG" if i % 2 else "JPEG") for i, (w, h) in enumerate(CASES[case])]


def assert_every_mode_equals(servers: dict[str, TritonServer], expected: dict[str, list[int]], case: str) -> None:
    """Each server's greedy ids for `case` equal transformers' (`expected`); each disaggregated server's prompt
    was prefilled on the colocated one, and its KV came over."""
    decode = {name: server for name, server in servers.items() if name.startswith("disaggregated")}
    counts = lambda server: (server_metric(server, "triton_vlm_prefills_total", 'where="remote"'),  # noqa: E731
                             server_metric(server, "triton_vlm_kv_transfer_bytes_total"))
    before = {name: counts(server) for name, server in decode.items()}
    for name, server in servers.items():
        answer = stream(server.grpc_url, prompt=PROMPT, images=images(case), max_tokens=12)
        assert answer.output_ids == expected[case], name
    for name, server in decode.items():
        (prefills, kv), (prefills_before, kv_before) = counts(server), before[name]
        assert prefills == prefills_before + 1 and kv > kv_before, name


@contextlib.contextmanager
def family_deployments(root, model, transport: str, full: bool = False):
    """A family's two deployments, -> {"colocated": server, "disaggregated": server}:
    - colocated: encoder DP 2 (a request's images split over two replicas) and tensor parallelism 2 in one
      server, with the default caches. It keeps `image_encoder` and has a `language_model`, so it is also
      an encoder server and a prefill server:
    - disaggregated (E/P/D): a decode server whose every image is encoded by the colocated server (no local
      encoder, no embedding cache of its own), the embeddings coming back by `transport` (grpc | shm), and
      whose every prompt is prefilled there too (TP 2), its KV coming back to this server's TP 1 engine
      inside the answer (grpc) or, with shm, the other one-host path, written by NIXL.
    `full` (the full E/P/D, 1P + 1D + 2E): a `--mode encoder` server too, which the disaggregated server
    encodes on beside the colocated one. (One KV transport per family; test_pd.py runs both.)"""
    kv_transport = "nixl" if transport == "shm" else "grpc"
    colocated = Deployment(model, encoder_dp=2, tensor_parallel=2, kv_transport=kv_transport)
    with contextlib.ExitStack() as stack:
        first = [(colocated, root / "colocated")]
        if full:
            first.append((Deployment(model, mode="encoder", encoder_dp=1), root / "encoder"))
        started = stack.enter_context(serving(*first))
        encoder, encoders = (started[0], started) if full else (started, [started])
        decode = Deployment(model, mode="decode", encoder_dp=1, minimal=True, embedding_cache_mb=0,
                            encoder_urls=tuple(e.grpc_url for e in encoders), encoder_transport=transport,
                            encoder_fallback="none", prefill_urls=(encoder.grpc_url,), kv_transport=kv_transport,
                            preprocess_instances=1)  # it decodes no image: one takes its requests on threads
        disaggregated = stack.enter_context(serving((decode, root / "disaggregated")))
        yield {"colocated": encoder, "disaggregated": disaggregated}


QUESTION = "What happens in the video?"
VIDEO_SHAPES = {"clip": ["video"], "clip+image": ["image", "video"]}  # the parts of a message, in order


def check_video_parity(servers, model, shape: list[str], seed: int = 0, max_tokens: int = 12) -> None:
    """A 3 s, 8 fps, 128x96 clip (and an image, as `shape` orders them) and a question, greedy: each server's
    ids and prompt token count equal transformers' (its own processor, `reference_video_generate`)."""
    clip, picture = make_clip(seed=seed), make_image(120, 80, seed=seed, fmt="PNG")
    content = [{"type": kind} for kind in shape] + [{"type": "text", "text": QUESTION}]
    files = {"video": "clip.mp4", "image": "picture.png"}
    reference = [{"role": "user", "content": [dict(part, file=files[part["type"]]) if part["type"] in files else part
                                              for part in content]}]
    prompt, expected = reference_video_generate(model, reference, {"clip.mp4": clip, "picture.png": picture},
                                                max_tokens)
    for server in servers:
        answer = stream(server.grpc_url, messages=[{"role": "user", "content": content}], videos=[clip],
                        images=[picture] if "image" in shape else None, max_tokens=max_tokens)
        assert (answer.output_ids, answer.num_input_tokens) == (expected, len(prompt)), server.log_file.parent.name
