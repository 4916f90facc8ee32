"""Image-caption pairs from a manifest; each item is a T=1 video with `is_image` True."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule, ManifestDataset, Resolution, as_resolution
from datamodules.transforms import video_transform
from datamodules.video_io import MediaReadError


class ImageReadError(MediaReadError):
    kind = "image"


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """uint8 [1, H, W, 3] (a one-frame video); raises ImageReadError for missing or undecodable files."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file does not exist")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # convert() forces the decode, so truncation fails here
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(path, f"not a readable image ({error})") from error
    return torch.from_numpy(pixels.copy())[None]  # (1, H, W, 3)


class ImageTextDataset(ManifestDataset):
    """Rows (image, caption) of a CSV/JSONL manifest as T=1 videos; unreadable images are skipped and counted."""

    def __init__(
        self,
        manifest: str | os.PathLike,
        resolution: Resolution,
        random_crop: bool = False,
        image_column: str = "image",
        caption_column: str = "caption",
        seed: int = 0,
    ):
        super().__init__(manifest, image_column, caption_column, seed)
        self.transform = video_transform(as_resolution(resolution), random_crop)
        self.check_readable()  # no readable image: a clear error now, not in a DataLoader worker mid-epoch

    def load(self, path: Path, caption: str) -> dict[str, Any]:
        return {"video": self.transform(read_image(path)), "caption": caption, "is_image": True}  # (1, C, H, W)


class ImageTextDataModule(BaseDataModule):
    """Text-to-image batches (T=1 videos), e.g. for image pre-training of a video backbone.

    It takes the settings every datamodule takes, so any experiment composes with it, and is explicit about the
    two an image dataset cannot honour: `num_frames` must be 1 and `images_per_video` 0 (a recipe's clip length or
    joint mode silently dropped would train something other than the recipe). `frame_stride` has no effect on
    one-frame items.
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        resolution: Resolution = (256, 256),
        batch_size: int = 8,
        num_workers: int = 0,
        val_manifest: str | os.PathLike | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        random_crop: bool = False,
        seed: int = 0,
        num_frames: int = 1,
        frame_stride: int = 1,
        images_per_video: int = 0,
    ):
        if num_frames != 1:
            raise ValueError(
                f"the image datamodule (data=images) gives one-frame items, but num_frames={num_frames} was asked for "
                "(the experiment's clip length): set data.num_frames=1 to train on images alone, or use data=joint "
                "to append images to video clips"
            )
        if images_per_video != 0:
            raise ValueError(
                f"images_per_video={images_per_video} appends images to video clips (joint mode), and the image "
                "datamodule (data=images) has no videos: set data.images_per_video=0, or use data=joint"
            )
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters(logger=False)
        self.manifests = {"train": manifest, "val": val_manifest}
        self.resolution, self.random_crop = as_resolution(resolution), random_crop
        self.columns = (image_column, caption_column)

    def build_dataset(self, split: str) -> Dataset | None:
        if self.manifests[split] is None:
            return None
        random_crop = self.random_crop and split == "train"
        return ImageTextDataset(self.manifests[split], self.resolution, random_crop, *self.columns, seed=self.seed)


class JointImagesFromManifest:
    """Joint mode for a video datamodule whose appended images come from an image-caption manifest (video_text,
    ucf101, msrvtt): the images get the videos' resolution, random crop (training only) and seed."""

    def use_image_manifest(self, images_per_video: int, image_manifest: str | os.PathLike | None,
                           image_column: str = "image", caption_column: str = "caption") -> None:
        """Fail now when joint mode (images_per_video > 0) has no manifest to read its images from."""
        if images_per_video > 0 and image_manifest is None:
            raise ValueError(
                f"images_per_video={images_per_video} (joint image-video training) needs image_manifest, a CSV/JSONL "
                "manifest of (image, caption) rows (data.image_manifest=FILE, or data=joint); set "
                "data.images_per_video=0 to train on videos alone"
            )
        self.image_manifest, self.image_columns = image_manifest, (image_column, caption_column)

    def build_image_dataset(self, split: str) -> Dataset:
        random_crop = self.random_crop and split == "train"
        return ImageTextDataset(self.image_manifest, self.resolution, random_crop, *self.image_columns, self.seed)
