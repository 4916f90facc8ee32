"""LPIPS perceptual loss (VGG16) for tokenizer training, built offline from local weights.

LPIPS has two parts: an ImageNet VGG16 backbone and five learned linear heads. torchmetrics ships the heads
(`lpips_models/vgg.pth`, the official PerceptualSimilarity v0.1 weights) but downloads the backbone through
torchvision; nothing may be downloaded here, so the backbone comes from a local file in torchvision's layout
(`vgg16-397923af.pth`, keys `features.N.weight`, the file torchvision's `VGG16_Weights.IMAGENET1K_V1` fetches).
A missing file is a clear error; the tokenizer config keeps the loss off (`perceptual_weight: 0`) by default.
"""
from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from torch import nn

OFFICIAL_FILE = "vgg16-397923af.pth"


class LPIPSLoss(nn.Module):
    """Mean LPIPS distance between two videos `(B, C, T, H, W)` in [-1, 1], computed per frame.

    Frozen and always in eval mode; gradients flow to the inputs only.
    """

    def __init__(self, vgg_weights: str | Path):
        super().__init__()
        from torchmetrics.functional.image.lpips import _LPIPS  # the reference LPIPS graph and its linear heads

        path = Path(vgg_weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"perceptual loss: VGG16 weights not found at {path}. Put torchvision's ImageNet VGG16 file "
                f"({OFFICIAL_FILE}, from https://download.pytorch.org/models/{OFFICIAL_FILE}) there, or turn the "
                "loss off with model.perceptual_weight=0"
            )
        # pnet_rand=True builds the backbone without a download; the ImageNet weights are loaded just below
        self.lpips = _LPIPS(pretrained=True, net="vgg", pnet_rand=True, eval_mode=True)
        self._load_backbone(path)
        self.requires_grad_(False)

    def _load_backbone(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # LPIPS' slices hold VGG16's feature layers under their torchvision index (slice1.0, ..., slice5.28), so
        # `features.N.*` of the file goes to the layer named N; the classifier part of the file is not needed
        layers = {name: layer for slice_ in (self.lpips.net.slice1, self.lpips.net.slice2, self.lpips.net.slice3,
                                             self.lpips.net.slice4, self.lpips.net.slice5)
                  for name, layer in slice_.named_children()}
        expected = {f"features.{name}.{key}": (layer, key) for name, layer in layers.items()
                    for key in layer.state_dict()}
        missing = sorted(set(expected) - set(state))
        wrong_shape = [k for k in set(expected) & set(state)
                       if tuple(state[k].shape) != tuple(expected[k][0].state_dict()[expected[k][1]].shape)]
        if missing or wrong_shape:
            raise ValueError(
                f"{path} is not a torchvision VGG16 state dict: missing {missing[:6]}"
                + (f", wrong shapes {sorted(wrong_shape)[:6]}" if wrong_shape else "")
            )
        with torch.no_grad():
            for key, (layer, name) in expected.items():
                layer.state_dict()[name].copy_(state[key])

    def train(self, mode: bool = True) -> LPIPSLoss:
        return super().train(False)  # the backbone is a fixed measurement: no dropout, ever

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        frames = lambda v: rearrange(v, "b c t h w -> (b t) c h w")  # noqa: E731  LPIPS is an image metric
        return self.lpips(frames(prediction), frames(target)).mean()
