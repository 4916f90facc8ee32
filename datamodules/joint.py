"""Joint image-video training (LaVie) and the collate function every datamodule shares.

Joint mode appends M images to each video on the frame axis: `video` becomes [T + M, C, H, W] and the item gains
`image_captions` (M captions, one per appended image). Models split the frame axis at T; the batch carries no
extra count, M is len(image_captions[0]).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class JointImageVideoDataset(Dataset):
    """Each item of `video_dataset` with `images_per_video` items of `image_dataset` appended.

    The images for item i are random but fixed by (seed, i), so a run is reproducible whatever the worker layout.
    """

    def __init__(self, video_dataset: Dataset, image_dataset: Dataset, images_per_video: int, seed: int = 0):
        if images_per_video < 1:
            raise ValueError(f"images_per_video must be >= 1 for joint mode, got {images_per_video}")
        if len(image_dataset) == 0:
            raise ValueError("joint mode needs a non-empty image dataset")
        self.video_dataset, self.image_dataset = video_dataset, image_dataset
        self.images_per_video, self.seed = int(images_per_video), int(seed)

    def __len__(self) -> int:
        return len(self.video_dataset)

    def image_indices(self, index: int) -> list[int]:
        rng = np.random.default_rng([self.seed, index])
        count = len(self.image_dataset)
        return rng.choice(count, size=self.images_per_video, replace=count < self.images_per_video).tolist()

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.video_dataset[index]
        if item is None:  # a dataset's way to drop an item (ManifestDatasets replace it or raise): collate drops it
            return None
        images = [self.image_dataset[j] for j in self.image_indices(index)]
        if any(image is None for image in images):
            return None
        video = item["video"]  # (T, C, H, W)
        for image in images:
            if image["video"].shape[1:] != video.shape[1:]:
                raise ValueError(
                    f"image frames {tuple(image['video'].shape[1:])} do not match video frames "
                    f"{tuple(video.shape[1:])}; build both datasets with the same resolution"
                )
        item = dict(item)
        item["video"] = torch.cat([video, *(image["video"] for image in images)])  # (T + M, C, H, W)
        item["image_captions"] = [image["caption"] for image in images]
        return item


def _stack(values: Sequence[Any]) -> Any:
    """Batch one field: tensors stack, numbers become tensors, dicts recurse, anything else stays a list."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(values))
    if isinstance(first, bool):  # before int: bool is an int subclass
        return torch.tensor(values, dtype=torch.bool)
    if isinstance(first, int):
        return torch.tensor(values, dtype=torch.long)
    if isinstance(first, float):
        return torch.tensor(values, dtype=torch.float32)
    if isinstance(first, dict):
        return {key: _stack([value[key] for value in values]) for key in first}
    return list(values)  # captions: list[str]; image_captions: list of lists


def collate(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """The DataLoader collate_fn of every datamodule; drops None items (unreadable files nothing replaced)."""
    kept = [item for item in items if item is not None]
    if not kept:
        raise RuntimeError(
            f"all {len(items)} items of a batch were unreadable even after resampling; "
            "most files in the dataset are broken, see the warnings above for their names"
        )
    keys = kept[0].keys()
    for item in kept[1:]:
        if item.keys() != keys:
            raise ValueError(f"items in one batch have different fields: {sorted(keys)} vs {sorted(item.keys())}")
    return {key: _stack([item[key] for item in kept]) for key in keys}
