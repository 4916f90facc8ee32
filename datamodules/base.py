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
import torch
from lightning import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from datamodules.joint import JointImageVideoDataset, collate
from datamodules.resumable import EpochSampler, SeededItems
from datamodules.video_io import MediaReadError

Resolution = tuple[int, int]


def as_resolution(value: int | Sequence[int]) -> Resolution:
    """(H, W) from an int (square) or a pair; accepts Hydra ListConfigs."""
    if isinstance(value, int):
        return (value, value)
    height, width = (int(v) for v in value)
    return (height, width)


class UnreadableFileWarning(UserWarning):
    """A file in a dataset was skipped; the message names it and the running count of distinct unreadable files."""


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

    An unreadable row is replaced by another row, so a training loop always gets full batches and never crashes
    mid-epoch: by up to `max_resamples` rows drawn at random (fixed by (seed, index)), then by the next row not known
    to be unreadable. Each unreadable row is warned about by name and counted once. Which rows failed is a bitmap in
    shared memory, one bit a row (1.25 MB for a 10M-row manifest), seen by the main process and every DataLoader
    worker, so a row known to be unreadable is never read again by any of them.

    Subclasses call `check_readable()` at the end of __init__: a manifest with no readable file fails there, in the
    main process before training, with a ValueError naming it; the same error is raised when reading finds every row
    unreadable.
    """

    max_resamples = 10
    probe_limit = 64  # rows check_readable tries: enough to tell "wrong paths" apart from "some broken files"
    _EXAMPLE_BYTES = 512  # room for the first failure's message, the example an error quotes

    def __init__(self, manifest: str | os.PathLike, path_column: str, caption_column: str, seed: int = 0):
        self.set_entries(manifest, read_manifest(manifest, path_column, caption_column), seed)

    def set_entries(self, manifest: str | os.PathLike, entries: list[tuple[Path, str]], seed: int = 0) -> None:
        """The rows and skip state, for datasets whose rows come from an official index (a split list, an
        annotation json) rather than a csv/jsonl manifest; `manifest` names that index in messages."""
        self.manifest = Path(manifest)
        self.entries = entries
        self.seed = int(seed)
        # Shared with DataLoader workers (inherited at fork, or pickled while spawning). Plain reads of the bitmap
        # need no lock: a stale 0 only costs one more read attempt; marking and counting happen under the lock.
        self._unreadable = multiprocessing.RawArray("B", (len(entries) + 7) // 8)
        self._skipped = multiprocessing.RawValue("q", 0)
        self._example = multiprocessing.RawArray("c", self._EXAMPLE_BYTES)
        self._lock = multiprocessing.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_skipped(self) -> int:
        """How many distinct rows (files) were found unreadable so far, by all processes together."""
        return self._skipped.value

    def is_unreadable(self, index: int) -> bool:
        """Whether row `index` is known to be unreadable."""
        byte, bit = divmod(index, 8)
        return bool(self._unreadable[byte] >> bit & 1)

    def load(self, path: Path, caption: str) -> dict[str, Any]:
        """The item for one row; raises MediaReadError when the file cannot be used."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        replacements = None  # rows drawn by (seed, index), made only when needed
        for _ in range(self.max_resamples + 1):
            item = self._read(index)
            if item is not None:
                return item
            if replacements is None:
                replacements = np.random.default_rng([self.seed, index])
            index = int(replacements.integers(len(self.entries)))
        # The random draws met only unreadable rows (most of the data is broken): walk to a row not known to be
        # unreadable, so an item is found whenever one exists, and the error below is certain when none does.
        while (index := self._next_unmarked(index)) is not None:
            item = self._read(index)
            if item is not None:
                return item
        raise self._no_readable_file()

    def check_readable(self) -> None:
        """Read rows until one loads, or raise the ValueError of a manifest with no readable file.

        Tries at most `probe_limit` rows, drawn at random (fixed by seed), so a huge manifest does not stall: a few
        broken files cost a few reads, and a manifest none of whose tried rows reads is not worth training on. Rows
        found unreadable here are warned about and counted like those found while training.
        """
        count = len(self.entries)
        if count == 0:
            raise ValueError(f"{self.manifest} lists no files")
        rows = np.random.default_rng([self.seed, count]).choice(count, min(count, self.probe_limit), replace=False)
        with torch.random.fork_rng(devices=[]):  # a load may draw a random clip start: keep torch's RNG as it was
            for row in rows.tolist():
                if self._read(row) is not None:
                    return
        raise self._no_readable_file(tried=len(rows))

    def _read(self, index: int) -> dict[str, Any] | None:
        """Row `index`'s item, or None when it is unreadable (known already, or found now and recorded)."""
        if self.is_unreadable(index):
            return None
        path, caption = self.entries[index]
        try:
            return self.load(path, caption)
        except MediaReadError as error:
            self._mark_unreadable(index, error)
            return None

    def _mark_unreadable(self, index: int, error: MediaReadError) -> None:
        byte, bit = divmod(index, 8)
        with self._lock:
            if self._unreadable[byte] >> bit & 1:
                return  # another worker read it at the same time and has counted it
            self._unreadable[byte] |= 1 << bit
            self._skipped.value += 1
            count = self._skipped.value
            if count == 1:
                self._example.value = str(error).encode("utf-8")[: self._EXAMPLE_BYTES - 1]
        warnings.warn(
            f"skipping {error}; skipped {count} unreadable {error.kind}s so far", UnreadableFileWarning, stacklevel=4
        )

    def _next_unmarked(self, start: int) -> int | None:
        """The first row at or after `start` (wrapping around) not known to be unreadable; None when there is none."""
        # One byte a row, only on this rare path (10 MB for 10M rows, freed on return).
        marks = np.unpackbits(np.frombuffer(self._unreadable, dtype=np.uint8), bitorder="little")[: len(self.entries)]
        free = np.flatnonzero(marks == 0)
        return int(free[np.searchsorted(free, start) % len(free)]) if len(free) else None

    def _no_readable_file(self, tried: int | None = None) -> ValueError:
        count, example = len(self.entries), self._example.value.decode("utf-8", errors="replace")
        scope = f"all {count} rows"
        if tried is not None and tried < count:
            scope = f"all {tried} rows tried (at random, of {count})"
        return ValueError(
            f"no readable file in {self.manifest}: {scope} are unreadable ({self.num_skipped} of {count} rows found "
            f"unreadable so far), e.g. {example}"
        )


class BaseDataModule(LightningDataModule):
    """Train/val DataLoaders with the shared collate; subclasses only say how to build a split's dataset.

    `images_per_video` > 0 switches on joint image-video mode for any subclass that can build an image dataset:
    every video item gets that many images appended (see datamodules.joint).

    Training batches are resumable (datamodules.resumable): their order and every item's randomness follow from
    (seed, epoch, position), and the datamodule's checkpoint state says how many batches of which epoch were
    trained on, so `train.py ckpt_path=...` reads on exactly where the interrupted run stopped. Each rank takes its
    own share of every epoch (set `trainer.use_distributed_sampler=false`, as configs/trainer/default.yaml does).
    """

    def __init__(self, batch_size: int = 8, num_workers: int = 0, images_per_video: int = 0, seed: int = 0):
        super().__init__()
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.images_per_video, self.seed = int(images_per_video), int(seed)
        self.datasets: dict[str, Dataset | None] = {}
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint

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

    def _dataset(self, split: str) -> Dataset | None:
        if split not in self.datasets:
            self.setup()
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        if dataset is None:
            raise ValueError(f"{type(self).__name__} has no training data")
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochSampler(len(dataset), self.batch_size, self.seed, rank=rank, world_size=world_size)
        if self._resume is not None:
            # Lightning creates the resumed epoch's iterator before it calls set_epoch: set it here
            sampler.set_epoch(self._resume[0])
            sampler.resume_at(*self._resume)
            self._resume = None
        return self._dataloader(SeededItems(dataset, self.seed), sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        dataset = self._dataset("val")
        if dataset is None:
            return []  # Lightning treats an empty list as "no batches for this stage"
        return self._dataloader(dataset, shuffle=False)

    def _dataloader(self, dataset: Dataset, **order: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            # each new iterator draws a worker seed: from here, not from the global RNG the training noise is drawn
            # from (validation creates one mid-epoch)
            generator=torch.Generator().manual_seed(self.seed),
            **order,
        )

    # ---- checkpoint state: where in the data the run is ----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        # `processed` counts the batches of this epoch whose training step has run, for a checkpoint written at the
        # end of a batch, after validation or by a crash alike (Lightning restarts after the last processed batch)
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches_done": batches, "seed": self.seed,
                "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if (state_dict.get("seed"), state_dict.get("batch_size")) != (self.seed, self.batch_size):
            warnings.warn(
                f"resuming with other data settings than the checkpoint's (seed {state_dict.get('seed')} -> "
                f"{self.seed}, batch size {state_dict.get('batch_size')} -> {self.batch_size}): the data order "
                "does not continue the interrupted run's", stacklevel=2,
            )
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches_done"]))
