"""A folder of images with one caption: the few pictures of a subject a LoRA personalises a model with.

Every image file under the folder (subfolders included, sorted by path) is an item, a T=1 video with `is_image`
True, captioned with `caption` ("a photo of sks dog"-style); an image with a text file of the same name beside it
(`dog1.png` + `dog1.txt`, the DreamBooth / kohya convention) takes that file's text instead. Unreadable images are
skipped with a warning and counted, as in every manifest dataset.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from datamodules.base import Resolution, as_resolution
from datamodules.images import ImageTextDataModule, ImageTextDataset
from datamodules.transforms import video_transform

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def folder_entries(folder: str | os.PathLike, caption: str) -> list[tuple[Path, str]]:
    """(image, caption) for every image file under `folder`, sorted; a sidecar `<image>.txt` overrides `caption`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder} (data.folder)")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no image in {folder} (data.folder): expected {', '.join(IMAGE_SUFFIXES)} files")
    entries = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else caption
        if not text:
            raise ValueError(f"no caption for {image}: set data.caption (or write a non-empty {sidecar.name})")
        entries.append((image, text))
    return entries


class ImageFolderDataset(ImageTextDataset):
    """The images of a folder as T=1 videos (items as `ImageTextDataset`'s)."""

    def __init__(self, folder: str | os.PathLike, caption: str, resolution: Resolution, random_crop: bool = False,
                 seed: int = 0):
        self.set_entries(folder, folder_entries(folder, caption), seed)
        self.transform = video_transform(as_resolution(resolution), random_crop)
        self.check_readable()


class ImageFolderDataModule(ImageTextDataModule):
    """Text-to-image batches from a folder of images and one caption (`data=image_folder data.folder=DIR
    data.caption="..."`). Like `data=images` it gives one-frame items only: num_frames must be 1, images_per_video 0."""

    def __init__(
        self,
        folder: str | os.PathLike,
        caption: str = "",
        resolution: Resolution = (256, 256),
        batch_size: int = 4,
        num_workers: int = 0,
        val_folder: str | os.PathLike | None = None,
        random_crop: bool = False,
        seed: int = 0,
        num_frames: int = 1,
        frame_stride: int = 1,
        images_per_video: int = 0,
    ):
        if num_frames != 1 or images_per_video != 0:
            raise ValueError(
                f"the image folder datamodule (data=image_folder) gives one-frame items, but num_frames={num_frames} "
                f"and images_per_video={images_per_video} were asked for: set data.num_frames=1 "
                "data.images_per_video=0"
            )
        super().__init__(manifest=folder, resolution=resolution, batch_size=batch_size, num_workers=num_workers,
                         val_manifest=val_folder, random_crop=random_crop, seed=seed)
        self.caption = caption
        folder_entries(folder, caption)  # a wrong folder or a missing caption fails now, not at the first batch

    def build_dataset(self, split: str) -> Dataset | None:
        folder = self.manifests[split]
        if folder is None:
            return None
        return ImageFolderDataset(folder, self.caption, self.resolution, self.random_crop and split == "train",
                                  seed=self.seed)
