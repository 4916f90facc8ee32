"""C3D, the video classifier behind the video Inception Score (IS) on UCF-101, as TGAN2 runs it.

The reference is pfnet-research/tgan2 `tgan2/models/c3d/c3d_ucf101.py` `C3DVersion1UCF101` (chainer) with the
C3D v1.0 Sports-1M network fine-tuned on UCF-101 (`conv3d_deepnetA_ucf.npz`) and its per-pixel mean
(`mean2.npz`). Two details differ from the popular PyTorch port (DavideA/c3d-pytorch) and change the scores:
- pool5 is a 2x2x2 max-pool in *ceil mode* (chainer `cover_all=True`, no padding), not `padding=(0, 1, 1)`;
- preprocessing maps [-1, 1] RGB to `128 * x` BGR, resizes every frame to 112x112 (bilinear, align_corners=True,
  no crop, aspect ratio not kept) and adds `128 - mean[:, :, 8:120, 8:120]`, i.e. pixel = (x + 1) * 128 - mean.

The project weight file (`scripts/convert_tgan2_c3d.py` writes it) is a safetensors file with the 22 tensors
`conv1a.weight` ... `fc8.bias` in PyTorch layout and `mean` (3, 16, 128, 171), BGR.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.components.checkpoints import CheckpointKeyError, load_state_dict_checked

CONV_NAMES = ("conv1a", "conv2a", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
# Output channels of the official network, scaled by `width`.
CONV_CHANNELS = (64, 128, 256, 256, 512, 512, 512, 512)
# The max-pools, keyed by the conv (+ReLU) they follow: (kernel = stride, ceil_mode). pool5 is chainer's cover_all.
POOLS = {"conv1a": ((1, 2, 2), False), "conv2a": ((2, 2, 2), False), "conv3b": ((2, 2, 2), False),
         "conv4b": ((2, 2, 2), False), "conv5b": ((2, 2, 2), True)}
OFFICIAL_INPUT_SIZE = (16, 112, 112)  # (T, H, W) of TGAN2's network: its fc6 and its mean2.npz are sized for 16 frames
MEAN_CROP = (slice(8, 120), slice(8, 120))  # TGAN2's crop of the (128, 171) mean: rows and columns 8:120
OFFICIAL_FILES = ("TGAN2's `conv3d_deepnetA_ucf.npz` + `mean2.npz` (pfnet-research/tgan2 README, "
                  "'Pre-trained weights'), "
                  "converted with `python scripts/convert_tgan2_c3d.py --weights conv3d_deepnetA_ucf.npz "
                  "--mean mean2.npz --out c3d_ucf101_tgan2.safetensors`")


def _pooled(size: int, kernel: int, ceil_mode: bool) -> int:
    """Output length of a max-pool with stride = kernel and no padding (ceil_mode = chainer's cover_all)."""
    return (size + kernel - 1) // kernel if ceil_mode else size // kernel


class C3D(nn.Module):
    """C3D v1.0 as TGAN2's `C3DVersion1UCF101`: 8 conv3d (k3, p1) + ReLU, 5 max-pools, fc6/fc7 (+ReLU), fc8.

    `width` scales every channel count (1.0 = the official shapes); `input_size` (T, H, W) sets fc6's input size,
    so small networks on small clips (e.g. width 0.125 on 16x32x32) work too. Dropout (after pool5, fc6, fc7 as in
    the reference) only acts in training mode.
    """

    def __init__(
        self,
        num_classes: int = 101,
        width: float = 1.0,
        input_size: Sequence[int] = OFFICIAL_INPUT_SIZE,
        fc_dim: int = 4096,
        in_channels: int = 3,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.input_size = tuple(int(s) for s in input_size)
        channels = [max(1, round(c * width)) for c in CONV_CHANNELS]
        c_in = in_channels
        size = self.input_size
        for name, c_out in zip(CONV_NAMES, channels):
            setattr(self, name, nn.Conv3d(c_in, c_out, kernel_size=3, padding=1))
            c_in = c_out
            if name in POOLS:
                kernel, ceil_mode = POOLS[name]
                size = tuple(_pooled(s, k, ceil_mode) for s, k in zip(size, kernel))
                if min(size) < 1:
                    raise ValueError(f"input_size {self.input_size} is too small for C3D's 5 poolings "
                                     f"(T >= 8, H, W >= 16)")
        self.pool5_size = size  # (1, 4, 4) for (16, 112, 112)
        self.fc6 = nn.Linear(c_in * math.prod(size), fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.fc8 = nn.Linear(fc_dim, num_classes)
        self.dropout = nn.Dropout(dropout)

    def conv_features(self, x: Tensor, pool5: bool = True) -> Tensor:
        """(B, 3, T, H, W) preprocessed clip -> pool5 output (B, C, T', H', W') (conv5b's if not `pool5`)."""
        for name in CONV_NAMES:
            x = F.relu(getattr(self, name)(x))
            if name in POOLS and (pool5 or name != "conv5b"):
                kernel, ceil_mode = POOLS[name]
                x = F.max_pool3d(x, kernel, stride=kernel, ceil_mode=ceil_mode)
        return x

    def head(self, pool5: Tensor) -> tuple[Tensor, Tensor]:
        """pool5 output -> (fc7 features after ReLU, fc8 logits)."""
        h = self.dropout(pool5.flatten(1))  # (B, C*T'*H'*W'), chainer's C, T, H, W order
        h = self.dropout(F.relu(self.fc6(h)))
        fc7 = F.relu(self._modules["fc7"](h))  # the layer; `self.fc7` is the feature method below
        return fc7, self.fc8(self.dropout(fc7))

    def forward(self, x: Tensor) -> Tensor:
        """Preprocessed clip (B, 3, T, H, W) -> fc8 logits (B, num_classes)."""
        return self.head(self.conv_features(x))[1]

    def fc7(self, x: Tensor) -> Tensor:  # noqa: F811 - the method shadows the layer's attribute, not its state key
        """fc7 activations after ReLU (B, fc_dim): TGAN2's `get_feature`, the features its FID uses.

        The fc7 *layer* stays registered as `fc7` (state key `fc7.weight`); reach it as `model._modules["fc7"]`.
        """
        return self.head(self.conv_features(x))[0]

    def probs(self, x: Tensor) -> Tensor:
        """Class probabilities (B, num_classes): softmax of fc8, what the Inception Score consumes."""
        return self.forward(x).softmax(dim=-1)


def tgan2_preprocess(x: Tensor, mean_crop_bgr: Tensor | float, size: Sequence[int] | None = None) -> Tensor:
    """TGAN2's C3D input from generator-convention videos: float RGB in [-1, 1], (B, 3, T, H, W).

    RGB -> BGR, times 128, per-frame bilinear resize to `size` (align_corners=True, as chainer's resize_images; no
    crop, aspect ratio not kept), then `+ (128 - mean_crop_bgr)`. `size` defaults to the mean's last two dims
    (112x112 for TGAN2's (3, 16, 112, 112) mean); with a scalar mean it defaults to (112, 112).
    """
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"expected RGB videos (B, 3, T, H, W), got {tuple(x.shape)}")
    mean = torch.as_tensor(mean_crop_bgr, dtype=x.dtype, device=x.device)
    if size is None:
        size = tuple(mean.shape[-2:]) if mean.ndim >= 2 else (112, 112)
    if mean.ndim == 4 and mean.shape[1] != x.shape[2]:
        raise ValueError(f"the mean has {mean.shape[1]} frames but the videos have {x.shape[2]}")
    b, c, t, h, w = x.shape
    x = 128.0 * x[:, [2, 1, 0]]  # RGB -> BGR, [-1, 1] -> [-128, 128]
    if (h, w) != tuple(size):
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        frames = F.interpolate(frames, size=tuple(size), mode="bilinear", align_corners=True)
        x = frames.reshape(b, t, c, *size).transpose(1, 2)
    return x + (128.0 - mean)


def videos_to_c3d_input(videos: Tensor, mean_crop_bgr: Tensor | float, size: Sequence[int] | None = None) -> Tensor:
    """Generator-contract output, uint8 (B, T, H, W, 3) RGB, -> TGAN2's C3D input (B, 3, T, 112, 112).

    The bridge is x = u / 127.5 - 1 (the exact inverse of the usual uint8 quantisation of [-1, 1] videos; TGAN2 fed
    its generator's float output clipped to [-1, 1] directly), so a uint8 pixel u reaches the net as
    (u / 127.5) * 128 - mean, i.e. 255 -> 256 - mean as in TGAN2.
    """
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected uint8 videos (B, T, H, W, 3), got {videos.dtype} {tuple(videos.shape)}")
    x = videos.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (B, 3, T, H, W)
    return tgan2_preprocess(x, mean_crop_bgr, size)


def load_c3d(path: str | Path, device: str | torch.device = "cpu", **c3d_kwargs) -> tuple[C3D, Tensor]:
    """(C3D in eval mode, mean_crop_bgr (3, 16, 112, 112)) from the project's safetensors weight file.

    `c3d_kwargs` go to `C3D` (the official file needs none). A file with a (3, T, H, W) mean larger than 112x112 is
    cropped as TGAN2 does ([:, :, 8:120, 8:120]); a mean already at the network's size is used as is.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"C3D weight file not found: {path}. The official UCF-101 C3D for the Inception Score is "
            f"{OFFICIAL_FILES}.")
    from safetensors.torch import load_file

    state = load_file(path)
    if "mean" not in state:
        raise CheckpointKeyError(f"checkpoint {path} has no `mean` tensor (TGAN2's mean2.npz, (3, 16, 128, 171) BGR); "
                                 f"keys: {', '.join(sorted(state))}")
    mean = state.pop("mean").float()
    file_mean_shape = tuple(mean.shape)
    model = C3D(**c3d_kwargs)
    load_state_dict_checked(model, {k: v.float() for k, v in state.items()}, path)
    _, h, w = model.input_size
    if tuple(mean.shape[-2:]) != (h, w):
        mean = mean[..., MEAN_CROP[0], MEAN_CROP[1]]
        if tuple(mean.shape[-2:]) != (h, w):
            raise ValueError(f"mean in {path} has shape {file_mean_shape}; expected (3, T, 128, 171) "
                             f"(cropped to 8:120) or (3, T, {h}, {w})")
    return model.to(device).eval(), mean.contiguous().to(device)
