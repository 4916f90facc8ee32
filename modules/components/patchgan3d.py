"""3D PatchGAN discriminator for the video tokenizer's adversarial loss (Loong reproduces MAGVIT-v2, which trains
its tokenizer with a 3D GAN discriminator).

VQGAN's `NLayerDiscriminator` inflated to 3D: 4x4 spatial kernels as there, 3 frames in time. It returns raw
logits on a grid of overlapping space-time patches (no sigmoid), so the loss picks hinge or non-saturating terms
and averages over the grid. It does not need to be causal: it only judges reconstructions during training.
"""
from __future__ import annotations

import torch
from torch import nn


class PatchGAN3D(nn.Module):
    """(B, C, T, H, W) in [-1, 1] -> logits (B, 1, T', H', W'), one per space-time patch.

    `num_layers` stride-2 convs (the first without norm), then a stride-1 conv and a stride-1 conv to one channel,
    widths base * (1, 2, 4, 8, 8, ...). Time: kernel 3, padding 1, so stride 2 maps T -> ceil(T / 2) and an image
    (T = 1) goes through as a 1-frame clip: 17 frames -> 3 logit frames, 1 -> 1. Space: kernel 4, padding 1, as in
    VQGAN: 128 px -> 14 x 14 logits at 3 layers. GroupNorm, not VQGAN's BatchNorm: tokenizer batches are a few
    clips per device and a real and a fake batch go through separately, which batch statistics would tell apart.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm_groups: int = 32):
        super().__init__()
        kernel, padding = (3, 4, 4), (1, 1, 1)
        widths = [base_channels * min(2 ** i, 8) for i in range(num_layers + 1)]
        layers: list[nn.Module] = [nn.Conv3d(in_channels, widths[0], kernel, stride=2, padding=padding),
                                   nn.LeakyReLU(0.2)]
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv3d(widths[i - 1], widths[i], kernel, stride=stride, padding=padding, bias=False),
                       nn.GroupNorm(norm_groups, widths[i]), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv3d(widths[-1], 1, kernel, stride=1, padding=padding))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """VQGAN's initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        if video.ndim != 5:
            raise ValueError(f"expected a (B, C, T, H, W) video, got shape {tuple(video.shape)}")
        return self.net(video)  # (B, 1, T', H', W')
