"""What a resumed run needs beyond Lightning's own restore to continue the uninterrupted run exactly.

Random-number state survives a checkpoint, so a resumed run draws the noise the uninterrupted run drew.

Lightning restores weights, optimiser, schedulers, loop counters and (with datamodules.base) the data position, but
not the RNGs that a training step draws its noise, timesteps and caption dropout from. This callback stores them in
every checkpoint (torch CPU and CUDA, numpy, Python; one set per rank) and puts them back right before the first
training batch after a resume: the same point of the step sequence at which they were saved (the end of a batch).

Validation is made RNG-neutral: it runs on its own fixed seed and the training RNGs are restored afterwards. A run
that validates every N steps therefore draws the same training noise as one that does not, and a resumed run,
which does not repeat the validation that preceded its checkpoint, stays on the uninterrupted trajectory.

Logged step numbers continue too: Lightning 2.6 counts the logging step of a run resumed from a checkpoint written
at the end of a batch (every regular checkpoint) one too far, so metrics.csv would skip a step and every later
row would be labelled one step late. The count is set back to what the checkpoint implies.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

KEY = "rng_states"


def capture() -> dict[str, Any]:
    """The RNG states as tensors and plain Python values: checkpoints must load with torch.load(weights_only=True)."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    random.setstate(state["python"])


def _all_ranks(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's state, in rank order (checkpoints are written by rank 0 but each rank has its own RNGs)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def _logging_step(checkpoint: dict[str, Any]) -> int | None:
    """The logging step the first batch after resuming from `checkpoint` must log at: the number of batches trained.

    Lightning counts a batch into its logging step only after its validation, so a checkpoint written at the end of a
    batch or after its validation (the batch is processed and no next batch is ready yet) saved one less than that;
    one written at the start of the next batch (interrupted.ckpt) or inside a training step saved it exactly.
    """
    try:
        epoch_loop = checkpoint["loops"]["fit_loop"]
        saved = int(epoch_loop["epoch_loop.state_dict"]["_batches_that_stepped"])
        total = epoch_loop["epoch_loop.batch_progress"]["total"]
    except (KeyError, TypeError):
        return None  # a checkpoint layout this Lightning version does not write: leave Lightning's count alone
    return saved + int(total["ready"] == total["processed"])


class ExactResume(Callback):
    def __init__(self, validation_seed: int = 0) -> None:
        self.validation_seed = validation_seed
        self._to_restore: dict[str, Any] | None = None  # loaded from a checkpoint, applied before the next batch
        self._outside_validation: dict[str, Any] | None = None  # the training RNGs while validation runs
        self._logging_step: int | None = None  # Lightning's logging step count the resumed run must continue from

    # ---- saving and resuming ------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # a checkpoint written during validation holds the training RNGs, not validation's
        # (and one written after a resume, before the first batch, the states still to be applied)
        state = self._outside_validation or self._to_restore or capture()
        # after an exception (interrupted.ckpt) the other ranks may never reach a collective: this rank's state only
        checkpoint[KEY] = [state] if trainer.interrupted else _all_ranks(state)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._logging_step = _logging_step(checkpoint)
        states = checkpoint.get(KEY)
        if not states:
            rank_zero_warn("The checkpoint holds no RNG states (written without the ExactResume callback): the "
                           "resumed run draws other noise than the interrupted one would have.")
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(f"The checkpoint holds the RNG states of {len(states)} ranks, this run has "
                           f"{trainer.world_size}: every rank reseeds from rank 0's state plus its rank.")
            torch.set_rng_state(states[0]["torch"])
            torch.manual_seed(int(torch.randint(2**62, ())) + trainer.global_rank)
            self._to_restore = capture()
            return
        self._to_restore = states[trainer.global_rank]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._to_restore is not None:
            restore(self._to_restore)
            self._to_restore = None
        if self._logging_step is not None:
            epoch_loop = trainer.fit_loop.epoch_loop
            # with gradient accumulation the count is of optimizer steps, which this rule does not track
            if hasattr(epoch_loop, "_batches_that_stepped") and trainer.accumulate_grad_batches == 1:
                epoch_loop._batches_that_stepped = self._logging_step
            self._logging_step = None

    # ---- validation on its own seed ------------------------------------------------------------------------
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # trainer.validate(): no training RNG to protect
        self._outside_validation = capture()
        torch.manual_seed(self.validation_seed)  # seeds every CUDA device too

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._outside_validation is not None:
            restore(self._outside_validation)
            self._outside_validation = None
