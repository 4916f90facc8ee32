"""Interrupted training continues exactly: a run stopped part-way and resumed from its checkpoint takes the same
batches, draws the same noise and logs the same per-step losses as the run that was never interrupted.

The tiny LaVie recipe, shrunk: 3 batches an epoch so the run crosses epoch boundaries, joint image-video items,
validation and sample videos every 2 steps (both must leave the training RNG alone), EMA on.
"""
from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import Callback

from tests.hydra_compose import compose_config
from train import train

pytestmark = pytest.mark.usefixtures("single_thread")

TOTAL_STEPS = 8
FAST = [
    "experiment=tiny_lavie", "model.unet.block_out_channels=[16,16,32]", "model.unet.norm_num_groups=4",
    "model.text_encoder.config.num_hidden_layers=1", "data.train_size=6", "data.val_size=2", "data.batch_size=2",
    "data.images_per_video=1", f"trainer.max_steps={TOTAL_STEPS}", "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.sample_videos.every_n_steps=2", "callbacks.sample_videos.overrides={num_inference_steps:2}",
    "callbacks.sample_videos.prompts=[a red circle moving left on a dark background]",
    "+callbacks.probe._target_=tests.test_resume.Probe",
]


class Interrupted(Exception):
    pass


class Probe(Callback):
    """Records what the module and optimizer hold when the first batch of a fit starts, and can stop the run there
    as a crash would (the checkpoint of the finished steps is on disk, the next batch never runs)."""

    stop_at: int | None = None
    seen: dict[str, Any] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self._first = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._first:
            self._first = False
            Probe.seen = {
                "step": trainer.global_step,
                "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),  # live tensors otherwise
                "captions": list(batch["caption"]),
            }
        if Probe.stop_at is not None and trainer.global_step == Probe.stop_at:
            raise Interrupted(f"stopped before step {trainer.global_step + 1}")


def losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader(next((run_dir / "csv").rglob("metrics.csv")).open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def run(tmp: Path, name: str, *extra: str, stop_at: int | None = None) -> Path:
    Probe.stop_at = stop_at
    run_dir = tmp / name
    cfg = compose_config("train", [*FAST, *extra], run_dir)
    if stop_at is None:
        train(cfg)
    else:
        with pytest.raises(Interrupted):
            train(cfg)
    return run_dir


def assert_same_tensors(actual: Any, expected: Any, where: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same_tensors(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_tensors(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("resume")
    whole = run(tmp, "whole")
    quiet = run(tmp, "quiet", "trainer.val_check_interval=1000", "callbacks.sample_videos.every_n_steps=1000",
                "callbacks.sample_videos.at_train_end=false")
    return {"whole": whole, "quiet": quiet, "tmp": tmp}


def stopped_run(runs: dict[str, Path], stop_at: int) -> Path:
    """The run interrupted before step stop_at + 1 (made once per stop point)."""
    name = f"part{stop_at}"
    if name not in runs:
        runs[name] = run(runs["tmp"], name, stop_at=stop_at)
    return runs[name]


def test_validation_and_sample_videos_leave_the_training_noise_alone(runs):
    assert losses(runs["quiet"]) == losses(runs["whole"])


# 3 batches an epoch: stopping after step 5 is mid-epoch (the checkpoint of the last finished step, or the one
# written by the crash), after step 6 at an epoch's end
@pytest.mark.parametrize(("stop_at", "checkpoint"), [(5, "last.ckpt"), (5, "interrupted.ckpt"), (6, "last.ckpt")])
def test_resumed_run_continues_the_uninterrupted_trajectory(runs, stop_at, checkpoint):
    part = stopped_run(runs, stop_at)
    path = part / "checkpoints" / checkpoint
    resumed = run(runs["tmp"], f"resumed_{stop_at}_{checkpoint}", f"ckpt_path={path}")

    # the module and the optimizer start from exactly what the checkpoint holds (raw weights, not the EMA ones)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert Probe.seen["step"] == saved["global_step"] == stop_at
    expected_weights = {**saved["state_dict"], **saved["raw_state_dict"]}
    assert_same_tensors(Probe.seen["weights"], expected_weights, "weights")
    assert_same_tensors(Probe.seen["optimizer"], saved["optimizer_states"][0], "optimizer")

    whole, before, after = losses(runs["whole"]), losses(part), losses(resumed)
    assert sorted(whole) == list(range(TOTAL_STEPS)) and sorted(after) == list(range(stop_at, TOTAL_STEPS))
    assert all(before[s] == whole[s] for s in range(stop_at))
    resumed_losses = torch.tensor([after[s] for s in range(stop_at, TOTAL_STEPS)])
    expected_losses = torch.tensor([whole[s] for s in range(stop_at, TOTAL_STEPS)])
    torch.testing.assert_close(resumed_losses, expected_losses, rtol=1e-6, atol=0)

    final_whole = torch.load(runs["whole"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    final_resumed = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final_resumed["global_step"] == final_whole["global_step"] == TOTAL_STEPS
    for key, value in final_whole["state_dict"].items():
        torch.testing.assert_close(final_resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
