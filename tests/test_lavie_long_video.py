"""LaVie's recursive long-video stage (modules/lavie_long.py): the first frame on conv_in starting at zero (the model
is the base model until fine-tuned), the training conditioning, clip-by-clip generation of exactly F frames, weights
and configs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import modules.lavie_long as lavie_long
from modules.components.checkpoints import CheckpointKeyError
from modules.components.video_unet import config_from_lavie
from modules.lavie import LaVie, PretrainedConfigError
from modules.lavie_long import LaVieLong, clips_for, first_frame_conditioning
from tests.lavie_fixtures import FP64, fixture_tensors, frame_counts, lavie_fixture_dir
from tests.sd_layout import TINY_TEXT_ENCODER, TINY_VAE, randomize_, tiny_lavie_base_config, write_lavie_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPTS = ["a red circle moving left on a dark background", "a blue square growing on a light background"]
SIZE, CLIP = 16, 8


def model_config(name: str, **overrides):
    """configs/model/<name>.yaml as train.py composes it (its defaults list resolved)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"]).model
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


def shrink(cfg):
    """A tiny config shrunk so a denoising step takes milliseconds."""
    cfg.unet.block_out_channels = [32, 32, 64]
    cfg.text_encoder.config.num_hidden_layers = 1
    cfg.sampler.num_inference_steps = 2
    cfg.sampler.height = cfg.sampler.width = SIZE
    cfg.sampler.num_frames = CLIP
    if "clip_frames" in cfg.sampler:
        cfg.sampler.clip_frames = CLIP
    return cfg


def tiny_base() -> LaVie:
    torch.manual_seed(0)
    return randomize_(instantiate(shrink(model_config("lavie_tiny"))), seed=1).eval()


def tiny_long(**overrides) -> LaVieLong:
    torch.manual_seed(0)
    return instantiate(OmegaConf.merge(shrink(model_config("lavie_long_tiny")), OmegaConf.create(overrides)))


def write_train_checkpoint(path: Path, model: torch.nn.Module) -> Path:
    """What train.py writes (the parts init_from reads): the module's whole state dict under "state_dict"."""
    torch.save({"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def base() -> LaVie:
    return tiny_base()


@pytest.fixture(scope="module")
def long_from_base(base, tmp_path_factory) -> LaVieLong:
    """The long stage initialised from `base` the way fine-tuning starts (model.init_from)."""
    path = write_train_checkpoint(tmp_path_factory.mktemp("base") / "last.ckpt", base)
    model = tiny_long(init_from=str(path))
    model.setup("fit")
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> LaVieLong:
    """A long stage whose conditioning inputs act (random non-zero weights everywhere)."""
    return randomize_(tiny_long(), seed=2).eval()


# ------------------------------------------------------------------------------------------ the base model, unchanged
def test_init_from_a_base_run_loads_every_weight_and_zero_conditioning_inputs(base, long_from_base):
    state, original = long_from_base.state_dict(), base.state_dict()
    assert state.keys() == original.keys()
    for key, value in original.items():
        if key != "unet.conv_in.weight":
            assert torch.equal(state[key], value), key
    conv_in = state["unet.conv_in.weight"]
    channels = base.unet.conv_in.in_channels
    assert conv_in.shape[1] == channels + long_from_base.autoencoder.latent_channels
    assert torch.equal(conv_in[:, :channels], original["unet.conv_in.weight"])
    assert not conv_in[:, channels:].any()


def test_before_fine_tuning_the_unet_computes_the_base_unet_whatever_the_conditioning(base, long_from_base):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, CLIP, SIZE, SIZE, generator=g)
    t = torch.tensor([10, 700])
    context = base.encode_prompts(PROMPTS)
    with torch.no_grad():
        expected = base.unet(x, t, context)
        for conditioning in (torch.zeros_like(x), torch.randn(x.shape, generator=g)):
            torch.testing.assert_close(long_from_base.unet(x, t, context, conditioning=conditioning), expected,
                                       atol=1e-6, rtol=1e-5)


def test_before_fine_tuning_a_long_video_starts_with_the_base_models_clip(base, long_from_base):
    """Clip 1 is plain text-to-video: with the conditioning inputs at zero it is the base model's video."""
    expected = base.generate(PROMPTS, num_frames=CLIP, seed=3)
    video = long_from_base.generate(PROMPTS, num_frames=2 * CLIP, seed=3)
    assert (video[:, :CLIP].int() - expected.int()).abs().max() <= 1  # uint8 rounding of float32 sums


def test_official_base_unet_loads_strictly_widened_and_computes_the_official_outputs(fixtures_dir):
    """The official tiny base UNet's weights (`<fixtures root>/lavie/unet_base_tiny_*`) through the long stage's own
    checkpoint path: every key strictly, conv_in widened by zeros, and its outputs the official ones whatever the
    conditioning."""
    names = ("unet_base_tiny_config.json", "unet_base_tiny_weights.safetensors", "unet_base_tiny_io.safetensors")
    root = lavie_fixture_dir(fixtures_dir, names, "LaVie base UNet")
    unet = config_from_lavie(json.loads((root / names[0]).read_text()))
    components = {"unet": {**unet, "conditioning_channels": unet["in_channels"]},
                  "text_encoder": {**TINY_TEXT_ENCODER, "hidden_size": unet["cross_attention_dim"]},
                  "vae": {**TINY_VAE, "latent_channels": unet["in_channels"]}}
    cfg = tiny_lavie_base_config(components, checkpoint=root / names[1], pretrained={"init_from_sd": False})
    cfg = OmegaConf.merge(cfg, {"_target_": "modules.lavie_long.LaVieLong", "sampler": {"clip_frames": 3}})
    torch.manual_seed(0)
    model = instantiate(cfg).eval()
    weights = fixture_tensors(root / names[1])
    state = model.unet.state_dict()
    assert state.keys() == weights.keys()
    channels = weights["conv_in.weight"].shape[1]
    assert torch.equal(state["conv_in.weight"][:, :channels], weights["conv_in.weight"].float())
    assert not state["conv_in.weight"][:, channels:].any()

    io = fixture_tensors(root / names[2])
    unet64 = model.unet.double()
    for frames in frame_counts(root / names[2]):
        x = io[f"x_f{frames}"].double()
        conditioning = torch.randn(x.shape, generator=torch.Generator().manual_seed(frames), dtype=x.dtype)
        with torch.no_grad():
            out = unet64(x, io[f"timesteps_f{frames}"], io[f"encoder_hidden_states_f{frames}"].double(),
                         conditioning=conditioning)
        torch.testing.assert_close(out, io[f"out_fp64_f{frames}"].double(), **FP64)


def test_official_layout_checkpoint_loads_strictly_and_a_wrong_one_is_named(base, tmp_path):
    path = write_lavie_checkpoint(tmp_path / "lavie_base.pt", base.unet.state_dict())
    model = tiny_long(pretrained={"checkpoint": str(path)})
    assert torch.equal(model.unet.conv_in.weight[:, :3], base.unet.conv_in.weight)
    assert not model.unet.conv_in.weight[:, 3:].any()
    # a long-stage checkpoint (already widened) loads as it is
    widened = write_lavie_checkpoint(tmp_path / "long.pt", randomize_(tiny_long(), seed=5).unet.state_dict())
    again = tiny_long(pretrained={"checkpoint": str(widened)})
    assert torch.equal(again.unet.conv_in.weight, torch.load(widened)["ema"]["conv_in.weight"])
    broken = write_lavie_checkpoint(tmp_path / "broken.pt", {**base.unet.state_dict(), "extra.weight": torch.ones(1)})
    with pytest.raises(InstantiationException) as excinfo:
        tiny_long(pretrained={"checkpoint": str(broken)})
    assert isinstance(excinfo.value.__cause__, CheckpointKeyError)
    assert "broken.pt" in str(excinfo.value.__cause__) and "extra.weight" in str(excinfo.value.__cause__)


def test_missing_base_run_is_named():
    model = tiny_long(init_from="no-such-run/last.ckpt")
    with pytest.raises(PretrainedConfigError, match="model.init_from"):
        model.setup("fit")
    model.setup("validate")  # only training reads it: sampling this stage's checkpoint needs no base files


# ------------------------------------------------------------------------------------------ training
def test_training_conditioning_is_the_first_frame_at_every_position_and_zero_for_images():
    model = tiny_long(first_frame_dropout=0.0).train()
    latents = torch.randn(2, 3, CLIP + 2, SIZE, SIZE)  # 8 video frames, 2 appended images
    conditioning = model.training_conditioning(latents, num_images=2)
    for frame in range(CLIP):
        assert torch.equal(conditioning[:, :, frame], latents[:, :, 0])
    assert not conditioning[:, :, CLIP:].any()
    assert torch.equal(first_frame_conditioning(latents[:, :, :CLIP]), conditioning[:, :, :CLIP])
    dropped = tiny_long(first_frame_dropout=1.0).train()
    assert not dropped.training_conditioning(latents, num_images=2).any()


def test_conditioning_acts_once_its_weights_are_non_zero(long_from_base, trained):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, CLIP, SIZE, SIZE, generator=g)
    context = trained.encode_prompts(PROMPTS[:1])
    a, b = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    with torch.no_grad():
        assert (trained.unet(x, 500, context, conditioning=a) - trained.unet(x, 500, context, conditioning=b)
                ).abs().max() > 1e-3
    # fine-tuning starts at zero and moves the conditioning inputs: their gradient is non-zero
    model = long_from_base.train()
    try:
        model.first_frame_dropout = 0.0
        batch = {"video": torch.rand(2, CLIP, 3, SIZE, SIZE) * 2 - 1, "caption": PROMPTS}
        model.zero_grad()
        model.diffusion_loss(batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
        assert model.unet.conv_in.weight.grad[:, 3:].abs().sum() > 0
    finally:
        model.zero_grad()
        model.first_frame_dropout = 0.1
        model.eval()


# ------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize(("frames", "clips"), [(1, 1), (8, 1), (9, 2), (15, 2), (16, 3), (21, 3), (22, 3), (23, 4)])
def test_clip_count_covers_exactly_the_frames_asked(frames, clips):
    assert clips_for(frames, CLIP) == clips
    # the first clip gives CLIP frames and each next one CLIP - 1: `clips` suffice and one fewer would not
    assert CLIP + (clips - 1) * (CLIP - 1) >= frames
    assert clips == 1 or CLIP + (clips - 2) * (CLIP - 1) < frames


@pytest.mark.parametrize("frames", [1, 8, 13, 21])
def test_generate_returns_exactly_the_frames_asked(trained, frames):
    video = trained.generate(PROMPTS, num_frames=frames, seed=0)
    assert video.dtype == torch.uint8 and video.shape == (2, frames, SIZE, SIZE, 3)


def test_a_longer_video_continues_the_shorter_one_and_a_seed_is_its_video(trained):
    long = trained.generate(PROMPTS, num_frames=21, seed=4)
    assert torch.equal(trained.generate(PROMPTS, num_frames=13, seed=4), long[:, :13])
    assert torch.equal(trained.generate(PROMPTS[1:], num_frames=21, seed=[5]), long[1:])  # any batch


def test_each_clip_is_conditioned_on_the_last_frame_of_the_clip_before(trained, monkeypatch):
    """Spy on the UNet calls and the denoising loop: clip 1 sees zero conditioning, clip k+1 the last frame's latent
    of clip k at every position, and no UNet call holds more than one clip (memory flat in the number of clips)."""
    calls, results = [], []
    forward = trained.unet.forward

    def spy_unet(x, t, context, conditioning=None, **kwargs):
        calls.append((x.shape, conditioning.clone()))
        return forward(x, t, context, conditioning=conditioning, **kwargs)

    def spy_denoise(*args, **kwargs):
        results.append(lavie_long_denoise(*args, **kwargs))
        return results[-1]

    lavie_long_denoise = lavie_long.guided_denoise
    monkeypatch.setattr(trained.unet, "forward", spy_unet)
    monkeypatch.setattr(lavie_long, "guided_denoise", spy_denoise)
    video = trained.generate(PROMPTS, num_frames=21, seed=0)
    steps = trained.sampler["num_inference_steps"]
    assert len(results) == 3 and len(calls) == 3 * steps
    assert all(shape[2] == CLIP for shape, _ in calls)
    for clip in range(3):
        for _, conditioning in calls[clip * steps : (clip + 1) * steps]:
            if clip == 0:
                assert not conditioning.any()
            else:
                expected = results[clip - 1][:, :, -1:].expand(-1, -1, CLIP, -1, -1)
                assert torch.equal(conditioning, expected.repeat(2, 1, 1, 1, 1))  # both halves of guidance
    # the video: clip 1, then each continuation without its frame 0 (identity autoencoder: latents are pixels)
    kept = torch.cat([results[0], results[1][:, :, 1:], results[2][:, :, 1:]], dim=2)[:, :, :21]
    expected = ((kept.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert torch.equal(video, expected)


def test_progress_counts_every_step_of_every_clip(trained):
    seen = []
    trained.generate(PROMPTS[:1], num_frames=16, progress=lambda done, total: seen.append((done, total)))
    steps = trained.sampler["num_inference_steps"]
    assert seen == [(i, 3 * steps) for i in range(1, 3 * steps + 1)]


@pytest.mark.parametrize("frames", [0, -3, 2.5, True])
def test_a_frame_count_below_one_is_refused(trained, frames):
    with pytest.raises(ValueError, match="num_frames"):
        trained.generate(PROMPTS, num_frames=frames)


@pytest.mark.parametrize(("change", "message"), [
    ({"sampler": {"clip_frames": 1}}, "clip_frames"),
    ({"sampler": {"num_frames": 0}}, "num_frames"),
    ({"unet": {"conditioning_channels": 0}}, "conditioning_channels"),
    ({"first_frame_dropout": 1.5}, "first_frame_dropout"),
])
def test_bad_config_values_are_named(change, message):
    with pytest.raises(Exception, match=message):
        tiny_long(**change)


# ------------------------------------------------------------------------------------------ paper size
def test_paper_size_config_is_the_official_base_layout_with_a_wider_conv_in(fixtures_dir):
    """configs/model/lavie_long.yaml on the meta device: the official base UNet's keys and shapes
    (`<fixtures root>/lavie/keys_base.json`), conv_in taking the first frame's 4 latent channels as well."""
    path = fixtures_dir / "lavie" / "keys_base.json"
    if not path.is_file():
        pytest.fail(f"official key layout not found: {path}")
    official = {key: tuple(shape) for key, shape in json.loads(path.read_text()).items()}
    cfg = model_config("lavie_long", pretrained={"init_from_sd": False})
    with torch.device("meta"):
        model = instantiate(cfg)
    state = {k: tuple(v.shape) for k, v in model.unet.state_dict().items()}
    assert state.keys() == official.keys()
    out, inputs, *kernel = official["conv_in.weight"]
    assert state.pop("conv_in.weight") == (out, inputs + model.autoencoder.latent_channels, *kernel)
    assert state == {k: v for k, v in official.items() if k != "conv_in.weight"}
    assert model.sampler["clip_frames"] == model.sampler["num_frames"] - 2 * (model.sampler["clip_frames"] - 1)


# ------------------------------------------------------------------------------------------ the benchmark
def test_benchmark_measures_a_clip_count_and_keeps_other_backbones_results(tmp_path, monkeypatch):
    """benchmarks/long_video.py: one measurement runs (exactly the frames of N clips), and rewriting the results
    file for one backbone keeps another backbone's entries."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("long_video", CONFIGS.parent / "benchmarks" / "long_video.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "long_video", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    run = bench.one_run("lavie", clips=2, steps=1, device="cpu")
    assert run["frames"] == bench.BACKBONES["lavie"].frames(2) == 2 * CLIP - 1 and run["peak_growth_mib"] >= 0
    path = tmp_path / "long_video_cpu.json"
    other = {"memory_ratio_8_2": 1.5, "time_ratio_8_2": 4.2, "load_average": {"start": [1], "end": [1]},
             "runs": {"2": {**run, "clips": 2}}, "description": "other", "steps": 1, "command": "c", "wall_s": 1.0,
             "date": "d", "device_name": "cpu", "torch": "t", "threads": 1, "cpus": 2, "mem_method": "m"}
    bench.update_results(path, "vidrd", other)
    bench.update_results(path, "lavie", {**other, "memory_ratio_8_2": 1.0, "description": "lavie"})
    report = json.loads(path.read_text())
    assert report["vidrd_memory_ratio_8_2"] == 1.5 and report["lavie_memory_ratio_8_2"] == 1.0
    assert set(report["backbones"]) == {"lavie", "vidrd"} and report["device"] == "cpu"
    markdown = path.with_suffix(".md").read_text()
    assert "| lavie | 1.000 | yes" in markdown and "| vidrd | 1.500 | no" in markdown
