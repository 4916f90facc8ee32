"""The README's commands as a researcher runs them: train.py and sample.py, their outputs and their error messages.

One subprocess run per entry script checks the command line itself (Hydra parsing, exit status, no traceback);
everything else calls the same functions in-process on composed configs, which is as faithful and far cheaper.
Exact resumption is tested in test_resume.py, the NaN guard in test_finite_guard.py.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from callbacks.finite_guard import NonFiniteTrainingError
from datamodules.video_io import read_video
from modules.components.checkpoints import CheckpointKeyError
from modules.lavie import PretrainedConfigError
from sample import sample
from tests.hydra_compose import REPO, compose_config
from train import train
from utils.cli import user_error_behind

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
PROMPT = "a red circle moving left on a dark background"


def run(script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, script, *overrides], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        pytest.fail(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def user_error(call, *args) -> BaseException:
    """The exception `call(*args)` raises, checked to be one the entry scripts report as a message with exit 2."""
    with pytest.raises(Exception) as info:
        call(*args)
    assert user_error_behind(info.value) is not None, f"{type(info.value).__name__} would be a traceback: {info.value}"
    return user_error_behind(info.value)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("train") / "run"
    run("train.py", *FAST_TRAIN, f"hydra.run.dir={run_dir}")
    return run_dir


def test_training_writes_checkpoint_metrics_logs_and_samples(trained_run):
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert not (trained_run / "checkpoints" / "interrupted.ckpt").exists()
    assert (trained_run / "config.yaml").is_file()
    metrics = next((trained_run / "csv").rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert sorted(losses) == [0, 1, 2, 3] and all(loss == loss for loss in losses.values())  # every step, no NaN
    assert all(r.get("train/loss_image") for r in rows if r.get("train/loss"))
    assert any(r.get("val/loss") for r in rows)
    assert list((trained_run / "tensorboard").rglob("events.out.tfevents*"))
    samples = list((trained_run / "samples").rglob("*.mp4"))
    assert samples and read_video(samples[0]).shape == (8, 32, 32, 3)


def sample_config(out: Path, *overrides: str):
    return compose_config("sample", ["experiment=tiny_lavie", "model.sampler.num_inference_steps=2", *overrides], out)


def test_sample_writes_videos_grid_and_record(trained_run, tmp_path):
    out = tmp_path / "samples"
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPT}\n\na blue square moving up\n")
    common = [f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "num_frames=16", "seed=3"]
    sample(sample_config(out, *common, "num_seeds=2", f"prompts_file={prompts_file}"))
    record = json.loads((out / "samples.json").read_text())
    assert [v["prompt"] for v in record["videos"]] == [PROMPT] * 2 + ["a blue square moving up"] * 2
    assert [v["seed"] for v in record["videos"]] == [3, 4, 5, 6]
    assert record["sampler"]["num_inference_steps"] == 2 and record["sampler"]["guidance_scale"] == 4.0
    for video in record["videos"]:
        assert read_video(out / video["file"]).shape == (16, 32, 32, 3) and video["frames"] == 16
    assert (out / "grid.png").is_file()

    # the same prompt and seed from the command line gives the same video
    again = tmp_path / "again"
    sample(sample_config(again, *common, f"prompts=[{PROMPT}]"))
    first = json.loads((again / "samples.json").read_text())["videos"][0]
    assert first["seed"] == 3
    assert torch.equal(read_video(again / first["file"]), read_video(out / record["videos"][0]["file"]))


def test_sample_command_line_reports_a_bad_frame_count_without_a_traceback(tmp_path):
    result = run("sample.py", "experiment=tiny_lavie", "num_frames=0", f"prompts=[{PROMPT}]",
                 f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "num_frames must be a positive number of frames" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.mp4"))


@pytest.mark.parametrize("frames", ["-3", "2.5", "true"])
def test_sample_rejects_other_bad_frame_counts(tmp_path, frames):
    error = user_error(sample, sample_config(tmp_path, f"num_frames={frames}", f"prompts=[{PROMPT}]"))
    assert "num_frames must be a positive number of frames" in str(error)
    assert not list(tmp_path.glob("*.mp4"))


def test_sample_errors(tmp_path, trained_run):
    assert "empty" in str(user_error(sample, sample_config(tmp_path, "prompts=[]")))

    # a checkpoint of another model: the message lists the keys that do not match
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    state["unet.not_a_layer.weight"] = state.pop("unet.conv_in.weight")
    bad = tmp_path / "bad.ckpt"
    torch.save(checkpoint, bad)
    error = user_error(sample, sample_config(tmp_path, f"ckpt_path={bad}", "prompts=[a red circle]"))
    assert isinstance(error, CheckpointKeyError)
    assert "unet.conv_in.weight" in str(error) and "unet.not_a_layer.weight" in str(error)

    # weights of a diverged run: refused, not sampled into black videos
    state["unet.conv_in.weight"] = state.pop("unet.not_a_layer.weight")
    state["unet.conv_out.bias"] = torch.full_like(state["unet.conv_out.bias"], float("nan"))
    torch.save(checkpoint, bad)
    error = user_error(sample, sample_config(tmp_path, f"ckpt_path={bad}", "prompts=[a red circle]"))
    assert "non-finite" in str(error) and "unet.conv_out.bias" in str(error)
    assert not list(tmp_path.glob("*.mp4"))


def test_paper_size_training_without_sd_folder_explains_what_is_needed(tmp_path):
    error = user_error(train, compose_config("train", ["model=lavie_base", "trainer.max_steps=1"], tmp_path))
    assert isinstance(error, PretrainedConfigError)
    assert "model.pretrained.sd_path" in str(error) and "experiment=tiny_lavie" in str(error)


def test_missing_official_checkpoint_is_named(tmp_path):
    cfg = compose_config("sample", ["model=lavie_base", f"model.pretrained.sd_path={tmp_path}",
                                    f"model.pretrained.checkpoint={tmp_path / 'lavie_base.pt'}", "prompts=[a cat]"],
                         tmp_path)
    assert "lavie_base.pt" in str(user_error(sample, cfg))


def test_unknown_config_option_is_rejected(tmp_path):
    with pytest.raises(ConfigCompositionException, match="not_an_option"):
        compose_config("train", ["experiment=tiny_lavie", "model.not_an_option=1"], tmp_path)


def test_a_diverging_run_stops_at_once_and_keeps_no_bad_checkpoint(tmp_path):
    """The audit's case: a learning rate of 1e10 made the loss NaN from step 1, the run exited 0 and sampling from
    its last.ckpt wrote black videos."""
    cfg = compose_config("train", [*FAST_TRAIN, "model.optimizer.lr=1e10", "trainer.max_steps=20",
                                   "callbacks.model_checkpoint.every_n_train_steps=1"], tmp_path)
    error = user_error(train, cfg)
    assert isinstance(error, NonFiniteTrainingError)
    assert "training stopped in step 2 " in str(error) and "model.optimizer.lr" in str(error)
    checkpoints = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()
    for path in checkpoints:  # whatever was written before the stop holds finite weights
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
