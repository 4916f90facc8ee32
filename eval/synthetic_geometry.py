"""Read shape, colour and motion back from a video of the synthetic dataset's world by its own geometry.

A cheap recogniser that needs no training, for `make demo`'s check and for following a run: the object is the
saturated pixels (`object_pixels`), colour is their mean (`drawn_colour`), motion is read from the object's centroid
and area over time, and shape is the dataset shape whose drawing (`coverage`, at the object's place, size and best
angle) overlaps the object most. The learned recognisers of `eval=synthetic` (the I3D net) remain the protocol's
measure; this one is exact on rendered clips (tests/test_synthetic_geometry.py) and says how it decided.

Motion rules, in units of what the dataset draws (TRAVEL of the frame for a move, SIZE_RANGE for growth):
- the least-squares slope of the centroid against normalised time (0 at the first frame, 1 at the last), divided by
  TRAVEL, and of log area divided by its log ratio in the data; the largest in magnitude names the motion when it is
  at least MIN_MOTION of what the data does;
- otherwise the object is "rotate" when its last outline, moved onto the first's centroid, overlaps the first by
  less than STILL_IOU, else "still".
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from datamodules.synthetic import (
    HALF_SYMMETRY,
    SHAPES,
    SIZE_RANGE,
    TRAVEL,
    coverage,
    drawn_colour,
    object_pixels,
)

MIN_MOTION = 0.5  # a move or size change counts from half of what the dataset draws
STILL_IOU = 0.85  # first and last outline overlap at least this much when the object neither moves nor turns
MIN_OBJECT_SHARE = 0.01  # below 1% of the pixels, nothing is drawn
ANGLES = 24  # angles tried per shape when matching outlines
_LOG_SIZE_RATIO = 2 * np.log(SIZE_RANGE[1] / SIZE_RANGE[0])  # log area ratio of a full grow


class Reading(NamedTuple):
    """What a video shows; None where nothing coloured is drawn."""

    shape: str | None
    colour: str | None
    motion: str | None


def _unit_areas(resolution: int = 256) -> dict[str, float]:
    """Area of each shape drawn with radius 1, in units of the radius squared (measured on a fine grid)."""
    radius = 0.3
    return {shape: float(coverage(shape, [0.5], [0.5], [radius], [0.0], (resolution, resolution)).sum())
            / (radius * resolution) ** 2 for shape in SHAPES}


_UNIT_AREA = _unit_areas()


def _centroids(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, y (fractions of width, height) and area (pixels) of each frame's mask [T, H, W]."""
    height, width = mask.shape[1:]
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    safe = np.maximum(area, 1)
    xs = ((np.arange(width) + 0.5) / width)[None, None, :]
    ys = ((np.arange(height) + 0.5) / height)[None, :, None]
    return (mask * xs).sum(axis=(1, 2)) / safe, (mask * ys).sum(axis=(1, 2)) / safe, area


def _slope(values: np.ndarray) -> float:
    """Least-squares change of `values` [T] from normalised time 0 to 1."""
    t = np.linspace(0.0, 1.0, len(values))
    return float(np.polyfit(t, values, 1)[0]) if len(values) > 1 else 0.0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """mask [H, W] moved by whole pixels, filling with False."""
    out = np.zeros_like(mask)
    height, width = mask.shape
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        mask[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


def read_motion(mask: np.ndarray) -> str:
    """The dataset motion that the object masks [T, H, W] (at least one pixel in every frame) show."""
    cx, cy, area = _centroids(mask)
    scores = {
        "right": _slope(cx) / TRAVEL,
        "down": _slope(cy) / TRAVEL,  # image rows grow downwards
        "grow": _slope(np.log(area)) / _LOG_SIZE_RATIO,
    }
    kind, score = max(scores.items(), key=lambda item: abs(item[1]))
    if abs(score) >= MIN_MOTION:
        return kind if score > 0 else {"right": "left", "down": "up", "grow": "shrink"}[kind]
    height, width = mask.shape[1:]
    last = _shift(mask[-1], round((cy[0] - cy[-1]) * height), round((cx[0] - cx[-1]) * width))
    return "rotate" if _iou(mask[0], last) < STILL_IOU else "still"


def read_shape(mask: np.ndarray) -> str:
    """The dataset shape whose outline, placed at each frame's centroid with the frame's area and the best angle,
    overlaps the object masks [T, H, W] most on average."""
    height, width = mask.shape[1:]
    cx, cy, area = _centroids(mask)
    side = min(height, width)
    best = {}
    for shape in SHAPES:
        # every shape repeats after twice its half symmetry angle (a circle after any angle: one try suffices)
        period = 2 * HALF_SYMMETRY.get(shape, 0.0)
        angles = np.linspace(0.0, period, ANGLES, endpoint=False) if period else np.zeros(1)
        total = 0.0
        for t in range(len(mask)):
            radius = np.sqrt(area[t] / _UNIT_AREA[shape]) / side
            drawn = coverage(shape, np.full(len(angles), cx[t]), np.full(len(angles), cy[t]),
                             np.full(len(angles), radius), angles, (height, width)) >= 0.5
            overlap = np.logical_and(drawn, mask[t]).sum(axis=(1, 2))
            union = np.logical_or(drawn, mask[t]).sum(axis=(1, 2))
            total += float((overlap / np.maximum(union, 1)).max())
        best[shape] = total / len(mask)
    return max(best, key=best.get)


def read_video(frames: np.ndarray) -> Reading:
    """Shape, colour and motion of uint8 frames [T, H, W, 3] (a generated or rendered clip)."""
    frames = np.asarray(frames)
    mask = object_pixels(frames)
    colour = drawn_colour(frames)
    per_frame = mask.reshape(len(mask), -1).mean(axis=1)
    if colour is None or (per_frame < MIN_OBJECT_SHARE / 4).any():
        return Reading(None, colour, None)  # no object in some frame: neither outline nor motion to read
    return Reading(read_shape(mask), colour, read_motion(mask))
