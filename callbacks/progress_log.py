"""Training progress on a terminal and in a log file.

On a terminal this is Lightning's RichProgressBar. Redirected to a file (nohup, a cluster job) a live bar prints
nothing until training ends, so there the bar stays off and plain lines are printed instead (rank 0, stdout):

    step 250/750  loss 0.1234  1.30 steps/s  elapsed 3:12  left 6:24
    validation at step 250: val/loss 0.1207  val/loss_video 0.1189  val/loss_image 0.1312  (0:04)

a step line every `every_n_steps` optimizer steps and at least every `every_n_seconds` (and at the last step), one
line per validation (not one per validation batch). `loss` is the mean training loss over the steps since the
previous line (metrics.csv has every logged step); steps/s and the time left are measured over this process's
whole run so far, validation and sample videos included, so the time left is what the clock will say.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from utils.progress import format_duration, on_terminal, time_left

LINES_PER_RUN = 30  # every_n_steps=null: about this many step lines over max_steps (25 steps for a 750-step run)
MAX_VAL_METRICS = 4  # val/* metrics on a validation line


class LogFriendlyProgressBar(RichProgressBar):
    """RichProgressBar on a terminal; plain progress lines when stdout is not one (`plain=None`), or always
    (`plain=True`), or never (`plain=False`). `every_n_steps=null`: max_steps / 30."""

    def __init__(self, every_n_steps: int | None = None, every_n_seconds: float | None = 60.0,
                 plain: bool | None = None, clock: Callable[[], float] = time.monotonic, **rich_kwargs: Any):
        super().__init__(**rich_kwargs)
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive number of steps or null, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self.plain = (not on_terminal()) if plain is None else plain
        self.clock = clock
        if self.plain:
            super().disable()  # every RichProgressBar hook is a no-op while disabled
        self._reset()

    def _reset(self) -> None:
        self._started = self._last_line_time = self._val_started = 0.0
        self._start_step = self._last_line_step = 0
        self._losses: list[float] = []
        self._interval = 1

    # ------------------------------------------------------------------ on/off
    def enable(self) -> None:
        if not self.plain:  # Lightning's tuners switch the bar back on after their runs
            super().enable()

    def _printing(self, trainer: Trainer) -> bool:
        return self.plain and trainer.is_global_zero

    # ------------------------------------------------------------------ numbers
    @staticmethod
    def total_steps(trainer: Trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            estimate = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - no estimate (e.g. an iterable dataset without a length)
            return None
        return int(estimate) if math.isfinite(estimate) else None

    @staticmethod
    def step_loss(trainer: Trainer, outputs: Any) -> float | None:
        """This step's training loss: the logged train/loss (what metrics.csv shows), else the step's output."""
        value = trainer.callback_metrics.get("train/loss")
        if value is None:
            value = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        return float(value) if isinstance(value, (int, float)) else None

    def step_line(self, trainer: Trainer) -> str:
        step, total = trainer.global_step, self.total_steps(trainer)
        elapsed = self.clock() - self._started
        done = step - self._start_step
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        finite = [x for x in self._losses if math.isfinite(x)]
        loss = f"{sum(finite) / len(finite):.4f}" if finite else ("nan" if self._losses else "-")
        left = time_left(done, elapsed, total - step) if total is not None else None
        return (f"step {step}/{total if total is not None else '?'}  loss {loss}  "
                f"{f'{rate:.2f}' if rate is not None else '?'} steps/s  elapsed {format_duration(elapsed)}  "
                f"left {format_duration(left)}")

    def _print(self, line: str) -> None:
        print(line, flush=True)

    def _print_step(self, trainer: Trainer) -> None:
        self._print(self.step_line(trainer))
        self._losses = []
        self._last_line_step = trainer.global_step
        self._last_line_time = self.clock()

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self._printing(trainer):
            return
        self._reset()
        self._started = self._last_line_time = self.clock()
        self._start_step = self._last_line_step = trainer.global_step
        total = self.total_steps(trainer)
        self._interval = self.every_n_steps or max(1, round((total or 30 * 50) / LINES_PER_RUN))
        floor = f" and at least every {format_duration(self.every_n_seconds)}" if self.every_n_seconds else ""
        self._print(f"training from step {trainer.global_step} to {total if total is not None else '?'}: "
                    f"a progress line every {self._interval} steps{floor}")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._printing(trainer):
            return
        loss = self.step_loss(trainer, outputs)
        if loss is not None:
            self._losses.append(loss)
        step, total = trainer.global_step, self.total_steps(trainer)
        if step == self._last_line_step:
            return  # no optimizer step yet (gradient accumulation) or already printed
        due = (step // self._interval > self._last_line_step // self._interval
               or (self.every_n_seconds is not None and self.clock() - self._last_line_time >= self.every_n_seconds)
               or (total is not None and step >= total))
        if due:
            self._print_step(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._val_started = self.clock()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._printing(trainer) or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = [(name, value.item()) for name, value in trainer.callback_metrics.items()
                   if name.startswith("val") and isinstance(value, torch.Tensor) and value.numel() == 1]
        metrics.sort(key=lambda item: item[0] != "val/loss")  # the total loss first, then in logging order
        shown = "  ".join(f"{name} {value:.4f}" for name, value in metrics[:MAX_VAL_METRICS]) or "no metrics"
        self._print(f"validation at step {trainer.global_step}: {shown}  "
                    f"({format_duration(self.clock() - self._val_started)})")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self._printing(trainer):
            return
        if trainer.global_step != self._last_line_step:
            self._print_step(trainer)
        elapsed = self.clock() - self._started
        done = trainer.global_step - self._start_step
        self._print(f"training ended at step {trainer.global_step}: {done} steps in {format_duration(elapsed)}"
                    + (f" ({done / elapsed:.2f} steps/s)" if elapsed > 0 and done > 0 else ""))
