"""Frame-rate matching of real clips (`eval.real_frame_stride`): real UCF-101 videos are 25 fps, a model's videos
often 8 fps (LaVie's base model; the generator's `fps` attribute), so 16 consecutive real frames span 0.64 s and 16
generated ones 2 s. A stride samples every k-th real frame; "auto" picks k = round(real fps / generated fps), halves
rounded up (25 / 8 -> 3, i.e. 8.33 fps). The stride is part of the real-statistics cache key.
"""
from __future__ import annotations

import math

UCF101_FPS = 25.0  # the dataset page (https://www.crcv.ucf.edu/data/UCF101.php): "frame rate 25 fps"


def real_frame_stride(value: int | str, real_fps: float, generated_fps: float | None) -> int:
    """The stride between sampled real frames: `value` itself (a positive int) or, for "auto", the one that brings
    `real_fps` closest to `generated_fps` by the rounding rule of the module docstring."""
    if value == "auto":
        if not generated_fps or generated_fps <= 0:
            raise ValueError("eval.real_frame_stride=auto needs the generator's frame rate, but it has no positive "
                             "`fps` attribute; give the stride as an integer")
        return max(1, math.floor(real_fps / generated_fps + 0.5))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"eval.real_frame_stride must be a positive integer or 'auto', got {value!r}")
    return value


def frame_rate_record(real_fps: float, stride: int, generated_fps: float | None, setting: int | str) -> dict:
    """Both frame rates and the stride between them, for results.json."""
    return {"real_fps": real_fps, "real_frame_stride": stride, "real_frame_stride_setting": setting,
            "real_clip_fps": real_fps / stride, "generated_fps": generated_fps}
