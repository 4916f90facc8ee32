"""Loong's causal 3D-CNN tokenizer encoder/decoder and the 3D PatchGAN discriminator.

Causality is exact: changing frames after 4t leaves latents 0..t bit-identical (and changing latents after t leaves
frames 0..4t bit-identical); a GroupNorm over the 5-D tensor breaks it. Frame by frame, an image and every 1 + 4t
prefix encode bit for bit like the clip they start. At paper size the tokenizer has ~246M parameters.
"""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from modules.components.causal_conv import CausalGroupNorm
from modules.components.causal_video_cnn import (
    CODEBOOK_SIZE,
    PAPER_SIZE,
    PRESETS,
    TINY_SIZE,
    CausalVideoDecoder,
    CausalVideoEncoder,
)
from modules.components.patchgan3d import PatchGAN3D
from tests.sd_layout import randomize_

pytestmark = pytest.mark.usefixtures("single_thread")
SIZE = 16  # pixels: 2x2 latents keep every test fast
LATENT_FRAMES = 5  # 17 frames


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def encoder() -> CausalVideoEncoder:
    torch.manual_seed(0)
    return randomize_(CausalVideoEncoder(**TINY_SIZE), seed=1).eval()  # norm scales and biases random too


@pytest.fixture(scope="module")
def decoder() -> CausalVideoDecoder:
    torch.manual_seed(2)
    return randomize_(CausalVideoDecoder(**TINY_SIZE), seed=3).eval()


def video(frames: int = 17, size: int = SIZE, seed: int = 4, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=g) * 2 - 1  # (B, C, T, H, W) in [-1, 1]


def latents(seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, TINY_SIZE["latent_dim"], LATENT_FRAMES, SIZE // 8, SIZE // 8, generator=g)


def encoder_causality(encoder: CausalVideoEncoder, clip: torch.Tensor) -> list[tuple[bool, bool]]:
    """For t = 1, 2, 3: replace frames 4t+1.. -> (latents 0..t bit-identical, every later latent frame changed)."""
    z = encoder(clip)
    results = []
    for t in (1, 2, 3):
        changed = clip.clone()
        changed[:, :, 4 * t + 1:] = video(seed=10 + t)[:, :, 4 * t + 1:]
        z_changed = encoder(changed)
        later = all(not torch.equal(z_changed[:, :, s], z[:, :, s]) for s in range(t + 1, z.shape[2]))
        results.append((torch.equal(z_changed[:, :, :t + 1], z[:, :, :t + 1]), later))
    return results


@torch.no_grad()
def test_encoder_is_exactly_causal(encoder):
    assert encoder_causality(encoder, video()) == [(True, True)] * 3


@torch.no_grad()
def test_decoder_is_exactly_causal(decoder):
    z = latents()
    frames = decoder(z)
    for t in (1, 2, 3):
        changed = z.clone()
        changed[:, :, t + 1:] = latents(seed=20 + t)[:, :, t + 1:]
        out = decoder(changed)
        assert torch.equal(out[:, :, :4 * t + 1], frames[:, :, :4 * t + 1])  # frames 0..4t untouched
        assert all(not torch.equal(out[:, :, f], frames[:, :, f]) for f in range(4 * t + 1, 17))


@torch.no_grad()
def test_groupnorm_over_time_breaks_causality(encoder, monkeypatch):
    """Negative control: GroupNorm over (B, C, T, H, W), as in a popular reproduction, pools statistics over the
    future frames, so the exact checks above fail."""
    clip = video()
    monkeypatch.setattr(CausalGroupNorm, "forward", nn.GroupNorm.forward)
    assert all(not earlier_equal for earlier_equal, _ in encoder_causality(encoder, clip))
    image = (encoder(clip[:, :, :1]) - encoder(clip)[:, :, :1]).abs().max()
    assert image > 1e-3  # an image no longer encodes like the first frame
    monkeypatch.undo()
    assert encoder_causality(encoder, clip) == [(True, True)] * 3


@torch.no_grad()
def test_image_and_prefixes_encode_like_the_clip(encoder, decoder):
    clip = video()
    z = encoder(clip)
    x = decoder(z)
    encoder.set_frame_by_frame(True)
    decoder.set_frame_by_frame(True)
    try:
        z_exact, x_exact = encoder(clip), decoder(z)
        for t in range(LATENT_FRAMES):  # t = 0: an image is latent 0 of the video
            assert torch.equal(encoder(clip[:, :, :1 + 4 * t]), z_exact[:, :, :1 + t]), t
            assert torch.equal(decoder(z[:, :, :1 + t]), x_exact[:, :, :1 + 4 * t]), t
    finally:
        encoder.set_frame_by_frame(False)
        decoder.set_frame_by_frame(False)
    # one conv per clip computes the same numbers, up to the summation order its kernels pick per shape
    torch.testing.assert_close(z_exact, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_exact, x, atol=1e-5, rtol=1e-5)
    for t in range(LATENT_FRAMES):
        torch.testing.assert_close(encoder(clip[:, :, :1 + 4 * t]), z[:, :, :1 + t], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_shapes(encoder, decoder):
    for frames, size, latent_frames in ((1, 32, 1), (17, 32, 5), (65, 16, 17)):
        z = encoder(video(frames, size, batch=2))
        assert z.shape == (2, 8, latent_frames, size // 8, size // 8)
        assert decoder(z).shape == (2, 3, frames, size, size)
    assert encoder.latent_shape(65, 128, 128) == (17, 16, 16)
    assert decoder.video_shape(17, 16, 16) == (65, 128, 128)


@pytest.fixture(scope="module")
def paper_size():
    with torch.device("meta"):
        return CausalVideoEncoder(**PAPER_SIZE), CausalVideoDecoder(**PAPER_SIZE), PatchGAN3D()


def test_paper_size_shapes_on_meta(paper_size):
    enc, dec, disc = paper_size
    for frames, latent_frames in ((1, 1), (17, 5), (65, 17)):
        clip = torch.empty(2, 3, frames, 128, 128, device="meta")
        z = enc(clip)
        assert z.shape == (2, 8, latent_frames, 16, 16)  # 65x128x128 -> 17x16x16 tokens
        assert dec(z).shape == (2, 3, frames, 128, 128)
    assert disc(clip).shape == (2, 1, 9, 14, 14)


def test_paper_size_parameters(paper_size):
    enc, dec, disc = paper_size
    codebook = CODEBOOK_SIZE * PAPER_SIZE["latent_dim"]
    assert (n_params(enc), n_params(dec), codebook) == (97_500_936, 150_228_611, 65_536)
    total = n_params(enc) + n_params(dec) + codebook
    assert total == 247_795_083  # Loong: 246M; +0.7%
    assert abs(total / 246e6 - 1) < 0.05
    assert n_params(disc) == 8_293_185


def test_tiny_preset_size():
    enc, dec = CausalVideoEncoder(**PRESETS["tiny"]), CausalVideoDecoder(**PRESETS["tiny"])
    assert (n_params(enc), n_params(dec)) == (405_896, 1_239_155)


def test_bad_sizes_raise(encoder, decoder):
    for frames in (2, 4, 16, 18):
        with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
            encoder(video(frames))
    for height, width in ((20, 16), (16, 12)):
        with pytest.raises(ValueError, match="divisible by 8"):
            encoder(torch.zeros(1, 3, 5, height, width))
    with pytest.raises(ValueError, match="latent channels"):
        decoder(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="temporal_downsample"):
        CausalVideoEncoder(**{**TINY_SIZE, "temporal_downsample": [True, True]})


def test_hydra_instantiation():
    cfg = OmegaConf.create({"_target_": "modules.components.causal_video_cnn.CausalVideoDecoder", **TINY_SIZE})
    dec = instantiate(cfg)  # lists arrive as ListConfig
    assert isinstance(dec, CausalVideoDecoder) and dec.temporal_factor == 4 and dec.spatial_factor == 8
    assert n_params(dec) == n_params(CausalVideoDecoder(**TINY_SIZE))


@torch.no_grad()
def test_discriminator_logit_maps():
    torch.manual_seed(6)
    disc = PatchGAN3D(base_channels=8, num_layers=3, norm_groups=4).eval()
    clip = video(17, 32, batch=2)
    logits = disc(clip)
    assert logits.shape == (2, 1, 3, 2, 2)  # raw logits per space-time patch
    assert disc(clip[:, :, :1]).shape == (2, 1, 1, 2, 2)  # images are 1-frame clips
    assert logits.std() > 0
