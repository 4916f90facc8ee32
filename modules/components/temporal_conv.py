"""VidRD's Temp-Conv: a residual stack of convolutions over time only, after every ResNet of the video UNet (and of
the temporal VAE decoder's up blocks).

Matches the official `TemporalConvLayer` (anonymous0x233/ReuseAndDiffuse `model/modules/unet_blocks.py`, and
`vae/modules.py` with 3 layers) in key names and maths, so `ModelT2V.pth` loads strictly and the fixtures in
`$FIXTURES_DIR/vidrd` (`temporal_conv_*`) are reproduced:

    h = x                                              (b, C, F, H, W)
    for each layer (4 in the UNet, 3 in the VAE):      convs.{4l .. 4l+3}
        h = Conv3d_(3,1,1)(Dropout(SiLU(GroupNorm(h))))   GroupNorm statistics over the group's channels AND frames
    out = x + h    (a single frame passes unchanged)

The last convolution starts at zero (as upstream), so a new Temp-Conv is the identity.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from modules.components.video_group_norm import FrameLayout


class TemporalConvLayer(nn.Module):
    """Temp-Conv on (b, C, F, H, W); `after_resnet` applies it to a ResNet's frames-in-batch output.

    `layout`: the UNet's `FrameLayout` (how its ((B F), C, H, W) rows split into video frames and appended images),
    needed only by `after_resnet`. Appended images pass unchanged, as a single frame does."""

    def __init__(self, channels: int, layout: FrameLayout | None = None, num_layers: int = 4, groups: int = 32,
                 dropout: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"a Temp-Conv needs at least one layer, got num_layers={num_layers}")
        if channels % groups:
            raise ValueError(f"Temp-Conv channels {channels} do not split into {groups} GroupNorm groups")
        self.layout = layout
        layers: list[nn.Module] = []
        for _ in range(num_layers):  # the official nn.Sequential: indices 4l .. 4l+3 per layer
            layers += [nn.GroupNorm(groups, channels, eps=eps), nn.SiLU(), nn.Dropout(dropout),
                       nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))]
        self.convs = nn.Sequential(*layers)
        last = self.convs[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, C, F, H, W) -> same shape. nn.GroupNorm on the 5-D tensor pools each group over the frames, the
        official call. One frame: the input itself (the official UNet layer returns x + 0 * h, the same value)."""
        if x.shape[2] == 1:
            return x
        return x + self.convs(x)

    def after_resnet(self, resnet: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the ResNet this Temp-Conv follows: ((B F), C, H, W) through Temp-Conv over each video's
        frames. A bound method, so a deep copy of the UNet hooks its own copy of the layer."""
        if self.layout is None or self.layout.total_frames is None:
            raise RuntimeError("TemporalConvLayer.after_resnet needs the frame layout; call the video model's forward")
        video_frames, frames = self.layout.video_frames, self.layout.total_frames
        x = rearrange(output, "(b f) c h w -> b c f h w", f=frames)
        out = self(x[:, :, :video_frames])
        if video_frames < frames:  # appended images: no temporal mixing
            out = torch.cat([out, x[:, :, video_frames:]], dim=2)
        return rearrange(out, "b c f h w -> (b f) c h w")
