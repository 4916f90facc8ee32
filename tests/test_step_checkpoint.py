"""last.ckpt holds the step training ended with (callbacks/step_checkpoint.py), and a finished run that is continued
with a larger max_steps from it takes the uninterrupted run's trajectory; the plain progress lines of
callbacks/progress_log.py on a tiny Lightning run (the subprocess test with redirected output is in
test_entrypoints.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from lightning import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader

from callbacks.progress_log import LogFriendlyProgressBar
from callbacks.step_checkpoint import StepCheckpoint
from tests.hydra_compose import compose_config
from tests.test_resume import FAST, TOTAL_STEPS, losses
from train import train

pytestmark = pytest.mark.usefixtures("single_thread")


class Linear(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self.layer(batch).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path: Path, callbacks: list, batches: int = 3, **trainer_kwargs) -> None:
    data = DataLoader(torch.randn(batches * 2, 4), batch_size=2)
    trainer = Trainer(default_root_dir=tmp_path, callbacks=callbacks, logger=False, enable_model_summary=False,
                      accelerator="cpu", **trainer_kwargs)
    trainer.fit(Linear(), train_dataloaders=data, val_dataloaders=DataLoader(torch.randn(2, 4), batch_size=2))


def saved_steps(folder: Path) -> dict[str, int]:
    return {path.name: torch.load(path, map_location="cpu", weights_only=True)["global_step"]
            for path in sorted(folder.glob("*.ckpt"))}


@pytest.mark.parametrize("limit", ["max_steps", "max_epochs"])
def test_last_checkpoint_is_the_step_training_ended_with(tmp_path, limit):
    checkpoint = StepCheckpoint(dirpath=tmp_path / "ckpt", filename="step_{step:06d}", auto_insert_metric_name=False,
                                every_n_train_steps=2, save_top_k=-1, save_last=True)
    stop = {"max_steps": 5, "max_epochs": -1} if limit == "max_steps" else {"max_epochs": 1}
    fit(tmp_path, [checkpoint], enable_progress_bar=False, **stop)
    end = 5 if limit == "max_steps" else 3
    assert saved_steps(tmp_path / "ckpt") == {"last.ckpt": end, **{f"step_{s:06d}.ckpt": s for s in (2, 4, end)
                                                                    if s <= end}}


def test_a_finished_run_continued_with_more_steps_takes_the_uninterrupted_trajectory(tmp_path):
    """Train 5 steps (checkpoints every 3: last.ckpt is step 5's, written at its end), then continue from it to
    TOTAL_STEPS: the losses are the uninterrupted run's, as after any other checkpoint (test_resume.py)."""
    recipe = [o for o in FAST if not o.startswith(("trainer.max_steps=", "callbacks.model_checkpoint."))]
    whole = tmp_path / "whole"
    train(compose_config("train", [*recipe, f"trainer.max_steps={TOTAL_STEPS}"], whole))
    part = tmp_path / "part"
    train(compose_config("train", [*recipe, "trainer.max_steps=5", "callbacks.model_checkpoint.every_n_train_steps=3"],
                         part))
    assert torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 5
    continued = tmp_path / "continued"
    train(compose_config("train", [*recipe, f"trainer.max_steps={TOTAL_STEPS}",
                                   f"ckpt_path={part / 'checkpoints' / 'last.ckpt'}"], continued))
    expected, before, after = losses(whole), losses(part), losses(continued)
    assert sorted(before) == list(range(5)) and sorted(after) == list(range(5, TOTAL_STEPS))
    torch.testing.assert_close(torch.tensor([after[s] for s in sorted(after)]),
                               torch.tensor([expected[s] for s in sorted(after)]), rtol=1e-6, atol=0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0  # every reading is one second later
        return self.now


def test_plain_progress_lines_every_n_steps_and_one_per_validation(tmp_path, capsys):
    bar = LogFriendlyProgressBar(every_n_steps=2, every_n_seconds=None, plain=True, clock=FakeClock())
    fit(tmp_path, [bar], batches=3, max_steps=6, max_epochs=-1, val_check_interval=3, enable_checkpointing=False,
        num_sanity_val_steps=1)
    out = capsys.readouterr().out
    steps = re.findall(r"^step (\d+)/6  loss (\d+\.\d{4})  (\d+\.\d\d) steps/s  elapsed (\S+)  left (\S+)$", out, re.M)
    assert [int(s[0]) for s in steps] == [2, 4, 6], out
    assert steps[-1][4] == "0:00" and all(left != "?" for *_, left in steps)
    # one line per validation (at the end of each 3-batch epoch; not for the sanity check), none per batch
    assert re.findall(r"^validation at step (\d+): val/loss \d+\.\d{4}  \(\S+\)$", out, re.M) == ["3", "6"]
    assert out.startswith("training from step 0 to 6: a progress line every 2 steps\n")
    assert "training ended at step 6: 6 steps in" in out


def test_plain_progress_has_a_time_floor_and_a_default_interval(tmp_path, capsys):
    clock = FakeClock()
    bar = LogFriendlyProgressBar(every_n_steps=None, every_n_seconds=5, plain=True, clock=clock)
    fit(tmp_path, [bar], batches=30, max_steps=60, max_epochs=-1, limit_val_batches=0, enable_checkpointing=False)
    out = capsys.readouterr().out
    assert "a progress line every 2 steps and at least every 0:05" in out  # 60 / 30
    assert len(re.findall(r"^step \d+/60", out, re.M)) == 30
    slow = LogFriendlyProgressBar(every_n_steps=1000, every_n_seconds=5, plain=True, clock=clock)
    fit(tmp_path, [slow], batches=30, max_steps=30, max_epochs=-1, limit_val_batches=0, enable_checkpointing=False)
    lines = re.findall(r"^step (\d+)/30", capsys.readouterr().out, re.M)
    assert 3 <= len(lines) < 30 and lines[-1] == "30"  # the clock moves a second per reading


def test_on_a_terminal_the_rich_bar_is_kept():
    bar = LogFriendlyProgressBar(plain=False)
    assert bar.is_enabled
    plain = LogFriendlyProgressBar(plain=True)
    plain.enable()  # Lightning's tuners call this after their runs
    assert plain.is_disabled
