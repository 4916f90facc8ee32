"""The README's commands, run as a researcher runs them: train.py, resume, sample.py, and their error messages."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.video_io import read_video

REPO = Path(__file__).resolve().parents[1]
# The tiny_lavie recipe, shrunk to a handful of steps on a handful of videos, in joint image-video mode (one
# synthetic image appended to each video, LaVie's L_video + alpha * L_image).
FAST_TRAIN = [
    "data.images_per_video=1",
    "experiment=tiny_lavie",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=1",
    "data.train_size=8",
    "data.val_size=2",
    "data.batch_size=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.sample_videos.overrides={num_inference_steps:2}",
    "callbacks.sample_videos.prompts=[a red circle moving left on a dark background]",
]


def run(script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, script, *overrides], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        pytest.fail(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("train") / "run"
    run("train.py", *FAST_TRAIN, f"hydra.run.dir={run_dir}")
    return run_dir


def test_training_writes_checkpoint_metrics_logs_and_samples(trained_run):
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert (trained_run / "config.yaml").is_file()
    metrics = next((trained_run / "csv").rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(loss == loss for loss in losses)  # present and not NaN
    assert all(r.get("train/loss_image") for r in rows if r.get("train/loss"))
    assert any(r.get("val/loss") for r in rows)
    assert list((trained_run / "tensorboard").rglob("events.out.tfevents*"))
    samples = list((trained_run / "samples").rglob("*.mp4"))
    assert samples and read_video(samples[0]).shape == (8, 32, 32, 3)


def test_resume_continues_from_the_checkpoint(trained_run, tmp_path):
    resumed = tmp_path / "resumed"
    run("train.py", *FAST_TRAIN, "trainer.max_steps=6", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={resumed}")
    checkpoint = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 6
    metrics = next((resumed / "csv").rglob("metrics.csv"))
    steps = [int(r["step"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    assert steps and min(steps) >= 4  # the resumed run did not start again from step 0


def test_sample_writes_videos_grid_and_record(trained_run, tmp_path):
    out = tmp_path / "samples"
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle moving left on a dark background\n\na blue square moving up\n")
    common = ["experiment=tiny_lavie", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "num_frames=16",
              "model.sampler.num_inference_steps=2", "seed=3", "num_seeds=2"]
    run("sample.py", *common, f"prompts_file={prompts_file}", f"hydra.run.dir={out}")
    record = json.loads((out / "samples.json").read_text())
    assert [v["prompt"] for v in record["videos"]] == ["a red circle moving left on a dark background"] * 2 + [
        "a blue square moving up"] * 2
    assert [v["seed"] for v in record["videos"]] == [3, 4, 5, 6]
    assert record["sampler"]["num_inference_steps"] == 2 and record["sampler"]["guidance_scale"] == 4.0
    for video in record["videos"]:
        assert read_video(out / video["file"]).shape == (16, 32, 32, 3)
    assert (out / "grid.png").is_file()

    # the same prompt and seed from the command line gives the same video
    again = tmp_path / "again"
    run("sample.py", *common[:-1], "prompts=[a red circle moving left on a dark background]", f"hydra.run.dir={again}")
    first = json.loads((again / "samples.json").read_text())["videos"][0]
    assert first["seed"] == 3
    assert torch.equal(read_video(again / first["file"]), read_video(out / record["videos"][0]["file"]))


def test_paper_size_training_without_sd_folder_explains_what_is_needed():
    result = run("train.py", "model=lavie_base", "trainer.max_steps=1", check=False)
    assert result.returncode == 2
    assert "model.pretrained.sd_path" in result.stderr and "experiment=tiny_lavie" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_official_checkpoint_is_named(tmp_path):
    result = run("sample.py", "model=lavie_base", f"model.pretrained.sd_path={tmp_path}",
                 f"model.pretrained.checkpoint={tmp_path / 'lavie_base.pt'}", "prompts=[a cat]", check=False)
    assert result.returncode == 2 and "lavie_base.pt" in result.stderr


def test_sample_errors(tmp_path, trained_run):
    empty = run("sample.py", "experiment=tiny_lavie", "prompts=[]", check=False)
    assert empty.returncode == 2 and "empty" in empty.stderr

    # a checkpoint of another model: the message lists the keys that do not match
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    state["unet.not_a_layer.weight"] = state.pop("unet.conv_in.weight")
    bad = tmp_path / "bad.ckpt"
    torch.save(checkpoint, bad)
    wrong = run("sample.py", "experiment=tiny_lavie", f"ckpt_path={bad}", "prompts=[a red circle]", check=False)
    assert wrong.returncode == 2
    assert "unet.conv_in.weight" in wrong.stderr and "unet.not_a_layer.weight" in wrong.stderr


def test_unknown_config_option_is_rejected():
    result = run("train.py", "experiment=tiny_lavie", "model.not_an_option=1", check=False)
    assert result.returncode != 0 and "not_an_option" in result.stderr
