"""NonFiniteGuard on a minimal module, one failure at a time: a NaN loss, a NaN gradient behind a finite loss,
weights that overflow to inf under a finite gradient, and the same under manual optimisation (the tokenizer's)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.finite_guard import NonFiniteGuard, NonFiniteTrainingError
from callbacks.interrupt_checkpoint import InterruptCheckpoint


class Tiny(L.LightningModule):
    """loss = mean((w x)^2); `fault` makes step `bad_step` (0-based) go wrong in one way."""

    def __init__(self, fault: str, bad_step: int = 2, manual: bool = False, lr: float = 0.1):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))
        self.fault, self.bad_step, self.lr = fault, bad_step, lr
        self.automatic_optimization = not manual

    def loss(self) -> torch.Tensor:
        value = (self.weight * torch.arange(4.0)).pow(2).mean()
        if self.global_step != self.bad_step:
            return value
        if self.fault == "loss":
            return value * float("nan")
        if self.fault == "gradient":  # finite value, NaN gradient (the untaken branch of where() still backprops)
            return torch.where(torch.tensor(True), value, (self.weight / 0.0).sum())
        return value

    def training_step(self, batch, batch_idx):
        loss = self.loss()
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def configure_optimizers(self):
        lr = 1e38 if self.fault == "weights" else self.lr  # a finite gradient times 1e38 overflows the weights
        return torch.optim.SGD(self.parameters(), lr=lr)

    def train_dataloader(self):
        return [torch.zeros(1)] * 10


def fit(tmp_path: Path, module: Tiny) -> NonFiniteTrainingError:
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[NonFiniteGuard(), checkpoints, InterruptCheckpoint(tmp_path, "interrupted")])
    with pytest.raises(NonFiniteTrainingError) as info:
        trainer.fit(module)
    return info.value


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
@pytest.mark.parametrize(("fault", "what"), [("loss", "the loss is nan"),
                                             ("gradient", "the gradient of weight is not finite")])
def test_stops_before_the_bad_step_is_applied(tmp_path, fault, what, manual):
    module = Tiny(fault, manual=manual)
    error = fit(tmp_path, module)
    assert "training stopped in step 3 (after 2 optimizer steps" in str(error) and what in str(error)
    assert torch.isfinite(module.weight).all()
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and torch.isfinite(last["state_dict"]["weight"]).all()
    assert not (tmp_path / "interrupted.ckpt").exists()


def test_weights_that_overflow_are_never_checkpointed(tmp_path):
    module = Tiny("weights", bad_step=-1)
    error = fit(tmp_path, module)
    assert "the weight weight is not finite, so the checkpoint was not written" in str(error)
    assert not torch.isfinite(module.weight).all()  # the module diverged ...
    assert not list(tmp_path.glob("*.ckpt"))  # ... and nothing of it reached the disk


def test_a_healthy_run_is_left_alone(tmp_path):
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[NonFiniteGuard()])
    trainer.fit(Tiny("none"))
    assert trainer.global_step == 4
