"""WebVid-style video-caption corpora: a CSV/JSONL manifest of (video path, caption) rows."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule, ManifestDataset, Resolution, as_resolution
from datamodules.images import JointImagesFromManifest
from datamodules.transforms import video_transform
from datamodules.video_io import VideoReadError, read_video, video_info


class VideoTextDataset(ManifestDataset):
    """Clips of `num_frames` frames, `frame_stride` apart, from the videos of a manifest.

    With `random_start` (training) each read takes a clip at a random position, drawn from torch's RNG, which
    Lightning's seed_everything seeds per worker; otherwise (validation) the first clip of each video. Missing,
    corrupt and too-short videos are skipped with a warning and counted (see ManifestDataset).
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        num_frames: int,
        resolution: Resolution,
        frame_stride: int = 1,
        random_start: bool = False,
        random_crop: bool = False,
        video_column: str = "video",
        caption_column: str = "caption",
        seed: int = 0,
    ):
        super().__init__(manifest, video_column, caption_column, seed)
        self.num_frames, self.frame_stride, self.random_start = int(num_frames), int(frame_stride), random_start
        self.transform = video_transform(as_resolution(resolution), random_crop)
        self.check_readable()  # no readable video: a clear error now, not in a DataLoader worker mid-epoch

    def load(self, path: Path, caption: str) -> dict[str, Any]:
        info = video_info(path)
        span = (self.num_frames - 1) * self.frame_stride + 1  # source frames one clip covers
        if info.num_frames < span:
            raise VideoReadError(path, f"too short: {info.num_frames} frames, a clip needs {span}")
        start = int(torch.randint(info.num_frames - span + 1, ())) if self.random_start else 0
        frames = read_video(path, self.num_frames, start, self.frame_stride)  # (T, H, W, 3)
        return {
            "video": self.transform(frames),  # (T, C, H, W)
            "caption": caption,
            "fps": info.fps / self.frame_stride,  # the rate the clip plays at naturally
            "is_image": False,
        }


class VideoTextDataModule(JointImagesFromManifest, BaseDataModule):
    """Video-caption batches from manifests; `images_per_video` > 0 with `image_manifest` gives joint mode."""

    def __init__(
        self,
        manifest: str | os.PathLike,
        num_frames: int = 16,
        resolution: Resolution = (256, 256),
        frame_stride: int = 1,
        batch_size: int = 8,
        num_workers: int = 0,
        val_manifest: str | os.PathLike | None = None,
        images_per_video: int = 0,
        image_manifest: str | os.PathLike | None = None,
        video_column: str = "video",
        caption_column: str = "caption",
        image_column: str = "image",
        random_crop: bool = False,
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, images_per_video=images_per_video, seed=seed)
        self.save_hyperparameters(logger=False)
        self.use_image_manifest(images_per_video, image_manifest, image_column, caption_column)
        self.manifests = {"train": manifest, "val": val_manifest}
        self.num_frames, self.frame_stride = num_frames, frame_stride
        self.resolution, self.random_crop = as_resolution(resolution), random_crop
        self.columns = {"video": video_column, "caption": caption_column}

    def build_dataset(self, split: str) -> Dataset | None:
        if self.manifests[split] is None:
            return None
        train = split == "train"
        return VideoTextDataset(
            self.manifests[split],
            self.num_frames,
            self.resolution,
            self.frame_stride,
            random_start=train,
            random_crop=self.random_crop and train,
            video_column=self.columns["video"],
            caption_column=self.columns["caption"],
            seed=self.seed,
        )
