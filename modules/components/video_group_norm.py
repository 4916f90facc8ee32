"""GroupNorm whose statistics pool over the frames of a video, for 2D layers that run with frames in the batch.

The official LaVie UNet (Vchitect/LaVie `base/models/resnet.py`, `unet.py`) applies the ResNet GroupNorms (`norm1`,
`norm2`) and `conv_norm_out` to (b, c, f, h, w) tensors, so each sample's mean and variance per group are taken over
the group's channels and all f frames. A 2D UNet with frames folded into the batch, ((b f), c, h, w), would take them
per frame instead, and the same weights would give other outputs (fixtures/lavie/README.md measures up to ~1 max abs
on a tiny UNet). `VideoGroupNorm` computes the official statistics on the frames-in-batch layout.

Appended images of joint image-video training (the frames after the video's, `FrameLayout.video_frames`) are
normalised each on its own, as Stable Diffusion normalises an image: an image is not a frame of the video it is
appended to, so neither its output nor the video's depends on the other. (The official training code pools them
with the video's frames; sampling never appends images, so official checkpoints compute the same either way.)
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


class FrameLayout:
    """How the rows of a frames-in-batch tensor ((B F), C, H, W) split: per sample, `video_frames` frames of one
    video, then `total_frames - video_frames` appended images. One instance is shared by every `VideoGroupNorm` of
    a model; the model sets it at the start of each forward (the norms sit in diffusers blocks that pass no frame
    count)."""

    def __init__(self) -> None:
        self.video_frames: int | None = None
        self.total_frames: int | None = None

    def set(self, video_frames: int, total_frames: int) -> None:
        self.video_frames, self.total_frames = video_frames, total_frames


class VideoGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same parameters and state-dict keys) with statistics over each video's frames."""

    def __init__(self, norm: nn.GroupNorm, layout: FrameLayout):
        super().__init__(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)
        # keep the original parameters (and with them any weights already loaded)
        self.weight, self.bias = norm.weight, norm.bias
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        video_frames, frames = self.layout.video_frames, self.layout.total_frames
        if frames is None:
            raise RuntimeError("VideoGroupNorm needs the frame layout; call the video model's forward")
        x = rearrange(x, "(b f) c h w -> b c f h w", f=frames)
        # nn.GroupNorm on a 5-D tensor: statistics over (channels of the group, frames, h, w), the official call
        out = super().forward(x[:, :, :video_frames])
        if video_frames < frames:  # appended images: statistics of each image alone
            images = rearrange(x[:, :, video_frames:], "b c m h w -> (b m) c h w")
            images = rearrange(super().forward(images), "(b m) c h w -> b c m h w", b=x.shape[0])
            out = torch.cat([out, images], dim=2)
        return rearrange(out, "b c f h w -> (b f) c h w")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", statistics over each video's frames"
