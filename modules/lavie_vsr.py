"""LaVie's video super-resolution stage (Wang et al. 2023, section 4.3): x4 upsampling of a video, text-conditioned.

A latent diffusion upsampler built like Stable Diffusion's x4 upscaler (`StableDiffusionUpscalePipeline`): the
low-resolution frames, noised to a `noise_level` by their own DDPM schedule (`low_res_noise_schedule`, diffusers'
`add_noise`), are concatenated with the noisy latent at the latent's size, the noise level enters as a class
embedding, and the latent decodes to 4x the low-res size (the upscaler's VAE downsamples by 4, latents scaled by
0.08333). The UNet is `VSRUNet` (the official `UNet3DVSRModel`: the x4 upscaler's UNet with temporal attention,
temporal convolutions and temporal modules).

Training (`training_step`, the paper's recipe): high-resolution clips from any datamodule, their low-res version
by area downsampling, a random noise level per clip in [0, max_noise_level], the noise schedule's target (the x4
upscaler predicts v). The paper trains only the temporal layers (`train_spatial_layers: false`, the spatial ones
frozen from the upscaler); a model trained from scratch trains all.

`residual_to_bicubic` (not in LaVie, off by default; the CPU recipe turns it on): the diffusion runs on the
difference between the clip's latent and the latent of the bicubic upsampling of its (clean) low-res frames, and
sampling adds that latent back. The UNet and its inputs are unchanged; only what it denoises is. A UNet trained from
scratch otherwise spends its first thousands of steps learning to copy the low-res frames (docs/lavie.md).

Sampling: `upsample(videos, prompts)` is the API (and `sample.py ... super_resolution=...` runs it after any
generator): uint8 [B, T, H, W, 3] (or float in [0, 1]) -> uint8 [B, T, 4H, 4W, 3], in windows of
`sampler.window_frames` (8) frames, one after the other, as LaVie's `vsr/sample.py` does; each video's generator
draws, per window, the low-res noise, then the initial latent noise (then any step noise), so a seed gives the same
video in any batch. `generate` (the VideoGenerator contract) has no video to upsample and says so.

`sampler.method: posterior_mean` (not in LaVie; the official settings sample with DDIM, 50 steps) makes one UNet call
instead of a denoising loop: the model's estimate of the clean latent at the last training timestep, from pure noise.
Trained with a squared error, that estimate approximates the mean of the high-res clips given the low-res frames and
the text, the output of least expected squared error, so of highest expected PSNR; a sampler draws one clip, with
detail where the mean is smooth, and pays for every misplaced edge twice (docs/lavie.md). It is DDIM with one
`trailing` step to abar = 1 (`posterior_mean_scheduler`).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from datamodules.transforms import to_model_range, to_uint8
from modules.base import ProgressHook
from modules.components.vsr_unet import VSRUNet
from modules.lavie import LaVie, PretrainedConfigError
from modules.samplers.diffusion import SAMPLER_METHODS, guided_denoise, make_scheduler

# Not an official LaVie sampler: the model's clean-sample estimate from pure noise (see `posterior_mean_scheduler`)
POSTERIOR_MEAN = "posterior_mean"
VSR_SAMPLER_METHODS = SAMPLER_METHODS + (POSTERIOR_MEAN,)


def downsample(video: torch.Tensor, factor: int) -> torch.Tensor:
    """[..., C, H, W] -> [..., C, H/factor, W/factor] by area averaging (the degradation the tiny recipe trains
    and is measured with)."""
    if video.shape[-1] % factor or video.shape[-2] % factor:
        raise ValueError(f"frame size {tuple(video.shape[-2:])} is not a multiple of the scale {factor}")
    lead = video.shape[:-3]
    frames = F.avg_pool2d(video.reshape(-1, *video.shape[-3:]), factor)
    return frames.reshape(*lead, *frames.shape[-3:])


def bicubic_upsample(video: torch.Tensor, factor: int) -> torch.Tensor:
    """[..., C, H, W] in [-1, 1] -> [..., C, factor H, factor W], bicubic, clamped (the baseline)."""
    lead = video.shape[:-3]
    frames = F.interpolate(video.reshape(-1, *video.shape[-3:]).float(), scale_factor=factor, mode="bicubic",
                           align_corners=False).clamp(-1, 1)
    return frames.reshape(*lead, *frames.shape[-3:])


class LaVieVSR(LaVie):
    """LaVie base's text encoder, noise schedule, optimiser and checkpoint handling with the VSR UNet.

    low_res_noise_schedule  diffusers DDPMScheduler config that noises the low-res frames to `noise_level`
    scale                   upsampling factor: the autoencoder's downsampling factor (4: the x4 upscaler's VAE)
    train_spatial_layers    false: only the temporal layers train (the paper); true: all (a model from scratch)
    max_train_noise_level   training noise levels are uniform in [0, this]; None: the UNet's max_noise_level (350,
                            the x4 upscaler's)
    residual_to_bicubic     diffuse the latent minus the bicubic upsampling's latent (not in LaVie; see above)
    residual_scale          that difference times this (to about unit variance, as SD's VAE latents are scaled)
    """

    def __init__(
        self,
        unet: VSRUNet,
        text_encoder: nn.Module,
        autoencoder: nn.Module,
        noise_schedule: dict[str, Any],
        low_res_noise_schedule: dict[str, Any],
        sampler: dict[str, Any],
        optimizer: functools.partial,
        lr_scheduler: functools.partial | None = None,
        pretrained: dict[str, Any] | None = None,
        caption_dropout: float = 0.1,
        train_text_encoder: bool = False,
        train_spatial_layers: bool = False,
        scale: int = 4,
        max_train_noise_level: int | None = None,
        residual_to_bicubic: bool = False,
        residual_scale: float = 1.0,
        fps: int = 8,
    ):
        if not isinstance(unet, VSRUNet):
            raise TypeError(f"LaVieVSR needs a VSRUNet, got {type(unet).__name__}")
        if autoencoder.downsample_factor != scale:
            raise ValueError(f"the autoencoder downsamples by {autoencoder.downsample_factor}, the upsampler's scale is "
                             f"{scale}: the low-res frames are concatenated at the latent's size, so they must agree")
        super().__init__(unet, text_encoder, autoencoder, noise_schedule, sampler, optimizer, lr_scheduler,
                         pretrained, image_loss_weight=0.0, caption_dropout=caption_dropout,
                         train_text_encoder=train_text_encoder, fps=fps)
        self.check_vsr_sampler(self.sampler, unet.max_noise_level)
        self.scale = int(scale)
        if max_train_noise_level is not None and not 0 <= max_train_noise_level <= unet.max_noise_level:
            raise ValueError(f"max_train_noise_level must be in [0, {unet.max_noise_level}], got {max_train_noise_level}")
        self.max_train_noise_level = unet.max_noise_level if max_train_noise_level is None else int(max_train_noise_level)
        self.residual_to_bicubic = residual_to_bicubic
        self.residual_scale = float(residual_scale)
        self.low_res_noise_schedule = dict(low_res_noise_schedule)
        self.low_res_scheduler = DDPMScheduler.from_config(self.low_res_noise_schedule)
        self.train_spatial_layers = train_spatial_layers
        if not train_spatial_layers:
            for name, parameter in self.unet.named_parameters():
                parameter.requires_grad_(self.unet.is_temporal_key(name))

    # ------------------------------------------------------------------ weights
    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        cls.check_vsr_sampler(cfg.get("sampler") or {}, cfg.unet.get("max_noise_level", 350))

    @staticmethod
    def check_sampler(sampler: Any) -> None:
        method = sampler.get("method")
        if method not in VSR_SAMPLER_METHODS:
            raise ValueError(f"model.sampler.method must be one of {', '.join(VSR_SAMPLER_METHODS)}, got {method!r}")

    @staticmethod
    def check_vsr_sampler(sampler: Any, max_noise_level: int) -> None:
        level = sampler.get("noise_level")
        if not isinstance(level, int) or not 0 <= level <= max_noise_level:
            raise ValueError(f"model.sampler.noise_level must be an int in [0, {max_noise_level}], got {level!r}")
        window = sampler.get("window_frames")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"model.sampler.window_frames must be a positive int, got {window!r}")

    @staticmethod
    def check_pretrained(pretrained: Any) -> None:
        """Paper-size training starts from the x4 upscaler: refuse to run without its folder, or with paths that do
        not exist, before any weights are built."""
        folder, checkpoint = pretrained.get("sd_path"), pretrained.get("checkpoint")
        if pretrained.get("init_from_sd") and not folder:
            raise PretrainedConfigError(
                "this model is initialised from Stable Diffusion's x4 upscaler: set model.pretrained.sd_path=DIR to a "
                "local diffusers-layout folder with unet/, vae/, text_encoder/, tokenizer/ (the official one is "
                "stabilityai/stable-diffusion-x4-upscaler on the Hugging Face hub). To train a CPU-sized model from "
                "scratch instead, use experiment=tiny_lavie_vsr."
            )
        if folder and not Path(folder).is_dir():
            raise PretrainedConfigError(f"x4 upscaler folder not found: {folder} (model.pretrained.sd_path)")
        if checkpoint and not Path(checkpoint).is_file():
            raise PretrainedConfigError(
                f"LaVie VSR checkpoint not found: {checkpoint} (model.pretrained.checkpoint; the official lavie_vsr.pt "
                "is published with Vchitect/LaVie)"
            )

    # ------------------------------------------------------------------ training
    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        video = batch["video"]  # (B, T, C, H, W) high resolution
        if batch.get("image_captions") and len(batch["image_captions"][0]):
            raise ValueError("the VSR stage trains on videos only (the paper turns images into clips); "
                             "set data.images_per_video=0")
        batch_size = video.shape[0]
        context = self.encode_prompts(self._drop_captions(list(batch["caption"])))
        low_res = downsample(video, self.scale)  # (B, T, C, h, w)
        latents = self.to_diffusion_latents(self.autoencoder.encode(video), low_res)  # (B, c, T, h, w)
        low_res = low_res.transpose(1, 2)  # (B, C, T, h, w)

        def randn(shape: torch.Size) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=video.device, dtype=video.dtype)

        noise_level = torch.randint(0, self.max_train_noise_level + 1, (batch_size,), generator=generator,
                                    device=video.device)
        noisy_low_res = self.low_res_scheduler.add_noise(low_res, randn(low_res.shape), noise_level)
        noise = randn(latents.shape)
        timesteps = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (batch_size,),
                                  generator=generator, device=video.device)
        noisy = self.train_scheduler.add_noise(latents, noise, timesteps)
        pred = self.unet(noisy, timesteps, noisy_low_res, context, noise_level)
        loss = F.mse_loss(pred, self.prediction_target(latents, noise, timesteps))
        return {"loss_video": loss, "loss": loss}

    # ------------------------------------------------------------------ sampling
    def generate(self, prompts: list[str], num_frames: int | None = None, seed: int | list[int] = 0,
                 progress: ProgressHook | None = None, **overrides: Any) -> torch.Tensor:
        raise ValueError(
            "the super-resolution stage upsamples a video, it does not make one from text: call "
            "upsample(videos, prompts), or run it after a generator with "
            "`python sample.py <generator options> super_resolution=<VSR config or checkpoint>`"
        )

    @torch.no_grad()
    def upsample(self, videos: torch.Tensor, prompts: list[str], seed: int | list[int] = 0,
                 progress: ProgressHook | None = None, **overrides: Any) -> torch.Tensor:
        """videos uint8 [B, T, H, W, 3] (a generator's output) or float in [0, 1] -> uint8 [B, T, sH, sW, 3],
        s = `scale`. Windows of `window_frames` frames are upsampled one after another; `progress(done, total)`
        counts denoising steps over all windows."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("upsample needs a non-empty list of prompts, one per video")
        if videos.ndim != 5 or videos.shape[-1] != 3 or videos.shape[0] != len(prompts):
            raise ValueError(f"videos must be [B, T, H, W, 3] with one video per prompt, got {tuple(videos.shape)} "
                             f"for {len(prompts)} prompts")
        if videos.dtype == torch.uint8:
            low_res = to_model_range(videos)
        elif videos.is_floating_point():
            low_res = videos.float().movedim(-1, -3) * 2 - 1
        else:
            raise ValueError(f"videos must be uint8 or float in [0, 1], got {videos.dtype}")
        settings = self.sampler_settings(**overrides)
        self.check_sampler(settings)
        self.check_vsr_sampler(settings, self.unet.max_noise_level)
        seeds = self.seeds_for(prompts, seed)
        low_res = low_res.transpose(1, 2).to(self.device, self.dtype)  # (B, C, T, h, w)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([settings["negative_prompt"]] * len(prompts))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        frames, window = low_res.shape[2], settings["window_frames"]
        starts = list(range(0, frames, window))
        steps = settings["num_inference_steps"]

        out = []
        for k, start in enumerate(starts):
            def window_progress(done: int, total: int, k: int = k) -> None:
                if progress is not None:
                    progress(k * total + done, total * len(starts))

            frames = low_res[:, :, start:start + window]
            latents = self.upsample_latents(frames, cond, uncond, generators, settings, window_progress)
            latents = self.from_diffusion_latents(latents, frames.transpose(1, 2))
            out.append(self.autoencoder.decode(latents).float().clamp(-1, 1))  # (B, t, C, sh, sw)
        return to_uint8(torch.cat(out, dim=1))

    def to_diffusion_latents(self, latents: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        """What the diffusion runs on: the autoencoder's latents (LaVie) or, with `residual_to_bicubic`, their
        difference to the latents of the bicubic upsampling of the low-res frames (B, T, C, h, w), scaled."""
        if not self.residual_to_bicubic:
            return latents
        return (latents - self._bicubic_latents(low_res)) * self.residual_scale

    def from_diffusion_latents(self, latents: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        if not self.residual_to_bicubic:
            return latents
        return latents / self.residual_scale + self._bicubic_latents(low_res)

    def _bicubic_latents(self, low_res: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(bicubic_upsample(low_res, self.scale).to(low_res.dtype))

    def upsample_latents(self, low_res: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                         generators: list[torch.Generator], settings: dict[str, Any],
                         progress: ProgressHook | None = None) -> torch.Tensor:
        """One window: low-res frames (B, C, t, h, w) in [-1, 1] -> latents (B, c, t, h, w), the x4 upscaler's
        sampling: the frames noised to `noise_level`, both halves of the guided batch see them (only the text
        differs), the noise level as the UNet's class label."""
        batch = low_res.shape[0]

        def draw(shape: tuple[int, ...]) -> torch.Tensor:  # each video's own generator: batch-independent
            return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)

        level = torch.full((batch,), settings["noise_level"], dtype=torch.long, device=self.device)
        noisy_low_res = self.low_res_scheduler.add_noise(low_res, draw(low_res.shape[1:]), level)
        noise = draw((self.autoencoder.latent_channels, *low_res.shape[2:]))

        def denoiser(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            copies = x.shape[0] // batch  # 2 with guidance: [uncond; cond]
            return self.unet(x, t, noisy_low_res.repeat(copies, 1, 1, 1, 1), context, level.repeat(copies))

        if settings["method"] == POSTERIOR_MEAN:
            scheduler, steps = posterior_mean_scheduler(self.noise_schedule), 1
        else:
            scheduler, steps = make_scheduler(settings["method"], self.noise_schedule), settings["num_inference_steps"]
        return guided_denoise(
            denoiser, scheduler, noise, cond, uncond, num_inference_steps=steps,
            guidance_scale=settings["guidance_scale"], eta=settings["eta"], generator=generators, progress=progress,
        )


def posterior_mean_scheduler(noise_schedule: dict[str, Any]) -> DDIMScheduler:
    """The `posterior_mean` sampler: DDIM whose single step (`trailing` spacing) calls the model at the last training
    timestep, where the latent is pure noise (abar 4e-5 on the linear betas), and steps to abar = 1
    (`set_alpha_to_one`), so its output is the model's clean-sample estimate whatever its prediction_type."""
    return DDIMScheduler.from_config({**noise_schedule, "timestep_spacing": "trailing", "set_alpha_to_one": True})
