"""The README's commands as a researcher runs them: train.py and sample.py, their outputs and their error messages.

A few subprocess runs check the command line itself (Hydra parsing, exit status, no traceback, what a log file of
the run shows, --help, what a failed run leaves behind); everything else calls the same functions in-process on
composed configs, which is as faithful and far cheaper.
Exact resumption is tested in test_resume.py, the NaN guard in test_finite_guard.py.
"""
from __future__ import annotations

import csv
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from callbacks.finite_guard import NonFiniteTrainingError
from datamodules.video_io import read_video
from modules.components.checkpoints import CheckpointKeyError
from modules.lavie import PretrainedConfigError
from sample import sample
from tests.hydra_compose import REPO, compose_config
from train import train
from utils.cli import user_error_behind, user_errors_exit

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


def run(script: str, *overrides: str, check: bool = True, output: Path | None = None) -> subprocess.CompletedProcess:
    """`script` with `overrides`; with `output`, stdout and stderr go to that file as with `nohup ... > FILE 2>&1`
    (not a terminal), and the result's stdout holds the file's text."""
    command = [sys.executable, script, *overrides]
    if output is None:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    else:
        with output.open("w") as file:
            result = subprocess.run(command, cwd=REPO, stdout=file, stderr=subprocess.STDOUT, text=True, timeout=600)
        result.stdout, result.stderr = output.read_text(), ""
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
    """FAST_TRAIN as a cluster job runs it: output redirected to a file (train_output.txt beside the run folder),
    a checkpoint every 3 steps of 4 (max_steps is not a multiple), a progress line every step."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    overrides = [o for o in FAST_TRAIN if not o.startswith("callbacks.model_checkpoint.every_n_train_steps=")]
    run("train.py", *overrides, "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.model_checkpoint.save_top_k=-1", "callbacks.rich_progress_bar.every_n_steps=1",
        f"hydra.run.dir={run_dir}", output=run_dir.parent / "train_output.txt")
    return run_dir


def test_training_writes_checkpoint_metrics_logs_and_samples(trained_run):
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    # last.ckpt (and the step file) hold the step training ended with, though 4 is not a multiple of 3
    steps = {path.name: torch.load(path, map_location="cpu", weights_only=True)["global_step"]
             for path in (trained_run / "checkpoints").glob("*.ckpt")}
    assert steps == {"step_000003.ckpt": 3, "step_000004.ckpt": 4, "last.ckpt": 4}
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


def test_training_redirected_to_a_file_prints_progress_lines(trained_run):
    """Redirected to a file (nohup, a cluster job), a live bar prints nothing until the end: plain lines instead."""
    output = (trained_run.parent / "train_output.txt").read_text()
    lines = re.findall(r"^step (\d+)/4  loss (\S+)  (\S+) steps/s  elapsed (\d+:\d\d)  left (\S+)$", output, re.M)
    assert [int(step) for step, *_ in lines] == [1, 2, 3, 4], output[-3000:]
    assert all(float(loss) > 0 for _, loss, *_ in lines)
    assert float(lines[-1][2]) > 0 and lines[-1][4] == "0:00" and re.fullmatch(r"\d+:\d\d", lines[1][4])
    # one line per validation (every 2 steps), none per validation batch; no live bar
    assert re.findall(r"^validation at step (\d+): val/loss \S+", output, re.M) == ["2", "4"]
    assert "training ended at step 4: 4 steps in" in output
    assert not re.search(r"^Epoch \d+", output, re.M)  # no (final state of a) live bar


def sample_config(out: Path, *overrides: str):
    return compose_config("sample", ["experiment=tiny_lavie", "model.sampler.num_inference_steps=2", *overrides], out)


def test_sample_writes_videos_grid_and_record(trained_run, tmp_path, capsys):
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
    # progress in denoising steps (4 videos in one batch of 2 steps), not in batches
    assert re.search(r"^generating 4 videos: 2/2 steps  elapsed \d+:\d\d  left 0:00$", capsys.readouterr().out, re.M)

    # the same prompt and seed from the command line gives the same video
    again = tmp_path / "again"
    sample(sample_config(again, *common, f"prompts=[{PROMPT}]"))
    first = json.loads((again / "samples.json").read_text())["videos"][0]
    assert first["seed"] == 3
    assert torch.equal(read_video(again / first["file"]), read_video(out / record["videos"][0]["file"]))


def test_sample_super_resolution_upsamples_every_video(trained_run, tmp_path):
    """super_resolution= post-processes any generator's videos: here a VSR run's checkpoint (its model from the
    run's config.yaml) after the tiny base model, 32x32 -> 128x128."""
    from tests.test_lavie_vsr import small_config

    vsr_run = tmp_path / "vsr_run"
    (vsr_run / "checkpoints").mkdir(parents=True)
    vsr_cfg = small_config()
    vsr_cfg.sampler.num_inference_steps = 1
    OmegaConf.save(OmegaConf.create({"model": vsr_cfg}), vsr_run / "config.yaml")
    from hydra.utils import instantiate
    torch.save({"state_dict": instantiate(vsr_cfg).state_dict()}, vsr_run / "checkpoints" / "last.ckpt")

    out = tmp_path / "samples"
    sample(sample_config(out, f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "num_frames=3",
                         f"prompts=[{PROMPT}]", f"super_resolution={vsr_run / 'checkpoints' / 'last.ckpt'}"))
    record = json.loads((out / "samples.json").read_text())
    assert record["super_resolution"]["sampler"]["num_inference_steps"] == 1
    assert read_video(out / record["videos"][0]["file"]).shape == (3, 128, 128, 3)


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


# ---------------------------------------------------------------------------------------------- failed runs
def test_a_run_that_stops_before_anything_prints_its_error_once_and_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "run"
    result = run("train.py", "model=lavie_base", f"hydra.run.dir={run_dir}", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert output.count("set model.pretrained.sd_path=DIR") == 1, output  # not once logged and once printed
    assert "Traceback" not in output
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []


def test_an_evaluation_that_stops_before_anything_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "eval"
    result = run("eval/run_synthetic.py", "experiment=tiny_lavie", "eval.num_videos=1", f"hydra.run.dir={run_dir}",
                 check=False)
    assert result.returncode == 2 and "eval.num_videos" in result.stderr, result.stderr[-2000:]
    assert not run_dir.exists()


def hydra_made(run_dir: Path, log_text: str = "") -> Path:
    """What Hydra writes into a run folder before the task starts."""
    (run_dir / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra" / name).write_text("{}\n")
    (run_dir / "train.log").write_text(log_text)
    return run_dir


def fail_in(run_dir: Path, monkeypatch, write_output: bool = False) -> None:
    """A run in `run_dir` (as Hydra's job folder, logging to its train.log) that stops with a user error, after
    writing a file or not."""
    monkeypatch.setattr("utils.cli.hydra_run_dir", lambda: (run_dir, ".hydra"))
    job_log = logging.FileHandler(run_dir / "train.log")  # as Hydra's job logging does
    logging.getLogger().addHandler(job_log)

    @user_errors_exit
    def failing_run() -> None:
        if write_output:
            (run_dir / "config.yaml").write_text("written before the error\n")
        raise ValueError("a bad value")

    try:
        with pytest.raises(SystemExit) as stop:
            failing_run()
    finally:
        logging.getLogger().removeHandler(job_log)
        job_log.close()
    assert stop.value.code == 2


@pytest.mark.parametrize("before", ["nothing", "an older run's log", "earlier outputs"])
def test_a_failed_run_removes_only_a_folder_it_made(tmp_path, monkeypatch, before):
    run_dir = hydra_made(tmp_path / "run", log_text="[...] an older run\n" if before == "an older run's log" else "")
    if before == "earlier outputs":  # e.g. an evaluation folder being resumed
        (run_dir / "videos").mkdir()
        (run_dir / "videos" / "000000.mp4").write_bytes(b"video")
    fail_in(run_dir, monkeypatch)
    assert run_dir.exists() == (before != "nothing")
    if before == "earlier outputs":
        assert (run_dir / "videos" / "000000.mp4").read_bytes() == b"video"


def test_a_failed_run_that_wrote_something_keeps_its_folder(tmp_path, monkeypatch):
    run_dir = hydra_made(tmp_path / "run")
    fail_in(run_dir, monkeypatch, write_output=True)
    assert (run_dir / "config.yaml").is_file()


# ---------------------------------------------------------------------------------------------- help and configs
def test_train_help_says_how_to_train_sample_and_evaluate():
    result = run("train.py", "--help")
    for text in ("python train.py experiment=tiny_lavie", "ckpt_path=RUN/checkpoints/last.ckpt", "python sample.py",
                 "python eval/run_synthetic.py", "== Config groups", "experiment: ", "tiny_lavie"):
        assert text in result.stdout, text
    assert "powered by Hydra" not in result.stdout


@pytest.mark.parametrize(("entry", "example"), [("sample", "python sample.py experiment=tiny_lavie ckpt_path="),
                                                ("evaluate", "python eval/run_synthetic.py experiment=tiny_lavie")])
def test_sample_and_evaluate_help_have_examples(tmp_path, entry, example):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(entry, return_hydra_config=True)
    assert example in cfg.hydra.help.template and "$APP_CONFIG_GROUPS" in cfg.hydra.help.template


# what sample.py reads; everything else an experiment sets is for training and must not show in `--cfg job`
SAMPLING_KEYS = {"model", "paths", "task_name", "ckpt_path", "prompts", "prompts_file", "num_frames", "seed",
                 "num_seeds", "batch_size", "device", "precision", "super_resolution"}


def test_sample_config_holds_only_what_sampling_uses(tmp_path):
    cfg = compose_config("sample", ["experiment=tiny_lavie"], tmp_path)
    training_only = {key for key in cfg if key not in SAMPLING_KEYS and cfg[key] is not None}
    assert not training_only, f"sample.py's config shows training-only keys: {sorted(training_only)}"
    assert cfg.seed == 0 and cfg.task_name == "sample"  # sampling's own settings, not the recipe's
    train_cfg = compose_config("train", ["experiment=tiny_lavie"], tmp_path)
    assert cfg.model == train_cfg.model  # the recipe's model, as trained
    OmegaConf.to_container(cfg.model, resolve=True)  # the model does not refer to the emptied training nodes
    assert train_cfg.data and train_cfg.trainer and train_cfg.callbacks  # train.py still gets the recipe


def test_metrics_csv_is_written_as_it_is_logged(tmp_path):
    cfg = compose_config("train", ["experiment=tiny_lavie"], tmp_path)
    assert cfg.logger.csv.flush_logs_every_n_steps <= cfg.trainer.log_every_n_steps
