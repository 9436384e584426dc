"""Every config.pbtxt against the interface constants the adapters use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triton_vlm import config as config_module
from triton_vlm import interface as I
from triton_vlm.config import EncoderConfig
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.repository import COMMITTED, render

FIELD_ORDER = ["name", "backend", "platform", "max_batch_size", "model_transaction_policy", "dynamic_batching",
               "input", "output", "ensemble_scheduling", "instance_group", "parameters"]


def _load(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _dtype(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


@pytest.mark.parametrize("model", sorted(I.MODELS))
def test_tensors_match_the_interface(model):
    config = _load(COMMITTED / model / "config.pbtxt")
    inputs, outputs = I.MODELS[model]
    assert config.name == model
    assert [t.name for t in config.input] == inputs
    assert [t.name for t in config.output] == outputs
    for tensor in [*config.input, *config.output]:
        assert (_dtype(tensor.data_type), list(tensor.dims)) == I.spec(tensor.name), tensor.name
    if model != "vlm":
        assert config.instance_group, "every python model sets instance_group explicitly"


@pytest.mark.parametrize("model", sorted(I.MODELS))
def test_fields_come_in_the_house_order(model):
    seen = []
    for line in (COMMITTED / model / "config.pbtxt").read_text().splitlines():
        key = re.match(r"[a-z_]*", line).group()
        if key and key not in seen:
            seen.append(key)
    assert seen == [k for k in FIELD_ORDER if k in seen]


def test_ensemble_steps_connect():
    ensemble = _load(COMMITTED / "vlm" / "config.pbtxt")
    available = {t.name for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        step_inputs, step_outputs = I.MODELS[step.model_name]
        assert set(step.input_map) == set(step_inputs) - I.OUTSIDE_ENSEMBLE, step.model_name
        assert set(step.input_map.values()) <= available, step.model_name
        assert set(step.output_map) == set(step_outputs) - I.OUTSIDE_ENSEMBLE, step.model_name
        available |= set(step.output_map.values())
    assert {t.name for t in ensemble.output} <= available


def test_language_model_is_one_decoupled_instance():
    config = _load(COMMITTED / "language_model" / "config.pbtxt")
    assert config.model_transaction_policy.decoupled
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
        (1, "KIND_CPU")]


def test_render_points_every_model_at_the_model(tmp_path):
    repo = render(tmp_path / "repo", tmp_path / "model", {"vision_encoder": {"threads": "3"}})
    for model in ("preprocess", "vision_encoder", "language_model"):
        params = _load(repo / model / "config.pbtxt").parameters
        assert params["model_path"].string_value == str((tmp_path / "model").resolve())
    assert _load(repo / "vision_encoder" / "config.pbtxt").parameters["threads"].string_value == "3"
    assert (repo / "vlm" / "1").is_dir()


def _groups(config) -> list[tuple]:
    return [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind), list(g.gpus))
            for g in config.instance_group]


def test_encode_shards_match_the_encoder_replicas():
    encode = _load(COMMITTED / "encode" / "config.pbtxt")
    replicas = sum(count for count, _, _ in _groups(_load(COMMITTED / "vision_encoder" / "config.pbtxt")))
    assert encode.model_transaction_policy.decoupled, "decoupled so that execute never blocks a request"
    assert int(encode.parameters["data_parallel"].string_value) == replicas


@pytest.mark.parametrize(("dp", "gpus", "groups"), [
    (1, (), [(1, "KIND_CPU", [])]),
    (3, (), [(3, "KIND_CPU", [])]),
    (3, (0, 1), [(2, "KIND_GPU", [0]), (1, "KIND_GPU", [1])]),
    (None, (0, 1), [(1, "KIND_GPU", [0]), (1, "KIND_GPU", [1])]),
])
def test_deployment_renders_encoder_replicas(tmp_path, dp, gpus, groups):
    repo = Deployment(tmp_path / "model", encoder_dp=dp, encoder_threads=1, gpus=gpus).render(tmp_path / "repo")
    encoder, encode = _load(repo / "vision_encoder" / "config.pbtxt"), _load(repo / "encode" / "config.pbtxt")
    assert _groups(encoder) == groups
    assert int(encode.parameters["data_parallel"].string_value) == sum(g[0] for g in groups)
    assert encoder.parameters["threads"].string_value == "1"
    language = _load(repo / "language_model" / "config.pbtxt")
    assert language.parameters["device"].string_value == (f"cuda:{gpus[0]}" if gpus else "cpu")
    # the stubs that take embeddings as GPU tensors are GPU instances on the first GPU
    for stage in (language, encode):
        assert _groups(stage) == ([(1, "KIND_GPU", [gpus[0]])] if gpus else [(1, "KIND_CPU", [])])


def test_deployment_dtype_reaches_the_encoder_and_the_language_model(tmp_path):
    repo = Deployment(tmp_path / "model", dtype="float32").render(tmp_path / "repo")
    for model in ("vision_encoder", "language_model"):
        assert _load(repo / model / "config.pbtxt").parameters["dtype"].string_value == "float32"
    with pytest.raises(ValueError, match="dtype must be one of"):
        Deployment(tmp_path / "model", dtype="fp8")


def test_deployment_defaults_keep_the_repository(tmp_path):
    repo = Deployment(tmp_path / "model").render(tmp_path / "repo")
    for model in ("preprocess", "vision_encoder", "encode", "language_model"):
        committed, rendered = _load(COMMITTED / model / "config.pbtxt"), _load(repo / model / "config.pbtxt")
        assert _groups(rendered) == _groups(committed)
        assert {k: v for k, v in rendered.parameters.items() if k != "model_path"} == {
            k: v for k, v in committed.parameters.items() if k != "model_path"}


def test_deployment_renders_preprocess_instances(tmp_path):
    assert _groups(_load(COMMITTED / "preprocess" / "config.pbtxt")) == [(2, "KIND_CPU", [])]
    repo = Deployment(tmp_path / "model", preprocess_instances=1).render(tmp_path / "repo")
    assert _groups(_load(repo / "preprocess" / "config.pbtxt")) == [(1, "KIND_CPU", [])]
    with pytest.raises(ValueError, match="preprocess_instances must be >= 1"):
        Deployment(tmp_path / "model", preprocess_instances=0)


def test_encoder_threads_default_to_cores_over_replicas(monkeypatch):
    monkeypatch.setattr(config_module, "usable_cores", lambda: 8)
    assert EncoderConfig.from_parameters({"threads": "0"}, instances=4).threads == 2
    assert EncoderConfig.from_parameters({"threads": "0"}, instances=16).threads == 1
    assert EncoderConfig.from_parameters({"threads": "3"}, instances=4).threads == 3


def test_deployment_renders_tensor_parallel_and_refuses_too_few_gpus(tmp_path):
    repo = Deployment(tmp_path / "model", tensor_parallel=2).render(tmp_path / "repo")
    language = _load(repo / "language_model" / "config.pbtxt")
    assert language.parameters["tensor_parallel"].string_value == "2"
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in language.instance_group] == [
        (1, "KIND_CPU")], "one Triton instance owns every rank"
    with pytest.raises(ValueError, match="needs as many GPUs"):
        Deployment(tmp_path / "model", tensor_parallel=4, gpus=(0, 1))


def test_epd_modes_render_their_servers(tmp_path):
    encoder = Deployment(tmp_path / "model", mode="encoder", encoder_dp=3).render(tmp_path / "encoder")
    assert sorted(p.name for p in encoder.iterdir()) == ["image_encoder", "vision_encoder"]
    assert _groups(_load(encoder / "vision_encoder" / "config.pbtxt")) == [(3, "KIND_CPU", [])]
    assert _load(encoder / "image_encoder" / "config.pbtxt").parameters["data_parallel"].string_value == "3"
    language = Deployment(tmp_path / "model", mode="language", encoder_urls=("h1:1", "h2:2"),
                          local_encode_below=500).render(tmp_path / "l")
    params = _load(language / "encode" / "config.pbtxt").parameters
    assert params["encoder_urls"].string_value == "h1:1,h2:2" and params["encoder_fallback"].string_value == "local"
    assert params["local_encode_below"].string_value == "500"
    assert _load(language / "preprocess" / "config.pbtxt").parameters["image_processing"].string_value == "remote"
    assert (language / "vision_encoder").is_dir(), "kept for the local fallback"
    assert not (language / "image_encoder").exists()
    bare = Deployment(tmp_path / "model", mode="language", encoder_urls=("h1:1",), encoder_fallback="none")
    assert not (bare.render(tmp_path / "bare") / "vision_encoder").exists()
    watched = Deployment(tmp_path / "model", mode="language", encoder_urls_file="encoders.txt").render(tmp_path / "w")
    assert _load(watched / "encode" / "config.pbtxt").parameters["encoder_urls_file"].string_value == str(
        Path("encoders.txt").resolve())
    with pytest.raises(ValueError, match="encoder-urls"):
        Deployment(tmp_path / "model", mode="language")
    with pytest.raises(ValueError, match="encoder-urls"):
        Deployment(tmp_path / "model", encoder_urls=("h1:1",))
    with pytest.raises(ValueError, match="local-encode-below"):
        Deployment(tmp_path / "model", mode="language", encoder_urls=("h1:1",), encoder_fallback="none",
                   local_encode_below=10)


def test_the_docker_image_sets_the_launchers_malloc_knobs():
    """The image runs NGC's own tritonserver, not our launcher: it must set the same glibc knobs."""
    from triton_vlm.deploy.launcher import MALLOC

    dockerfile = (COMMITTED.parent / "docker" / "Dockerfile").read_text()
    line = next(x for x in dockerfile.splitlines() if x.startswith("ENV MALLOC_"))
    assert dict(kv.split("=") for kv in line.split()[1:]) == MALLOC


def test_servers_start_without_auto_complete_unless_asked(tmp_path):
    """The `tritonserver` drop-in and `triton-vlm render`'s arguments (the docker image's) turn off Triton's
    config auto-complete, which costs a throw-away stub per model; a user's own choice is kept."""
    from triton_vlm.deploy import launcher

    assert launcher.NO_AUTO_COMPLETE in launcher.command(["--model-repository=r"])
    assert launcher.NO_AUTO_COMPLETE in Deployment(tmp_path / "model").server_args()
    asked = launcher.command(["--model-repository=r", "--strict-model-config=false"])
    assert launcher.NO_AUTO_COMPLETE not in asked and asked.count("--strict-model-config=false") == 1


# Each committed model's parameters, read the way its model.py reads them (image_encoder: two configs)
_Pre, _Encode = config_module.PreprocessConfig, config_module.EncodeConfig
_READERS = {
    "preprocess": lambda p: _Pre.from_parameters(p),
    "vision_encoder": lambda p: EncoderConfig.from_parameters(p),
    "encode": lambda p: _Encode.from_parameters(p),
    "image_encoder": lambda p: (_Encode.from_parameters(p, shared=(_Pre,)), _Pre.from_parameters(p, shared=(_Encode,))),
    "language_model": lambda p: config_module.LanguageConfig.from_parameters(p),
}


@pytest.mark.parametrize("model", sorted(_READERS))
def test_every_committed_parameter_is_read_and_an_unknown_one_fails_at_load(model):
    params = config_module.read_parameters({"parameters": {
        k: {"string_value": v.string_value} for k, v in _load(COMMITTED / model / "config.pbtxt").parameters.items()}})
    _READERS[model](params)  # the committed keys are all known
    with pytest.raises(ValueError, match=r"unknown parameter 'max_prefill_tokens' in config.pbtxt; this model takes"):
        _READERS[model]({**params, "max_prefill_tokens": "512"})  # retired by the paged engine: no longer ignored


@pytest.mark.parametrize(("key", "value", "message"), [
    ("enable_prefix_caching", "ture", "must be true or false, got 'ture'"),
    ("max_num_seqs", "eight", "must be an integer, got 'eight'"),
])
def test_a_badly_typed_parameter_fails_naming_it(key, value, message):
    with pytest.raises(ValueError, match=f"parameter '{key}' in config.pbtxt {message}"):
        config_module.LanguageConfig.from_parameters({key: value})
    assert not config_module.LanguageConfig.from_parameters({"enable_prefix_caching": "False"}).enable_prefix_caching


def test_serve_flags_of_the_knobs_come_from_their_configs_and_reach_the_repository(tmp_path, capsys):
    """`EncodeConfig` and `LanguageConfig` declare each knob once (default, help, choices, the models that
    get it); `serve`/`render` take it as a flag, `Deployment` as a field, and the rendered models get it."""
    from triton_vlm import cli
    from triton_vlm.models.tiny_model import make_tiny_model

    language_knobs = [f.name for f in config_module.serve_knobs(config_module.LanguageConfig)]
    encode_knobs = [f.name for f in config_module.serve_knobs(config_module.EncodeConfig)]
    assert set(language_knobs) == {"max_num_seqs", "kv_cache_mb", "block_size", "max_num_batched_tokens",
                                   "enable_prefix_caching", "local_prefill_below", "kv_transport"}
    assert set(encode_knobs) == {"encoder_fallback", "encoder_transport", "local_encode_below", "embedding_cache_mb",
                                 "embedding_cache_redis"}
    video_knobs = [f.name for f in config_module.serve_knobs(config_module.PreprocessConfig)]
    assert set(video_knobs) == {"max_videos", "max_video_bytes", "max_video_frames", "max_video_seconds",
                                "max_video_tokens", "max_video_fps", "video_decode_timeout_s"}
    assert [*video_knobs, *encode_knobs, *language_knobs] == list(Deployment.KNOBS)
    assert set(Deployment.KNOBS) <= set(Deployment.__dataclass_fields__)
    model = make_tiny_model(tmp_path / "model")
    assert cli.main(["render", str(tmp_path / "repo"), "--model", str(model), "--gpus", "none", "--max-num-seqs",
                     "4", "--kv-cache-mb", "64", "--no-enable-prefix-caching", "--embedding-cache-mb", "32",
                     "--embedding-cache-redis", "redis://Cache-Host:6379", "--max-video-frames", "48"]) == 0
    language = _load(tmp_path / "repo" / "language_model" / "config.pbtxt").parameters
    assert (language["max_num_seqs"].string_value, language["kv_cache_mb"].string_value,
            language["enable_prefix_caching"].string_value, language["block_size"].string_value) == (
        "4", "64", "false", "16")  # not given: the repository's
    for model_name in ("preprocess", "image_encoder"):  # the video limits go to both readers of video files
        params = _load(tmp_path / "repo" / model_name / "config.pbtxt").parameters
        assert params["max_video_frames"].string_value == "48"
        assert config_module.PreprocessConfig.from_parameters({k: v.string_value for k, v in params.items()},
                                                              (config_module.EncodeConfig,)).max_video_frames == 48
    for model_name in ("encode", "image_encoder"):  # the cache's knobs go to both
        params = _load(tmp_path / "repo" / model_name / "config.pbtxt").parameters
        assert (params["embedding_cache_mb"].string_value, params["embedding_cache_redis"].string_value) == (
            "32", "redis://Cache-Host:6379")
    assert cli.main(["render", str(tmp_path / "epd"), "--model", str(model), "--gpus", "none", "--mode", "language",
                     "--encoder-urls", "h1:1", "--encoder-transport", "grpc", "--local-encode-below", "300"]) == 0
    encode = _load(tmp_path / "epd" / "encode" / "config.pbtxt").parameters
    assert (encode["encoder_transport"].string_value, encode["local_encode_below"].string_value,
            encode["encoder_fallback"].string_value) == ("grpc", "300", "local")
    with pytest.raises(SystemExit, match="max_num_batched_tokens"):
        cli.main(["render", str(tmp_path / "repo2"), "--model", str(model), "--max-num-batched-tokens", "4"])
    with pytest.raises(SystemExit):  # argparse: not one of the knob's choices
        cli.main(["render", str(tmp_path / "repo3"), "--model", str(model), "--encoder-transport", "pigeon"])
    assert "invalid choice: 'pigeon'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="encoder_transport must be one of auto, grpc, shm, got 'pigeon'"):
        Deployment(model, mode="language", encoder_urls=("h1:1",), encoder_transport="pigeon")
    with pytest.raises(ValueError, match="embedding_cache_mb must be >= 0"):
        Deployment(model, embedding_cache_mb=-1)

def test_prefill_and_decode_modes_render_their_servers(tmp_path):
    """E/P/D: a prefill server is its language model alone; a decode server takes the prefill servers (and
    may take encoder servers); the flags of one mode are refused in the others."""
    from triton_vlm import cli
    from triton_vlm.models.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    assert cli.main(["render", str(tmp_path / "p"), "--model", str(model), "--gpus", "none", "--mode", "prefill"]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir() if p.is_dir()) == ["language_model"]
    assert cli.main(["render", str(tmp_path / "d"), "--model", str(model), "--gpus", "none", "--mode", "decode",
                     "--prefill-urls", "p1:1", "p2:2", "--encoder-urls", "e1:1", "--local-prefill-below", "64"]) == 0
    language = _load(tmp_path / "d" / "language_model" / "config.pbtxt").parameters
    assert (language["prefill_urls"].string_value, language["local_prefill_below"].string_value) == ("p1:1,p2:2", "64")
    assert _load(tmp_path / "d" / "encode" / "config.pbtxt").parameters["encoder_urls"].string_value == "e1:1"
    assert not (tmp_path / "d" / "image_encoder").exists()
    assert cli.main(["render", str(tmp_path / "d2"), "--model", str(model), "--gpus", "none", "--mode", "decode",
                     "--prefill-urls", "p1:1"]) == 0  # encodes itself
    assert _load(tmp_path / "d2" / "preprocess" / "config.pbtxt").parameters["image_processing"].string_value == \
        "local"
    for bad, message in [(dict(mode="decode"), "--prefill-urls/--prefill-urls-file go with --mode decode"),
                         (dict(prefill_urls=("p1:1",)), "go with --mode decode"),
                         (dict(mode="prefill", encoder_urls=("e1:1",)), "--encoder-urls/--encoder-urls-file go with"),
                         (dict(local_prefill_below=8), "--local-prefill-below needs --mode decode")]:
        with pytest.raises(ValueError, match=message):
            Deployment(model, **bad)
