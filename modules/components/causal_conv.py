"""Causal 3D building blocks of Loong's MAGVIT-v2-style video tokenizer (see `causal_video_cnn.py`).

"Causal" means: an output at time t is a function of inputs at times <= t only (<= 2t after a temporal stride 2).
Two things make that hold exactly, not just approximately:
- every temporal convolution pads its k-1 missing frames in FRONT and none behind;
- every normalisation works per frame.
Together they make a clip's first frame a complete input on its own (an image is a 1-frame video).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class CausalConv3d(nn.Conv3d):
    """A `nn.Conv3d` (same weights and names) whose time axis is padded causally.

    Time: k_t - 1 copies of the FIRST frame go in front, nothing behind. Replicating rather than zero-padding makes
    an image look like a still video that has always been still, so the first frame's features have the statistics
    of a static clip's later frames instead of a black-to-image transition; both choices are equally causal.
    Space: ordinary zero padding k // 2 on each side ("same" size at stride 1, halving at stride 2 for even sizes).
    With temporal stride s the output at t sees input frames s*t - (k_t - 1) .. s*t; for k_t = 3, s = 2 that is
    frames <= 2t, and output 0 sees frame 0 alone (plus its copies): T = 1 + 2k frames -> 1 + k.

    `frame_by_frame`: by default one conv3d call covers the clip. Its output at t is the same function of the same
    inputs whatever the clip length, but not always the same floating-point sum: kernels and their blocking are
    picked by shape (measured with PyTorch's CPU conv3d: 64 -> 512 channels at 4x4 pixels, a 5-frame and a 2-frame
    call give first frames ~1e-6 apart; cuDNN also picks algorithms per shape), so `encode(video[:, :, :5])` and
    `encode(video)[:, :, :2]` agree to rounding only. Changing later frames of a clip of fixed length is different:
    same shape, same kernel, and earlier outputs stay bit-identical. With `frame_by_frame=True`
    each output frame is its own call on its k_t-frame window: every call has the same shape for any clip length,
    and no call sees a later frame even through a transform-based algorithm, so prefixes (an image included) encode
    bit for bit like the clip they start. It costs one call per output frame; use it where exactness matters
    (tokenising images and re-encoding clip ends consistently), not for training.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3,
                 stride: int | tuple[int, int, int] = 1):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_channels, out_channels, (kt, kh, kw), stride=stride, padding=(0, kh // 2, kw // 2))
        self.time_pad = kt - 1
        self.frame_by_frame = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        if self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)  # (B, C, k-1+T, H, W)
        if not self.frame_by_frame:
            return super().forward(x)
        kt, st = self.kernel_size[0], self.stride[0]
        frames = (x.shape[2] - kt) // st + 1
        windows = (self._conv_forward(x[:, :, t * st:t * st + kt], self.weight, self.bias) for t in range(frames))
        return torch.cat(list(windows), dim=2)  # (B, C_out, T_out, H', W'), one (B, C_out, 1, H', W') per frame


class CausalGroupNorm(nn.GroupNorm):
    """GroupNorm of each frame on its own: statistics over (C/G, H, W) of one frame, never over time.

    `nn.GroupNorm` applied to the 5-D tensor pools its statistics over all T frames, so every output frame depends
    on every input frame (future included) and an image no longer encodes like the first frame of a video. Some
    popular open MAGVIT-v2 reproductions do exactly that; tests/test_causal_video_cnn.py shows the causality check
    failing with it. Folding time into the batch, (B*T, C, H, W), keeps it causal.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        frames = x.shape[2]
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", t=frames)


class ResBlock3d(nn.Module):
    """MAGVIT-v2 residual block: (GroupNorm, swish, causal 3x3x3 conv) twice; a 1x1x1 shortcut if widths differ."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        self.norm1 = CausalGroupNorm(norm_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = CausalGroupNorm(norm_groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.shortcut = nn.Identity() if in_channels == out_channels else CausalConv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Downsample3d(nn.Module):
    """Strided causal 3x3x3 conv (MAGVIT-v2 replaces pooling by strided convs): space / 2, time / 2 if `temporal`.

    Temporal stride 2 with two front-padded frames maps T = 1 + 2k -> 1 + k and output t sees frames <= 2t, so the
    first frame keeps a latent of its own at every level.
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(channels, channels, 3, stride=(2 if temporal else 1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        return self.conv(x)  # (B, C, 1 + (T-1)/2 if temporal else T, H/2, W/2)


class DepthToSpaceUpsample3d(nn.Module):
    """Decoder upsampling, MAGVIT-v2 style: causal conv to C*2*2 (x2 in time: C*2*2*2), then depth-to-space.

    Time-shuffling 1 + k frames gives 2 + 2k; the first of them (the "duplicate" before frame 0) is dropped, so
    1 + k -> 1 + 2k, latent 0 -> frame 0 alone, and frames <= 2t come from inputs <= t (the decoder stays causal).
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.factor_t = 2 if temporal else 1
        self.conv = CausalConv3d(channels, channels * self.factor_t * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        x = self.conv(x)  # (B, C*ft*4, T, H, W)
        x = rearrange(x, "b (c ft fh fw) t h w -> b c (t ft) (h fh) (w fw)", ft=self.factor_t, fh=2, fw=2)
        return x[:, :, self.factor_t - 1:]  # (B, C, 1 + ft*(T-1), 2H, 2W)
