"""Reconstructions of fixed validation clips every N training steps, for video tokenizers and autoencoders.

Each written video shows the input (left) and its reconstruction (right) side by side; `grid.png` has one row per
clip. Files, TensorBoard logging, EMA weights and rank-0-only writing are `SampleVideos`'; only what is drawn
differs. The module needs `reconstruct(video [B, T, C, H, W] in [-1, 1]) -> (reconstruction, ...)`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from lightning import LightningModule, Trainer

from callbacks.sample_videos import SampleVideos
from datamodules.transforms import to_uint8


class ReconstructionVideos(SampleVideos):
    tag = "reconstructions"

    def __init__(self, num_videos: int = 4, every_n_steps: int = 1000, at_train_end: bool = True,
                 use_ema: bool = True, dirpath: str | None = None, max_grid_frames: int = 8) -> None:
        if num_videos < 1:
            raise ValueError(f"num_videos must be >= 1, got {num_videos}")
        super().__init__(prompts=[f"validation clip {i}" for i in range(num_videos)], every_n_steps=every_n_steps,
                         at_train_end=at_train_end, use_ema=use_ema, dirpath=dirpath, max_grid_frames=max_grid_frames)
        self.num_videos = num_videos
        self._clips: torch.Tensor | None = None

    def _fixed_clips(self, trainer: Trainer) -> torch.Tensor:
        """The first `num_videos` validation clips (train clips when there is no validation split), kept."""
        if self._clips is None:
            datamodule = trainer.datamodule
            loader = datamodule.val_dataloader() if datamodule is not None else None
            if not loader:
                loader = trainer.train_dataloader
            clips = []
            for batch in loader:
                clips.append(batch["video"])
                if sum(len(c) for c in clips) >= self.num_videos:
                    break
            self._clips = torch.cat(clips)[: self.num_videos]
        return self._clips

    def make_videos(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        clips = self._fixed_clips(trainer).to(pl_module.device)
        reconstruction = pl_module.reconstruct(clips)[0]
        return to_uint8(torch.cat([clips, reconstruction], dim=-1))  # input | reconstruction, along the width

    def write_index(self, root: Path) -> None:
        index = root / "README.txt"
        if not index.exists():
            index.write_text("each video: validation input (left) | reconstruction (right); grid.png: one row per clip\n")
