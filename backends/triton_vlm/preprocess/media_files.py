"""The files that go to an encoder: image files and wrapped videos (`video_inputs.wrap`), in prompt order ->
their layouts (from headers and plans alone) and their pixel rows (decoded: on the caller's thread)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .image_inputs import ImageProcessing
from .images import ImageLimits, open_image
from .video_inputs import VideoProcessing, is_wrapped, unwrap


class MediaFiles:
    def __init__(self, images: ImageProcessing, videos: VideoProcessing, limits: ImageLimits) -> None:
        self.images, self.videos, self.limits = images, videos, limits

    def _numbered(self, files: Sequence[bytes]) -> list[tuple[bool, int]]:
        """(is a video, its number among its kind) per file: errors name "image 2", "video 0"."""
        seen, out = [0, 0], []
        for file in files:
            video = is_wrapped(file)
            out.append((video, seen[video]))
            seen[video] += 1
        return out

    def layouts(self, files: Sequence[bytes]) -> np.ndarray:
        rows = []
        for file, (video, i) in zip(files, self._numbered(files), strict=True):
            if video:
                rows.append(np.asarray([unwrap(file, i, self.videos)[1].layout], np.int64))
            else:
                rows.append(self.images.grid([open_image(file, i, self.limits).size]))
        return np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)

    def decode(self, files: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """-> (pixel_values, layout [N, 3]), file after file."""
        numbered = self._numbered(files)
        if not any(video for video, _ in numbered):
            return self.images.decode(files, self.limits)
        image_files = [f for f, (video, _) in zip(files, numbered, strict=True) if not video]
        image_pixels, image_grid = self.images.decode(image_files, self.limits)
        image_rows = np.split(image_pixels, np.cumsum(self.images.family.pixel_rows(image_grid))[:-1])
        pixels, layout, next_image = [], [], 0
        for file, (video, i) in zip(files, numbered, strict=True):
            if video:
                data, plan = unwrap(file, i, self.videos)
                rows, grid = self.videos.pixels(data, i, plan)
            else:
                rows, grid = image_rows[next_image], image_grid[next_image:next_image + 1]
                next_image += 1
            pixels.append(rows)
            layout.append(grid)
        return np.concatenate(pixels), np.concatenate(layout).astype(np.int64)
