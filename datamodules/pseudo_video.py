"""Pseudo-videos from images (VidRD section 4.2): random zooming and panning over a still image make an F-frame clip,
so image-caption data trains the temporal layers too ("pseudo-videos ... show temporal consistency like the original
video data"). A wrapper over any image dataset, and `data=pseudo_video`, a datamodule for every backbone.

A clip is a camera path over the image: a window 1/zoom of the image's size whose zoom and centre move from a random
start to a random end, eased in and out (smoothstep), each frame resampled bilinearly (`grid_sample`) to the output
resolution. Zoom is interpolated in log scale (a constant-rate zoom); the centre is a position `u` in [-1, 1] within
the room the window has, `centre = u * (1 - 1/zoom)`, so the window never leaves the image. The paper uses FFmpeg's
zoompan; this is the same operation in torch, on the datamodule's tensors.

Reproducible and resumable like the other datasets: in training the path is drawn from torch's RNG, which
`SeededItems` seeds per (seed, epoch, item) (a new path every epoch, the same on a resumed run); validation draws it
from a generator seeded by (seed, item) alone, the same clip every time.
"""
from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule, Resolution, as_resolution
from datamodules.images import ImageTextDataset
from datamodules.resumable import derived_seed


class CameraPath(NamedTuple):
    """Per-frame zoom (>= 1: the window is 1/zoom of the image) and window centre (x, y), in grid_sample's [-1, 1]
    image coordinates (x right, y down)."""

    zoom: torch.Tensor     # (F,)
    centre: torch.Tensor   # (F, 2)


def smoothstep(t: torch.Tensor) -> torch.Tensor:
    """3t^2 - 2t^3: starts and ends at rest, so a clip's camera accelerates and settles smoothly."""
    return t * t * (3 - 2 * t)


def camera_path(num_frames: int, zoom: tuple[float, float], position: tuple[tuple[float, float], tuple[float, float]],
                ease: bool = True) -> CameraPath:
    """The path from (zoom[0], position[0]) to (zoom[1], position[1]): positions `u` in [-1, 1]^2 within the
    window's room to move (see the module docstring)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if min(zoom) < 1:
        raise ValueError(f"zoom must be >= 1 (the window inside the image), got {zoom}")
    t = torch.linspace(0, 1, num_frames, dtype=torch.float64) if num_frames > 1 else torch.zeros(1, dtype=torch.float64)
    t = smoothstep(t) if ease else t
    log_zoom = math.log(zoom[0]) + t * (math.log(zoom[1]) - math.log(zoom[0]))
    scale = torch.exp(log_zoom)
    start, end = torch.tensor(position[0], dtype=torch.float64), torch.tensor(position[1], dtype=torch.float64)
    u = start + t[:, None] * (end - start)  # (F, 2)
    centre = u * (1 - 1 / scale)[:, None]
    return CameraPath(scale.float(), centre.float())


def random_camera_path(num_frames: int, max_zoom: float = 1.5, max_pan: float = 1.0,
                       generator: torch.Generator | None = None) -> CameraPath:
    """Start and end zoom uniform in [1, max_zoom], start and end positions uniform in [-max_pan, max_pan]^2 (1: the
    window may reach the image's edges)."""
    draws = torch.rand(6, generator=generator, dtype=torch.float64)
    zoom = (1 + (max_zoom - 1) * float(draws[0]), 1 + (max_zoom - 1) * float(draws[1]))
    u = (draws[2:] * 2 - 1) * max_pan
    return camera_path(num_frames, zoom, ((float(u[0]), float(u[1])), (float(u[2]), float(u[3]))))


def render(image: torch.Tensor, path: CameraPath, resolution: Resolution) -> torch.Tensor:
    """Frames (F, C, h, w) of `image` (C, H, W) seen through `path`'s windows, bilinear, border-clamped."""
    scale = 1 / path.zoom
    theta = torch.zeros(len(scale), 2, 3, dtype=image.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = scale, scale
    theta[:, :, 2] = path.centre.to(image.dtype)
    grid = F.affine_grid(theta, [len(scale), image.shape[0], *resolution], align_corners=False)
    frames = F.grid_sample(image.expand(len(scale), -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                           align_corners=False)
    return frames


class PseudoVideoDataset(Dataset):
    """Each image item (video [1, C, H, W]) of `images` as an F-frame zoom-and-pan clip; other keys (caption, label)
    carried, `is_image` False. `vary_by_epoch`: the path from torch's RNG (seeded per item by SeededItems in
    training); False: from (seed, index) alone."""

    def __init__(self, images: Dataset, num_frames: int, resolution: Resolution, max_zoom: float = 1.5,
                 max_pan: float = 1.0, seed: int = 0, vary_by_epoch: bool = True):
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if max_zoom < 1:
            raise ValueError(f"data.max_zoom must be >= 1 (1: pan only), got {max_zoom}")
        if not 0 <= max_pan <= 1:
            raise ValueError(f"data.max_pan must lie in [0, 1] (1: the window may reach the image's edges), got {max_pan}")
        self.images, self.num_frames, self.resolution = images, int(num_frames), as_resolution(resolution)
        self.max_zoom, self.max_pan, self.seed, self.vary_by_epoch = max_zoom, max_pan, int(seed), vary_by_epoch

    def __len__(self) -> int:
        return len(self.images)

    def path_for(self, index: int) -> CameraPath:
        generator = None if self.vary_by_epoch else torch.Generator().manual_seed(derived_seed(self.seed, index))
        return random_camera_path(self.num_frames, self.max_zoom, self.max_pan, generator)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.images[index]
        image = item["video"]
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(
                f"pseudo-videos are made from images, but the source gave a {tuple(image.shape)} video: use an image "
                "source (data.source: the images datamodule, or synthetic with data.source.image_mode=true)")
        return {**item, "video": render(image[0], self.path_for(index), self.resolution), "is_image": False}


class PseudoVideoDataModule(BaseDataModule):
    """`data=pseudo_video`: the images of `source` (any datamodule whose items are images: `data=images`, or
    synthetic with `image_mode`) as zoom-and-pan clips of `num_frames` frames at `resolution`.

    Takes the settings every datamodule takes. Joint mode (`images_per_video` > 0) appends still images: from
    `image_manifest` when given, else the source's own images."""

    def __init__(
        self,
        source: BaseDataModule,
        num_frames: int = 16,
        resolution: Resolution = (256, 256),
        max_zoom: float = 1.5,
        max_pan: float = 1.0,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        frame_stride: int = 1,
        images_per_video: int = 0,
        image_manifest: str | os.PathLike | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        random_crop: bool = False,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, images_per_video=images_per_video, seed=seed)
        if not isinstance(source, BaseDataModule):
            raise TypeError(f"data.source must be a datamodule config (data=images, synthetic), got {type(source)}")
        self.source, self.num_frames, self.resolution = source, int(num_frames), as_resolution(resolution)
        self.max_zoom, self.max_pan = max_zoom, max_pan
        self.image_manifest, self.columns, self.random_crop = image_manifest, (image_column, caption_column), random_crop
        PseudoVideoDataset([], self.num_frames, self.resolution, max_zoom, max_pan)  # bad settings: an error now

    def build_dataset(self, split: str) -> Dataset | None:
        images = self.source.build_dataset(split)
        if images is None:
            return None
        return PseudoVideoDataset(images, self.num_frames, self.resolution, self.max_zoom, self.max_pan, self.seed,
                                  vary_by_epoch=split == "train")

    def build_image_dataset(self, split: str) -> Dataset:
        if self.image_manifest is not None:
            return ImageTextDataset(self.image_manifest, self.resolution, self.random_crop and split == "train",
                                    *self.columns, seed=self.seed)
        return self.source.build_dataset(split)
