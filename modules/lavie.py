"""LaVie base text-to-video model (Wang et al. 2023, section 4.1) as a VideoGenerator.

A Stable Diffusion UNet inflated to video (`VideoUNet`), a CLIP text encoder and a frozen per-frame autoencoder;
epsilon-prediction DDPM training with LaVie's schedule (linear betas 1e-4..0.02), joint image-video fine-tuning
(L = L_video + alpha * L_image), sampling with classifier-free guidance by a named sampler (`sampler.method`: `ddpm`,
the official ancestral sampler, or `ddim`; modules/samplers/diffusion.py).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from modules.base import ProgressHook, VideoGenerator, merge_sampler_settings
from modules.components.checkpoints import load_state_dict_checked, read_state_dict
from modules.components.text_encoder import ClipTextEncoder
from modules.components.video_unet import VideoUNet
from modules.samplers.diffusion import SAMPLER_METHODS, guided_denoise, make_scheduler

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")


class PretrainedConfigError(ValueError):
    """The config asks for pretrained weights that were not given or cannot be found."""


class LaVie(VideoGenerator):
    def __init__(
        self,
        unet: VideoUNet,
        text_encoder: ClipTextEncoder,
        autoencoder: nn.Module,
        noise_schedule: dict[str, Any],
        sampler: dict[str, Any],
        optimizer: functools.partial,
        lr_scheduler: functools.partial | None = None,
        pretrained: dict[str, Any] | None = None,
        image_loss_weight: float = 1.0,
        caption_dropout: float = 0.1,
        train_text_encoder: bool = False,
        fps: int = 8,
    ):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder
        self.noise_schedule = dict(noise_schedule)
        self.sampler = dict(sampler)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.image_loss_weight = image_loss_weight
        self.caption_dropout = caption_dropout
        self.fps = fps
        self.train_scheduler = DDPMScheduler.from_config(self.noise_schedule)

        expected = self.autoencoder.latent_channels + (3 if getattr(unet, "coordinate_channels", False) else 0)
        if unet.config.in_channels != expected:
            raise ValueError(
                f"model.unet.in_channels is {unet.config.in_channels} but the autoencoder gives "
                f"{self.autoencoder.latent_channels} latent channels"
                + (" plus 3 coordinate channels" if expected != self.autoencoder.latent_channels else "")
                + f": set model.unet.in_channels={expected}"
            )
        self.autoencoder.requires_grad_(False)
        self.text_encoder.requires_grad_(train_text_encoder)

        self.check_sampler(self.sampler)
        pretrained = dict(pretrained or {})
        self.check_pretrained(pretrained)
        if pretrained.get("sd_path") or pretrained.get("checkpoint"):
            self.load_pretrained(sd_path=pretrained.get("sd_path"), checkpoint=pretrained.get("checkpoint"))

    # ------------------------------------------------------------------ weights
    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        cls.check_sampler(cfg.get("sampler") or {})
        cls.check_pretrained(cfg.get("pretrained") or {})

    @staticmethod
    def check_sampler(sampler: Any) -> None:
        method = sampler.get("method")
        if method not in SAMPLER_METHODS:
            raise ValueError(f"model.sampler.method must be one of {', '.join(SAMPLER_METHODS)}, got {method!r}")

    @staticmethod
    def check_pretrained(pretrained: Any) -> None:
        """Paper-size training starts from Stable Diffusion: refuse to run without its folder, or with paths
        that do not exist, before any weights are built."""
        sd_path, checkpoint = pretrained.get("sd_path"), pretrained.get("checkpoint")
        if pretrained.get("init_from_sd") and not sd_path:
            raise PretrainedConfigError(
                "this model is initialised from Stable Diffusion 1.4: set model.pretrained.sd_path=DIR to a local "
                "diffusers-layout folder with unet/, vae/, text_encoder/, tokenizer/ and scheduler/ "
                "(the official one is CompVis/stable-diffusion-v1-4 on the Hugging Face hub). "
                "To train a CPU-sized model from scratch instead, use experiment=tiny_lavie."
            )
        if sd_path and not Path(sd_path).is_dir():
            raise PretrainedConfigError(f"Stable Diffusion folder not found: {sd_path} (model.pretrained.sd_path)")
        if checkpoint and not Path(checkpoint).is_file():
            raise PretrainedConfigError(
                f"LaVie checkpoint not found: {checkpoint} (model.pretrained.checkpoint; the official lavie_base.pt "
                "is published with Vchitect/LaVie)"
            )

    def load_pretrained(self, sd_path: str | Path | None = None, checkpoint: str | Path | None = None) -> None:
        """Stable Diffusion 1.4 folder (diffusers layout) for all components, then optionally the official LaVie
        checkpoint (`lavie_base.pt`: a dict whose "ema" entry is the UNet state dict) for the UNet."""
        self.check_pretrained({"sd_path": sd_path, "checkpoint": checkpoint})
        if sd_path:
            sd_path = Path(sd_path)
            missing = [name for name in SD_SUBFOLDERS if not (sd_path / name).is_dir()]
            if missing:
                raise PretrainedConfigError(
                    f"{sd_path} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}/ "
                    f"(expected {', '.join(SD_SUBFOLDERS)}/ and scheduler/)"
                )
            self.unet.load_image_unet_weights(sd_path / "unet")
            self.text_encoder.load_from_sd_folder(sd_path)
            self.autoencoder.load_from_sd_folder(sd_path)
        if checkpoint:
            state = read_state_dict(checkpoint)
            if "ema" in state:
                state = state["ema"]
            elif "state_dict" in state:  # one of our Lightning checkpoints: keep the UNet part
                state = {k[len("unet."):]: v for k, v in state["state_dict"].items() if k.startswith("unet.")}
            load_state_dict_checked(self.unet, state, checkpoint)

    # ------------------------------------------------------------------ training
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(prompts)

    def _drop_captions(self, captions: list[str]) -> list[str]:
        """Replace captions by the empty prompt with probability `caption_dropout` (learns the unconditional
        prediction that classifier-free guidance needs)."""
        if not self.training or self.caption_dropout <= 0:
            return captions
        keep = torch.rand(len(captions)) >= self.caption_dropout
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        video = batch["video"]  # (B, T+M, C, H, W), M appended images
        image_captions = batch.get("image_captions") or [[] for _ in batch["caption"]]
        num_images = len(image_captions[0])
        batch_size = video.shape[0]

        prompts = [c for caption, images in zip(batch["caption"], image_captions) for c in [caption, *images]]
        context = self.encode_prompts(self._drop_captions(prompts))
        context = context.view(batch_size, 1 + num_images, *context.shape[1:])  # (B, 1+M, L, D)

        latents = self.autoencoder.encode(video)  # (B, c, T+M, h, w)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(
            0, self.train_scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=latents.device
        )
        noisy = self.train_scheduler.add_noise(latents, noise, timesteps)
        conditioning = self.training_conditioning(latents, num_images, generator)
        extra = {} if conditioning is None else {"conditioning": conditioning}
        pred = self.unet(noisy, timesteps, context, num_image_frames=num_images, **extra)
        target = self.prediction_target(latents, noise, timesteps)

        video_frames = latents.shape[2] - num_images
        losses = {"loss_video": F.mse_loss(pred[:, :, :video_frames], target[:, :, :video_frames])}
        loss = losses["loss_video"]
        if num_images:
            losses["loss_image"] = F.mse_loss(pred[:, :, video_frames:], target[:, :, video_frames:])
            loss = loss + self.image_loss_weight * losses["loss_image"]
        losses["loss"] = loss
        return losses

    def training_conditioning(self, latents: torch.Tensor, num_images: int,
                              generator: torch.Generator | None = None) -> torch.Tensor | None:
        """What conv_in's conditioning channels see for clean `latents` [B, c, T+M, h, w] (M appended images):
        nothing for the base model; the first frame for the long-video stage (modules/lavie_long.py)."""
        return None

    def prediction_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet learns to predict: the noise (LaVie), the velocity, or the clean sample, per the schedule's
        prediction_type; the sampler's scheduler reads the same setting, so training and sampling always agree."""
        kind = self.train_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.train_scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise ValueError(f"unknown noise_schedule.prediction_type {kind!r}: epsilon, v_prediction or sample")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.diffusion_loss(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["caption"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # fixed noise and timesteps per batch, so validation losses are comparable across epochs
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        losses = self.diffusion_loss(batch, generator=generator)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=len(batch["caption"]))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ sampling
    def sampler_settings(self, **overrides: Any) -> dict[str, Any]:
        return merge_sampler_settings(self.sampler, overrides)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        num_frames: int | None = None,
        seed: int | list[int] = 0,
        progress: ProgressHook | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("generate needs a non-empty list of prompts")
        settings = self.sampler_settings(**overrides)
        num_frames = self.frames_to_generate(num_frames, settings["num_frames"])
        seeds = self.seeds_for(prompts, seed)
        factor = self.autoencoder.downsample_factor
        height, width = settings["height"], settings["width"]
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        shape = (self.autoencoder.latent_channels, num_frames, height // factor, width // factor)

        # One CPU generator per video draws its initial noise and then its step noise (ancestral sampling): the same
        # seed gives the same video on any device and in any batch.
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([settings["negative_prompt"]] * len(prompts))
        latents = guided_denoise(
            lambda x, t, c: self.unet(x, t, c),
            make_scheduler(settings["method"], self.noise_schedule),
            noise,
            cond,
            uncond,
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"],
            eta=settings["eta"],
            generator=generators,
            progress=progress,
        )
        video = self.autoencoder.decode(latents).float().clamp(-1, 1)  # (B, T, C, H, W)
        return ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu()  # (B, T, H, W, 3)
