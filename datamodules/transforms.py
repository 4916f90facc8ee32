"""The one frame pipeline every dataset uses, and the conversions between file frames and model tensors.

Files hold uint8 frames [T, H, W, 3]; models train on float [T, C, H, W] in [-1, 1]. Keeping both directions
here means datasets, samplers and writers agree on the value range without each re-deriving it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


def to_model_range(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [..., T, H, W, 3] -> float32 [..., T, C, H, W] in [-1, 1] (a CPU tensor).

    The arithmetic runs in numpy on purpose: it is single-threaded, while torch's intra-op thread pool costs more
    than it saves on clip-sized tensors in data loading (about 10x slower on a busy 2-core machine).
    """
    array = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    video = np.moveaxis(array, -1, -3).astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # (..., T, C, H, W)
    return torch.from_numpy(np.ascontiguousarray(video))


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """float [..., T, C, H, W] in [-1, 1] -> uint8 [..., T, H, W, 3] (clamped), ready for write_video."""
    return video.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1).cpu()


class ResizeToCover(v2.Transform):
    """Scale so the frame covers `size` (H, W) on both sides, keeping the aspect ratio.

    For a square target this is "resize the shorter side"; for a wide target (e.g. 320x512) it also guarantees the
    width, which a plain shorter-side resize does not, so the following crop never has to pad.
    """

    def __init__(self, size: Sequence[int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        height, width = inpt.shape[-2:]
        scale = max(self.size[0] / height, self.size[1] / width)
        # ceil (minus float noise) so rounding never leaves the frame a pixel short of the crop
        new_size = [math.ceil(height * scale - 1e-6), math.ceil(width * scale - 1e-6)]
        if new_size == [height, width]:
            return inpt
        return self._call_kernel(v2.functional.resize, inpt, new_size, antialias=True)


class _FramesToVideo(v2.Transform):
    """uint8 [T, H, W, 3] -> tv_tensors.Video [T, C, H, W]; as a Video, random crops are shared by all frames."""

    def forward(self, frames: torch.Tensor) -> tv_tensors.Video:
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        return tv_tensors.Video(frames.permute(0, 3, 1, 2))  # (T, C, H, W)


class _PlainTensor(v2.Transform):
    """Drop the tv_tensors subclass so models and collate see an ordinary tensor."""

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return video.as_subclass(torch.Tensor)


def video_transform(resolution: Sequence[int], random_crop: bool = False) -> v2.Compose:
    """uint8 [T, H, W, 3] -> float32 [T, C, h, w] in [-1, 1] with (h, w) = `resolution`.

    Frames are resized to cover the target, then centre-cropped (or randomly cropped, one crop for the whole
    clip). An image is a T=1 video and goes through the same path. The result is a plain module, so it pickles
    into DataLoader workers.
    """
    size = (int(resolution[0]), int(resolution[1]))
    return v2.Compose(
        [
            _FramesToVideo(),
            ResizeToCover(size),
            v2.RandomCrop(size) if random_crop else v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),  # [0, 1]
            v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),  # [-1, 1]
            _PlainTensor(),
        ]
    )
