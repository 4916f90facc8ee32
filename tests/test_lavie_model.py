"""LaVie as a VideoGenerator: training objective, joint image-video loss, sampling contract."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from hydra.utils import instantiate
from omegaconf import OmegaConf

from modules.lavie import LaVie

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_lavie(**overrides) -> LaVie:
    """The tiny_lavie model config, shrunk further so a test step takes well under a second."""
    cfg = OmegaConf.load(CONFIGS / "model" / "lavie_tiny.yaml")
    cfg.unet.block_out_channels = [32, 32, 64]
    cfg.unet.attention_head_dim = [1, 1, 2]
    cfg.text_encoder.config.num_hidden_layers = 1
    cfg.sampler.num_inference_steps = 3
    cfg.sampler.height = cfg.sampler.width = 16
    cfg.sampler.num_frames = 4
    cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    torch.manual_seed(0)
    return instantiate(cfg)


@pytest.fixture(scope="module")
def model() -> LaVie:
    return tiny_lavie().eval()


def video_batch(batch=2, frames=4, size=16, images=0):
    batch_dict = {
        "video": torch.rand(batch, frames + images, 3, size, size) * 2 - 1,
        "caption": ["a red circle moving left on a dark background", "a blue square growing on a light background"][:batch],
    }
    if images:
        batch_dict["image_captions"] = [[f"image {b} {m}" for m in range(images)] for b in range(batch)]
    return batch_dict


def test_training_step_learns_on_a_fixed_batch():
    model = tiny_lavie(caption_dropout=0.0).train()
    batch = video_batch()
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


def test_text_encoder_trains_only_when_configured():
    assert all(p.requires_grad for p in tiny_lavie(train_text_encoder=True).text_encoder.parameters())
    frozen = tiny_lavie(train_text_encoder=False)
    assert not any(p.requires_grad for p in frozen.text_encoder.parameters())
    trainable = {id(p) for group in frozen.configure_optimizers().param_groups for p in group["params"]}
    assert trainable == {id(p) for p in frozen.unet.parameters()}


@pytest.mark.parametrize("exact", ["video", "images"])
def test_joint_loss_scores_video_frames_and_image_frames_separately(monkeypatch, exact):
    """A UNet that predicts the target exactly on one part of the frame axis and with a known error (0.5 per
    value, so an MSE of 0.25) on the other: each loss term must see only its own frames, and the total must
    weight the image term. Swapping the video and image slices would give the other case's numbers."""
    weight, frames, images = 0.3, 4, 2
    model = tiny_lavie(image_loss_weight=weight, noise_schedule={"prediction_type": "sample"}).train()
    batch = video_batch(frames=frames, images=images)
    target = model.autoencoder.encode(batch["video"])  # "sample" prediction: the target is the clean latent

    def fake_unet(sample, timestep, context, num_image_frames=0):
        prediction = target.clone()  # (B, C, T+M, H, W)
        wrong = slice(frames, None) if exact == "video" else slice(0, frames)
        prediction[:, :, wrong] += 0.5
        return prediction

    monkeypatch.setattr(model.unet, "forward", fake_unet)
    losses = model.diffusion_loss(batch)
    expected_video, expected_image = (0.0, 0.25) if exact == "video" else (0.25, 0.0)
    torch.testing.assert_close(losses["loss_video"], torch.tensor(expected_video))
    torch.testing.assert_close(losses["loss_image"], torch.tensor(expected_image))
    torch.testing.assert_close(losses["loss"], torch.tensor(expected_video + weight * expected_image))


def test_image_frames_get_their_own_captions(monkeypatch):
    model = tiny_lavie(caption_dropout=0.0).train()
    seen = {}

    def fake_unet(sample, timestep, context, num_image_frames=0):
        seen.update(context=context, num_image_frames=num_image_frames)
        return torch.zeros_like(sample)

    monkeypatch.setattr(model.unet, "forward", fake_unet)
    batch = video_batch(images=2)
    model.diffusion_loss(batch)
    assert seen["num_image_frames"] == 2
    context = seen["context"]  # (B, 1+M, L, D): video caption, then each image's own caption
    assert context.shape[:2] == (2, 3)
    torch.testing.assert_close(context[1, 2], model.encode_prompts([batch["image_captions"][1][1]])[0])
    torch.testing.assert_close(context[0, 0], model.encode_prompts([batch["caption"][0]])[0])


def test_generate_is_uint8_and_bit_identical_for_a_seed(model):
    prompts = ["a red circle moving left on a dark background", "a green star"]
    first = model.generate(prompts, seed=7)
    second = model.generate(prompts, seed=7)
    assert first.dtype == torch.uint8 and first.shape == (2, 4, 16, 16, 3)
    assert torch.equal(first, second)
    # seed 7 for a batch means seeds 7, 8: the second video alone with seed 8 is the same video
    alone = model.generate(prompts[1:], seed=8)
    assert torch.equal(alone[0], first[1])
    assert not torch.equal(model.generate(prompts, seed=8), first)


def test_generate_overrides_and_num_frames(model):
    video = model.generate(["a red circle"], num_frames=6, seed=0, height=24, width=16, num_inference_steps=2)
    assert video.shape == (1, 6, 24, 16, 3)
    assert model.sampler_settings(guidance_scale=1.0)["guidance_scale"] == 1.0
    assert model.sampler["guidance_scale"] != 1.0  # per-call overrides do not stick


@pytest.mark.parametrize("prompts", [[], "a single string"])
def test_generate_rejects_bad_prompt_lists(model, prompts):
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        model.generate(prompts)


def test_generate_rejects_unknown_sampler_settings(model):
    with pytest.raises(ValueError, match="unknown sampler setting"):
        model.generate(["a red circle"], guidance=3.0)
    with pytest.raises(ValueError, match="unknown sampler method 'euler'"):
        model.generate(["a red circle"], method="euler")


def test_both_named_samplers_generate_the_same_video_for_a_seed(model):
    """DDPM draws fresh noise at every step from each video's own generator: the same seed gives the same video, in
    any batch; DDIM (eta 0) and DDPM start from the same noise and end in different videos."""
    prompts = ["a red circle moving left on a dark background", "a green star"]
    assert model.sampler["method"] == "ddim"  # the CPU recipe's (configs/model/lavie_tiny.yaml)
    ddpm = model.generate(prompts, seed=3, method="ddpm")
    assert torch.equal(model.generate(prompts, seed=3, method="ddpm"), ddpm)
    assert torch.equal(model.generate(prompts[1:], seed=4, method="ddpm")[0], ddpm[1])
    assert not torch.equal(model.generate(prompts, seed=3, method="ddim"), ddpm)


@pytest.mark.parametrize("sampler, message", [
    ({"method": "euler"}, "model.sampler.method must be one of ddpm, ddim, got 'euler'"),
    ({"method": None}, "model.sampler.method must be one of ddpm, ddim, got None"),
])
def test_sampler_method_is_checked_before_the_model_is_built(sampler, message):
    cfg = OmegaConf.load(CONFIGS / "model" / "lavie_tiny.yaml")
    cfg.sampler = OmegaConf.merge(cfg.sampler, sampler)
    with pytest.raises(ValueError, match=message):
        LaVie.validate_config(cfg)


def test_generate_rejects_seed_count_mismatch(model):
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        model.generate(["a red circle"], seed=[1, 2])


def test_noise_schedule_is_lavies():
    cfg = OmegaConf.load(CONFIGS / "model" / "lavie_base.yaml")
    model_schedule = OmegaConf.to_container(cfg.noise_schedule)
    ddim = DDIMScheduler.from_config(model_schedule)
    assert ddim.config.beta_schedule == "linear"
    assert ddim.betas[0].item() == pytest.approx(1e-4) and ddim.betas[-1].item() == pytest.approx(0.02)
    assert ddim.config.prediction_type == "epsilon"
    ddim.set_timesteps(50)
    # 50 DDIM steps over 1000 training steps with SD's steps_offset=1: 981, 961, ..., 1
    assert ddim.timesteps.tolist() == list(range(981, 0, -20))
    assert cfg.sampler.num_inference_steps == 50 and cfg.sampler.guidance_scale == 7.0  # official base/configs/sample.yaml
    # the official sampler (LaVie's base/configs/sample.yaml: sample_method 'ddpm', 50 steps)
    assert cfg.sampler.method == "ddpm" and cfg.sampler.eta == 0
    assert (cfg.sampler.num_frames, cfg.sampler.height, cfg.sampler.width) == (16, 320, 512)
    assert cfg.autoencoder.scaling_factor == 0.18215 and cfg.fps == 8


def test_classifier_free_guidance_combines_conditional_and_unconditional(model):
    """guidance 1 uses only the conditional branch; other scales extrapolate from the unconditional one."""
    from modules.samplers.diffusion import guided_denoise

    calls = []

    def denoiser(x, t, context):
        calls.append(x.shape[0])
        return context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1).expand_as(x).clone()

    noise = torch.randn(1, 3, 2, 4, 4)
    cond, uncond = torch.full((1, 5, 8), 1.0), torch.full((1, 5, 8), 0.5)
    scheduler = lambda: DDIMScheduler.from_config(model.noise_schedule)  # noqa: E731
    plain = guided_denoise(denoiser, scheduler(), noise, cond, uncond, num_inference_steps=1, guidance_scale=1.0)
    assert calls == [1]
    guided = guided_denoise(denoiser, scheduler(), noise, cond, uncond, num_inference_steps=1, guidance_scale=3.0)
    assert calls == [1, 2]
    # eps = 0.5 + 3 * (1.0 - 0.5) = 2.0 vs eps = 1.0: a different, deterministic result
    expected = guided_denoise(lambda x, t, c: torch.full_like(x, 2.0), scheduler(), noise, cond, None, 1, 1.0)
    torch.testing.assert_close(guided, expected)
    assert not torch.allclose(plain, guided)


def test_text_context_length_is_configurable(model):
    """The tiny model conditions on `max_length` token positions (SD uses 77); prompts are padded/truncated."""
    context = model.encode_prompts(["a red circle", "a blue square " * 30])
    assert context.shape == (2, model.text_encoder.max_length, model.text_encoder.dim)
    assert model.text_encoder.max_length < 77


@pytest.mark.parametrize("max_length", [1, 78])
def test_text_context_length_is_checked(max_length):
    from modules.components.text_encoder import ClipTextEncoder

    config = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "lavie_tiny.yaml").text_encoder.config)
    with pytest.raises(ValueError, match="max_length must be in 2..77"):
        ClipTextEncoder(config, max_length=max_length)


@pytest.mark.parametrize("unet, message", [
    ({"in_channels": 6}, "model.unet.in_channels=3"),
    ({"coordinate_channels": True}, "plus 3 coordinate channels: set model.unet.in_channels=6"),
])
def test_unet_input_channels_must_match_the_latents(unet, message):
    with pytest.raises(Exception) as raised:  # Hydra wraps the model's ValueError in an InstantiationException
        tiny_lavie(unet=unet)
    error = raised.value if isinstance(raised.value, ValueError) else raised.value.__cause__
    assert isinstance(error, ValueError) and message in str(error)


def test_coordinate_channels_train_and_sample():
    model = tiny_lavie(unet={"coordinate_channels": True, "in_channels": 6})
    batch = video_batch(images=2)
    model.diffusion_loss(batch)["loss"].backward()
    assert model.unet.conv_in.weight.grad[:, 3:].abs().sum() > 0  # the coordinate channels feed the first layer
    assert model.eval().generate(["a red circle"], seed=0).shape == (1, 4, 16, 16, 3)
