"""Plumbing every datamodule shares: resolution parsing, caption manifests, skipping unreadable files, and a
LightningDataModule base that adds joint image-video mode and the shared collate once for all datasets.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.joint import JointImageVideoDataset, collate
from datamodules.video_io import MediaReadError

Resolution = tuple[int, int]


def as_resolution(value: int | Sequence[int]) -> Resolution:
    """(H, W) from an int (square) or a pair; accepts Hydra ListConfigs."""
    if isinstance(value, int):
        return (value, value)
    height, width = (int(v) for v in value)
    return (height, width)


class UnreadableFileWarning(UserWarning):
    """A file in a dataset was skipped; the message names it and the running count."""


def read_manifest(path: str | os.PathLike, path_column: str, caption_column: str) -> list[tuple[Path, str]]:
    """(file, caption) rows from a CSV with a header row, or from JSONL (one object per line, `.jsonl`/`.json`).

    Relative file paths are resolved against the manifest's folder, so a dataset folder can be moved as a whole.
    """
    path = Path(path)
    expected = (
        f"a CSV file with a header row containing the columns {path_column!r} and {caption_column!r}, or a .jsonl "
        f'file with one {{"{path_column}": ..., "{caption_column}": ...}} object per line; file paths may be '
        "relative to the manifest's folder"
    )
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found; it should be {expected}")
    with path.open(newline="", encoding="utf-8") as handle:
        if path.suffix.lower() in (".jsonl", ".json"):
            rows = [json.loads(line) for line in handle if line.strip()]
        else:
            rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"manifest {path} has no rows; it should be {expected}")
    missing = [c for c in (path_column, caption_column) if c not in rows[0]]
    if missing:
        raise ValueError(f"manifest {path} lacks column(s) {missing}; found {sorted(rows[0])}; it should be {expected}")
    return [(path.parent / str(row[path_column]), str(row[caption_column])) for row in rows]


class ManifestDataset(Dataset):
    """Base for datasets of (file, caption) rows whose files may be missing or broken.

    An unreadable row is replaced by another row (chosen by (seed, index), up to `max_resamples` times), warned about
    by name and counted, so a training loop always gets full batches and never crashes mid-epoch. The counter lives
    in shared memory so it also counts what DataLoader worker processes skipped.
    """

    max_resamples = 10

    def __init__(self, manifest: str | os.PathLike, path_column: str, caption_column: str, seed: int = 0):
        self.set_entries(manifest, read_manifest(manifest, path_column, caption_column), seed)

    def set_entries(self, manifest: str | os.PathLike, entries: list[tuple[Path, str]], seed: int = 0) -> None:
        """The rows and skip state, for datasets whose rows come from an official index (a split list, an
        annotation json) rather than a csv/jsonl manifest; `manifest` names that index in messages."""
        self.manifest = Path(manifest)
        self.entries = entries
        self.seed = int(seed)
        self._skipped = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_skipped(self) -> int:
        """How many unreadable files were skipped so far (all workers together)."""
        return self._skipped.value

    def load(self, path: Path, caption: str) -> dict[str, Any]:
        """The item for one row; raises MediaReadError when the file cannot be used."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        rng = np.random.default_rng([self.seed, index])
        for _ in range(self.max_resamples + 1):
            path, caption = self.entries[index]
            try:
                return self.load(path, caption)
            except MediaReadError as error:
                self._record_skip(error)
            index = int(rng.integers(len(self.entries)))
        return None  # collate drops it; only happens when most of the data is broken

    def _record_skip(self, error: MediaReadError) -> None:
        with self._skipped.get_lock():
            self._skipped.value += 1
            count = self._skipped.value
        warnings.warn(
            f"skipping {error}; skipped {count} unreadable {error.kind}s so far", UnreadableFileWarning, stacklevel=2
        )


class BaseDataModule(LightningDataModule):
    """Train/val DataLoaders with the shared collate; subclasses only say how to build a split's dataset.

    `images_per_video` > 0 switches on joint image-video mode for any subclass that can build an image dataset:
    every video item gets that many images appended (see datamodules.joint).
    """

    def __init__(self, batch_size: int = 8, num_workers: int = 0, images_per_video: int = 0, seed: int = 0):
        super().__init__()
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.images_per_video, self.seed = int(images_per_video), int(seed)
        self.datasets: dict[str, Dataset | None] = {}

    def build_dataset(self, split: str) -> Dataset | None:
        """The dataset for "train" or "val", or None when there is no such split."""
        raise NotImplementedError

    def build_image_dataset(self, split: str) -> Dataset:
        """Images (T=1 items) to append to the videos of `split` in joint mode."""
        raise NotImplementedError(f"{type(self).__name__} has no image source for joint mode; set images_per_video=0")

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val"):
            if split in self.datasets:  # setup runs once per stage; datasets (and skip counters) persist
                continue
            dataset = self.build_dataset(split)
            if dataset is not None and self.images_per_video > 0:
                images = self.build_image_dataset(split)
                dataset = JointImageVideoDataset(dataset, images, self.images_per_video, seed=self.seed)
            self.datasets[split] = dataset

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        if split not in self.datasets:
            self.setup()
        dataset = self.datasets[split]
        if dataset is None:
            return []  # Lightning treats an empty list as "no batches for this stage"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False)
