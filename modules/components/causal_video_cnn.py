"""Loong's video tokenizer encoder and decoder: a MAGVIT-v2-style causal 3D CNN (Loong sections 3.1 and 4.1).

Spatial compression 8x, temporal 4x, on clips of 1 + 4k frames: 65x128x128 -> 17x16x16 latents, 17 -> 5, and an
image (1 frame) -> 1x16x16. The network is causal in time (see `causal_conv.py`), which gives "the first frame is
modelled separately" exactly: latent 0 is a function of frame 0 alone, so encoding an image gives latent 0 of any
video starting with it, and `encode(video[:, :, :1 + 4t])` is `encode(video)[:, :, :1 + t]` (bit for bit after
`set_frame_by_frame(True)`, to float rounding otherwise). The decoder is causal too: frames 0..4t depend on latents
0..t only, which Loong's re-encoding of the last frames of a generated clip relies on.

Layout (MAGVIT-v2 paper / its open reproductions): causal conv in; per level `num_res_blocks` residual blocks at
width base * multiplier, then (all levels but the last) a strided-conv downsample, halving time too where
`temporal_downsample` says so (the later levels, as in MAGVIT-v2); `num_res_blocks` more blocks at the bottleneck;
GroupNorm, swish, 1x1x1 conv to `latent_dim`. The decoder mirrors it, upsampling by depth-to-space. The quantiser
(CVQ) is separate; MAGVIT-v2's adaptive GroupNorm in the decoder (conditioned on the quantised latents) is left out,
so the decoder is a plain function of the latents.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modules.components.causal_conv import (
    CausalConv3d,
    CausalGroupNorm,
    DepthToSpaceUpsample3d,
    Downsample3d,
    ResBlock3d,
)

#: Paper size (Loong: "the video tokenizer has a total of 246M parameters"). MAGVIT-v2's video config (base 128,
#: 4 residual blocks per level, time halved in the last two downsamples) with the deepest width 3 x 128 = 384
#: instead of 4 x 128 = 512: with 512 the encoder + decoder alone have 370.4M parameters (the bottleneck blocks
#: and the decoder's first x8 depth-to-space conv dominate), with 384 they have 247.7M; with the 8192 x 8 codebook
#: 247.8M, +0.7% of 246M. latent_dim 8 rather than 18: 18 is MAGVIT-v2's LFQ width (log2 of its 2^18 vocabulary),
#: which a CVQ codebook of 8192 entries does not need; a low-dimensional lookup space like ViT-VQGAN's factorised
#: codes keeps codebook usage high. The codebook is 65,536 parameters (147,456 at 18: the total moves by 0.03%).
PAPER_SIZE = dict(in_channels=3, base_channels=128, channel_multipliers=[1, 2, 2, 3], num_res_blocks=4,
                  temporal_downsample=[False, True, True], latent_dim=8, norm_groups=32)
#: CPU size for tests and smoke runs: the paper layout at base 16 with 1 residual block per level; same 8x / 4x
#: compression; 0.41M (encoder) + 1.24M (decoder) parameters.
TINY_SIZE = dict(in_channels=3, base_channels=16, channel_multipliers=[1, 2, 2, 3], num_res_blocks=1,
                 temporal_downsample=[False, True, True], latent_dim=8, norm_groups=8)
PRESETS = {"paper": PAPER_SIZE, "tiny": TINY_SIZE}
#: Loong's video vocabulary (section 4.1); the codebook holds CODEBOOK_SIZE x latent_dim parameters.
CODEBOOK_SIZE = 8192


class _CausalVideoCNN(nn.Module):
    """What the encoder and the decoder share: one constructor (the same arguments on both sides: pass the same
    preset), its checks, and the shape arithmetic. Each side creates its layers in `_build`."""

    def __init__(self, in_channels: int = 3, base_channels: int = 128,
                 channel_multipliers: Sequence[int] = (1, 2, 2, 3), num_res_blocks: int = 4,
                 temporal_downsample: Sequence[bool] = (False, True, True), latent_dim: int = 8,
                 norm_groups: int = 32, frame_by_frame: bool = False):
        super().__init__()
        self.channel_multipliers = [int(m) for m in channel_multipliers]  # plain lists: Hydra passes ListConfig
        self.temporal_downsample = [bool(t) for t in temporal_downsample]
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ValueError(f"temporal_downsample needs one flag per downsample, {len(self.channel_multipliers) - 1}"
                             f" for {len(self.channel_multipliers)} levels, got {self.temporal_downsample}")
        self.widths = [base_channels * m for m in self.channel_multipliers]
        if any(w % norm_groups for w in self.widths):
            raise ValueError(f"norm_groups={norm_groups} must divide every width {self.widths}")
        self.in_channels, self.latent_dim, self.norm_groups = in_channels, latent_dim, norm_groups
        self.num_res_blocks = num_res_blocks
        self.spatial_factor = 2 ** len(self.temporal_downsample)
        self.temporal_factor = 2 ** sum(self.temporal_downsample)
        self._build()
        self.set_frame_by_frame(frame_by_frame)

    def _build(self) -> None:
        """Create the layers (the encoder or the decoder side), from the fields set above."""
        raise NotImplementedError

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T', H', W') of the latents of a clip; ValueError unless T = 1 + k * temporal_factor and H, W divide."""
        s, f = self.spatial_factor, self.temporal_factor
        if frames < 1 or (frames - 1) % f:
            raise ValueError(f"clips must have 1 + {f}k frames (1, {1 + f}, {1 + 4 * f}, ...), got {frames}")
        if height % s or width % s:
            raise ValueError(f"height and width must be divisible by {s}, got {height}x{width}")
        return 1 + (frames - 1) // f, height // s, width // s

    def video_shape(self, latent_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, H, W) decoded from latents of (T', H', W'): T = 1 + temporal_factor * (T' - 1)."""
        if latent_frames < 1:
            raise ValueError(f"need at least one latent frame, got {latent_frames}")
        return 1 + self.temporal_factor * (latent_frames - 1), height * self.spatial_factor, width * self.spatial_factor

    def set_frame_by_frame(self, enabled: bool = True) -> None:
        """Run every conv one output frame at a time, so prefixes of a clip (an image included) give bit-identical
        results to the whole clip on any backend; see `CausalConv3d`. Off: one conv per clip (faster, same values
        up to float rounding). Weights and outputs' meaning are the same either way."""
        for module in self.modules():
            if isinstance(module, CausalConv3d):
                module.frame_by_frame = enabled

    def _res_blocks(self, in_channels: int, out_channels: int) -> list[nn.Module]:
        return [ResBlock3d(in_channels if i == 0 else out_channels, out_channels, self.norm_groups)
                for i in range(self.num_res_blocks)]


class CausalVideoEncoder(_CausalVideoCNN):
    """Video (B, C, T, H, W) in [-1, 1], T = 1 + 4k -> features (B, latent_dim, 1 + k, H/8, W/8) for the quantiser.

    Arguments: see `PAPER_SIZE` / `TINY_SIZE`; `temporal_downsample[i]` says whether the downsample after level i
    also halves time; `frame_by_frame` (see `set_frame_by_frame`) trades speed for bit-exact prefixes.
    """

    def _build(self) -> None:
        widths, norm_groups = self.widths, self.norm_groups
        self.conv_in = CausalConv3d(self.in_channels, widths[0], 3)
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            level = self._res_blocks(widths[max(i - 1, 0)], width)
            if i < len(widths) - 1:
                level.append(Downsample3d(width, self.temporal_downsample[i]))
            self.down.append(nn.Sequential(*level))
        self.mid = nn.Sequential(*self._res_blocks(widths[-1], widths[-1]))
        self.norm_out = CausalGroupNorm(norm_groups, widths[-1])
        self.conv_out = CausalConv3d(widths[-1], self.latent_dim, 1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        _, channels, frames, height, width = video.shape
        if channels != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channels, got {channels}")
        self.latent_shape(frames, height, width)  # raises on bad sizes
        x = self.conv_in(video)  # (B, C0, T, H, W)
        for level in self.down:
            x = level(x)  # (B, Ci, T_i, H_i, W_i)
        x = self.mid(x)  # (B, C_last, T', H/8, W/8)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, D, T', H/8, W/8)


class CausalVideoDecoder(_CausalVideoCNN):
    """Latents (B, latent_dim, T', H', W') -> video (B, C, 1 + 4(T' - 1), 8H', 8W'); the encoder mirrored.

    Same constructor arguments as `CausalVideoEncoder` (pass the same preset); upsampling by depth-to-space, in
    time at the levels where the encoder downsampled time, so 1 latent frame decodes to 1 frame.
    """

    def _build(self) -> None:
        widths, norm_groups = self.widths, self.norm_groups
        self.conv_in = CausalConv3d(self.latent_dim, widths[-1], 3)
        self.mid = nn.Sequential(*self._res_blocks(widths[-1], widths[-1]))
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):  # deepest level first
            level = self._res_blocks(widths[min(i + 1, len(widths) - 1)], widths[i])
            if i > 0:
                level.append(DepthToSpaceUpsample3d(widths[i], self.temporal_downsample[i - 1]))
            self.up.append(nn.Sequential(*level))
        self.norm_out = CausalGroupNorm(norm_groups, widths[0])
        self.conv_out = CausalConv3d(widths[0], self.in_channels, 3)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        _, channels, frames, _, _ = latents.shape
        if channels != self.latent_dim:
            raise ValueError(f"expected {self.latent_dim} latent channels, got {channels}")
        self.video_shape(frames, 1, 1)  # raises on an empty clip
        x = self.mid(self.conv_in(latents))  # (B, C_last, T', H', W')
        for level in self.up:
            x = level(x)  # (B, Ci, T_i, H_i, W_i)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, C, 1 + 4(T'-1), 8H', 8W')
