"""Lightning's ModelCheckpoint, plus a checkpoint of the step that training ends with.

ModelCheckpoint(every_n_train_steps=N, save_last=True) writes last.ckpt on its N-step checkpoints only: a run of
300 steps with N=250 ends with a last.ckpt of step 250, and sample.py, which loads last.ckpt, samples weights 50
steps older than the run's. Here the last step is a checkpoint step too: at the end of the batch that reaches
max_steps, the step file (step_XXXXXX.ckpt, unless save_top_k=0) and last.ckpt are written like on every N-th step,
so they resume like any other (exact resume included). A run that ends another way (max_epochs, max_time, a
callback's stop) gets them when training ends. Steps already checkpointed are not written twice.
"""
from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    def _save_final(self, trainer: Trainer) -> None:
        if self._should_skip_saving_checkpoint(trainer) or trainer.global_step == 0:
            return  # fast_dev_run, sanity check, not fitting, this step already saved, or nothing trained
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            self._save_final(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_final(trainer)
        super().on_train_end(trainer, pl_module)
