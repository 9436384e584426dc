"""What `triton-vlm serve` deploys: the knobs of one deployment, rendered into a model repository and
tritonserver arguments. Anything left as None keeps what the source repository says."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import LANGUAGE_MODE, MODELS, EncodeConfig, LanguageConfig, PreprocessConfig, serve_knobs
from ..models import family_class
from .launcher import MODEL_CONTROL, NO_AUTO_COMPLETE
from .repository import COMMITTED, render

CUDA_MEMORY_POOL_MB = 256  # per GPU and embedding block; in-flight embeddings between steps live here (Triton's
# default is 64 in all): a family's extra features (Qwen3-VL's 3 deepstack blocks) get as much again each


@dataclass(frozen=True)
class Deployment:
    model: Path
    encoder_dp: int | None = None  # vision_encoder instances = shards per request
    encoder_threads: int | None = None  # torch threads per encoder instance; 0: cores / instances
    preprocess_instances: int | None = None  # preprocess stubs (SGLang's --tokenizer-worker-num); the repository has 2
    gpus: tuple[int, ...] = ()  # () = CPU; else encoder instances spread over these, language from the first
    tensor_parallel: int | None = None  # language model ranks (one Triton instance; rank r on GPU first + r)
    cuda_memory_pool_mb: int | None = None  # default: CUDA_MEMORY_POOL_MB per embedding block
    # colocated | encoder (image_encoder + vision_encoder only) | language (E/PD: encodes on encoder servers) |
    # prefill (E/P/D: language_model only, prefills for decode servers) | decode (E/P/D: the entry point, which
    # prefills on prefill servers; encodes on encoder servers if it has some, else itself)
    mode: str = "colocated"
    encoder_urls: tuple[str, ...] = ()  # language and decode modes: gRPC addresses of the encoder servers
    encoder_urls_file: str | None = None  # language and decode modes: a file listing them, watched (live scaling)
    prefill_urls: tuple[str, ...] = ()  # decode mode: gRPC addresses of the prefill servers
    prefill_urls_file: str | None = None  # decode mode: a file listing them, watched
    minimal: bool = False  # only what `vlm` needs: no vlm_unary, and (colocated) no image_encoder
    # the knobs (`config.knob`; None: the repository's): the encode stage's, E/PD's and its embedding cache
    encoder_fallback: str | None = None
    encoder_transport: str | None = None
    local_encode_below: int | None = None
    embedding_cache_mb: int | None = None
    embedding_cache_redis: str | None = None
    # the language model's KV cache and batching; vLLM's names
    block_size: int | None = None
    kv_cache_mb: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool | None = None
    local_prefill_below: int | None = None
    kv_transport: str | None = None
    dtype: str | None = None  # the vision encoder's and language model's: auto (bf16 on GPUs, fp32 on CPU) | float32 |
    # bfloat16 | float16

    DTYPES = ("auto", "float32", "bfloat16", "float16")

    # the video limits
    max_videos: int | None = None
    max_video_bytes: int | None = None
    max_video_frames: int | None = None
    max_video_seconds: float | None = None
    max_video_tokens: int | None = None
    max_video_fps: float | None = None
    video_decode_timeout_s: float | None = None

    KNOBS = {f.name: f for config in (PreprocessConfig, EncodeConfig, LanguageConfig)
             for f in serve_knobs(config)}  # a field each

    MODES = ("colocated", "encoder", "language", "prefill", "decode")

    def __post_init__(self) -> None:
        if self.mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}, got {self.mode!r}")
        if self.mode == "language" and not self.remote_encode or self.mode not in ("language", "decode") and \
                self.remote_encode:
            raise ValueError("--encoder-urls/--encoder-urls-file go with --mode language (which needs one of them) "
                             "or --mode decode")
        if (self.mode == "decode") != bool(self.prefill_urls or self.prefill_urls_file):
            raise ValueError("--prefill-urls/--prefill-urls-file go with --mode decode, which needs one of them")
        if self.local_prefill_below and self.mode != "decode":
            raise ValueError("--local-prefill-below needs --mode decode")
        # the knobs' own rules (choices, ranges), checked here rather than when the server loads them
        encode = EncodeConfig(**self._knobs(EncodeConfig))
        LanguageConfig(**self._knobs(LanguageConfig))
        PreprocessConfig(**self._knobs(PreprocessConfig))
        if encode.local_encode_below and (not self.remote_encode or encode.encoder_fallback != "local"):
            raise ValueError("--local-encode-below needs encoder servers (--mode language or decode) and the "
                             "local encoder (--encoder-fallback local)")
        if self.encoder_dp is not None and self.encoder_dp < 1:
            raise ValueError(f"encoder_dp must be >= 1, got {self.encoder_dp}")
        if self.tensor_parallel is not None and self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.gpus and (self.tensor_parallel or 1) > len(self.gpus):
            raise ValueError(f"tensor_parallel {self.tensor_parallel} needs as many GPUs; got {list(self.gpus)}")
        if self.dtype is not None and self.dtype not in self.DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(self.DTYPES)}, got {self.dtype!r}")
        if self.preprocess_instances is not None and self.preprocess_instances < 1:
            raise ValueError(f"preprocess_instances must be >= 1, got {self.preprocess_instances}")
        if self.encoder_threads is not None and self.encoder_threads < 0:
            raise ValueError(f"encoder_threads must be >= 0, got {self.encoder_threads}")
        config = Path(self.model) / "config.json"
        if config.exists():  # a family we do not serve fails here, not inside the server's model loads
            family_class(json.loads(config.read_text()).get("model_type"))

    @property
    def remote_encode(self) -> bool:
        """Whether the images are encoded on encoder servers (E/PD, E/P/D)."""
        return bool(self.encoder_urls or self.encoder_urls_file)

    def _knobs(self, config) -> dict:
        """The knobs of `config` this deployment sets."""
        return {f.name: getattr(self, f.name) for f in serve_knobs(config) if getattr(self, f.name) is not None}

    def encoder_groups(self, count: int) -> list[dict]:
        """`count` instances: KIND_CPU, or KIND_GPU spread as evenly as possible over the GPUs."""
        if not self.gpus:
            return [{"count": count, "kind": "KIND_CPU"}]
        per_gpu = [count // len(self.gpus) + (i < count % len(self.gpus)) for i in range(len(self.gpus))]
        return [{"count": n, "kind": "KIND_GPU", "gpus": [gpu]} for gpu, n in zip(self.gpus, per_gpu, strict=True) if n]

    def render(self, dest: str | Path, source: Path = COMMITTED) -> Path:
        parameters: dict[str, dict[str, str]] = {name: {} for name in ("preprocess", "vision_encoder", "encode",
                                                                        "image_encoder", "language_model")}
        groups: dict[str, list[dict]] = {}
        dp = self.encoder_dp or (len(self.gpus) if self.gpus else None)  # on GPUs: one replica per GPU
        if dp is not None:
            parameters["encode"]["data_parallel"] = parameters["image_encoder"]["data_parallel"] = str(dp)
            groups["vision_encoder"] = self.encoder_groups(dp)
            # image_encoder instances = requests decoded and patchified at once; each waits on the replicas
            groups["image_encoder"] = [{"count": max(2, dp), "kind": "KIND_CPU"}]
        if self.encoder_threads is not None:
            parameters["vision_encoder"]["threads"] = str(self.encoder_threads)
        if self.preprocess_instances is not None:
            groups["preprocess"] = [{"count": self.preprocess_instances, "kind": "KIND_CPU"}]
        if self.gpus:
            parameters["language_model"]["device"] = f"cuda:{self.gpus[0]}"
            # the stubs that take embeddings on the GPU (from the replicas by BLS; from `encode` as an
            # ensemble input) run as GPU instances: the python backend hands them GPU tensors as they are
            for model in ("encode", "language_model"):
                groups[model] = [{"count": 1, "kind": "KIND_GPU", "gpus": [self.gpus[0]]}]
        if self.dtype is not None:
            parameters["vision_encoder"]["dtype"] = parameters["language_model"]["dtype"] = self.dtype
        if self.tensor_parallel is not None:
            parameters["language_model"]["tensor_parallel"] = str(self.tensor_parallel)
        for name, f in self.KNOBS.items():  # E/PD's own (LANGUAGE_MODE) only on servers with encoder servers
            if getattr(self, name) is not None and (self.remote_encode or not f.metadata[LANGUAGE_MODE]):
                value = getattr(self, name)
                for model in f.metadata[MODELS]:
                    parameters[model][name] = str(value).lower() if isinstance(value, bool) else str(value)
        if self.remote_encode:
            parameters["encode"].update(encoder_urls=",".join(self.encoder_urls),
                                        encoder_urls_file=_path(self.encoder_urls_file))
            parameters["preprocess"]["image_processing"] = "remote"  # the files go to the encoder servers
        if self.mode == "decode":
            parameters["language_model"].update(prefill_urls=",".join(self.prefill_urls),
                                                prefill_urls_file=_path(self.prefill_urls_file))
        repo = render(dest, self.model, parameters, source, groups)
        # a colocated server keeps image_encoder: other language servers may use it as their encoder (and any
        # server with a language_model may serve as a decode server's prefill server)
        remote = ["image_encoder", *(["vision_encoder"] if self.encoder_fallback == "none" else [])]
        drop = {"encoder": ["preprocess", "encode", "language_model", "vlm", "vlm_unary"],
                "language": remote,
                "decode": remote if self.remote_encode else ["image_encoder"],
                "prefill": ["preprocess", "encode", "vision_encoder", "image_encoder", "vlm", "vlm_unary"],
                }.get(self.mode, [])
        if self.minimal:
            drop += [m for m in ("vlm_unary", "image_encoder") if m not in drop and (repo / m).exists()
                     and not (m == "image_encoder" and self.mode == "encoder")]
        for model in drop:
            shutil.rmtree(repo / model)
        return repo

    def server_args(self) -> list[str]:
        pool = self.cuda_memory_pool_mb
        if pool is None and self.gpus:
            from ..models import load_family

            pool = CUDA_MEMORY_POOL_MB * (1 + load_family(self.model).extra_features)
        pool = (pool or 0) * 2**20
        return [*MODEL_CONTROL, NO_AUTO_COMPLETE, *(f"--cuda-memory-pool-byte-size={gpu}:{pool}" for gpu in self.gpus)]


def _path(file: str | None) -> str:
    return str(Path(file).resolve()) if file else ""
