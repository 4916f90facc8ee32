"""Stop training at the first non-finite loss or gradient, and never write a checkpoint with non-finite weights.

Without it a diverged run (a learning rate far too high, an fp16 overflow) trains on NaNs to the end, exits 0 and
overwrites last.ckpt with NaN weights, from which sampling writes black videos. Checks, each one cheap:
- the loss, before every backward pass (automatic and manual optimisation alike);
- the gradients, before every optimizer step, so a bad step is never taken (skipped under fp16 loss scaling,
  whose scaler skips inf/NaN steps itself by design);
- the weights, whenever a checkpoint is about to be written (a finite gradient times a huge learning rate can
  still overflow them): the save is refused, so the last good checkpoint stays in place.
Under DDP every rank takes the same decision (the loss check is all-reduced), so no rank hangs in a collective.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer


class NonFiniteTrainingError(RuntimeError):
    """Training produced a NaN or inf; the message names the step and what was non-finite."""


def first_non_finite(named: Any) -> str | None:
    for name, tensor in named:
        if tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


class NonFiniteGuard(Callback):
    def __init__(self, check_gradients: bool = True) -> None:
        self.check_gradients = check_gradients

    def _stop(self, trainer: Trainer, what: str) -> None:
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", "")
        kept = f"; the last checkpoint written is {last}" if last else "; no checkpoint had been written yet"
        raise NonFiniteTrainingError(
            f"training stopped in step {trainer.global_step + 1} (after {trainer.global_step} optimizer steps, epoch "
            f"{trainer.current_epoch}): {what}. This step was not applied and no checkpoint was written from it"
            f"{kept}. Usual causes: a learning rate too high "
            "(model.optimizer.lr), fp16 overflow (use bf16-mixed), or broken input data."
        )

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self._stop(trainer, f"the loss is {loss.detach().float().mean().item()}")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not self.check_gradients or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        named = ((n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None)
        name = first_non_finite(named)
        if name is not None:  # gradients are all-reduced under DDP: every rank sees the same values
            self._stop(trainer, f"the gradient of {name} is not finite")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        name = first_non_finite(pl_module.named_parameters())
        if name is None:
            name = first_non_finite(checkpoint.get("state_dict", {}).items())  # e.g. the EMA weights
        if name is not None:
            self._stop(trainer, f"the weight {name} is not finite, so the checkpoint was not written")
