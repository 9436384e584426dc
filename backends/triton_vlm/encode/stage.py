"""The encode stage wired for one server: local replicas, or E/PD encoder servers with the local replicas
as the fallback; and an encoder server's own stage (`ImageEncoderStage`). Triton-free:
`encode_on_replicas(pixels, grid)` (BLS to this server's `vision_encoder`), the cache, the metrics'
callbacks and the log functions come from the caller."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..config import EncodeConfig, PreprocessConfig
from ..models.family import Family
from ..preprocess.image_inputs import ImageProcessing, Images
from ..preprocess.images import ImageLimits
from ..preprocess.media_files import MediaFiles
from ..preprocess.video_inputs import VideoProcessing, is_wrapped
from .dispatch import ShardedEncode, even
from .embedding_cache import EmbeddingCache
from .remote_encoders import RemoteEncoders

log = logging.getLogger(__name__)

def media_files(model_path, family: Family, config: PreprocessConfig | None = None) -> MediaFiles:
    """Image files and wrapped videos under `config`'s limits; without it, files preprocess has checked
    against its own (no limit here)."""
    if config is None:
        config = PreprocessConfig(model_path=model_path, max_image_bytes=2**62, max_image_pixels=2**62,
                                  max_video_bytes=2**62, max_video_frames=2**31, max_video_seconds=float("inf"))
    return MediaFiles(ImageProcessing(model_path, family), VideoProcessing(family, config), ImageLimits.of(config))


class LocalEncoder:
    """This server's `vision_encoder` replicas; files (E/PD's fallback, an encoder server's requests: images and
    wrapped videos) are decoded here first."""

    def __init__(self, files: MediaFiles | None, encode_on_replicas: Callable) -> None:
        self.files, self.encode_on_replicas = files, encode_on_replicas

    def pixels(self, files: tuple[bytes, ...]):
        """Files -> their pixel_values (for `Images.pieces`)."""
        return self.files.decode(files)[0]

    def __call__(self, images: Images, target=None):
        pixels, grid = images.pixel_values, images.layout
        if images.files is not None:
            pixels, grid = self.files.decode(images.files)
        return self.encode_on_replicas(pixels, grid)


def encode_stage(config: EncodeConfig, family: Family, encode_on_replicas: Callable,
                 cache: EmbeddingCache | None = None, on_split: Callable[[int], None] | None = None,
                 warn: Callable[[str], None] = log.warning,
                 info: Callable[[str], None] = log.info) -> tuple[ShardedEncode, RemoteEncoders | None]:
    """-> (the stage, the encoder-server pool when `config` names encoder servers). Servers unreachable at
    start are marked down and said so (`warn`); changes of a watched list are said with `info`."""
    remote, disaggregated = None, bool(config.remote_encoders or config.encoder_urls_file)
    # files come only with encoder servers (preprocess sends pixels otherwise): only then the image processor
    local = LocalEncoder(media_files(config.model_path, family) if disaggregated else None, encode_on_replicas)
    if disaggregated:
        fallback = local if config.encoder_fallback == "local" else None
        remote = RemoteEncoders(config.remote_encoders, fallback=fallback, timeout_s=config.encoder_timeout_s,
                                local_below=config.local_encode_below, transport=config.encoder_transport,
                                embedding_bytes=lambda images: family.embedding_bytes(images.layout))
        remote.start(config.encoder_urls_file, warn, info, "encoder",
                     "its shards go to " + ("the other encoders or the local encoder" if fallback else "the others"))
        run, split = remote, remote.split
    else:
        run, split = local, even(config.data_parallel)
    return ShardedEncode(run, split, family.embedding_width, cache=cache, on_split=on_split,
                         pieces=lambda images: images.pieces(family)), remote


class ImageEncoderStage:
    """An E/PD encoder server's `image_encoder`: image files and wrapped videos (and their content keys) ->
    embeddings and layouts. Layouts come from the file headers (and the videos' plans, checked); files whose
    embeddings are cached are neither decoded nor encoded; the others are decoded under the preprocess
    limits and split over this server's replicas by tokens (videos, and InternVL's images, decoded first
    and split by pieces: temporal patches, tiles)."""

    def __init__(self, preprocess: PreprocessConfig, encode: EncodeConfig, family: Family,
                 encode_on_replicas: Callable, cache: EmbeddingCache | None = None,
                 on_split: Callable[[int], None] | None = None) -> None:
        self.config, self.family = preprocess, family
        self.files = media_files(encode.model_path, family, preprocess)
        local = LocalEncoder(self.files, encode_on_replicas)
        self.stage = ShardedEncode(local, even(encode.data_parallel), family.embedding_width, cache=cache,
                                   on_split=on_split, pieces=lambda images: images.pieces(family, local.pixels))

    def __call__(self, files: list[bytes], keys: list[bytes]):
        """-> (embeddings [sum tokens, embedding_width], layouts [N, 3]); a bad file raises InvalidRequest."""
        videos = sum(map(is_wrapped, files))
        self.config.check_image_count(len(files) - videos, videos)
        layout = self.files.layouts(files)
        return self.stage.encode(Images.of(self.family, layout, files=tuple(files)), keys), layout

    def shutdown(self) -> None:
        self.stage.shutdown()
