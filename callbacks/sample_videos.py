"""Generate a fixed set of prompts every N training steps, so progress can be watched (and compared) over a run.

Files: `<dirpath>/step_{global_step:06d}/{i:02d}.mp4` and `grid.png` (one row per prompt), plus `prompts.txt` once in
`<dirpath>`. `dirpath` defaults to `<trainer.log_dir or default_root_dir>/samples`; the Hydra config pins it to the
run directory. With a TensorBoardLogger attached, each video goes to TensorBoard as an animated GIF (what torch's
`add_video` writes too, but encoded with Pillow instead of moviepy) and the grid as an image.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary

from callbacks.ema import EMA
from datamodules.video_io import write_grid_png, write_video


def gif_summary(tag: str, video: torch.Tensor, fps: float) -> Summary:
    """A TensorBoard image summary holding an animated GIF of uint8 frames (T, H, W, 3): its video display."""
    frames = [Image.fromarray(frame) for frame in video.numpy()]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    height, width = video.shape[1:3]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class SampleVideos(Callback):
    """Call `pl_module.generate(prompts, num_frames, seed, **overrides)` every `every_n_steps` optimizer steps.

    The seed is fixed, so the same noise is used at every step and the samples differ only by training.
    `num_frames=None` means the model's own clip length; `overrides` are sampler settings for these calls only. The
    module runs in eval mode under no_grad, with the EMA weights when an EMA callback is attached and `use_ema`.
    Only global rank 0 generates (every rank when the model is sharded) and writes; like Lightning's
    ModelCheckpoint, nothing is written under fast_dev_run.
    """

    tag = "samples"  # TensorBoard tag prefix

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 1000,
        num_frames: int | None = None,
        seed: int = 0,
        overrides: dict[str, Any] | None = None,
        at_train_end: bool = True,
        use_ema: bool = True,
        dirpath: str | None = None,
        max_grid_frames: int = 8,
    ) -> None:
        if not prompts:
            raise ValueError("SampleVideos needs at least one prompt")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.prompts = [str(p) for p in prompts]  # plain list, also when Hydra hands over a ListConfig
        self.every_n_steps = every_n_steps
        self.num_frames = num_frames
        self.seed = seed
        self.overrides = dict(overrides or {})
        self.at_train_end = at_train_end
        self.use_ema = use_ema
        self.dirpath = dirpath
        self.max_grid_frames = max_grid_frames
        self._last_step = -1  # global_step sampled last: accumulated micro-batches share one step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.sample(trainer, pl_module)

    def output_dir(self, trainer: Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    def _averaged_weights(self, trainer: Trainer, pl_module: LightningModule) -> contextlib.AbstractContextManager:
        ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
        if ema is None or not self.use_ema:
            return contextlib.nullcontext()
        # Callback order must not matter: if EMA's on_train_batch_end has not run yet for this step, fold it in now.
        ema.update(trainer, pl_module)
        return ema.averaged_weights()

    def sample(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        """Generate and write the samples for the current step; returns their folder (None on other ranks)."""
        self._last_step = trainer.global_step
        # A sharded model (ModelParallelStrategy: trainer=fsdp) needs every rank in each forward, so every rank
        # generates and rank 0 alone writes; otherwise only rank 0 generates.
        sharded = isinstance(trainer.strategy, ModelParallelStrategy)
        if trainer.fast_dev_run or not (trainer.is_global_zero or sharded):
            return None
        # Remember every submodule's mode, not just the top one: models keep frozen parts (VAE) in eval mode.
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad(), self._averaged_weights(trainer, pl_module):
                videos = self.make_videos(trainer, pl_module)
        finally:
            for module, training in modes.items():
                module.training = training
        if not trainer.is_global_zero:
            return None
        videos = videos.detach().cpu()  # uint8 (B, T, H, W, 3)

        root = self.output_dir(trainer)
        folder = root / f"step_{trainer.global_step:06d}"
        for i, video in enumerate(videos):
            write_video(folder / f"{i:02d}.mp4", video, fps=pl_module.fps)
        grid = write_grid_png(folder / "grid.png", videos, max_frames=self.max_grid_frames)
        self.write_index(root)
        self._log_tensorboard(trainer, pl_module, videos, grid)
        return folder

    def make_videos(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        """The videos to write, uint8 (B, T, H, W, 3); runs in eval mode, under no_grad, with the EMA weights."""
        return pl_module.generate(self.prompts, num_frames=self.num_frames, seed=self.seed, **self.overrides)

    def write_index(self, root: Path) -> None:
        """Once per run: what each numbered video shows."""
        prompts_file = root / "prompts.txt"
        if not prompts_file.exists():
            prompts_file.write_text("".join(f"{i:02d}\t{p}\n" for i, p in enumerate(self.prompts)))

    def _log_tensorboard(self, trainer: Trainer, pl_module: LightningModule, videos: torch.Tensor, grid: Path) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer, step = logger.experiment, trainer.global_step
            for i, video in enumerate(videos):
                writer.file_writer.add_summary(gif_summary(f"{self.tag}/{i:02d}", video, pl_module.fps), step)
            image = np.asarray(Image.open(grid).convert("RGB"))  # (H, W, 3)
            writer.add_image(f"{self.tag}/grid", image, step, dataformats="HWC")
