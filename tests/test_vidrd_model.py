"""VidRD as a VideoGenerator (modules/vidrd.py, configs/model/vidrd*.yaml): training lowers the loss, generate() is the
iterative sampler (`iterate_clips`) driven clip by clip with exactly F frames, bad sampler values and files are
refused before anything is built, the official ModelT2V.pth layout loads strictly (every missing or unexpected key
listed), the paper-size model builds on the meta device with the official key layouts, and sample.py writes a 64-frame
video."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from datamodules.video_io import read_video
from modules.components.checkpoints import CheckpointKeyError
from modules.components.temporal_vae import rename_deprecated_attention
from modules.lavie import PretrainedConfigError
from modules.samplers.diffusion import make_scheduler
from modules.samplers.vidrd_iterative import IterativeSettings, iterate_clips, official_clip_noise
from modules.vidrd import VidRD
from tests.hydra_compose import REPO, compose_config
from tests.vidrd_fixtures import vidrd_fixture_dir

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]
# 16x16 videos (8x8 space-to-depth latents) and two DDIM steps: the tests check the plumbing, not the quality
SMALL = ["model.sampler.height=16", "model.sampler.width=16", "model.sampler.num_inference_steps=2"]


def tiny_config(overrides: list[str] = ()):
    return compose_config("sample", ["experiment=tiny_vidrd", *SMALL, *overrides], "/unused").model


def build(overrides: list[str] = (), seed: int = 0) -> VidRD:
    torch.manual_seed(seed)
    cfg = tiny_config(overrides)
    VidRD.validate_config(cfg)
    model = instantiate(cfg, _convert_="all").eval()
    with torch.no_grad():  # zero-initialised output layers (Temp-Conv, Temp-Attn) become non-zero: they must count
        for parameter in model.unet.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def model() -> VidRD:
    return build()


# ------------------------------------------------------------------------------------------ training
def test_training_lowers_the_loss_on_a_repeated_batch():
    torch.manual_seed(0)
    model = instantiate(tiny_config(), _convert_="all")
    # two flat-coloured clips (red, blue) with a little pixel noise, each with one appended image (joint training)
    colours = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])
    video = colours[:, None, :, None, None].expand(2, 9, 3, 16, 16) + 0.1 * torch.randn(2, 9, 3, 16, 16)
    batch = {"video": video, "caption": PROMPTS, "image_captions": [["a red circle"], ["a blue square"]]}

    def held_out_loss() -> float:  # the same noise and timesteps before and after: only the weights change
        model.eval()
        with torch.no_grad():
            return sum(model.diffusion_loss(batch, torch.Generator().manual_seed(s))["loss"].item()
                       for s in range(4)) / 4

    before = held_out_loss()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for step in range(25):
        losses = model.diffusion_loss(batch)
        assert set(losses) == {"loss", "loss_video", "loss_image"} and torch.isfinite(losses["loss"])
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    after = held_out_loss()
    assert after < 0.8 * before, (before, after)


def test_training_step_logs_and_returns_the_loss(model):
    model.train()
    batch = {"video": torch.rand(1, 8, 3, 16, 16) * 2 - 1, "caption": PROMPTS[:1]}
    loss = model.training_step(batch, 0)
    model.eval()
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)


# ------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("num_frames", [1, 5, 8, 9, 17])
def test_generate_returns_exactly_the_frames_asked(model, num_frames):
    video = model.generate(PROMPTS, num_frames=num_frames, seed=3)
    assert video.shape == (2, num_frames, 16, 16, 3) and video.dtype == torch.uint8


def sampler_by_hand(model: VidRD, prompts, num_frames, seeds, **overrides) -> torch.Tensor:
    """The iterative sampler driven by hand as modules/samplers/vidrd_iterative.py documents it."""
    cfg = {**model.sampler, **overrides}
    settings = IterativeSettings(**{k: cfg[k] for k in (
        "clip_frames", "prompt_frames", "alpha", "beta", "num_inference_steps", "guidance_scale", "eta",
        "negative_prompt", "keep_prompt_frames")})
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    channels = model.autoencoder.latent_channels
    factor = model.autoencoder.downsample_factor
    shape = (len(prompts), channels, settings.clip_frames, cfg["height"] // factor, cfg["width"] // factor)
    with torch.no_grad():
        cond = model.text_encoder(prompts)
        uncond = model.text_encoder([settings.negative_prompt] * len(prompts))
        clips = iterate_clips(lambda x, t, c: model.unet(x, t, c), make_scheduler("ddim", model.noise_schedule),
                              cond, uncond, official_clip_noise(shape, settings.alpha, generators),
                              settings.clips_for(num_frames), settings, generator=generators)
        decoded = [settings.kept_frames(model.autoencoder.decode(clip), i, dim=1) for i, clip in enumerate(clips)]
    video = torch.cat(decoded, dim=1)[:, :num_frames].clamp(-1, 1)
    return ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2)


@pytest.mark.parametrize("keep_prompt_frames", [True, False])
def test_generate_is_iterate_clips_driven_by_hand(model, keep_prompt_frames):
    ours = model.generate(PROMPTS, num_frames=19, seed=[7, 11], keep_prompt_frames=keep_prompt_frames)
    reference = sampler_by_hand(model, PROMPTS, 19, [7, 11], keep_prompt_frames=keep_prompt_frames)
    assert torch.equal(ours, reference)
    # clip 1 continues clip 0 (FNR/PNS/DSG): not a fresh video
    assert not torch.equal(ours[:, 8:16], model.generate(PROMPTS, num_frames=8, seed=[7, 11]))


def test_only_one_clip_is_ever_in_the_unet_and_progress_counts_every_step(model, monkeypatch):
    frames_seen, calls = [], []
    forward = model.unet.forward
    monkeypatch.setattr(model.unet, "forward", lambda x, *a, **k: frames_seen.append(x.shape[2]) or forward(x, *a, **k))
    model.generate(PROMPTS[:1], num_frames=24, progress=lambda done, total: calls.append((done, total)))
    assert set(frames_seen) == {8} and len(frames_seen) == 3 * 2  # 3 clips x 2 steps, one guided batch per step
    assert calls == [(i, 6) for i in range(1, 7)]


def test_settings_are_the_official_ones_at_paper_size(tmp_path):
    cfg = compose_config("sample", ["model=vidrd"], tmp_path).model
    sampler = cfg.sampler
    assert (sampler.clip_frames, sampler.prompt_frames, sampler.alpha, sampler.beta) == (8, 4, 4.0, 0.4)
    assert (sampler.num_inference_steps, sampler.guidance_scale, sampler.negative_prompt) == (50, 10.0, "watermark")
    assert (sampler.height, sampler.width, sampler.method) == (256, 256, "ddim")
    assert cfg.noise_schedule.prediction_type == "epsilon"
    assert cfg.autoencoder.temporal_decoding is False and cfg.autoencoder.clip_frames == 8


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("override, message", [
    ("model.sampler.prompt_frames=8", "prompt_frames"),
    ("model.sampler.prompt_frames=9", "M >= N"),
    ("model.sampler.alpha=-0.5", "alpha"),
    ("model.sampler.beta=1.5", "beta"),
    ("model.sampler.beta=-0.1", "beta"),
    ("model.sampler.num_frames=0", "num_frames"),
    ("model.sampler.method=ddpm", "model.sampler.method"),
    ("+model.sampler.gudiance=3", "gudiance"),
])
def test_bad_sampler_values_are_refused_before_building(override, message):
    with pytest.raises(ValueError, match=message):
        VidRD.validate_config(tiny_config([override]))


@pytest.mark.parametrize("overrides, message", [
    ({"num_frames": 0}, "num_frames"), ({"num_frames": -3}, "num_frames"), ({"prompt_frames": 8}, "M >= N"),
    ({"alpha": -1.0}, "alpha"), ({"beta": 2.0}, "beta"),
])
def test_bad_values_at_generate_are_refused(model, overrides, message):
    num_frames = overrides.pop("num_frames", 8)
    with pytest.raises(ValueError, match=message):
        model.generate(PROMPTS[:1], num_frames=num_frames, **overrides)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(PretrainedConfigError, match="sd_path=DIR"):
        VidRD.validate_config(compose_config("sample", ["model=vidrd"], tmp_path).model)
    with pytest.raises(PretrainedConfigError, match="ModelT2V.pth") as error:
        VidRD.validate_config(tiny_config([f"model.pretrained.checkpoint={tmp_path / 'ModelT2V.pth'}"]))
    assert str(tmp_path / "ModelT2V.pth") in str(error.value)
    sd = tmp_path / "sd21"
    for name in ("unet", "vae", "tokenizer"):
        (sd / name).mkdir(parents=True)
    with pytest.raises(PretrainedConfigError, match="missing text_encoder/"):
        VidRD.validate_config(tiny_config([f"model.pretrained.sd_path={sd}"]))
    (sd / "text_encoder").mkdir()
    with pytest.raises(PretrainedConfigError, match=f"no weight file in {sd / 'unet'}"):
        VidRD.validate_config(tiny_config([f"model.pretrained.sd_path={sd}"]))


# ------------------------------------------------------------------------------------------ official layout
def official_file(model: VidRD, path, seed: int = 5) -> dict[str, torch.Tensor]:
    """`model`'s UNet in the official ModelT2V.pth layout ({"state_dict": {"unet.<key>": ...}}), other weights."""
    torch.manual_seed(seed)
    state = {f"unet.{k}": v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in model.unet.state_dict().items()}
    torch.save({"state_dict": state}, path)
    return state


def test_official_checkpoint_loads_strictly(model, tmp_path):
    path = tmp_path / "ModelT2V.pth"
    state = official_file(model, path)
    cfg = tiny_config([f"model.pretrained.checkpoint={path}"])
    VidRD.validate_config(cfg)
    loaded = instantiate(cfg, _convert_="all")
    ours = loaded.unet.state_dict()
    assert ours.keys() == {k[len("unet."):] for k in state}
    assert all(torch.equal(ours[k[len("unet."):]], v) for k, v in state.items())


def test_a_mismatched_checkpoint_lists_every_missing_and_unexpected_key_before_building(model, tmp_path, monkeypatch):
    path = tmp_path / "ModelT2V.pth"
    state = official_file(model, path)
    dropped = ["unet.down_blocks.1.temp_convs.0.convs.3.weight", "unet.mid_block.attentions.0.proj_in.bias"]
    for key in dropped:
        state.pop(key)
    state["unet.up_blocks.9.temp_convs.0.convs.3.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, path)
    cfg = tiny_config([f"model.pretrained.checkpoint={path}"])
    with pytest.raises(CheckpointKeyError) as error:
        VidRD.validate_config(cfg)
    message = str(error.value)
    assert str(path) in message and "missing keys: 2" in message and "unexpected keys: 1" in message
    for key in [*dropped, "unet.up_blocks.9.temp_convs.0.convs.3.weight"]:
        assert key[len("unet."):] in message
    # building the model anyway stops at the same keys
    with pytest.raises(Exception, match="missing keys: 2") as built:  # hydra wraps the model's error
        instantiate(cfg, _convert_="all")
    assert isinstance(built.value.__cause__ or built.value, CheckpointKeyError)


def test_keys_outside_unet_are_refused_and_shapes_checked(model, tmp_path):
    path = tmp_path / "ModelT2V.pth"
    state = official_file(model, path)
    torch.save({"state_dict": {**state, "text_encoder.x": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointKeyError, match=r"unexpected keys: 1 \(text_encoder.x\)"):
        VidRD.validate_config(tiny_config([f"model.pretrained.checkpoint={path}"]))
    state["unet.conv_in.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointKeyError, match=r"conv_in.weight: file \(3, 3, 3, 3\)"):
        VidRD.validate_config(tiny_config([f"model.pretrained.checkpoint={path}"]))


def test_paper_size_builds_on_meta_with_the_official_layouts(fixtures_dir, model, tmp_path):
    folder = vidrd_fixture_dir(fixtures_dir, ("keys_unet.json", "keys_vae.json"), "VidRD key layout")
    official_unet = {k: tuple(v) for k, v in json.loads((folder / "keys_unet.json").read_text()).items()}
    official_vae = {k: tuple(v) for k, v in
                    rename_deprecated_attention(json.loads((folder / "keys_vae.json").read_text())).items()}
    cfg = compose_config("sample", ["model=vidrd", "model.pretrained.init_from_sd=false"], tmp_path).model
    VidRD.validate_config(cfg)
    with torch.device("meta"):
        paper = instantiate(cfg, _convert_="all")
    assert {k: tuple(v.shape) for k, v in paper.unet.state_dict().items()} == official_unet
    assert {k: tuple(v.shape) for k, v in paper.autoencoder.vae.state_dict().items()} == official_vae
    text = paper.text_encoder.model.config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (1024, 23, 16)
    assert sum(p.numel() for p in paper.unet.parameters()) == sum(
        torch.Size(s).numel() for s in official_unet.values())
    # a checkpoint of another size is refused by comparing with the paper-size UNet built on meta, key by key
    path = tmp_path / "ModelT2V.pth"
    official_file(model, path)
    cfg.pretrained.checkpoint = str(path)
    with pytest.raises(CheckpointKeyError, match="shape mismatches") as error:
        VidRD.validate_config(cfg)
    assert "missing keys" in str(error.value) and str(path) in str(error.value)


# ------------------------------------------------------------------------------------------ entry point
def test_sample_py_writes_a_64_frame_video(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "sample.py", "experiment=tiny_vidrd", "num_frames=64", "model.sampler.num_inference_steps=2",
         "prompts=[a red circle moving left on a dark background]", f"hydra.run.dir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "samples.json").read_text())
    assert record["model"] == "modules.vidrd.VidRD" and record["videos"][0]["frames"] == 64
    assert read_video(run / record["videos"][0]["file"]).shape == (64, 32, 32, 3)
    assert record["num_frames"] == 64 and record["sampler"]["prompt_frames"] == 4


def test_long_video_benchmark_measures_vidrd(monkeypatch):
    """benchmarks/long_video.py --model vidrd: one measurement makes exactly the frames of N clips (8 per clip)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("long_video", REPO / "benchmarks" / "long_video.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "long_video", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    run = bench.one_run("vidrd", 2, 1, "cpu")
    assert run["frames"] == bench.BACKBONES["vidrd"].frames(2) == 16 and run["peak_growth_mib"] >= 0


def test_sample_py_names_the_missing_official_checkpoint_before_building(tmp_path):
    sd = tmp_path / "sd21"
    for name in ("unet", "vae", "text_encoder"):
        (sd / name).mkdir(parents=True)
        (sd / name / "model.safetensors").write_bytes(b"")
    (sd / "tokenizer").mkdir()
    (sd / "tokenizer" / "vocab.json").write_text("{}")
    missing = tmp_path / "ModelT2V.pth"
    result = subprocess.run([sys.executable, "sample.py", "model=vidrd", "prompts=[a cat]",
                             f"model.pretrained.sd_path={sd}", f"model.pretrained.checkpoint={missing}",
                             f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert f"VidRD checkpoint not found: {missing}" in result.stderr and "Traceback" not in result.stderr
