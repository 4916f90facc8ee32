"""How many unreadable files the datasets skipped, per split, in the loggers (metrics.csv, TensorBoard).

Datasets built on ManifestDataset (video_text, images, joint, ucf101, msrvtt) skip a missing or broken file, warn
once and count it; the count is of distinct files and includes what DataLoader workers found. Warnings scroll past,
so the counts are logged next to the loss: `data/skipped_train`, `data/skipped_val` and, in joint image-video mode,
`data/skipped_train_images` / `data/skipped_val_images` for the images appended to the videos. They are logged
every `trainer.log_every_n_steps` like the loss, and once more when training ends so the final counts are in the
files. Datasets that cannot skip anything (the synthetic one) log nothing. Under DDP every rank has its own
datasets; rank 0's counts are the ones written.
"""
from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer

from datamodules.joint import JointImageVideoDataset


def skip_counts(datamodule: Any) -> dict[str, int]:
    """{"data/skipped_<split>[_images]": distinct unreadable files so far} over `datamodule.datasets` (the datasets
    BaseDataModule.setup built); empty when nothing there counts skips."""
    counts = {}
    for split, dataset in (getattr(datamodule, "datasets", None) or {}).items():
        parts = {split: dataset}
        if isinstance(dataset, JointImageVideoDataset):  # look through to the videos and the appended images
            parts = {split: dataset.video_dataset, f"{split}_images": dataset.image_dataset}
        for name, part in parts.items():
            if hasattr(part, "num_skipped"):
                counts[f"data/skipped_{name}"] = int(part.num_skipped)
    return counts


class DataSkips(Callback):
    """Log `skip_counts(trainer.datamodule)` during training and at its end."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        counts = skip_counts(trainer.datamodule)
        if counts:
            # batch_size given: nothing to infer from the batch, these are not per-sample values
            pl_module.log_dict({name: float(count) for name, count in counts.items()}, on_step=True, on_epoch=False,
                               batch_size=1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # self.log writes every log_every_n_steps only: skips found after the last write would go unrecorded
        counts = skip_counts(trainer.datamodule)
        if counts:
            for logger in trainer.loggers:
                logger.log_metrics({name: float(count) for name, count in counts.items()}, step=trainer.global_step)
