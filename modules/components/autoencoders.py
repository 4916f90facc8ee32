"""Frame autoencoders that map videos [B, T, C, H, W] in [-1, 1] to diffusion latents [B, c, T, h, w] and back.

`KLAutoencoder` is diffusers' `AutoencoderKL` (Stable Diffusion's VAE, frozen, latents scaled by 0.18215) applied
per frame. `IdentityAutoencoder` lets CPU-sized recipes diffuse directly in pixel space with the same model code;
`SpaceToDepthAutoencoder` is its lossless, weight-free stand-in for the VAE's downsampling: each f x f pixel block
becomes one latent pixel with 3 f^2 channels, so the UNet runs at 1/f the resolution (f^2 fewer FLOPs per layer).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from einops import rearrange
from torch import nn

from modules.components.checkpoints import load_diffusers_weights


class IdentityAutoencoder(nn.Module):
    """Pixel space: the latent of a video is the video itself, channels first per frame."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels
        self.downsample_factor = 1

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return rearrange(video, "b t c h w -> b c t h w")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return rearrange(latents, "b c t h w -> b t c h w")

    def load_from_sd_folder(self, sd_path: str | Path) -> None:
        raise ValueError("an identity autoencoder has no weights to load; use KLAutoencoder for SD folders")


class SpaceToDepthAutoencoder(nn.Module):
    """Pixel blocks as latent channels (`pixel_unshuffle`): [B, T, C, H, W] -> [B, C f^2, T, H/f, W/f], exactly
    invertible. A CPU-sized model then diffuses at (H/f, W/f), as the paper-size one diffuses in the VAE's 8x smaller
    latent space, without a VAE to train or load."""

    def __init__(self, channels: int = 3, factor: int = 2):
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor}")
        self.factor = int(factor)
        self.latent_channels = channels * self.factor**2
        self.downsample_factor = self.factor

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        height, width = video.shape[-2:]
        if height % self.factor or width % self.factor:
            raise ValueError(f"frame size {height}x{width} is not divisible by the space-to-depth factor {self.factor}")
        latents = nn.functional.pixel_unshuffle(rearrange(video, "b t c h w -> (b t) c h w"), self.factor)
        return rearrange(latents, "(b t) c h w -> b c t h w", b=video.shape[0])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        frames = nn.functional.pixel_shuffle(rearrange(latents, "b c t h w -> (b t) c h w"), self.factor)
        return rearrange(frames, "(b t) c h w -> b t c h w", b=latents.shape[0])

    def load_from_sd_folder(self, sd_path: str | Path) -> None:
        raise ValueError("a space-to-depth autoencoder has no weights to load; use KLAutoencoder for SD folders")


class KLAutoencoder(nn.Module):
    """Stable Diffusion's VAE per frame. Encoding samples the posterior, as LaVie's training does."""

    def __init__(self, config: dict[str, Any], scaling_factor: float = 0.18215, decode_chunk_frames: int = 8):
        super().__init__()
        self.vae = AutoencoderKL(**config)
        self.scaling_factor = scaling_factor
        self.decode_chunk_frames = decode_chunk_frames  # bounds decoder memory for long or large videos
        self.latent_channels = self.vae.config.latent_channels
        self.downsample_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def load_from_sd_folder(self, sd_path: str | Path) -> None:
        load_diffusers_weights(self.vae, Path(sd_path) / "vae", strict=True)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        frames = rearrange(video, "b t c h w -> (b t) c h w")
        latents = self.vae.encode(frames).latent_dist.sample() * self.scaling_factor
        return rearrange(latents, "(b t) c h w -> b c t h w", b=video.shape[0])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        frames = rearrange(latents, "b c t h w -> (b t) c h w") / self.scaling_factor
        decoded = torch.cat([self.vae.decode(chunk).sample for chunk in frames.split(self.decode_chunk_frames)])
        return rearrange(decoded, "(b t) c h w -> b t c h w", b=latents.shape[0])
