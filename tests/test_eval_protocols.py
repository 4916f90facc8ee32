"""The evaluation runners end to end on tiny official-layout datasets and random-weight feature networks in the
official key layouts.

What must hold: results.json carries every number with its settings, presets, frame rates, skip counts and weight
hashes; a resumed run (with damaged videos and temporary files left behind) and a run sharded over 2 CPU processes
write the same video files and score exactly what an uninterrupted single-process run scores; every bad input stops
with a user error (exit 2 from the scripts) before the first video is generated.

Each entry script runs once as a subprocess (the command line and the script wiring); everything else calls
`eval.runner.evaluate` in-process on the config the scripts compose (Hydra's compose API), which is seconds faster
per case.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from datamodules.video_io import read_video, write_video
from eval.generation import blocks, plan_jobs, shard, video_path
from eval.metrics.c3d import C3D
from eval.metrics.i3d import InceptionI3d
from eval.runner import evaluate
from tests.dataset_layouts import ucf101_video, write_msrvtt, write_ucf101
from tests.hydra_compose import compose_config
from utils.cli import user_error_behind

pytestmark = pytest.mark.usefixtures("single_thread")  # as OMP_NUM_THREADS=1 in the subprocesses: same bytes

REPO = Path(__file__).resolve().parents[1]
# a generator that takes a fraction of a second per batch: the tiny LaVie, narrower, 2 DDIM steps at 32x32
TINY_GENERATOR = [
    "experiment=tiny_lavie", "model.unet.block_out_channels=[16,16,32]", "model.unet.norm_num_groups=4",
    "model.text_encoder.config.num_hidden_layers=1", "model.sampler.num_inference_steps=2", "device=cpu",
    "gen_batch_size=2",
]
C3D_KWARGS = {"width": 0.0625, "fc_dim": 32}
CLIP_KWARGS = dict(embed_dim=32, vision_cfg=dict(image_size=224, layers=1, width=64, patch_size=32, head_width=32),
                   text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
SYNTHETIC_NETS = {"i3d": {"width": 0.125, "net_resolution": 32, "steps": 2, "batch_size": 4, "val_size": 8,
                          "bn_batches": 1},
                  "c3d": {"width": 0.0625, "fc_dim": 16, "steps": 2, "batch_size": 4, "val_size": 8}}


def hydra_value(value) -> str:
    """A Python dict/list/number as a Hydra command-line value."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return str(value)


def run(script: str, *overrides: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    result = subprocess.run([*launcher, str(REPO / "eval" / script), *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def config(protocol: str, overrides: list[str], out: Path):
    """The config `eval/run_<protocol>.py <overrides> hydra.run.dir=<out>` runs with. The two paths that come from
    Hydra's runtime under @hydra.main (the run folder, the working directory) are given explicitly."""
    return compose_config("evaluate", [f"eval={protocol}", *overrides], out)


def user_error(protocol: str, overrides: list[str], out: Path) -> str:
    """Run in-process; the run must stop with a user error (what the scripts turn into exit 2 and a one-paragraph
    message) before any video file exists. Returns the message."""
    with pytest.raises(Exception) as raised:
        evaluate(config(protocol, overrides, out))
    error = user_error_behind(raised.value)
    assert error is not None, f"not a user error: {raised.value!r}"
    assert not list(out.rglob("*.mp4")), "videos were generated before the error"
    return str(error)


def videos(out: Path, count: int) -> dict[int, bytes]:
    return {i: video_path(out, i).read_bytes() for i in range(count)}


@pytest.fixture(scope="module")
def ucf_inputs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ucf")
    write_ucf101(tmp / "UCF101", videos_per_class=3, num_frames=20, size=(32, 40))
    torch.manual_seed(0)
    i3d = tmp / "i3d_small.pt"
    torch.save(calibrated_i3d().state_dict(), i3d)
    c3d = C3D(**C3D_KWARGS)
    c3d_file = tmp / "c3d_small.safetensors"
    save_file({**{k: v.contiguous() for k, v in c3d.state_dict().items()},
               "mean": torch.rand(3, 16, 128, 171) * 255}, c3d_file)
    return {"root": tmp / "UCF101", "i3d": i3d, "c3d": c3d_file, "tmp": tmp}


def calibrated_i3d() -> InceptionI3d:
    """A random small I3D whose BatchNorm statistics are measured on random videos (as the reference fixture's
    are), so its embeddings vary between videos instead of collapsing to a constant."""
    net = InceptionI3d(width=0.125)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.rand(4, 3, 16, 32, 32) * 2 - 1)
    return net.eval()


def ucf_overrides(inputs: dict[str, Path], *extra: str) -> list[str]:
    return [
        *TINY_GENERATOR, f"data.root={inputs['root']}", f"eval.i3d_weights={inputs['i3d']}",
        f"eval.c3d_weights={inputs['c3d']}", f"eval.c3d_kwargs={hydra_value(C3D_KWARGS)}",
        "eval.num_videos=6", "eval.num_real_clips=5", "eval.i3d_size=32", "eval.score_batch_size=4",
        f"eval.cache_dir={inputs['tmp'] / 'cache'}", *extra,
    ]


@pytest.fixture(scope="module")
def ucf_run(ucf_inputs, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run of eval/run_ucf101.py: (its folder, its results)."""
    out = tmp_path_factory.mktemp("ucf_run") / "single"
    run("run_ucf101.py", *ucf_overrides(ucf_inputs), f"hydra.run.dir={out}")
    return out, json.loads((out / "results.json").read_text())


def test_shards_partition_fixed_blocks():
    jobs = plan_jobs([f"p{i}" for i in range(11)], base_seed=5)
    assert [j.seed for j in jobs] == list(range(5, 16))
    parts = [shard(jobs, 3, rank, 2) for rank in range(2)]
    assert sorted(j.index for part in parts for block in part for j in block) == list(range(11))
    assert [[j.index for j in b] for b in parts[1]] == [[3, 4, 5], [9, 10]]
    assert blocks(jobs, 3) == [b for k in range(4) for b in [parts[k % 2][k // 2]]]


def test_ucf101_results_record_every_setting_and_count(ucf_run):
    out, results = ucf_run
    assert results["num_videos"] == 6 and results["metrics"]["num_real_clips"] == 5
    assert results["metrics"]["fvd"] > 0 and results["metrics"]["is"] >= 1.0 and results["metrics"]["is_std"] == 0
    protocol = results["protocol"]
    assert protocol["fvd"]["preset"]["name"] == "center_square" and protocol["fvd"]["preset"]["size"] == 32
    assert protocol["fvd"]["preset"]["i3d_input_crop"] == "center"
    assert protocol["is"]["preset"] | {"reference": None} == {
        "name": "single_split", "subset_size": 6, "runs": 1, "splits": 1, "eps": 1e-20,
        "std": "0 (one split of one run)", "shuffle_before_splitting": None, "subset_rule": "all videos",
        "subset_seed": 0, "videos_available": 6, "disjoint": True, "max_runs_per_video": 1, "reference": None}
    assert protocol["frame_rate"] == {"real_fps": 25.0, "real_frame_stride": 1, "real_frame_stride_setting": 1,
                                      "real_clip_fps": 25.0, "generated_fps": 8}
    assert results["videos"]["generated_this_run"] == 6 and results["videos"]["regenerated"] == 0
    assert results["skipped"] == {"real_videos": 0, "real_videos_by_reason": {}, "real_videos_examples": {},
                                  "generated_videos_regenerated": 0, "stray_temp_files_removed": 0}
    assert results["real_clips"]["clips"] == 5 and results["real_clips"]["clip_fps"] == {"25": 5}
    assert results["weights"]["i3d"]["sha256"] and results["weights"]["c3d"]["sha256"]
    assert (out / "results.md").read_text().count("|") > 6


def test_a_resumed_run_regenerates_damaged_videos_and_scores_like_one_uninterrupted_run(ucf_inputs, ucf_run,
                                                                                       tmp_path):
    single, results = ucf_run
    expected = videos(single, 6)
    # what an interrupted run leaves: blocks [0, 1] and [2, 3] partly written, video 4 cut short later (a copy
    # or a sync), video 5 from a different clip length, and the temporary files of the writes it was killed in
    resumed = tmp_path / "resumed"
    (resumed / "videos").mkdir(parents=True)
    shutil.copy(single / "manifest.json", resumed / "manifest.json")
    for index in (0, 2, 4):
        shutil.copy(video_path(single, index), video_path(resumed, index))
    video_path(resumed, 4).write_bytes(expected[4][: len(expected[4]) // 2])
    write_video(video_path(resumed, 5), read_video(video_path(single, 5))[:8], fps=8)  # 8 of 16 frames
    (resumed / "videos" / ".000003.q1w2e3r4.tmp.mp4").write_bytes(b"partial")  # atomic_output's temporary name
    (resumed / "videos" / "000003.mp4.tmp").write_bytes(b"partial")

    again = evaluate(config("ucf101", ucf_overrides(ucf_inputs), resumed))
    assert again["metrics"] == results["metrics"] | {"real_stats_cached": True}
    assert videos(resumed, 6) == expected
    assert sorted(p.name for p in (resumed / "videos").iterdir()) == [f"{i:06d}.mp4" for i in range(6)]
    assert again["videos"]["finished_before_this_run"] == 2 and again["videos"]["generated_this_run"] == 4
    assert again["videos"]["regenerated"] == 2 and set(again["videos"]["regenerated_why"]) == {"4", "5"}
    assert "8 frames, expected 16" in again["videos"]["regenerated_why"]["5"]
    assert again["skipped"]["generated_videos_regenerated"] == 2 and again["skipped"]["stray_temp_files_removed"] == 2
    assert json.loads((resumed / "results.json").read_text())["videos"] == again["videos"]


def test_two_processes_write_and_score_like_one(ucf_inputs, ucf_run, tmp_path):
    single, results = ucf_run
    run("run_ucf101.py", *ucf_overrides(ucf_inputs), f"hydra.run.dir={tmp_path}", torchrun=2)
    sharded = json.loads((tmp_path / "results.json").read_text())
    assert sharded["world_size"] == 2
    assert videos(tmp_path, 6) == videos(single, 6)
    assert sharded["metrics"]["fvd"] == results["metrics"]["fvd"]
    assert sharded["metrics"]["is"] == results["metrics"]["is"]


def test_a_folder_with_other_settings_is_refused(ucf_inputs, ucf_run, tmp_path):
    shutil.copy(ucf_run[0] / "manifest.json", tmp_path / "manifest.json")
    message = user_error("ucf101", ucf_overrides(ucf_inputs, "seed=1", "eval.seed=1"), tmp_path)
    assert "other prompts, seeds or generator settings" in message


@pytest.fixture(scope="module")
def bad_inputs(ucf_inputs) -> dict[str, Path]:
    """An I3D file with renamed keys, and two datasets: every video too short; 2 of 6 train videos unusable."""
    tmp = ucf_inputs["tmp"]
    state = torch.load(ucf_inputs["i3d"], weights_only=True)
    renamed = {k.replace("Mixed_5c.", "Mixed_5x."): v for k, v in state.items()}
    torch.save(renamed, tmp / "i3d_renamed.pt")
    write_ucf101(tmp / "short", videos_per_class=3, num_frames=12, size=(32, 40))
    write_ucf101(tmp / "broken", classes=("ApplyEyeMakeup", "Archery"), videos_per_class=4, num_frames=20,
                 size=(32, 40), corrupt=[ucf101_video("Archery", 1)], short=[ucf101_video("Archery", 2)])
    return {"i3d_renamed": tmp / "i3d_renamed.pt", "short": tmp / "short", "broken": tmp / "broken"}


@pytest.mark.parametrize("extra, messages", [
    (["data.root=/nonexistent/UCF101"], ["classInd.txt"]),
    (["eval.i3d_weights=/nonexistent/i3d.pt"], ["i3d_pretrained_400.pt"]),
    (["eval.c3d_weights=/nonexistent/c3d.safetensors"], ["conv3d_deepnetA_ucf.npz"]),
    (["eval.prompts=captions"], ["eval.prompts must be one of"]),
    (["eval.num_frames=8"], ["eval.num_frames=8 is below I3D's minimum of 9 frames"]),
    (["eval.num_frames=12"], ["eval.num_frames=12", "TGAN2's C3D", "16-frame clips"]),
    (["eval.fvd_preset=center"], ["eval.fvd_preset must be one of", "stylegan_v", "tats"]),
    (["eval.is_preset=tgan2"], ["eval.is_preset=tgan2 scores 10 subset(s) of 2,048", "generates 6"]),
    (["eval.real_frame_stride=0"], ["eval.real_frame_stride must be a positive integer or 'auto'"]),
    (["eval.i3d_weights={i3d_renamed}"], ["does not match InceptionI3d", "missing keys", "Mixed_5c.b0.conv3d.weight",
                                          "unexpected keys", "Mixed_5x.b0.conv3d.weight"]),
    (["data.root={short}"], ["UCF-101 train split (trainlist01.txt", "only 0 of 5 real clips of 16 frames",
                             "skipped 6 videos: 6 too short", "eval.num_real_clips=5"]),
    (["data.root={broken}"], ["only 4 of 5 real clips", "in 1 pass(es)", "skipped 2 videos", "1 unreadable",
                              "1 too short", "lower eval.num_real_clips"]),
    # 25 fps real clips for an 8 fps generator: every 3rd frame, so a 16-frame clip spans 46 of the 20 frames
    (["eval.real_frame_stride=auto"], ["(frame stride 3)", "eval.real_frame_stride=auto", "spans 46 source frames"]),
], ids=["no dataset", "no i3d file", "no c3d file", "bad prompts", "8 frames", "12 frames", "unknown fvd preset",
        "too few videos for tgan2", "stride 0", "i3d keys", "real clips too short", "too few real clips",
        "auto stride too long"])
@pytest.mark.filterwarnings("ignore::datamodules.base.UnreadableFileWarning")
def test_bad_input_stops_before_any_video_with_a_clear_message(ucf_inputs, bad_inputs, tmp_path, extra, messages):
    extra = [e.format(**{k: str(v) for k, v in bad_inputs.items()}) for e in extra]
    message = user_error("ucf101", ucf_overrides(ucf_inputs, *extra), tmp_path)
    assert all(m in message for m in messages), message


@pytest.mark.filterwarnings("ignore::datamodules.base.UnreadableFileWarning")
def test_skipped_real_videos_are_counted_in_the_results(ucf_inputs, bad_inputs, tmp_path):
    results = evaluate(config("ucf101", ucf_overrides(ucf_inputs, f"data.root={bad_inputs['broken']}",
                                                      "eval.num_real_clips=4", "eval.limit=2"), tmp_path))
    assert results["metrics"]["num_real_clips"] == 4 and results["num_videos"] == 2
    assert results["skipped"]["real_videos"] == 2
    assert results["skipped"]["real_videos_by_reason"] == {"unreadable": 1, "too short": 1}
    assert results["skipped"]["real_videos_examples"]["unreadable"] == [ucf101_video("Archery", 1)]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True, **CLIP_KWARGS)
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def msrvtt_overrides(root: Path, clip_file: Path) -> list[str]:
    return [*TINY_GENERATOR, f"data.root={root}", f"eval.clip_weights={clip_file}",
            f"eval.clip_model_kwargs={hydra_value(CLIP_KWARGS)}", "eval.num_frames=4", "eval.limit=3"]


def test_msrvtt_clipsim_over_seeded_captions(tmp_path, clip_file):
    root = tmp_path / "MSRVTT"
    write_msrvtt(root, video_ids=(7010, 7011, 7012, 9999), captions_per_video=3)
    out = tmp_path / "run"
    run("run_msrvtt.py", *msrvtt_overrides(root, clip_file), f"hydra.run.dir={out}")
    results = json.loads((out / "results.json").read_text())
    per_video = results["metrics"]["per_video"]
    assert list(per_video) == ["video7010", "video7011", "video7012"]  # the first 3 in video-number order
    assert -1 <= results["metrics"]["clipsim"] <= 1
    assert results["metrics"]["clipsim"] == pytest.approx(sum(per_video.values()) / 3, abs=1e-12)
    assert results["protocol"]["caption_rule"] == "seeded" and results["protocol"]["frame_rate"]["generated_fps"] == 8


def test_msrvtt_clip_weights_with_other_keys_stop_before_any_video(tmp_path, clip_file):
    root = tmp_path / "MSRVTT"
    write_msrvtt(root, video_ids=(7010, 7011), captions_per_video=1)
    state = load_file(clip_file)
    state["extra.weight"] = state.pop("logit_scale")
    save_file(state, tmp_path / "clip_wrong.safetensors")
    message = user_error("msrvtt", msrvtt_overrides(root, tmp_path / "clip_wrong.safetensors"), tmp_path / "run")
    assert "missing keys: 1 (logit_scale)" in message and "unexpected keys: 1 (extra.weight)" in message


def synthetic_overrides(tmp_path: Path) -> list[str]:
    return [*TINY_GENERATOR, "eval.num_videos=4", "eval.num_real_clips=4", "eval.score_batch_size=4",
            f"eval.feature_nets={hydra_value(SYNTHETIC_NETS)}", f"eval.net_dir={tmp_path / 'nets'}",
            f"eval.cache_dir={tmp_path / 'cache'}"]


def test_synthetic_protocol_trains_its_feature_nets_once_and_scores(tmp_path):
    run("run_synthetic.py", *synthetic_overrides(tmp_path), f"hydra.run.dir={tmp_path / 'a'}")
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    metrics = results["metrics"]
    assert set(metrics) >= {"fvd", "is", "acc_shape", "acc_colour", "acc_motion", "text_alignment"}
    assert metrics["fvd"] > 0 and metrics["is"] >= 1 and metrics["num_real_clips"] == 4
    assert results["protocol"]["is"]["preset"]["name"] == "single_split" and results["skipped"]["real_videos"] == 0
    assert set(results["weights"]) == {"i3d", "c3d"} and len(list((tmp_path / "nets").glob("*.safetensors"))) == 2
    # the same settings in-process (the nets and real statistics are reused): the same numbers
    again = evaluate(config("synthetic", synthetic_overrides(tmp_path), tmp_path / "b"))
    assert again["metrics"] == metrics | {"real_stats_cached": True}
    assert len(list((tmp_path / "nets").glob("*.safetensors"))) == 2


def test_synthetic_too_few_videos_for_the_is_preset(tmp_path):
    message = user_error("synthetic", [*synthetic_overrides(tmp_path), "eval.is_preset=stylegan_v"], tmp_path / "a")
    assert "eval.is_preset=stylegan_v scores 1 subset(s) of 2,048" in message
    assert not (tmp_path / "nets").exists()  # stopped before training the feature nets, too
