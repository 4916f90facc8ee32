"""Progress of sampling and evaluation (utils/progress.py): counted in denoising steps, with a time left measured
over the whole run (resumed work excluded), as plain lines when the output is not a terminal; and results.md rows
that name their run and the settings their numbers depend on."""
from __future__ import annotations

import io

import pytest
import torch
from hydra.utils import instantiate

import eval.generation as generation
from eval.generation import generate_shard, plan_jobs, video_path
from eval.runner import results_table
from tests.hydra_compose import compose_config
from utils.progress import WorkProgress, format_duration

pytestmark = pytest.mark.usefixtures("single_thread")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_left_counts_only_this_runs_work_and_is_never_zero_before_the_end():
    clock, out = Clock(), io.StringIO()
    with WorkProgress("generating", total=10, completed=4, unit="videos", plain=True, every_seconds=30,
                      stream=out, clock=clock) as bar:
        assert bar.status() == "4/10 videos  elapsed 0:00  left ?"  # no rate yet: unknown, not 0:00
        clock.now = 20
        bar.update(5)  # one video in 20 s (the 4 resumed ones took no time in this run)
        assert bar.status() == "5/10 videos  elapsed 0:20  left 1:40" and out.getvalue() == ""
        clock.now = 99
        bar.update(5.5)  # half a block of denoising steps later: 1.5 videos in 99 s, 4.5 to go
        assert out.getvalue() == "generating: 5.5/10 videos  elapsed 1:39  left 4:57\n"
        clock.now = 300
        bar.update(10)
    assert out.getvalue().splitlines()[-1] == "generating: 10/10 videos  elapsed 5:00  left 0:00"
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "?"


def test_generate_reports_every_denoising_step_and_the_hook_changes_nothing(tmp_path):
    cfg = compose_config("sample", ["experiment=tiny_lavie", "model.unet.block_out_channels=[16,16,32]",
                                    "model.unet.norm_num_groups=4", "model.text_encoder.config.num_hidden_layers=1",
                                    "model.sampler.num_inference_steps=3"], tmp_path)
    torch.manual_seed(0)
    model = instantiate(cfg.model, _convert_="all").eval()
    calls = []
    with_hook = model.generate(["a red circle moving left"], seed=1, progress=lambda done, total: calls.append(
        (done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert torch.equal(with_hook, model.generate(["a red circle moving left"], seed=1))


class StepModel:
    """A generator that reports 4 steps per call."""

    fps = 8

    def generate(self, prompts, num_frames=None, seed=0, progress=None):
        for step in range(4):
            progress(step + 1, 4)
        return torch.zeros(len(prompts), num_frames, 8, 8, 3, dtype=torch.uint8)


def test_evaluation_bar_counts_videos_moves_per_step_and_starts_from_the_resumed_ones(tmp_path, monkeypatch):
    bars = []

    class Recorder(WorkProgress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.history: list[float] = []
            bars.append(self)

        def update(self, completed):
            super().update(completed)
            self.history.append(completed)

    monkeypatch.setattr(generation, "WorkProgress", Recorder)
    jobs = plan_jobs([f"p{i}" for i in range(6)])
    for index in (0, 1, 2):  # block [0, 1] finished, block [2, 3] half finished: 3 videos resumed
        video_path(tmp_path, index).parent.mkdir(parents=True, exist_ok=True)
        video_path(tmp_path, index).write_bytes(b"done")
    written = generate_shard(StepModel(), jobs, tmp_path, num_frames=2, batch_size=2, progress=False)
    (bar,) = bars
    assert written == 3 and bar.total == 6 and bar.initial == 3
    assert bar.history == [3.25, 3.5, 3.75, 4, 4, 4.5, 5, 5.5, 6, 6]


def synthetic_results(run_name: str, feature_nets: dict, fvd: float) -> dict:
    return {
        "run_name": run_name,
        "protocol": {"protocol": "synthetic", "num_videos": 64, "num_frames": 8, "resolution": 32, "dataset_seed": 0,
                     "split": "test", "seed": 0, "limit": None, "prompts": "captions of the split's items 0..N-1",
                     "fvd": {"network": "I3D architecture trained on the synthetic dataset", "real": {
                         "split": "test", "num_clips": 512}},
                     "is": {"network": "C3D", "preset": {"name": "single_split", "subset_size": 64}},
                     "feature_nets": {kind: {"num_frames": 8, "resolution": 32, "seed": 0, **feature_nets.get(kind, {})}
                                      for kind in ("i3d", "c3d")},
                     "frame_rate": {"real_fps": None, "generated_fps": 8}},
        "metrics": {"fvd": fvd, "is": 3.2, "text_alignment": 0.6, "per_attribute": {"shape": 0.4}},
        "num_videos": 64,
        "generator": {"model": "modules.lavie.LaVie", "checkpoint": "logs/demo/train/checkpoints/last.ckpt",
                      "sampler": {"num_inference_steps": 25, "guidance_scale": 4.0, "eta": 0.0, "num_frames": 8,
                                  "negative_prompt": ""}, "precision": "fp32"},
        "weights": {"i3d": {"path": "x", "sha256": "ab" * 32}, "c3d": {"path": "y", "sha256": "cd" * 32}},
    }


def test_results_row_names_its_run_and_the_settings_its_numbers_depend_on():
    documented = results_table(synthetic_results("demo_step750", {}, 784.0))
    quick = results_table(synthetic_results("quick", {"i3d": {"steps": 50}, "c3d": {"steps": 50}}, 240.0))
    header, rule, row = documented.splitlines()
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cells["run"] == "demo_step750" and "LaVie" not in row
    assert cells["fvd"] == "784" and "per_attribute" not in header
    for setting in ("num_videos=64", "num_frames=8", "is.preset=single_split", "fvd.real_clips=512",
                    "i3d net: default", "c3d net: default"):
        assert setting in cells["protocol settings"], setting
    assert cells["sampler"] == "num_inference_steps=25, guidance_scale=4.0, eta=0.0"
    assert cells["feature-net weights"] == "i3d ababababab, c3d cdcdcdcdcd"  # which networks measured it
    assert cells["all settings"] == "[results.json](results.json)"
    # a run with weaker feature nets says so in its row
    assert "i3d net: steps=50" in quick and "c3d net: steps=50" in quick and "| quick |" in quick
