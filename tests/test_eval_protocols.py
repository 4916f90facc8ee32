"""The evaluation runners end to end, through their command lines, on tiny official-layout datasets and
random-weight feature networks in the official key layouts.

What must hold: results.json carries every number with its settings and weight hashes; a re-run skips finished
videos; an interrupted-and-resumed run, and a run sharded over 2 CPU processes, write the same video files and
score exactly what an uninterrupted single-process run scores; bad input stops with a clear message.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from eval.generation import blocks, plan_jobs, shard, video_path
from eval.metrics.c3d import C3D
from eval.metrics.i3d import InceptionI3d
from tests.dataset_layouts import write_msrvtt, write_ucf101

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


def hydra_value(value) -> str:
    """A Python dict/list/number as a Hydra command-line value."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return str(value)


def run(script: str, *overrides: str, torchrun: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    result = subprocess.run([*launcher, str(REPO / "eval" / script), *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


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


def ucf_overrides(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        *TINY_GENERATOR, f"data.root={inputs['root']}", f"eval.i3d_weights={inputs['i3d']}",
        f"eval.c3d_weights={inputs['c3d']}", f"eval.c3d_kwargs={hydra_value(C3D_KWARGS)}",
        "eval.num_videos=6", "eval.num_real_clips=5", "eval.i3d_size=32", "eval.score_batch_size=4",
        f"eval.cache_dir={inputs['tmp'] / 'cache'}", f"hydra.run.dir={out}", *extra,
    ]


def test_shards_partition_fixed_blocks():
    jobs = plan_jobs([f"p{i}" for i in range(11)], base_seed=5)
    assert [j.seed for j in jobs] == list(range(5, 16))
    parts = [shard(jobs, 3, rank, 2) for rank in range(2)]
    assert sorted(j.index for part in parts for block in part for j in block) == list(range(11))
    assert [[j.index for j in b] for b in parts[1]] == [[3, 4, 5], [9, 10]]
    assert blocks(jobs, 3) == [b for k in range(4) for b in [parts[k % 2][k // 2]]]


def test_ucf101_resume_and_two_processes_score_like_one_uninterrupted_run(ucf_inputs, tmp_path):
    single, resumed, sharded = tmp_path / "single", tmp_path / "resumed", tmp_path / "sharded"
    run("run_ucf101.py", *ucf_overrides(ucf_inputs, single))
    results = json.loads((single / "results.json").read_text())
    assert results["num_videos"] == 6 and results["metrics"]["num_real_clips"] == 5
    assert results["metrics"]["fvd"] > 0 and results["metrics"]["is"] >= 1.0
    assert results["protocol"]["is"]["splits"] == 1 and results["protocol"]["fvd"]["crop"] == "center"
    assert results["weights"]["i3d"]["sha256"] and results["weights"]["c3d"]["sha256"]
    assert (single / "results.md").read_text().count("|") > 6
    expected = {i: video_path(single, i).read_bytes() for i in range(6)}

    # interrupted: only the first block was written, plus a half-written temporary file of the second
    run("run_ucf101.py", *ucf_overrides(ucf_inputs, resumed, "eval.limit=2"), check=True)
    manifest = resumed / "manifest.json"
    manifest.unlink()  # that run had another video list; the real interrupted run would have the same manifest
    (resumed / "results.json").unlink()
    (resumed / "videos" / "000003.mp4.tmp").write_bytes(b"partial")
    video_path(resumed, 1).unlink()  # and a block with one video missing
    out = run("run_ucf101.py", *ucf_overrides(ucf_inputs, resumed))
    assert json.loads((resumed / "results.json").read_text())["metrics"] == results["metrics"] | {
        "real_stats_cached": True}, out.stdout
    assert {i: video_path(resumed, i).read_bytes() for i in range(6)} == expected

    run("run_ucf101.py", *ucf_overrides(ucf_inputs, sharded), torchrun=2)
    sharded_results = json.loads((sharded / "results.json").read_text())
    assert sharded_results["world_size"] == 2
    assert {i: video_path(sharded, i).read_bytes() for i in range(6)} == expected
    assert sharded_results["metrics"]["fvd"] == results["metrics"]["fvd"]
    assert sharded_results["metrics"]["is"] == results["metrics"]["is"]


def test_a_folder_with_other_settings_is_refused(ucf_inputs, tmp_path):
    run("run_ucf101.py", *ucf_overrides(ucf_inputs, tmp_path, "eval.limit=2"))
    result = run("run_ucf101.py", *ucf_overrides(ucf_inputs, tmp_path, "eval.limit=2", "seed=1",
                                                 "eval.seed=1"), check=False)
    assert result.returncode == 2 and "other prompts, seeds or generator settings" in result.stderr


@pytest.mark.parametrize("override, message", [
    ("data.root=/nonexistent/UCF101", "classInd.txt"),
    ("eval.i3d_weights=/nonexistent/i3d.pt", "i3d_pretrained_400.pt"),
    ("eval.c3d_weights=/nonexistent/c3d.safetensors", "conv3d_deepnetA_ucf.npz"),
    ("eval.prompts=captions", "eval.prompts must be one of"),
])
def test_ucf101_bad_input_is_a_clear_message(ucf_inputs, tmp_path, override, message):
    result = run("run_ucf101.py", *ucf_overrides(ucf_inputs, tmp_path), override, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_msrvtt_clipsim_over_seeded_captions(tmp_path):
    root = tmp_path / "MSRVTT"
    write_msrvtt(root, video_ids=(7010, 7011, 7012, 9999), captions_per_video=3)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True, **CLIP_KWARGS)
    clip_file = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, clip_file)
    out = tmp_path / "run"
    kwargs = hydra_value(CLIP_KWARGS)
    run("run_msrvtt.py", *TINY_GENERATOR, f"data.root={root}", f"eval.clip_weights={clip_file}",
        f"eval.clip_model_kwargs={kwargs}", "eval.num_frames=4", "eval.limit=3", f"hydra.run.dir={out}")
    results = json.loads((out / "results.json").read_text())
    per_video = results["metrics"]["per_video"]
    assert list(per_video) == ["video7010", "video7011", "video7012"]  # the first 3 in video-number order
    assert -1 <= results["metrics"]["clipsim"] <= 1
    assert results["metrics"]["clipsim"] == pytest.approx(sum(per_video.values()) / 3, abs=1e-12)
    assert results["protocol"]["caption_rule"] == "seeded"


def test_synthetic_protocol_trains_its_feature_nets_once_and_scores(tmp_path):
    nets = {"i3d": {"width": 0.125, "net_resolution": 32, "steps": 2, "batch_size": 4, "val_size": 8,
                    "bn_batches": 1},
            "c3d": {"width": 0.0625, "fc_dim": 16, "steps": 2, "batch_size": 4, "val_size": 8}}
    common = [*TINY_GENERATOR, "eval.num_videos=4", "eval.num_real_clips=4", "eval.score_batch_size=4",
              f"eval.feature_nets={hydra_value(nets)}", f"eval.net_dir={tmp_path / 'nets'}",
              f"eval.cache_dir={tmp_path / 'cache'}"]
    run("run_synthetic.py", *common, f"hydra.run.dir={tmp_path / 'a'}")
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    metrics = results["metrics"]
    assert set(metrics) >= {"fvd", "is", "acc_shape", "acc_colour", "acc_motion", "text_alignment"}
    assert all(0 <= metrics[k] <= 1 for k in ("acc_shape", "acc_colour", "acc_motion", "text_alignment"))
    assert metrics["fvd"] > 0 and metrics["is"] >= 1 and metrics["num_real_clips"] == 4
    assert set(results["weights"]) == {"i3d", "c3d"} and len(list((tmp_path / "nets").glob("*.safetensors"))) == 2
    # the same command through the UCF-101 runner with eval=synthetic: same protocol, nets and stats reused
    run("run_ucf101.py", "eval=synthetic", *common, f"hydra.run.dir={tmp_path / 'b'}")
    again = json.loads((tmp_path / "b" / "results.json").read_text())["metrics"]
    assert again == metrics | {"real_stats_cached": True}
