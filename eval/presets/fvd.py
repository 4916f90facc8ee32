"""FVD preprocessing presets (`eval.fvd_preset`): how a frame of any size becomes the I3D input, applied identically
to real and generated videos. The I3D network, the 2u/255 - 1 scaling and the Frechet formula are the same in all.

- center_square (the default since the first version of this protocol, so earlier numbers stay reproducible): the
  centred min(H, W) square, then a bilinear resize to 224 x 224 (`i3d_input(crop="center")`).
- stylegan_v: the whole frame resized to 224 x 224, no crop, aspect ratio not kept: StyleGAN-V's I3D detector is
  called with `resize=True` on the frames as stored (universome/stylegan-v `src/metrics/frechet_video_distance.py`).
- tats: the shorter side resized to 224 (the longer side to ceil(L * 224 / S)), then the centred 224 x 224 crop:
  `preprocess_single` in songweige/TATS `tats/fvd/fvd.py`.
Every resize is bilinear, align_corners=False, no antialiasing (F.interpolate's default, which TATS calls too; the
resize mode inside StyleGAN-V's TorchScript detector was not checked here). On square frames the three presets differ
only by that resize grid (tats's ceil can add a row), so they matter for real UCF-101 clips (320 x 240).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FVDPreset:
    name: str
    crop: str  # the `crop` mode of eval.metrics.i3d.i3d_input
    steps: str  # what happens to a frame, in words
    reference: str

    def record(self, size: int) -> dict[str, Any]:
        """The preset with its concrete settings, for results.json."""
        return {"name": self.name, "i3d_input_crop": self.crop, "size": size, "steps": self.steps.format(size=size),
                "resize": "bilinear, align_corners=False, no antialias", "applied_to": "real and generated videos",
                "reference": self.reference}


FVD_PRESETS = {
    preset.name: preset
    for preset in (
        FVDPreset("center_square", "center", "centre min(H, W) square crop, then resize to {size}x{size}",
                  "this project's protocol since its first version (default: earlier numbers stay reproducible)"),
        FVDPreset("stylegan_v", "none", "resize the whole frame to {size}x{size} (no crop, aspect not kept)",
                  "universome/stylegan-v src/metrics/frechet_video_distance.py (I3D detector with resize=True)"),
        FVDPreset("tats", "short_side", "resize the shorter side to {size} (longer: ceil), then centre "
                  "{size}x{size} crop", "songweige/TATS tats/fvd/fvd.py preprocess_single"),
    )
}


def fvd_preset(name: str) -> FVDPreset:
    if name not in FVD_PRESETS:
        raise ValueError(f"eval.fvd_preset must be one of {sorted(FVD_PRESETS)}, got {name!r} "
                         f"(docs/evaluation_protocols.md says which paper used which)")
    return FVD_PRESETS[name]
