"""LaVie's super-resolution stage: training step, frozen spatial layers, windowed seeded upsampling, the
super_resolution post-process's builder, and the tiny recipe's config. Tiny models, seconds."""
from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from modules.components.vsr_unet import TemporalModule, VSRUNet
from modules.lavie_vsr import LaVieVSR, bicubic_upsample, downsample
from tests.hydra_compose import compose_config
from tests.sd_layout import CONFIGS
from utils.super_resolution import build_super_resolution, super_resolution_config

pytestmark = pytest.mark.usefixtures("single_thread")

# configs/model/lavie_vsr_tiny.yaml at two levels of 32 channels, one step, DDIM
SMALL_UNET = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": [True, False],
    "block_out_channels": [32, 32],
    "attention_head_dim": [1, 1],
    "down_temporal_idx": [0, 1],
    "up_temporal_idx": [0, 1],
}


def small_config(**overrides) -> OmegaConf:
    cfg = OmegaConf.load(CONFIGS / "model" / "lavie_vsr_tiny.yaml")
    cfg.unet = OmegaConf.merge(cfg.unet, SMALL_UNET)
    cfg.sampler.method = "ddim"  # the denoising loop (the recipe's posterior_mean has its own test)
    cfg.sampler.num_inference_steps = 2
    cfg.sampler.window_frames = 3
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


@pytest.fixture(scope="module")
def model() -> LaVieVSR:
    torch.manual_seed(0)
    vsr = instantiate(small_config()).eval()
    torch.nn.init.normal_(vsr.unet.conv_in.weight, std=0.1)  # the low-res inputs start at zero: let them count
    return vsr


def clips(batch: int = 2, frames: int = 4, size: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, frames, 3, size, size) * 2 - 1


def test_training_step_learns_every_layer_from_scratch(model):
    trained = copy.deepcopy(model).train()
    loss = trained.diffusion_loss({"video": clips(), "caption": ["a red circle", "a blue square"]})["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert trained.unet.conv_in.weight.grad is not None  # spatial layers train in the tiny recipe
    assert trained.unet.down_temporal_blocks[0].resblocks_3d_t.conv1.weight.grad is not None


def test_paper_recipe_trains_only_the_temporal_layers():
    """train_spatial_layers false (the paper): exactly the keys naming 'temporal' are trainable, as the official
    from_pretrained_2d marks the new layers."""
    vsr = instantiate(small_config(train_spatial_layers=False))
    trainable = {n for n, p in vsr.unet.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in vsr.unet.named_parameters() if "temporal" in n}
    assert any(".attn_temporal." in n for n in trainable) and any("resblock_temporal" in n for n in trainable)
    assert not vsr.unet.conv_in.weight.requires_grad


def test_upsample_is_x4_in_windows_seeded_and_batch_independent(model):
    low = ((clips(2, 5, 8) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2)  # (B, T, H, W, 3)
    prompts = ["a red circle", "a blue square"]
    steps = []
    out = model.upsample(low, prompts, seed=[3, 4], progress=lambda done, total: steps.append((done, total)))
    assert out.shape == (2, 5, 32, 32, 3) and out.dtype == torch.uint8
    assert steps[-1] == (4, 4)  # 2 windows (3 + 2 frames) of 2 steps
    alone = model.upsample(low[1:], prompts[1:], seed=4)
    # the same noise; batched kernels may round a float differently, which moves a pixel by at most one level
    assert (alone[0].int() - out[1].int()).abs().max() <= 1
    # float input in [0, 1] is the same video
    assert (model.upsample(low.float() / 255, prompts, seed=[3, 4]).int() - out.int()).abs().max() <= 1
    # the second window is upsampled on its own: changing the first window's frames leaves it as it was
    changed = low.clone()
    changed[:, :3] = 255 - changed[:, :3]
    again = model.upsample(changed, prompts, seed=[3, 4])
    assert not torch.equal(again[:, :3], out[:, :3])
    assert torch.equal(again[:, 3:], out[:, 3:])


def test_upsample_and_generate_errors(model):
    low = torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="noise_level"):
        model.upsample(low, ["x"], noise_level=351)
    with pytest.raises(ValueError, match="one video per prompt"):
        model.upsample(low, ["x", "y"])
    with pytest.raises(ValueError, match="super_resolution="):
        model.generate(["x"])


def test_a_deep_copy_runs_its_own_temporal_modules(model):
    """The temporal modules run from forward hooks: a copy (EMA, the parity tests' dtype casts) must use its own."""
    unet = copy.deepcopy(model.unet)
    inputs = (torch.randn(1, 48, 2, 8, 8), torch.tensor([10]), torch.randn(1, 3, 2, 8, 8), torch.randn(1, 5, 64),
              torch.tensor([20]))
    with torch.no_grad():
        before = model.unet(*inputs)
        for module in unet.modules():
            if isinstance(module, TemporalModule):
                torch.nn.init.normal_(module.shift_conv.weight)
        assert not torch.allclose(unet(*inputs), before)
        assert torch.equal(model.unet(*inputs), before)


def test_unet_checks_its_inputs(model):
    x, low = torch.randn(1, 48, 2, 8, 8), torch.randn(1, 3, 2, 8, 8)
    with pytest.raises(ValueError, match="noise_level"):
        model.unet(x, 1, low, torch.randn(1, 5, 64), 400)
    with pytest.raises(ValueError, match="low_res"):
        model.unet(x, 1, low[:, :, :1], torch.randn(1, 5, 64), 0)
    with pytest.raises(ValueError, match="num_class_embeds"):
        VSRUNet(**{**OmegaConf.to_container(small_config().unet), "num_class_embeds": None, "_target_": None,
                   "_convert_": None})


def test_downsample_and_bicubic_baseline():
    video = clips(1, 2, 16)
    low = downsample(video, 4)
    assert low.shape == (1, 2, 3, 4, 4)
    torch.testing.assert_close(low[0, 0, 0, 0, 0], video[0, 0, 0, :4, :4].mean())
    assert bicubic_upsample(low, 4).shape == video.shape
    with pytest.raises(ValueError, match="multiple"):
        downsample(clips(1, 1, 10), 4)


def test_super_resolution_builder_reads_names_and_yaml(tmp_path):
    cfg, checkpoint = super_resolution_config("lavie_vsr_tiny")
    assert cfg._target_ == "modules.lavie_vsr.LaVieVSR" and checkpoint is None
    path = tmp_path / "vsr.yaml"
    OmegaConf.save(small_config(), path)
    assert isinstance(build_super_resolution(str(path), device="cpu"), LaVieVSR)
    with pytest.raises(ValueError, match="not a super-resolution stage"):
        build_super_resolution("lavie_tiny", device="cpu")
    with pytest.raises(FileNotFoundError):
        build_super_resolution(str(tmp_path / "missing.ckpt"))


def test_tiny_recipe_composes_on_the_synthetic_dataset(tmp_path):
    cfg = compose_config("train", ["experiment=tiny_lavie_vsr"], tmp_path)
    assert cfg.model._target_ == "modules.lavie_vsr.LaVieVSR"
    assert list(cfg.data.resolution) == [128, 128] and cfg.data.images_per_video == 0
    assert cfg.model.autoencoder.factor == cfg.model.scale == 4  # latent at the low-res size, as the x4 VAE's
    assert cfg.model.sampler.window_frames == 8


def test_the_2d_upscaler_unet_loads_with_only_the_temporal_layers_new(tmp_path):
    """The spatial layers come from the 2D x4 upscaler UNet (a diffusers unet/ folder, 7 input channels): every one
    of its keys loads, and only the layers naming 'temporal' are missing (official `from_pretrained_2d`)."""
    from diffusers import UNet2DConditionModel

    arguments = {k: v for k, v in OmegaConf.to_container(small_config().unet).items() if not k.startswith("_")}
    vsr_only = ("low_res_channels", "max_noise_level", "down_temporal_idx", "up_temporal_idx", "mid_temporal")
    image = {k: v for k, v in arguments.items() if k not in vsr_only}
    image["in_channels"] = arguments["in_channels"] + arguments["low_res_channels"]
    torch.manual_seed(2)
    UNet2DConditionModel(**image).save_pretrained(tmp_path / "unet")
    reference = UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict()
    unet = VSRUNet(**arguments)
    unet.load_image_unet_weights(tmp_path / "unet")
    state = unet.state_dict()
    assert {k for k in state if k not in reference} == {k for k in state if "temporal" in k}
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def test_paper_size_config_refuses_to_build_without_the_upscaler():
    from modules.lavie import PretrainedConfigError

    with pytest.raises(PretrainedConfigError, match="x4 upscaler"):
        LaVieVSR.validate_config(OmegaConf.load(CONFIGS / "model" / "lavie_vsr.yaml"))


def test_residual_to_bicubic_round_trips_and_starts_from_bicubic():
    """The tiny recipe's option: the diffusion runs on (latent - bicubic latent) * residual_scale; adding it back
    gives the latent, and a zero residual decodes to the bicubic upsampling."""
    vsr = instantiate(small_config(residual_to_bicubic=True, residual_scale=12.0))
    video = clips(1, 2, 32)
    low = downsample(video, 4)
    latents = vsr.autoencoder.encode(video)
    residual = vsr.to_diffusion_latents(latents, low)
    torch.testing.assert_close(vsr.from_diffusion_latents(residual, low), latents)
    zero = vsr.from_diffusion_latents(torch.zeros_like(residual), low)
    torch.testing.assert_close(vsr.autoencoder.decode(zero), bicubic_upsample(low, 4))


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])  # the tiny recipe's, the x4 upscaler's
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_posterior_mean_is_the_clean_estimate_from_pure_noise(model, prediction_type, guidance_scale):
    """sampler.method posterior_mean: one UNet call at the last training timestep on the window's initial noise,
    converted to the clean latent by hand here (x0 = sqrt(abar) x - sqrt(1 - abar) v for v-prediction), guided as
    the other samplers are; the same low-res noise and initial noise as a DDIM run with that seed."""
    from diffusers import DDPMScheduler

    vsr = copy.deepcopy(model)
    vsr.noise_schedule = {**vsr.noise_schedule, "prediction_type": prediction_type}
    low = clips(2, 3, 8).transpose(1, 2)  # (B, C, T, h, w)
    cond, uncond = vsr.encode_prompts(["a red circle", "a blue square"]), vsr.encode_prompts(["", ""])
    settings = vsr.sampler_settings(method="posterior_mean", guidance_scale=guidance_scale)
    calls = []
    with torch.no_grad():
        out = vsr.upsample_latents(low, cond, uncond, [torch.Generator().manual_seed(s) for s in (3, 4)], settings,
                                   progress=lambda done, total: calls.append((done, total)))
        generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
        low_noise = torch.stack([torch.randn(low.shape[1:], generator=g) for g in generators])
        noise = torch.stack([torch.randn(48, *low.shape[2:], generator=g) for g in generators])
        level = torch.full((2,), settings["noise_level"])
        noisy_low = vsr.low_res_scheduler.add_noise(low, low_noise, level)
        last = vsr.train_scheduler.config.num_train_timesteps - 1
        pred = vsr.unet(noise, torch.tensor(last), noisy_low, cond, level)
        if guidance_scale != 1.0:
            unguided = vsr.unet(noise, torch.tensor(last), noisy_low, uncond, level)
            pred = unguided + guidance_scale * (pred - unguided)
    abar = DDPMScheduler.from_config(vsr.noise_schedule).alphas_cumprod[last]
    expected = pred if prediction_type == "sample" else abar.sqrt() * noise - (1 - abar).sqrt() * pred
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert calls == [(1, 1)]  # one model call per window, whatever num_inference_steps says
    # not what a one-step DDIM of the schedule's own spacing gives (it calls the model at t = 1, on the noise)
    ddim = vsr.upsample_latents(low, cond, uncond, [torch.Generator().manual_seed(s) for s in (3, 4)],
                                {**settings, "method": "ddim", "num_inference_steps": 1})
    assert not torch.allclose(ddim, out, atol=1e-3)


def test_sampler_methods_of_the_recipes():
    """The paper-size config keeps LaVie's DDIM; the tiny recipe measures with posterior_mean (docs/lavie.md);
    a method that does not exist is named in the error with the ones that do."""
    assert OmegaConf.load(CONFIGS / "model" / "lavie_vsr.yaml").sampler.method == "ddim"
    assert OmegaConf.load(CONFIGS / "model" / "lavie_vsr_tiny.yaml").sampler.method == "posterior_mean"
    with pytest.raises(ValueError, match="posterior_mean"):
        LaVieVSR.check_sampler({"method": "mean"})
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="sampler.method must be one of .*posterior_mean"):
        instantiate(small_config(sampler={"method": "mean"}))
