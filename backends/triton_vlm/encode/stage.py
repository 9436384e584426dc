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
from ..preprocess.images import ImageLimits, open_image
from .dispatch import ShardedEncode, even
from .embedding_cache import EmbeddingCache
from .remote_encoders import RemoteEncoders

log = logging.getLogger(__name__)

CHECKED = ImageLimits(max_bytes=2**62, max_pixels=2**62)  # preprocess checked the files against the limits


class LocalEncoder:
    """This server's `vision_encoder` replicas; image files (E/PD's fallback, an encoder server's requests)
    are preprocessed here first, under `limits`."""

    def __init__(self, processing: ImageProcessing, encode_on_replicas: Callable,
                 limits: ImageLimits = CHECKED) -> None:
        self.processing, self.encode_on_replicas, self.limits = processing, encode_on_replicas, limits

    def pixels(self, files: tuple[bytes, ...]):
        """Image files -> their pixel_values (for `Images.pieces`)."""
        return self.processing.decode(files, self.limits)[0]

    def __call__(self, images: Images, target=None):
        pixels, grid = images.pixel_values, images.layout
        if images.files is not None:
            pixels, grid = self.processing.decode(images.files, self.limits)
        return self.encode_on_replicas(pixels, grid)


def encode_stage(config: EncodeConfig, family: Family, encode_on_replicas: Callable,
                 cache: EmbeddingCache | None = None, on_split: Callable[[int], None] | None = None,
                 warn: Callable[[str], None] = log.warning,
                 info: Callable[[str], None] = log.info) -> tuple[ShardedEncode, RemoteEncoders | None]:
    """-> (the stage, the encoder-server pool when `config` names encoder servers). Servers unreachable at
    start are marked down and said so (`warn`); changes of a watched list are said with `info`."""
    local = LocalEncoder(ImageProcessing(config.model_path, family), encode_on_replicas)
    remote = None
    if config.remote_encoders or config.encoder_urls_file:
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
    """An E/PD encoder server's `image_encoder`: image files (and their content keys) -> embeddings and
    layouts. Layouts come from the file headers; images whose embeddings are cached are neither decoded
    nor encoded; the others are decoded under the preprocess limits and split over this server's replicas
    by tokens (InternVL's images decoded first and split by tiles)."""

    def __init__(self, preprocess: PreprocessConfig, encode: EncodeConfig, family: Family,
                 encode_on_replicas: Callable, cache: EmbeddingCache | None = None,
                 on_split: Callable[[int], None] | None = None) -> None:
        self.config, self.limits, self.family = preprocess, ImageLimits.of(preprocess), family
        self.processing = ImageProcessing(encode.model_path, family)
        local = LocalEncoder(self.processing, encode_on_replicas, self.limits)
        self.stage = ShardedEncode(local, even(encode.data_parallel), family.embedding_width, cache=cache,
                                   on_split=on_split, pieces=lambda images: images.pieces(family, local.pixels))

    def __call__(self, files: list[bytes], keys: list[bytes]):
        """-> (embeddings [sum tokens, embedding_width], layouts [N, 3]); a bad image raises InvalidRequest."""
        self.config.check_image_count(len(files))
        layout = self.processing.grid([open_image(data, i, self.limits).size for i, data in enumerate(files)])
        return self.stage.encode(Images.of(self.family, layout, files=tuple(files)), keys), layout

    def shutdown(self) -> None:
        self.stage.shutdown()
