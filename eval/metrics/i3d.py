"""Inception-I3D (Kinetics-400), the feature network of the Frechet Video Distance.

A TF-faithful re-implementation of DeepMind's kinetics-i3d (the TF-Hub module the original FVD uses) whose
state-dict keys are those of piergiaj/pytorch-i3d, i.e. of TATS' `i3d_pretrained_400.pt`:
`Conv3d_1a_7x7.conv3d.weight`, `Conv3d_1a_7x7.bn.*`, `Mixed_3b.b0.conv3d.weight`, ..., `logits.conv3d.bias`.

TF semantics kept (they change the numbers, see $FIXTURES_DIR/eval/README.md section 1):
- "SAME" padding computed from the input size at every forward (asymmetric when the total is odd);
- BatchNorm eps 1e-3 (Sonnet v1); the VideoGPT/TATS/cd-fvd port uses PyTorch's 1e-5 and differs by ~1.5 logits;
- zero padding before every max-pool (its inputs are post-ReLU, so zero == -inf padding);
- AvgPool3d([2, 7, 7], stride 1, VALID) on Mixed_5c, then the 1x1x1 logits conv; dropout is a no-op in eval.

The FVD embedding is `logits(x)`: the 400 logits averaged over the remaining time steps
(TF-Hub tensor `RGB/inception_i3d/Mean:0`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modules.components.checkpoints import load_state_dict_checked, read_state_dict

OFFICIAL_WEIGHTS_HINT = (
    "the official FVD weights are TATS' `i3d_pretrained_400.pt` (Inception-I3D Kinetics-400 converted from the "
    "TF-Hub I3D module the original FVD uses), from https://github.com/songweige/TATS"
)
# Channels of each inception module's branches: (b0, b1a, b1b, b2a, b2b, b3b) = 1x1 | 1x1->3x3 | 1x1->3x3 | pool->1x1
MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# Max-pools between stages: name -> (kernel, stride)
POOLS = {
    "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}
AVG_POOL = (2, 7, 7)  # final VALID average pool on Mixed_5c (7x7 spatial at 224 px input)
# Time: conv 1a, max-pools 4a and 5a halve T ("SAME": ceil), then the VALID avg-pool removes one step:
# T' = ceil(T / 8) - 1, so the official network needs T >= 9 frames for one output step.
MIN_FRAMES = 9
# How `i3d_input` fits a frame into size x size: centre square then resize | resize as is | shorter side then crop.
I3D_CROPS = ("center", "none", "short_side")


def same_padding(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """TF "SAME" padding of a (T, H, W) input, as the `F.pad` tuple (w_front, w_back, h_front, h_back, t_front, t_back).

    Per dim: pad = max(k - s, 0) if n % s == 0 else max(k - n % s, 0); front = pad // 2, back = the rest.
    """
    pads = []
    for n, k, s in zip(size, kernel, stride):
        pad = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads.append((pad // 2, pad - pad // 2))
    return tuple(p for front_back in reversed(pads) for p in front_back)


class Unit3D(nn.Module):
    """Conv3d ("SAME", no bias) + BatchNorm (eps 1e-3) + ReLU; the logits layer is a plain conv with bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), norm_act: bool = True):
        super().__init__()
        self.kernel, self.stride, self.norm_act = tuple(kernel), tuple(stride), norm_act
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=not norm_act)
        if norm_act:
            self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride)))
        return F.relu(self.bn(x)) if self.norm_act else x


class MaxPool3dSame(nn.Module):
    """Max-pool with TF "SAME" padding; zeros are padded (inputs are post-ReLU, as in the reference)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride)), self.kernel, self.stride)


class InceptionModule(nn.Module):
    def __init__(self, in_channels: int, channels: tuple[int, int, int, int, int, int]):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = channels
        self.b0 = Unit3D(in_channels, c0)
        self.b1a = Unit3D(in_channels, c1a)
        self.b1b = Unit3D(c1a, c1b, (3, 3, 3))
        self.b2a = Unit3D(in_channels, c2a)
        self.b2b = Unit3D(c2a, c2b, (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, c3b)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """Inception-v1 I3D (Carreira & Zisserman 2017) with piergiaj/pytorch-i3d's module names.

    `width` scales every layer's channels (rounded, at least 1); 1.0 gives the official shapes. Inputs are
    float (B, in_channels, T, H, W) in [-1, 1] (see `i3d_input`), officially 224 x 224 and T >= 9 frames.
    On inputs smaller than that (e.g. a small-width I3D trained on 64 px videos) the final average pool shrinks
    to what is left, kernel (min(2, t), min(7, h), min(7, w)); official behaviour is unchanged at 224 px, T >= 9.
    """

    def __init__(self, num_classes: int = 400, in_channels: int = 3, width: float = 1.0, dropout: float = 0.5):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.num_classes, self.width = num_classes, width

        def ch(c: int) -> int:
            return max(1, round(c * width))

        stem = {  # name: (out channels, kernel, stride)
            "Conv3d_1a_7x7": (ch(64), (7, 7, 7), (2, 2, 2)),
            "Conv3d_2b_1x1": (ch(64), (1, 1, 1), (1, 1, 1)),
            "Conv3d_2c_3x3": (ch(192), (3, 3, 3), (1, 1, 1)),
        }
        self.endpoints = ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
                          "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
                          "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c")
        channels = in_channels
        for name in self.endpoints:
            if name in POOLS:
                layer = MaxPool3dSame(*POOLS[name])
            elif name in stem:
                out, kernel, stride = stem[name]
                layer, channels = Unit3D(channels, out, kernel, stride), out
            else:
                layer = InceptionModule(channels, tuple(ch(c) for c in MIXED[name]))
                channels = layer.out_channels
            self.add_module(name, layer)
        self.feature_dim = channels  # 1024 at width 1
        self.dropout = nn.Dropout(dropout)
        # Registered under "logits" (the official key prefix `logits.conv3d.*`) without shadowing the
        # `logits()` method: nn.Module resolves class attributes before submodules, so reach it as `classifier`.
        self._modules["logits"] = Unit3D(channels, num_classes, norm_act=False)

    @property
    def classifier(self) -> Unit3D:
        return self._modules["logits"]

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"I3D expects (B, C, T, H, W), got shape {tuple(x.shape)}")
        for name in self.endpoints:
            x = self._modules[name](x)
        return x  # Mixed_5c: (B, 1024, ceil(T/8), ceil(H/32), ceil(W/32))

    @staticmethod
    def _avg_pool(x: torch.Tensor) -> torch.Tensor:
        kernel = tuple(min(k, n) for k, n in zip(AVG_POOL, x.shape[2:]))  # == AVG_POOL on official-size inputs
        return F.avg_pool3d(x, kernel, stride=1)  # (B, F, T', h', w'); h' = w' = 1 at 224 px

    def pool_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool features (B, feature_dim, T') and logits (B, num_classes, T') per remaining time step, in one pass.

        T' = ceil(T / 8) - 1 officially. Spatial positions left after the pool (1 x 1 at 224 px) are averaged.
        """
        pooled = self._avg_pool(self._trunk(x))  # (B, F, T', h', w')
        logits = self.classifier(self.dropout(pooled))  # (B, C, T', h', w')
        return pooled.mean(dim=(3, 4)), logits.mean(dim=(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits per remaining time step, (B, num_classes, T')."""
        return self.pool_and_logits(x)[1]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Time-averaged logits (B, num_classes): the FVD embedding."""
        return self(x).mean(dim=2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pool features (B, feature_dim), 1024-d at width 1: the average pool on Mixed_5c averaged over T'."""
        return self._avg_pool(self._trunk(x)).mean(dim=(2, 3, 4))


def load_i3d(path: str | Path, device: str | torch.device = "cpu", num_classes: int | None = None,
             in_channels: int | None = None, width: float | None = None, prefix: str = "") -> InceptionI3d:
    """An `InceptionI3d` in eval mode, without gradients, from a `.pt`/`.pth` state dict or a `.safetensors` file.

    The state dict may be nested under "state_dict"; with `prefix` only keys starting with it are kept (stripped),
    e.g. "i3d." for a Lightning checkpoint. Floating tensors are cast to float32. `num_classes`, `in_channels` and
    `width` default to what the file holds (width = stem channels / 64; give it explicitly for widths whose
    rounding is ambiguous). Loading is strict except that missing BatchNorm `num_batches_tracked` counters
    (absent from TATS' file) are allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights not found: {path}; {OFFICIAL_WEIGHTS_HINT}")
    state = read_state_dict(path)
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}

    stem, head = state.get("Conv3d_1a_7x7.conv3d.weight"), state.get("logits.conv3d.weight")
    model = InceptionI3d(
        num_classes=num_classes or (head.shape[0] if head is not None else 400),
        in_channels=in_channels or (stem.shape[1] if stem is not None else 3),
        width=width or (stem.shape[0] / 64 if stem is not None else 1.0),
    )
    optional = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
    load_state_dict_checked(model, state, path, allowed_missing=optional)
    return model.to(device).eval().requires_grad_(False)


def i3d_input(videos: torch.Tensor, size: int = 224, crop: str = "center",
              min_frames: int = MIN_FRAMES) -> torch.Tensor:
    """Generator output uint8 (B, T, H, W, 3) -> I3D input float32 (B, 3, T, size, size) in [-1, 1], same device.

    crop="center" takes the centred H x W square (min side) and resizes it to size x size; crop="none" resizes the
    whole frame to size x size (the google-research FVD code, StyleGAN-V; aspect ratio not kept);
    crop="short_side" resizes the shorter side to `size` and the longer one to ceil(L * size / S), then takes the
    centred size x size crop (TATS `preprocess_single`, its float ceil included). Resizing is bilinear with
    align_corners=False and no antialiasing (F.interpolate's default, as TATS calls it) on the float pixel values,
    without re-rounding; frames already at the target size are not touched. Then x = 2 * u / 255 - 1 (TF FVD /
    TATS / cd-fvd). `min_frames` defaults to the official network's minimum (9: T' = ceil(T / 8) - 1 must be
    >= 1); the FVD protocols use 16. The named presets of eval/presets/fvd.py choose `crop`.
    """
    if not isinstance(videos, torch.Tensor):
        raise ValueError(f"videos must be a torch.Tensor, got {type(videos).__name__}")
    if videos.dtype != torch.uint8:
        raise ValueError(f"videos must be uint8 in [0, 255] (the generator output), got dtype {videos.dtype}")
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be (B, T, H, W, 3) RGB, got shape {tuple(videos.shape)}")
    if crop not in I3D_CROPS:
        raise ValueError(f"crop must be one of {I3D_CROPS}, got {crop!r}")
    b, t, h, w, _ = videos.shape
    if t < min_frames:
        raise ValueError(f"I3D needs at least {min_frames} frames per video (T' = ceil(T/8) - 1 >= 1 for the "
                         f"official network), got {t}")
    x = videos.permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w).float()  # (B*T, 3, H, W)
    if crop == "center":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, :, top:top + side, left:left + side]
    elif crop == "short_side":
        scale = size / min(h, w)  # TATS' arithmetic, float ceil included
        target = (size, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), size)
        if x.shape[-2:] != target:
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=False)
        top, left = (target[0] - size) // 2, (target[1] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    x = 2.0 * x / 255.0 - 1.0
    return x.reshape(b, t, 3, size, size).transpose(1, 2).contiguous()  # (B, 3, T, size, size)
