"""SpaceToDepthAutoencoder: a lossless stand-in for a VAE's downsampling (pixel blocks as latent channels)."""
from __future__ import annotations

import pytest
import torch

from modules.components.autoencoders import SpaceToDepthAutoencoder


def test_round_trip_is_exact_and_latents_hold_pixel_blocks():
    video = torch.rand(2, 3, 3, 8, 12) * 2 - 1  # (B, T, C, H, W)
    autoencoder = SpaceToDepthAutoencoder(channels=3, factor=2)
    latents = autoencoder.encode(video)
    assert latents.shape == (2, 12, 3, 4, 6)  # (B, C f^2, T, H/f, W/f)
    assert autoencoder.latent_channels == 12 and autoencoder.downsample_factor == 2
    torch.testing.assert_close(autoencoder.decode(latents), video, rtol=0, atol=0)
    # latent pixel (i, j) of a frame is the 2x2 block at (2i, 2j): channel c*4 + 2*dy + dx
    block = video[1, 2, :, 2:4, 6:8]  # (C, 2, 2) at latent position (1, 3)
    torch.testing.assert_close(latents[1, :, 2, 1, 3], block.reshape(-1), rtol=0, atol=0)


def test_frame_size_must_divide_by_the_factor():
    with pytest.raises(ValueError, match="not divisible"):
        SpaceToDepthAutoencoder(factor=2).encode(torch.zeros(1, 2, 3, 9, 8))
