"""Exponential moving average (EMA) of a generator's trainable weights.

Why not Lightning's own `WeightAveraging` / `EMAWeightAveraging` (Lightning >= 2.6)? It wraps the whole
LightningModule in `torch.optim.swa_utils.AveragedModel`, which deep-copies every parameter and buffer, the frozen
VAE and text encoder included, and swaps all of them around validation. Here only parameters with
`requires_grad=True` are copied, which is what matters next to a 909M-parameter UNet. We keep its averaging
function (`get_ema_multi_avg_fn`, a fused `torch._foreach_lerp_`) and its checkpoint layout:

    checkpoint["state_dict"]      the module's weights with the EMA values for the trainable parameters, so
                                  `load_from_checkpoint` / sample.py / eval get the EMA model with no extra step;
    checkpoint["raw_state_dict"]  the training (non-averaged) values of those parameters, so that resuming with
                                  `trainer.fit(ckpt_path=...)` continues the raw weights and the average exactly.

The EMA values are in the module during validation, inside `averaged_weights()` (used by SampleVideos) and after
`fit` ends. Limits: one EMA callback per trainer; a checkpoint saved with `save_weights_only=True` skips callback
hooks and holds the raw weights; the set of trainable parameters is fixed when fit starts; buffers are not averaged.

Sharded strategies (`trainer=fsdp`'s ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy) are refused when fit
starts, before the model is sharded: a rank may hold only a shard of each weight, so the average would have to be
a sharded one, gathered into the full checkpoint on every save and scattered back on resume, under names and
placements each strategy sets its own way. None of that exists here, and an average silently missing from a
checkpoint is worse than none; a sharded run trains without EMA.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim.swa_utils import get_ema_multi_avg_fn

RAW_KEY = "raw_state_dict"
SHARDED_STRATEGIES = (ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy)  # each rank holds a shard of a weight


class EMA(Callback):
    """Keep `ema = decay * ema + (1 - decay) * weights` after every `update_every_n_steps` optimizer steps.

    The average starts from the weights at the beginning of fit (DiT's convention); until optimizer step
    `start_step` it simply follows the weights, so a long from-scratch warm-up is not averaged in.
    """

    def __init__(self, decay: float = 0.9999, update_every_n_steps: int = 1, start_step: int = 0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self._ema_update = get_ema_multi_avg_fn(decay)
        self.num_updates = 0  # averaging updates so far (copies before start_step not counted)
        self._last_update_step = 0  # trainer.global_step of the last update: one update per optimizer step
        self._names: list[str] = []  # trainable parameter names, fixed at fit start
        self._aliases: list[list[str]] = []  # every state_dict name of each of them (tied weights have several)
        self._params: list[torch.nn.Parameter] = []
        self._shadow: list[torch.Tensor] | None = None  # the other copy: EMA values, or raw ones while swapped
        self._swapped = False  # True while the module holds the EMA values and _shadow the raw ones
        self._from_checkpoint: dict[str, torch.Tensor] | None = None
        self._validation = contextlib.ExitStack()

    # ---- the average --------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # before configure_model shards anything: a sharded run fails at once, not at its first checkpoint
        if isinstance(trainer.strategy, SHARDED_STRATEGIES):
            raise ValueError(
                f"the EMA callback does not support {type(trainer.strategy).__name__} (sharded weights, e.g. "
                "trainer=fsdp): drop it from the callbacks (callbacks=default, or ~callbacks.ema) or train without "
                "sharding (trainer=default or trainer=gpu, DDP with trainer.devices=N)"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Built here rather than in setup(): the strategy has moved the module to its device by now, and a resumed
        # checkpoint has already been read (on_load_checkpoint runs before this hook).
        if self._swapped:  # a previous fit() left the EMA in the module: train on from the raw weights
            self._swap()
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        aliases: dict[int, list[str]] = {}
        for n, p in pl_module.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(n)
        loaded, self._from_checkpoint = self._from_checkpoint, None
        if loaded is None and self._shadow is not None and names == self._names:
            return  # same trainer fitted again: keep averaging where it stopped
        self._names, self._params = names, [p for _, p in named]
        self._aliases = [aliases[id(p)] for p in self._params]
        low = sorted({str(p.dtype) for p in self._params if p.dtype in (torch.float16, torch.bfloat16)})
        if low:
            rank_zero_warn(
                f"EMA of {', '.join(low)} weights loses updates smaller than their precision; use a '*-mixed' "
                "precision so the weights stay float32."
            )
        with torch.no_grad():
            self._shadow = [
                (loaded[n] if loaded is not None and n in loaded else p).detach().to(p.device, p.dtype, copy=True)
                for n, p in named
            ]

    @torch.no_grad()
    def update(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fold the current weights into the average; at most once per optimizer step, so calling it again is safe."""
        step = trainer.global_step  # optimizer steps so far: unchanged between accumulated micro-batches
        if self._shadow is None or self._swapped or step <= self._last_update_step:
            return
        if step % self.update_every_n_steps:
            return
        if step <= self.start_step:
            for s, p in zip(self._shadow, self._params):
                s.copy_(p)
        else:
            self._ema_update(self._shadow, [p.detach() for p in self._params], self.num_updates)
            self.num_updates += 1
        self._last_update_step = step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.update(trainer, pl_module)

    # ---- using the average ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _swap(self) -> None:
        assert self._shadow is not None
        for s, p in zip(self._shadow, self._params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)
        self._swapped = not self._swapped

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """The module holds the EMA values inside this block (a no-op outside fit or when they are already in)."""
        if self._shadow is None or self._swapped:
            yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation.enter_context(self.averaged_weights())

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation.close()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Leave the EMA values in the module so evaluation after fit uses them; the raw ones stay in _shadow, so a
        # checkpoint saved from here on (ModelCheckpoint's save_last at train end) is still complete.
        if self._shadow is not None and not self._swapped:
            self._swap()

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "last_update_step": self._last_update_step, "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = state_dict["num_updates"]
        self._last_update_step = state_dict["last_update_step"]

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._shadow is None:
            return  # outside fit there is no average: the module's own weights are saved
        state = checkpoint["state_dict"]
        averaged, raw = (self._params, self._shadow) if self._swapped else (self._shadow, self._params)
        checkpoint[RAW_KEY] = {}
        for names, a, r in zip(self._aliases, averaged, raw):
            if names[0] not in state:  # a module may leave some weights out of its state_dict
                continue
            checkpoint[RAW_KEY][names[0]] = r.detach()
            for n in names:
                state[n] = a.detach()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning has already loaded checkpoint["state_dict"] (the EMA values) into the module: keep those for the
        # average and put the raw training values back into the module.
        self._shadow, self._swapped = None, False
        raw = checkpoint.get(RAW_KEY)
        if raw is None:
            rank_zero_warn("The checkpoint was not written with the EMA callback; the average starts from its weights.")
            return
        self._from_checkpoint = {n: checkpoint["state_dict"][n] for n in raw}
        params = dict(pl_module.named_parameters())
        unknown = sorted(set(raw) - set(params))
        if unknown:
            raise KeyError(f"checkpoint[{RAW_KEY!r}] names parameters the module does not have: {unknown[:5]}")
        with torch.no_grad():
            for n, v in raw.items():
                params[n].copy_(v)
