"""LaVie's cascade (model=lavie_cascade, modules/lavie_cascade.py): base -> interpolation -> x4 super-resolution in one
generator. The tiny cascade runs from stage checkpoints saved as train.py saves them and equals the three stages run
by hand through their own APIs; a missing stage file is named before anything is built; the paper-size cascade builds
on the meta device with each stage's official key layout and makes 61 frames at 1280x2048."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from datamodules.video_io import read_video
from modules.lavie_cascade import LaVieCascade, stage_seed
from sample import sample
from tests.hydra_compose import REPO, compose_config
from utils.generators import build_generator, load_training_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

STAGES = ("base", "interpolation", "super_resolution")
PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]
# a few denoising steps per stage: the tests check the plumbing and the equivalence, not the quality
FEW_STEPS = [f"model.{stage}.sampler.num_inference_steps=2" for stage in STAGES]


def stage_model_config(name: str):
    """The tiny cascade's `name` stage as a plain model config (the node without its ckpt_path)."""
    node = compose_config("sample", ["model=lavie_cascade_tiny", *FEW_STEPS], "/unused").model[name]
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    node.pop("ckpt_path")
    return node


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory) -> dict[str, Path]:
    """One train.py-style run per stage: RUN/config.yaml (the model node) and RUN/checkpoints/last.ckpt (a Lightning
    checkpoint: the model's state_dict under "state_dict"), random weights seeded per stage, every zero-initialised
    layer included, so a stage that did not load its checkpoint gives other videos."""
    root = tmp_path_factory.mktemp("stages")
    runs = {}
    for index, name in enumerate(STAGES):
        cfg = stage_model_config(name)
        torch.manual_seed(100 + index)
        model = instantiate(cfg, _convert_="all")
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.02 * torch.randn_like(parameter))  # zero-initialised layers (conv_in's new inputs,
                # shift_conv) become non-zero: their weights must come from the file
        run = root / name
        (run / "checkpoints").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({"model": cfg}), run / "config.yaml")
        torch.save({"state_dict": model.state_dict(), "global_step": 0, "pytorch-lightning_version": "2"},
                   run / "checkpoints" / "last.ckpt")
        runs[name] = run / "checkpoints" / "last.ckpt"
    return runs


def cascade_overrides(runs: dict[str, Path]) -> list[str]:
    return ["model=lavie_cascade_tiny", *FEW_STEPS, *(f"model.{s}.ckpt_path={runs[s]}" for s in STAGES)]


@pytest.fixture(scope="module")
def cascade(stage_runs, tmp_path_factory) -> LaVieCascade:
    cfg = compose_config("sample", cascade_overrides(stage_runs), tmp_path_factory.mktemp("unused"))
    return build_generator(cfg)


def test_every_stage_holds_its_checkpoint(cascade, stage_runs):
    for name in STAGES:
        saved = torch.load(stage_runs[name], map_location="cpu", weights_only=True)["state_dict"]
        state = getattr(cascade, name).state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) for k in saved), name
    assert cascade.fps == cascade.interpolation.fps == 24


def test_cascade_equals_the_three_stages_run_by_hand(cascade, stage_runs):
    """Two prompts against the three stages run by hand through their own APIs (base.generate,
    interpolation.interpolate, super_resolution.upsample), stage models built and loaded on their own, with the
    seeds the cascade gives each stage: the same uint8 videos, so the cascade adds nothing but the plumbing, and its
    key frames are the base model's own for that seed."""
    seeds = [3, 8]
    stages = cascade.generate_stages(PROMPTS, seed=seeds)
    assert stages["base"].shape == (2, 4, 32, 32, 3)
    assert stages["interpolation"].shape == (2, 13, 32, 32, 3)
    assert stages["super_resolution"].shape == (2, 13, 128, 128, 3)
    assert torch.equal(cascade.generate(PROMPTS, seed=seeds), stages["super_resolution"])

    alone = {}
    for name in STAGES:
        alone[name] = instantiate(stage_model_config(name), _convert_="all").eval()
        load_training_checkpoint(alone[name], stage_runs[name])
    base = alone["base"].generate(PROMPTS, seed=seeds)
    interpolated = alone["interpolation"].interpolate(PROMPTS, base, seed=[stage_seed(s, 1) for s in seeds])
    upsampled = alone["super_resolution"].upsample(interpolated, PROMPTS, seed=[stage_seed(s, 2) for s in seeds])
    assert torch.equal(stages["base"], base)
    assert torch.equal(stages["interpolation"], interpolated)
    assert torch.equal(stages["super_resolution"], upsampled)
    # a checkpoint that was not loaded would change the videos (the fixture's weights are not the initial ones)
    unloaded = instantiate(stage_model_config("base"), _convert_="all").eval()
    assert not torch.equal(unloaded.generate(PROMPTS, seed=seeds), base)
    # the later stages' noise is not a copy of the base stage's
    assert len({seeds[0], stage_seed(seeds[0], 1), stage_seed(seeds[0], 2)}) == 3


def test_num_frames_asks_for_4k_minus_3_frames(cascade):
    video = cascade.generate(PROMPTS[:1], num_frames=9, seed=0)  # 3 key frames
    assert video.shape == (1, 9, 128, 128, 3)
    settings = cascade.sampler_settings(num_frames=9)
    assert settings["num_frames"] == 9 and settings["base"]["num_frames"] == 3
    assert settings["interpolation"]["num_frames"] == 9
    for bad in (8, 16, 1):
        with pytest.raises(ValueError, match="4K - 3"):
            cascade.generate(PROMPTS[:1], num_frames=bad)
    with pytest.raises(ValueError, match="per stage"):
        cascade.generate(PROMPTS[:1], num_inference_steps=3)
    with pytest.raises(ValueError, match="the cascade sets it"):
        cascade.generate(PROMPTS[:1], base={"num_frames": 5})


def test_stage_overrides_and_progress_cover_all_three_stages(cascade):
    calls = []
    steps = {"base": {"num_inference_steps": 3}, "interpolation": {"num_inference_steps": 1}}
    cascade.generate(PROMPTS[:1], seed=0, progress=lambda done, total: calls.append((done, total)), **steps)
    settings = cascade.sampler_settings(**steps)
    assert settings["base"]["num_inference_steps"] == 3 and settings["interpolation"]["num_inference_steps"] == 1
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(done) == len(set(done))  # one count over the stages, never going back
    assert calls[-1][0] == calls[-1][1]  # ends at its total
    assert calls[3] == (4, calls[3][1])  # the interpolation's one step follows the base's three


def test_sample_py_writes_the_final_video_and_each_stage_checkpoint(stage_runs, tmp_path):
    out = tmp_path / "samples"
    sample(compose_config("sample", [*cascade_overrides(stage_runs), f"prompts=[{PROMPTS[0]}]", "seed=5"], out))
    record = json.loads((out / "samples.json").read_text())
    assert record["model"] == "modules.lavie_cascade.LaVieCascade" and record["fps"] == 24
    assert {s: record["stages"][s]["checkpoint"] for s in STAGES} == {s: str(stage_runs[s]) for s in STAGES}
    assert record["sampler"]["num_frames"] == 13 and record["sampler"]["base"]["num_frames"] == 4
    video = record["videos"][0]
    assert video["seed"] == 5 and video["frames"] == 13
    assert read_video(out / video["file"]).shape == (13, 128, 128, 3)
    assert (out / "grid.png").is_file()


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("stage", STAGES)
def test_a_missing_stage_checkpoint_is_named_before_anything_is_built(stage, stage_runs, tmp_path, monkeypatch):
    import modules.lavie_cascade
    import utils.generators

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built before the missing file was found")

    monkeypatch.setattr(modules.lavie_cascade, "instantiate", no_build)
    monkeypatch.setattr(utils.generators, "instantiate", no_build)
    missing = tmp_path / "no_run" / "last.ckpt"
    overrides = [o for o in cascade_overrides(stage_runs) if not o.startswith(f"model.{stage}.ckpt_path=")]
    cfg = compose_config("sample", [*overrides, f"model.{stage}.ckpt_path={missing}", "prompts=[a cat]"], tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        sample(cfg)
    message = str(error.value)
    assert f"{stage} stage" in message and str(missing) in message and f"model.{stage}.ckpt_path" in message
    assert not list(tmp_path.glob("*.mp4"))


def test_a_stage_config_error_names_the_stage_and_its_key(tmp_path):
    """The paper-size cascade without the interpolation stage's Stable Diffusion folder: the stage's own check, its
    key given as the cascade's."""
    sd = tmp_path / "sd"
    sd.mkdir()
    cfg = compose_config("sample", ["model=lavie_cascade", f"model.base.pretrained.sd_path={sd}",
                                    f"model.super_resolution.pretrained.sd_path={sd}", "prompts=[a cat]"], tmp_path)
    with pytest.raises(ValueError, match=r"interpolation stage of the cascade: .*model\.interpolation\.pretrained\."
                                         r"sd_path"):
        LaVieCascade.validate_config(cfg.model)


def test_a_second_super_resolution_post_process_is_refused(tmp_path):
    cfg = compose_config("sample", ["model=lavie_cascade_tiny", "prompts=[a cat]", "super_resolution=lavie_vsr_tiny"],
                         tmp_path)
    with pytest.raises(ValueError, match="ends with its own super-resolution stage"):
        sample(cfg)


def test_a_stage_of_the_wrong_kind_is_refused(tmp_path):
    cfg = compose_config("sample", ["model=lavie_cascade_tiny"], tmp_path).model
    cfg = {**OmegaConf.to_container(cfg), "interpolation": OmegaConf.load(REPO / "configs/model/lavie_vsr_tiny.yaml")}
    with pytest.raises(ValueError, match=r"model\.interpolation\._target_ .* has no interpolate\(\)"):
        LaVieCascade.validate_config(cfg)
    cfg = {**cfg, "base": OmegaConf.load(REPO / "configs/model/lavie_interpolation_tiny.yaml")}
    with pytest.raises(ValueError, match=r"model\.base\._target_ .* is a later stage"):
        LaVieCascade.validate_config(cfg)
    del cfg["base"]
    with pytest.raises(ValueError, match="the cascade has no base stage"):
        LaVieCascade.validate_config(cfg)


def test_the_cascade_does_not_train(tmp_path):
    cascade = instantiate(compose_config("sample", ["model=lavie_cascade_tiny"], tmp_path).model)
    for step in (lambda: cascade.setup("fit"), cascade.configure_optimizers):  # Lightning calls both before a step
        with pytest.raises(ValueError, match="train each stage on its own"):
            step()
    cascade.setup("predict")  # anything else goes on


def test_command_line_names_the_missing_stage_file(tmp_path):
    missing = tmp_path / "vsr.ckpt"
    result = subprocess.run([sys.executable, "sample.py", "model=lavie_cascade_tiny", "prompts=[a cat]",
                             f"model.super_resolution.ckpt_path={missing}", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "super_resolution stage" in result.stderr and "model.super_resolution.ckpt_path" in result.stderr
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------ paper size
def test_paper_size_cascade_builds_on_the_meta_device_with_the_official_layouts(fixtures_dir, tmp_path):
    official = {}
    for stage, name in (("base", "keys_base.json"), ("interpolation", "keys_interpolation.json"),
                        ("super_resolution", "keys_vsr.json")):
        path = fixtures_dir / "lavie" / name
        if not path.is_file():
            pytest.fail(f"official key layout not found: {path}")
        official[stage] = {key: tuple(shape) for key, shape in json.loads(path.read_text()).items()}
    cfg = compose_config("sample", ["model=lavie_cascade",
                                    *(f"model.{s}.pretrained.init_from_sd=false" for s in STAGES)], tmp_path)
    LaVieCascade.validate_config(cfg.model)
    with torch.device("meta"):
        cascade = instantiate(cfg.model, _convert_="all")
    for stage in STAGES:
        state = {k: tuple(v.shape) for k, v in getattr(cascade, stage).unet.state_dict().items()}
        assert state == official[stage], stage
    settings = cascade.sampler_settings()
    assert settings["num_frames"] == 61 and settings["base"]["num_frames"] == 16  # 16 key frames -> 61
    assert (settings["base"]["height"], settings["base"]["width"]) == (320, 512)
    assert (settings["interpolation"]["height"], settings["interpolation"]["width"]) == (320, 512)
    assert cascade.super_resolution.scale == 4 and cascade.fps == 24  # 61 frames at 1280x2048


def test_sample_records_stages_only_for_a_model_made_of_stages(tmp_path):
    from sample import weights_record

    model = compose_config("sample", ["experiment=tiny_lavie"], tmp_path).model  # its unet, text_encoder, ... are
    assert weights_record(model) == {"pretrained": OmegaConf.to_container(model.pretrained)}  # not stages
    stages = weights_record(compose_config("sample", ["model=lavie_cascade_tiny"], tmp_path).model)["stages"]
    assert list(stages) == list(STAGES) and all(s["checkpoint"] is None for s in stages.values())


def test_eval_generates_with_the_cascade_like_any_backbone(cascade, tmp_path):
    """eval/'s sharded generation uses only the contract: the cascade's videos are written at the asked frame count
    (a 4K - 3 one), at its frame rate, as the cascade makes them for those seeds."""
    from eval.generation import generate_shard, plan_jobs, video_path

    jobs = plan_jobs(PROMPTS, base_seed=7)
    assert generate_shard(cascade, jobs, tmp_path, num_frames=9, batch_size=2, progress=False) == 2
    expected = cascade.generate(PROMPTS, num_frames=9, seed=[7, 8])
    for job in jobs:
        video = read_video(video_path(tmp_path, job.index))
        assert video.shape == (9, 128, 128, 3)
        # mp4 is lossy (and random-weight videos are noise, the hardest to compress): far closer to the cascade's
        # own video for that seed than to the other one
        error = (video.float() - expected[job.index].float()).abs().mean()
        other = (video.float() - expected[1 - job.index].float()).abs().mean()
        assert error < other / 3, (error, other)
    with pytest.raises(ValueError, match="4K - 3"):
        generate_shard(cascade, plan_jobs(PROMPTS[:1]), tmp_path / "16", num_frames=16, batch_size=1, progress=False)
