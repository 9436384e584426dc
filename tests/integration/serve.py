"""The one way the integration tests start servers: deployments (or rendered repositories) on free
ports, started together, waited for, and always stopped."""

from __future__ import annotations

import contextlib
from pathlib import Path

from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import TritonServer


@contextlib.contextmanager
def serving(*what: tuple[Deployment | Path, Path], ready_s: float = 300, **server_args):
    """Started, ready tritonservers, one per (deployment or repository, root): each one's repository and
    log under its root, `server_args` for `TritonServer` (env, executable). -> the server, or a list of
    them for several. All are started before any is waited for, and all stopped after (no graceful
    drain: nothing outlives a test module)."""
    with contextlib.ExitStack() as stack:
        servers = []
        for deployment, root in what:
            root.mkdir(parents=True, exist_ok=True)
            repo = deployment.render(root / "repository") if isinstance(deployment, Deployment) else deployment
            server = TritonServer(repo, graceful_stop=False, log_file=root / "tritonserver.log", **server_args)
            stack.callback(server.stop)
            servers.append(server.start())
        for server in servers:  # a load that hangs (its stacks in the log) starts again, counted as such
            server.wait_ready(timeout_s=ready_s, restart_hung=True)
        yield servers[0] if len(servers) == 1 else servers


def encoder_shards(url: str) -> int:
    """Shards an encoder server has encoded (requests to its image_encoder)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics("image_encoder", as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0))


def relist(server: TritonServer, urls_file: Path, kind: str, urls: list[str]) -> None:
    """Write `urls` into the watched list file of a server's `kind` ("encoder", "prefill") servers and wait
    for the server to log that it switched to them."""
    from tests.conftest import wait_until

    seen = server.log_file.stat().st_size
    urls_file.write_text("".join(f"{u}  # listed by the test\n" for u in urls))
    line = f'{kind} servers now: {", ".join(urls) or "none"}"'

    def switched():
        with open(server.log_file, "rb") as f:
            f.seek(seen)
            return line in f.read().decode(errors="replace")

    wait_until(switched, 30, line)
