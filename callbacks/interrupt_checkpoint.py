"""`<run dir>/checkpoints/interrupted.ckpt` when training stops on an exception (Ctrl-C, a crash, a killed job), so
nothing trained since the last regular checkpoint is lost; never after a non-finite loss or with non-finite weights.

Lightning's OnExceptionCheckpoint saves whatever the module holds. After a NaN stop (callbacks.finite_guard) that
state is the one that just diverged: resuming from it diverges again, and its NaN weights would be the first file a
user reaches for. The last regular checkpoint is the one to go back to, and the error message names it.
"""
from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from callbacks.finite_guard import NonFiniteTrainingError, first_non_finite


class InterruptCheckpoint(OnExceptionCheckpoint):
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException, *_: Any) -> None:
        if isinstance(exception, NonFiniteTrainingError):
            return
        name = first_non_finite(pl_module.named_parameters())
        if name is not None:
            rank_zero_warn(f"not writing {self.ckpt_path}: the weight {name} is not finite")
            return
        super().on_exception(trainer, pl_module, exception)
