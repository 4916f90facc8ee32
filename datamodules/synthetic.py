"""The embedded default dataset: procedurally rendered, captioned videos that need no download.

Each item is one shape of one colour doing one motion on one background, e.g. "a red circle moving left on a dark
background", with the four attributes as class labels. Item `index` under `seed` is always the same video, at any
resolution and length, so eval code can regenerate ground truth (`attributes_for`) and score attribute accuracy.

Rendering is vectorised over (frame, row, column): each shape is a distance-like function on a coordinate grid,
turned into a one-pixel antialiased alpha mask, so thousands of small clips render in seconds on a CPU.
Motion runs on normalised time (first frame t=0, last t=1), so a clip of any length shows the whole motion and the
object stays in the frame.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule, Resolution, as_resolution
from datamodules.transforms import to_model_range

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
MOTIONS = ("left", "right", "up", "down", "grow", "shrink", "rotate", "still")
BACKGROUNDS = ("dark", "light", "gray", "checkered")
FPS = 8.0

# Saturated colours that stay distinct from each other and from every background.
RGB = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 215, 30),
    "purple": (160, 60, 220),
    "cyan": (40, 210, 220),
}
# A background is two tones; plain ones repeat a tone, "checkered" alternates square cells of 1/8 the shorter side.
_BACKGROUND_TONES = {
    "dark": ((20, 20, 28), (20, 20, 28)),
    "light": ((225, 225, 215), (225, 225, 215)),
    "gray": ((128, 128, 128), (128, 128, 128)),
    "checkered": ((70, 70, 70), (115, 115, 115)),
}
_CHECKER_CELLS = 8

_MOTION_PHRASES = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "grow": "growing",
    "shrink": "shrinking",
    "rotate": "rotating",
    "still": "standing still",
}
# A rotating circle looks exactly like a still one, which would make its motion label unlearnable.
_ROTATION_SHAPES = tuple(s for s in SHAPES if s != "circle")
# Half of each shape's symmetry angle: the largest visible change, the last frame as different from the first as
# it can be (a full symmetry period would end where it started).
HALF_SYMMETRY = {"square": np.pi / 4, "triangle": np.pi / 3, "star": np.pi / 5, "cross": np.pi / 4}

# Object radius as a fraction of the shorter side: the object spans about 0.6 of the frame. At 32x32 a third of the
# frame (radius 0.19, 11% of the pixels) was too small a part of the diffusion loss for the tiny LaVie to bind
# colour words within the demo's run (docs/tiny_lavie.md: colour-swapped captions left the loss unchanged after
# 1500 steps; at 0.3 the colour shows in the model's predictions by step 500).
_RADIUS = 0.3
# Objects start upright, up to this many radians off. Drawn at any angle (as up to 2026-12), every shape averaged
# over its angle is a round blob: that average is what a denoiser predicts from a noisy frame before the angle can
# be told, so the tiny LaVie drew blobs for every shape word (docs/tiny_lavie.md, session 6).
ANGLE_JITTER = 0.15
TRAVEL = 0.4  # left/right/up/down: distance travelled over the clip, as a fraction of the frame
SIZE_RANGE = (0.55, 1.45)  # grow/shrink: radius multiplier at the ends of the clip
_SPLITS = {"train": 0, "val": 1, "test": 2}  # separate seed streams, so val items are not train items


class Attributes(NamedTuple):
    shape: str
    colour: str
    motion: str
    background: str

    def labels(self) -> dict[str, int]:
        """Class indices into SHAPES, COLOURS, MOTIONS, BACKGROUNDS."""
        return {
            "shape": SHAPES.index(self.shape),
            "colour": COLOURS.index(self.colour),
            "motion": MOTIONS.index(self.motion),
            "background": BACKGROUNDS.index(self.background),
        }


class Layout(NamedTuple):
    """Per-item jitter, so items sharing attributes still differ (fractions of the frame, radians)."""

    cx: float
    cy: float
    radius: float
    angle: float
    spin: float  # +1 counter-clockwise, -1 clockwise


def caption_for(shape: str, colour: str, motion: str | None, background: str) -> str:
    """Caption like "a red circle moving left on a dark background"; motion None gives an image caption."""
    verb = "" if motion is None else f" {_MOTION_PHRASES[motion]}"
    return f"a {colour} {shape}{verb} on a {background} background"


def _rng(index: int, seed: int, split: str, image_mode: bool) -> np.random.Generator:
    # SeedSequence mixes the whole key, so (seed, split, mode, index) streams never overlap or shift each other.
    return np.random.default_rng([seed, _SPLITS[split], int(image_mode), index])


def _draw_attributes(rng: np.random.Generator, image_mode: bool) -> Attributes:
    motion = "still" if image_mode else MOTIONS[rng.integers(len(MOTIONS))]
    shapes = _ROTATION_SHAPES if motion == "rotate" else SHAPES
    shape = shapes[rng.integers(len(shapes))]
    return Attributes(shape, COLOURS[rng.integers(len(COLOURS))], motion, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])


def attributes_for(index: int, seed: int = 0, split: str = "train", image_mode: bool = False) -> Attributes:
    """The attributes of item `index` of SyntheticVideoDataset(seed=seed, split=split, image_mode=image_mode)."""
    return _draw_attributes(_rng(index, seed, split, image_mode), image_mode)


def _draw_layout(rng: np.random.Generator) -> Layout:
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05, size=2)
    angle = rng.uniform(-ANGLE_JITTER, ANGLE_JITTER)
    return Layout(cx, cy, _RADIUS * rng.uniform(0.9, 1.1), angle, rng.choice([-1.0, 1.0]))


def _trajectory(attributes: Attributes, layout: Layout, t: np.ndarray) -> tuple[np.ndarray, ...]:
    """Centre x, y (fractions of width/height), radius (fraction of the shorter side) and angle, each [T]."""
    cx, cy = np.full_like(t, layout.cx), np.full_like(t, layout.cy)
    radius, angle = np.full_like(t, layout.radius), np.full_like(t, layout.angle)
    motion = attributes.motion
    if motion in ("left", "right"):
        cx = cx + TRAVEL * (t - 0.5) * (1 if motion == "right" else -1)
    elif motion in ("up", "down"):
        cy = cy + TRAVEL * (t - 0.5) * (1 if motion == "down" else -1)  # image rows grow downwards
    elif motion in ("grow", "shrink"):
        low, high = SIZE_RANGE
        growth = t if motion == "grow" else 1 - t
        radius = radius * (low + (high - low) * growth)
    elif motion == "rotate":
        angle = angle + layout.spin * HALF_SYMMETRY[attributes.shape] * t
    return cx, cy, radius, angle


def _star_distance(u: np.ndarray, v: np.ndarray, points: int, outer: float, inner: float) -> np.ndarray:
    """Radial distance outside a star polygon (a regular polygon when inner = outer * cos(pi / points)).

    The angle is folded into half a sector; there the boundary is the straight edge from the outer vertex
    P0 = (outer, 0) to the inner vertex P1 at half a sector, and the ray at angle a meets it at
    R(a) = (P0 x e) / (d(a) x e), with e = P1 - P0 and d(a) the unit ray direction.
    """
    sector = 2 * np.pi / points
    theta = np.mod(np.arctan2(v, u) + np.pi / 2, sector)  # 0 = a vertex pointing up (rows grow downwards)
    folded = np.minimum(theta, sector - theta)  # [0, sector / 2]
    ex, ey = inner * np.cos(sector / 2) - outer, inner * np.sin(sector / 2)
    boundary = outer * ey / (np.cos(folded) * ey - np.sin(folded) * ex)
    return np.hypot(u, v) - boundary


def _box_distance(u: np.ndarray, v: np.ndarray, half_width: float, half_height: float) -> np.ndarray:
    return np.maximum(np.abs(u) - half_width, np.abs(v) - half_height)


# Distance-like functions in object coordinates (unit = object radius); negative inside. Sizes roughly equalise
# the areas so no shape is much easier to see than another.
_SHAPE_DISTANCE = {
    "circle": lambda u, v: np.hypot(u, v) - 1.0,
    "square": lambda u, v: _box_distance(u, v, 0.85, 0.85),
    "triangle": lambda u, v: _star_distance(u, v, 3, 1.2, 1.2 * np.cos(np.pi / 3)),
    "star": lambda u, v: _star_distance(u, v, 5, 1.25, 0.53),
    "cross": lambda u, v: np.minimum(_box_distance(u, v, 1.0, 0.36), _box_distance(u, v, 0.36, 1.0)),
}


def _background(name: str, height: int, width: int) -> np.ndarray:
    """float32 [H, W, 3]."""
    tone_a, tone_b = (np.array(tone, dtype=np.float32) for tone in _BACKGROUND_TONES[name])
    side = min(height, width)
    rows = (np.arange(height) * _CHECKER_CELLS // side)[:, None]
    columns = (np.arange(width) * _CHECKER_CELLS // side)[None, :]
    checker = ((rows + columns) % 2).astype(np.float32)[..., None]  # (H, W, 1)
    return tone_a * (1 - checker) + tone_b * checker


def coverage(shape: str, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, angle: np.ndarray,
             resolution: Resolution) -> np.ndarray:
    """float32 [N, H, W] in [0, 1]: how much of each pixel `shape` covers, for N placements given as arrays [N] of
    centre x, y (fractions of width/height), radius (fraction of the shorter side) and angle (radians), with a
    one-pixel antialiased edge. What `render` blends with, and what a recogniser compares a drawn object with."""
    height, width = resolution
    cx, cy, radius, angle = (np.asarray(a, dtype=np.float32).reshape(-1, 1, 1) for a in (cx, cy, radius, angle))
    # Pixel centres in units of the shorter side, so shapes stay round on non-square frames.
    side = min(height, width)
    xs = ((np.arange(width, dtype=np.float32) + 0.5) / side)[None, None, :]  # (1, 1, W)
    ys = ((np.arange(height, dtype=np.float32) + 0.5) / side)[None, :, None]  # (1, H, 1)
    dx, dy = xs - cx * (width / side), ys - cy * (height / side)  # (N, 1, W), (N, H, 1)
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / radius  # (N, H, W) object coordinates, unit = radius
    v = (dy * cos - dx * sin) / radius
    distance_px = _SHAPE_DISTANCE[shape](u, v) * (radius * side)
    return np.clip(0.5 - distance_px, 0.0, 1.0)


def render(attributes: Attributes, num_frames: int, resolution: Resolution, layout: Layout | None = None) -> np.ndarray:
    """uint8 [T, H, W, 3] showing `attributes`; `layout` defaults to a centred, upright, mid-sized object."""
    height, width = resolution
    layout = layout or Layout(0.5, 0.5, _RADIUS, 0.0, 1.0)
    t = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    alpha = coverage(attributes.shape, *_trajectory(attributes, layout, t), (height, width))[..., None]  # (T,H,W,1)
    background = _background(attributes.background, height, width)  # (H, W, 3)
    colour = np.array(RGB[attributes.colour], dtype=np.float32)
    frames = background + alpha * (colour - background)  # (T, H, W, 3), alpha-blended
    return (frames + 0.5).astype(np.uint8)  # round half up; values are already in [0, 255]


def render_item(index: int, num_frames: int, resolution: Resolution, seed: int = 0, split: str = "train",
                image_mode: bool = False) -> tuple[Attributes, np.ndarray]:
    """(attributes, uint8 [T, H, W, 3]) of item `index` of SyntheticVideoDataset(seed=seed, split=split, ...)."""
    rng = _rng(index, seed, split, image_mode)
    attributes = _draw_attributes(rng, image_mode)  # drawn first: attributes_for replays exactly this
    return attributes, render(attributes, 1 if image_mode else num_frames, as_resolution(resolution), _draw_layout(rng))


# Reading a frame back (generated videos, tokenizer reconstructions): every background is a grey tone and every
# object colour is saturated, so a pixel whose channels differ by more than this belongs to the object.
MIN_SATURATION = 60


def object_pixels(frames: np.ndarray) -> np.ndarray:
    """bool [..., H, W]: the saturated pixels of uint8 frames [..., H, W, 3], i.e. where an object is drawn."""
    frames = np.asarray(frames, dtype=np.int16)
    return frames.max(axis=-1) - frames.min(axis=-1) > MIN_SATURATION


def drawn_colour(frames: np.ndarray) -> str | None:
    """The colour name in RGB nearest to the mean of the saturated pixels of uint8 frames [..., H, W, 3]; None when
    under 1% of the pixels are saturated (nothing coloured is drawn)."""
    frames = np.asarray(frames)
    mask = object_pixels(frames)
    if mask.sum() < 0.01 * mask.size:
        return None
    mean = frames[mask].astype(np.float64).mean(axis=0)
    return min(RGB, key=lambda name: np.linalg.norm(mean - np.array(RGB[name])))


class SyntheticVideoDataset(Dataset):
    """`size` captioned clips of `num_frames` frames at `resolution` (H, W); item i depends only on (i, seed, split).

    image_mode gives still T=1 items (motion label "still", `is_image` True, captions without a motion phrase) from
    their own seed stream, for joint image-video training.
    """

    def __init__(
        self,
        size: int,
        num_frames: int,
        resolution: Resolution,
        seed: int = 0,
        image_mode: bool = False,
        split: str = "train",
    ):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        self.size = int(size)
        self.num_frames = 1 if image_mode else int(num_frames)
        self.resolution = as_resolution(resolution)
        self.seed, self.image_mode, self.split = int(seed), bool(image_mode), split

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        attributes, frames = render_item(index, self.num_frames, self.resolution, self.seed, self.split,
                                         self.image_mode)
        motion = None if self.image_mode else attributes.motion  # image captions name no motion
        item = {
            "video": to_model_range(frames),  # (T, C, H, W)
            "caption": caption_for(attributes.shape, attributes.colour, motion, attributes.background),
            "label": attributes.labels(),
            "is_image": self.image_mode,
        }
        if not self.image_mode:
            item["fps"] = FPS
        return item


class SyntheticDataModule(BaseDataModule):
    """Train/val splits of SyntheticVideoDataset; images_per_video > 0 appends synthetic images (joint mode).

    `frame_stride` is accepted so that every recipe composes with every dataset, and has no effect here: motion
    runs on normalised time, so a clip of `num_frames` frames taken `frame_stride` apart from a longer rendering is
    the same clip as a rendering of `num_frames` frames.
    """

    def __init__(
        self,
        num_frames: int = 16,
        resolution: Resolution = (32, 32),
        train_size: int = 2000,
        val_size: int = 64,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        images_per_video: int = 0,
        image_mode: bool = False,
        frame_stride: int = 1,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, images_per_video=images_per_video, seed=seed)
        self.save_hyperparameters(logger=False)
        self.num_frames, self.resolution = num_frames, as_resolution(resolution)
        self.sizes = {"train": train_size, "val": val_size}
        self.image_mode = image_mode

    def build_dataset(self, split: str) -> Dataset | None:
        if self.sizes[split] == 0:
            return None
        return SyntheticVideoDataset(
            self.sizes[split], self.num_frames, self.resolution, self.seed, image_mode=self.image_mode, split=split
        )

    def build_image_dataset(self, split: str) -> Dataset:
        return SyntheticVideoDataset(self.sizes[split], 1, self.resolution, self.seed, image_mode=True, split=split)
