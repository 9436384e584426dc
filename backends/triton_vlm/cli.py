"""`triton-vlm`: make-tiny-model, serve, render, openai, bench, infer."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from . import env
from .models import FAMILIES


def _make_tiny_model(args) -> int:
    from .models.tiny_model import make_tiny_model

    print(make_tiny_model(args.out, size=args.size, seed=args.seed, family=args.family))
    return 0


def _gpus(value: str) -> tuple[int, ...]:
    if value == "auto":
        import torch

        return tuple(range(torch.cuda.device_count()))
    return () if value in ("", "none") else tuple(int(g) for g in value.split(","))


def _deployment(args):
    from .deploy.deployment import Deployment
    from .models.tiny_model import ensure_model

    try:
        return Deployment(ensure_model(args.model), encoder_dp=args.encoder_dp, encoder_threads=args.encoder_threads,
                          preprocess_instances=args.preprocess_instances, gpus=_gpus(args.gpus),
                          tensor_parallel=args.tp, mode=args.mode,
                          encoder_urls=tuple(args.encoder_urls or ()), encoder_urls_file=args.encoder_urls_file,
                          prefill_urls=tuple(args.prefill_urls or ()), prefill_urls_file=args.prefill_urls_file,
                          minimal=args.minimal, dtype=args.dtype,
                          **{name: getattr(args, name) for name in Deployment.KNOBS})
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))


def deployment_from_args(argv: list[str]):
    """A Deployment from `triton-vlm serve` options (for benchmarks that start several deployments)."""
    p = argparse.ArgumentParser(prog="deployment")
    _deployment_args(p)
    return _deployment(p.parse_args(argv))


def server_from_args(argv: list[str], folder: Path, **server_options):
    """A TritonServer (not started) of a deployment from `triton-vlm serve` options, its repository
    rendered into `folder` and its log written there (benchmarks, the soak)."""
    from .deploy.server import TritonServer

    deployment = deployment_from_args(argv)
    repo = deployment.render(Path(folder) / "repository")
    return TritonServer(repo, log_file=Path(folder) / "tritonserver.log", extra_args=deployment.server_args(),
                        **server_options)


def _source(args) -> Path:
    from .deploy.repository import COMMITTED

    return Path(args.model_repository or COMMITTED)


def _render(args) -> int:
    deployment = _deployment(args)
    repo = deployment.render(args.out, source=_source(args))
    print(" ".join([f"--model-repository={repo.resolve()}", *deployment.server_args()]))
    return 0


def _serve(args) -> int:
    from .deploy.server import TritonServer, stop_process

    deployment = _deployment(args)
    model = deployment.model
    with tempfile.TemporaryDirectory(prefix="triton-vlm-") as tmp:
        repo = deployment.render(Path(tmp) / "repository", source=_source(args))
        server = TritonServer(repo, args.http_port, args.grpc_port, args.metrics_port,
                              extra_args=deployment.server_args()).start()
        frontend = None
        if args.openai_port is not None:  # its own process (its event loop never waits on ours), in our
            # process group, so that whatever stops `serve` stops it too; it also dies with us (pdeathsig)
            frontend = subprocess.Popen(
                [sys.executable, "-m", "triton_vlm.cli", "openai", "--triton-url", server.grpc_url, "--port",
                 str(args.openai_port), "--host", args.openai_host, "--served-model-name", str(model)],
                preexec_fn=_die_with_parent)
        signal.signal(signal.SIGTERM, lambda *_: server.terminate())  # the wait below then returns
        try:
            server.wait_ready(args.ready_timeout)
            openai = f"; OpenAI API http://{args.openai_host}:{args.openai_port}/v1" if frontend else ""
            print(f"triton-vlm ready: model {model}; gRPC {server.grpc_url}, HTTP {server.http_url} "
                  f"(models: vlm = streaming, vlm_unary = infer){openai}", flush=True)
            return server.process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            stop_process(frontend)
            server.stop()


def _die_with_parent() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _openai(args) -> int:
    from .openai_api.app import run

    run(args.triton_url, args.host, args.port, args.served_model_name, args.max_body_mb, args.head_timeout_s,
        args.body_timeout_s)
    return 0


def _client(module: str, argv: list[str]) -> int:
    """`bench` and `infer` are client programs (`triton_vlm_clients`): run, not imported, since server code
    must not import client code (the clients import ours)."""
    return subprocess.call([sys.executable, "-m", f"triton_vlm_clients.{module}", *argv])


def _knobs(p: argparse.ArgumentParser) -> None:
    """--encoder-transport, --max-num-seqs etc.: one flag per knob (`config.knob`) of the encode stage and the
    language engine, with its help, choices and default."""
    from .config import CHOICES, LANGUAGE_MODE, SERVE
    from .deploy.deployment import Deployment

    for f in Deployment.KNOBS.values():
        flag, kind = f"--{f.name.replace('_', '-')}", type(f.default)
        shown = ("on" if f.default else "off") if kind is bool else (f.default if f.default != "" else "none")
        mode = "language mode: " if f.metadata[LANGUAGE_MODE] else ""
        help = f"{mode}{f.metadata[SERVE]} (default: the repository's, {shown}"
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help}; --no-{flag[2:]} turns it off)")
        else:
            p.add_argument(flag, type=kind, choices=f.metadata[CHOICES] or None, help=f"{help})")


def _deployment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"model folder (default {env.default_model_path()}, built if missing)")
    p.add_argument("--model-repository", help="repository to render from (default: the committed one)")
    p.add_argument("--encoder-dp", type=int, help="vision encoder replicas; a request's images are split "
                   "over them by image tokens (default: the repository's, 2; on GPUs one per GPU)")
    p.add_argument("--encoder-threads", type=int, help="torch threads per encoder replica (default: cores / replicas)")
    p.add_argument("--preprocess-instances", type=int, help="preprocess processes (chat template, tokenizer, image "
                   "decoding; each takes many requests at once on threads) (default: the repository's, 2)")
    p.add_argument("--mode", choices=["colocated", "encoder", "language", "prefill", "decode"], default="colocated",
                   help="encoder: only image_encoder + vision_encoder (an E/PD encoder server: image files in, "
                   "embeddings out); language: encode on the --encoder-urls servers; prefill: only the language "
                   "model, prefilling for decode servers (E/P/D); decode: the entry point of E/P/D, prefilling on "
                   "the --prefill-urls servers (and encoding on the --encoder-urls servers, if given)")
    p.add_argument("--encoder-urls", nargs="+", metavar="HOST:PORT", help="gRPC addresses of encoder servers")
    p.add_argument("--encoder-urls-file", help="language and decode modes: a file of encoder addresses, one a "
                   "line, re-read every second: edit it to add or remove encoders while serving")
    p.add_argument("--prefill-urls", nargs="+", metavar="HOST:PORT", help="decode mode: gRPC addresses of prefill "
                   "servers (when all fail, prompts are prefilled here)")
    p.add_argument("--prefill-urls-file", help="decode mode: a file of prefill server addresses, one a line, "
                   "re-read every second")
    p.add_argument("--tp", type=int, help="tensor-parallel ranks of the language model (default 1); "
                   "gloo on CPU, NCCL on GPUs")
    p.add_argument("--minimal", action="store_true", help="only the models the streaming `vlm` needs: no "
                   "`vlm_unary` (plain infer() callers) and, colocated, no `image_encoder` (serving as another "
                   "server's encoder); fewer processes, faster start")
    _knobs(p)
    p.add_argument("--gpus", default="auto", help="GPU ids for the encoder replicas, e.g. 0,1; 'none' for CPU "
                   "(default: every visible GPU, else CPU)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                   help="the vision encoder's and language model's weights and activations (default: the "
                   "repository's, auto: bfloat16 on GPUs, float32 on CPU)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["bench"], ["infer"]):
        return _client(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="triton-vlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="write a small random-weight checkpoint of a model family")
    p.add_argument("out")
    p.add_argument("--size", choices=["tiny", "small", "medium"], default="tiny")
    p.add_argument("--family", choices=list(FAMILIES), default="qwen2_5_vl", help="model_type (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_model)

    p = sub.add_parser("serve", help="render the model repository for a model and run tritonserver")
    _deployment_args(p)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--openai-port", type=int, help="also serve the OpenAI API (/v1/chat/completions) on this port")
    p.add_argument("--openai-host", default="0.0.0.0", help="address of the OpenAI API (default 0.0.0.0)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("openai", help="OpenAI-compatible API in front of a server that has the `vlm` ensemble")
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="the server's gRPC address (default %(default)s)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--served-model-name", help="the model id /v1/models lists (default: the served model's "
                   "folder, from the language model's config; any `model` value is accepted either way)")
    p.add_argument("--max-body-mb", type=int, default=256, help="largest request body (default %(default)s MiB)")
    p.add_argument("--head-timeout-s", type=float, default=10, help="a request's head (line and headers) must "
                   "arrive within this many seconds of its first byte, or the connection is closed (default 10)")
    p.add_argument("--body-timeout-s", type=float, default=60, help="a request's body must arrive within this "
                   "many seconds of its head (default 60)")
    p.set_defaults(func=_openai)

    p = sub.add_parser("render", help="write the model repository of a deployment; print tritonserver's arguments")
    p.add_argument("out")
    _deployment_args(p)
    p.set_defaults(func=_render)

    # listed for --help; main() hands `bench ...` and `infer ...` to the client programs' own parsers
    sub.add_parser("bench", help="serving benchmark of image workloads (see `triton-vlm bench --help`)")

    sub.add_parser("infer", help="send one request with tritonclient (see `triton-vlm infer --help`)")

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
