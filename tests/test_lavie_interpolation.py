"""LaVie's interpolation stage as a VideoGenerator: conditioning layout, respaced DDIM, training, the input videos of
`generate`, weights and configs. (Numerical parity with the official UNet: tests/test_lavie_interpolation_parity.py.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from datamodules.video_io import write_video
from modules.components.video_unet import LAVIE_INTERPOLATION_DESIGN, VideoUNet
from modules.lavie import PretrainedConfigError
from modules.lavie_interpolation import (
    LaVieInterpolation,
    check_interpolated_frames,
    copied_key_frames,
    key_frames_of,
)
from modules.samplers.diffusion import respaced_ddim_scheduler, respaced_timesteps
from tests.sd_layout import CONFIGS, TINY_UNET, randomize_, write_tiny_sd_folder

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a red circle moving left on a dark background", "a blue square growing on a light background"]
SIZE, KEYS = 16, 2  # 2 key frames -> 5 frames


def tiny_config(**overrides):
    """configs/model/lavie_interpolation_tiny.yaml, shrunk so a step takes well under a second."""
    cfg = OmegaConf.load(CONFIGS / "model" / "lavie_interpolation_tiny.yaml")
    cfg.unet.block_out_channels = [32, 32, 64]
    cfg.text_encoder.config.num_hidden_layers = 1
    cfg.sampler.num_inference_steps = 3
    cfg.sampler.height = cfg.sampler.width = SIZE
    cfg.sampler.num_frames = 4 * KEYS - 3
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


def tiny_model(randomize: bool = True, **overrides) -> LaVieInterpolation:
    torch.manual_seed(0)
    model = instantiate(tiny_config(**overrides))
    if randomize:  # conditioning inputs and temporal projections non-zero: everything acts
        randomize_(model.unet, seed=1)
    return model


@pytest.fixture(scope="module")
def model() -> LaVieInterpolation:
    return tiny_model().eval()


def clips(batch: int = 2, frames: int = 4 * KEYS - 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, SIZE, SIZE, generator=g) * 2 - 1  # (B, T, C, H, W)


def uint8_videos(batch: int = 2, frames: int = KEYS, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------ conditioning layout
def test_output_frame_j_is_conditioned_on_key_frame_j_plus_1_over_4():
    keys = torch.randn(2, 4, 16, 3, 3)  # (B, c, K, h, w): the paper's 16 key frames
    copied = copied_key_frames(keys)
    assert copied.shape == (2, 4, 61, 3, 3)
    for j in range(61):
        assert torch.equal(copied[:, :, j], keys[:, :, (j + 1) // 4]), j
    # the official sampler's construction: every key frame 4 times, first copy and last two dropped
    assert torch.equal(copied, torch.repeat_interleave(keys, 4, dim=2)[:, :, 1:-2])


def test_key_frames_of_a_base_output_or_of_a_full_rate_clip():
    assert check_interpolated_frames(61) == 16 and check_interpolated_frames(13) == 4
    for bad in (12, 4, 1, 62):
        with pytest.raises(ValueError, match="4K - 3"):
            check_interpolated_frames(bad)
    base = torch.arange(4)
    assert torch.equal(key_frames_of(base, 13), base)
    assert torch.equal(key_frames_of(torch.arange(20), 13), torch.tensor([0, 4, 8, 12]))
    with pytest.raises(ValueError, match="has 7 frames"):
        key_frames_of(torch.arange(7), 13)


# ------------------------------------------------------------------------------------------ respaced DDIM
def test_respaced_timesteps_are_improved_diffusions():
    """space_timesteps(T, "n") keeps round(i (T - 1) / (n - 1)): 0, 20, 41, ..., 999 for 50 of 1000."""
    for total, steps in ((1000, 50), (1000, 25), (1000, 7), (100, 100)):
        kept = respaced_timesteps(total, steps)
        assert kept == sorted({round(i * (total - 1) / (steps - 1)) for i in range(steps)})
        assert len(kept) == steps and kept[0] == 0 and kept[-1] == total - 1
    assert respaced_timesteps(1000, 50)[:4] == [0, 20, 41, 61]
    with pytest.raises(ValueError):
        respaced_timesteps(10, 11)


def test_respaced_ddim_steps_between_the_kept_timesteps():
    """Each step of the respaced scheduler is the DDIM update (eta 0) from abar(t_i) to abar(t_{i-1}) of the
    training schedule (1 after the last), and the model is asked about the training timestep t_i."""
    schedule = dict(OmegaConf.load(CONFIGS / "model" / "lavie_interpolation.yaml").noise_schedule)
    scheduler, timestep_map = respaced_ddim_scheduler(schedule, 50)
    abar = DDPMScheduler.from_config(schedule).alphas_cumprod.double()
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(49, -1, -1))
    assert timestep_map.tolist() == respaced_timesteps(1000, 50)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    for step in (49, 20, 0):
        a_t = abar[timestep_map[step]]
        a_prev = abar[timestep_map[step - 1]] if step else torch.tensor(1.0, dtype=torch.float64)
        clean = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        expected = a_prev.sqrt() * clean + (1 - a_prev).sqrt() * eps
        out = scheduler.step(eps.float(), step, x.float(), eta=0.0).prev_sample
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ paper size
def test_paper_size_state_dict_is_the_official_checkpoints(fixtures_dir):
    """configs/model/lavie_interpolation.yaml on the meta device: exactly the keys and shapes the official sampler
    loads strictly from lavie_interpolation.pt (`<fixtures root>/lavie/keys_interpolation.json`)."""
    path = fixtures_dir / "lavie" / "keys_interpolation.json"
    if not path.is_file():
        pytest.fail(f"official key layout not found: {path}")
    official = {key: tuple(shape) for key, shape in json.loads(path.read_text()).items()}
    cfg = OmegaConf.load(CONFIGS / "model" / "lavie_interpolation.yaml")
    cfg.pretrained.init_from_sd = False
    with torch.device("meta"):
        model = instantiate(cfg)
    state = {k: tuple(v.shape) for k, v in model.unet.state_dict().items()}
    assert state.keys() - official.keys() == set() and official.keys() - state.keys() == set()
    assert state == official
    assert sum(p.numel() for p in model.unet.parameters()) == sum(torch.Size(s).numel() for s in official.values())
    assert model.unet.design == LAVIE_INTERPOLATION_DESIGN
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not any(p.requires_grad for p in model.autoencoder.parameters())


def test_paper_size_config_refuses_to_build_without_stable_diffusion():
    cfg = OmegaConf.load(CONFIGS / "model" / "lavie_interpolation.yaml")
    with pytest.raises(PretrainedConfigError) as excinfo:
        LaVieInterpolation.validate_config(cfg)
    assert "model.pretrained.sd_path" in str(excinfo.value)
    assert "experiment=tiny_lavie_interpolation" in str(excinfo.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"sampler": {"num_frames": 12}}, "4K - 3"),
    ({"sampler": {"method": "euler"}}, "respaced_ddim"),
    ({"pretrained": {"checkpoint": "a.pt", "init_from_base": "b.pt"}}, "not both"),
    ({"pretrained": {"checkpoint": "no-such/lavie_interpolation.pt"}}, "model.pretrained.checkpoint"),
])
def test_config_errors_come_before_the_model_is_built(change, message):
    with pytest.raises(ValueError, match=message):
        LaVieInterpolation.validate_config(tiny_config(**change))


def test_stable_diffusion_weights_start_the_conditioning_inputs_at_zero(tmp_path):
    """An SD 1.4 folder (its 2D UNet has a 4-channel conv_in) loads into the 8-channel interpolation UNet: every 2D
    weight as in the file, conv_in's key-frame inputs zero, as LaVie's from_pretrained_2d initialises them."""
    configs = write_tiny_sd_folder(tmp_path / "sd")
    design = {"spatial_attention": "sparse_causal", "temporal_attention_after": "feed_forward",
              "temporal_rope": False, "temporal_position_bias": False}
    unet = VideoUNet(**configs["unet"], conditioning_channels=4, **design)
    unet.load_image_unet_weights(tmp_path / "sd" / "unet")
    weights = load_file(tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    state = unet.state_dict()
    assert {k for k in state if not VideoUNet.is_temporal_key(k)} == set(weights)
    assert state["conv_in.weight"].shape == (TINY_UNET["block_out_channels"][0], 8, 3, 3)
    assert torch.equal(state["conv_in.weight"][:, :4], weights["conv_in.weight"])
    assert not state["conv_in.weight"][:, 4:].any()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if k != "conv_in.weight")


# ------------------------------------------------------------------------------------------ training
def test_training_conditions_on_the_clips_key_frames(monkeypatch):
    model = tiny_model(caption_dropout=0.0)
    seen = {}
    forward = model.unet.forward

    def spy(sample, timestep, context, conditioning=None, **kwargs):
        seen["sample"], seen["conditioning"] = sample, conditioning
        return forward(sample, timestep, context, conditioning=conditioning, **kwargs)

    monkeypatch.setattr(model.unet, "forward", spy)
    video = clips(frames=9)  # 3 key frames: 0, 4, 8
    model.diffusion_loss({"video": video, "caption": PROMPTS}, generator=torch.Generator().manual_seed(0))
    latents = video.permute(0, 2, 1, 3, 4)  # identity autoencoder: (B, C, T, H, W)
    for j in range(9):
        assert torch.equal(seen["conditioning"][:, :, j], latents[:, :, 4 * ((j + 1) // 4)]), j
    assert seen["sample"].shape == latents.shape  # every frame is noised and denoised, key frames included


def test_training_step_learns_on_a_fixed_batch():
    model = tiny_model(randomize=False, caption_dropout=0.0).train()
    batch = {"video": clips(), "caption": PROMPTS}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - same noise and timesteps every step
    first = model.diffusion_loss(batch, generator=generator())["loss"]
    for _ in range(15):
        loss = model.diffusion_loss(batch, generator=generator())["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = model.diffusion_loss(batch, generator=generator())["loss"]
    assert torch.isfinite(first) and last < 0.7 * first


def test_training_refuses_images_and_clip_lengths_without_key_frames(model):
    with pytest.raises(ValueError, match="images_per_video=0"):
        model.diffusion_loss({"video": clips(frames=6), "caption": PROMPTS, "image_captions": [["x"], ["y"]]})
    with pytest.raises(ValueError, match="4K - 3"):
        model.diffusion_loss({"video": clips(frames=8), "caption": PROMPTS})


# ------------------------------------------------------------------------------------------ sampling
def test_interpolate_is_uint8_seeded_and_batch_independent(model):
    videos = uint8_videos()
    out = model.interpolate(PROMPTS, videos, seed=3)
    assert out.dtype == torch.uint8 and out.shape == (2, 4 * KEYS - 3, SIZE, SIZE, 3)
    assert torch.equal(out, model.interpolate(PROMPTS, videos, seed=3))
    assert torch.equal(out[1], model.interpolate(PROMPTS[1:], videos[1:], seed=4)[0])  # video i uses seed + i
    other_keys = model.interpolate(PROMPTS, uint8_videos(seed=1), seed=3)
    assert (other_keys.float() - out.float()).abs().max() > 10  # the key frames condition the output


def test_guidance_gives_both_halves_the_key_frames_and_the_model_the_kept_timesteps(model, monkeypatch):
    calls = []
    forward = model.unet.forward

    def spy(sample, timestep, context, conditioning=None, **kwargs):
        calls.append((sample.shape[0], int(timestep), conditioning))
        return forward(sample, timestep, context, conditioning=conditioning, **kwargs)

    monkeypatch.setattr(model.unet, "forward", spy)
    model.interpolate(PROMPTS, uint8_videos(), seed=0, guidance_scale=4.0, num_inference_steps=3)
    kept = respaced_timesteps(1000, 3)
    assert [t for _, t, _ in calls] == kept[::-1]
    for batch, _, conditioning in calls:
        assert batch == 2 * len(PROMPTS)  # [unconditional; conditional] in one batch
        assert torch.equal(conditioning[: len(PROMPTS)], conditioning[len(PROMPTS):])


def test_an_exact_denoiser_samples_its_clean_latents(model, monkeypatch):
    """With a UNet that knows the clean latents, DDIM (eta 0) keeps every x_t on the line sqrt(abar_t) clean +
    sqrt(1 - abar_t) noise of its first noise and ends at the clean latents: only if the UNet is asked about the
    training timesteps whose alphas the respaced scheduler steps with (a respaced step index would miss)."""
    abar = DDPMScheduler.from_config(model.noise_schedule).alphas_cumprod.double()
    clean = torch.rand(2, 3, 4 * KEYS - 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    seen = []

    def exact(sample, timestep, context, conditioning=None, **kwargs):  # v-prediction of the known clean latents
        a, target = abar[timestep], clean.repeat(sample.shape[0] // len(clean), 1, 1, 1, 1).double()
        seen.append((sample.double(), a, target))
        eps = (sample.double() - a.sqrt() * target) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * target).float()

    monkeypatch.setattr(model.unet, "forward", exact)
    out = model.interpolate_latents(PROMPTS, torch.zeros(2, 3, KEYS, SIZE, SIZE), seed=0, num_inference_steps=10)
    torch.testing.assert_close(out, clean, atol=1e-4, rtol=0)
    first, a, target = seen[0]
    noise = (first - a.sqrt() * target) / (1 - a).sqrt()
    for sample, a, target in seen:
        torch.testing.assert_close(sample, a.sqrt() * target + (1 - a).sqrt() * noise, atol=1e-4, rtol=0)


def test_generate_reads_videos_named_by_their_prompts(model, tmp_path):
    videos = uint8_videos()
    for prompt, video in zip(PROMPTS, videos):
        write_video(tmp_path / f"{prompt}.mp4", video)
    out = model.generate(PROMPTS, seed=5, input_videos=str(tmp_path))
    assert out.shape == (2, 4 * KEYS - 3, SIZE, SIZE, 3)
    from datamodules.video_io import read_video
    decoded = torch.stack([read_video(tmp_path / f"{p}.mp4") for p in PROMPTS])
    assert torch.equal(out, model.interpolate(PROMPTS, decoded, seed=5))
    with pytest.raises(ValueError, match="no video named after prompt"):
        model.generate(["a green star"], input_videos=str(tmp_path))


def test_generate_takes_each_base_video_of_a_sample_run_by_prompt_and_seed(model, tmp_path):
    """A sample.py run folder: with several videos per prompt, the one of the same seed."""
    videos = uint8_videos(batch=3)
    entries = []
    for i, (prompt, seed) in enumerate([(PROMPTS[0], 0), (PROMPTS[0], 1), (PROMPTS[1], 2)]):
        write_video(tmp_path / f"{i:03d}.mp4", videos[i])
        entries.append({"prompt": prompt, "seed": seed, "file": f"{i:03d}.mp4", "frames": KEYS})
    (tmp_path / "samples.json").write_text(json.dumps({"videos": entries}))
    from datamodules.video_io import read_video
    out = model.generate([PROMPTS[0], PROMPTS[1]], seed=[1, 7], input_videos=str(tmp_path))
    expected = model.interpolate([PROMPTS[0], PROMPTS[1]], torch.stack([read_video(tmp_path / "001.mp4"),
                                                                         read_video(tmp_path / "002.mp4")]),
                                 seed=[1, 7])
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="no video for prompt"):
        model.generate(["a green star"], input_videos=str(tmp_path))


def test_generate_from_one_file_a_full_rate_clip_and_without_input(model, tmp_path):
    clip = uint8_videos(batch=1, frames=4 * KEYS - 3)[0]  # a clip at the output frame rate: its key frames are used
    write_video(tmp_path / "clip.mp4", clip)
    out = model.generate(PROMPTS[:1], seed=0, input_videos=str(tmp_path / "clip.mp4"))
    from datamodules.video_io import read_video
    keys = read_video(tmp_path / "clip.mp4")[::4]
    assert torch.equal(out, model.interpolate(PROMPTS[:1], keys[None], seed=0))
    with pytest.raises(ValueError, match="model.sampler.input_videos"):
        model.generate(PROMPTS)


def test_sampler_settings_are_recorded_and_overridable(model):
    settings = model.sampler_settings()
    assert settings["method"] == "respaced_ddim" and settings["input_videos"] is None
    with pytest.raises(ValueError, match="unknown sampler setting"):
        model.generate(PROMPTS, input_video="x.mp4")
    with pytest.raises(InstantiationException):
        instantiate(tiny_config(unet={"conditioning_channels": 0}))
