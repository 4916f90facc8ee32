"""UCF-101 zero-shot protocol: FVD (Inception-I3D, Kinetics-400) against real UCF-101 clips, and the video
Inception Score (TGAN2's C3D fine-tuned on UCF-101), for videos generated from one prompt per class.

Videos per class: `num_videos` following the class distribution of the train split (10,000 by default), or
`videos_per_class` for each class (100 -> 10,100). Video i of the list is generated with seed `seed + i`; the list is
class-major (all videos of class 0, then class 1, ...), so a `limit` subset takes whole leading classes: use
`videos_per_class` with a smaller count for a class-balanced subset instead.

Measurement choices are named presets (eval/presets/, docs/evaluation_protocols.md): `fvd_preset` (how frames are
cropped and resized for I3D, identical for real and generated videos), `is_preset` (which videos enter which IS
subset), `real_frame_stride` (an int, or "auto" to match the generator's frame rate). Everything scoring needs
(both networks, strictly loaded, and the real-clip statistics) is prepared before generation (`prepare`).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.utilities import dim_zero_cat

from datamodules.ucf101 import (
    UCF101_CLASSES, read_class_index, read_split, real_clips, train_class_distribution, ucf101_prompts,
    videos_per_class,
)
from eval.generation import Job
from eval.metrics.c3d import OFFICIAL_FILES as C3D_OFFICIAL
from eval.metrics.c3d import OFFICIAL_INPUT_SIZE as C3D_INPUT_SIZE
from eval.metrics.c3d import load_c3d
from eval.metrics.frechet import FrechetVideoDistance
from eval.metrics.i3d import MIN_FRAMES as I3D_MIN_FRAMES
from eval.metrics.i3d import OFFICIAL_WEIGHTS_HINT as I3D_OFFICIAL
from eval.metrics.i3d import load_i3d
from eval.metrics.inception_score import VideoInceptionScore
from eval.presets import frame_rate
from eval.presets import fvd as fvd_presets
from eval.presets import inception_score as is_presets
from eval.protocols.base import Protocol, batched, cached, file_sha256, generated_batches, require_file

PROMPT_KINDS = ("class_name", "descriptive")


def check_frame_count(num_frames: int, c3d_frames: int) -> None:
    """Both feature networks must be able to score `num_frames`-frame videos: I3D needs at least 9 (its time axis
    is ceil(T / 8) - 1 steps after the final pool), TGAN2's C3D exactly the frames its fc6 and mean are sized for."""
    if num_frames < I3D_MIN_FRAMES:
        raise ValueError(f"eval.num_frames={num_frames} is below I3D's minimum of {I3D_MIN_FRAMES} frames (FVD's "
                         f"I3D keeps ceil(T/8) - 1 time steps after its last pool); the UCF-101 protocol uses 16")
    if num_frames != c3d_frames:
        raise ValueError(f"eval.num_frames={num_frames}, but the IS network (TGAN2's C3D) scores {c3d_frames}-frame "
                         f"clips: its fc6 layer and its mean2.npz are sized for {c3d_frames} frames")


def explained(clips: Iterator[torch.Tensor], hint: str) -> Iterator[torch.Tensor]:
    """`clips`, with `hint` added to the ValueError real_clips raises when the split gives too few clips."""
    try:
        yield from clips
    except ValueError as error:
        raise ValueError(f"{error}. {hint}") from error


class UCF101Protocol(Protocol):
    name = "ucf101"

    def __init__(
        self,
        root: str,
        i3d_weights: str | None,
        c3d_weights: str | None,
        c3d_kwargs: dict[str, Any] | None = None,
        num_videos: int | None = 10_000,
        videos_per_class: int | None = None,
        prompts: str = "class_name",
        fold: int = 1,
        num_frames: int = 16,
        i3d_size: int = 224,
        fvd_preset: str = "center_square",
        is_preset: str = "single_split",
        num_real_clips: int = 10_000,
        real_split: str = "train",
        real_clip_sampling: str = "seeded",
        real_frame_stride: int | str = 1,
        real_fps: float = frame_rate.UCF101_FPS,
        seed: int = 0,
        score_batch_size: int = 8,
        cache_dir: str | None = None,
        limit: int | None = None,
    ):
        super().__init__(num_frames, seed, score_batch_size, cache_dir, limit)
        if (num_videos is None) == (videos_per_class is None):
            raise ValueError("set exactly one of eval.num_videos (train-split class distribution) and "
                             "eval.videos_per_class (the same count for every class)")
        if prompts not in PROMPT_KINDS:
            raise ValueError(f"eval.prompts must be one of {PROMPT_KINDS}, got {prompts!r}")
        if num_real_clips < 2:
            raise ValueError("eval.num_real_clips must be at least 2 (a covariance)")
        if real_fps <= 0:
            raise ValueError(f"eval.real_fps must be the real videos' positive frame rate, got {real_fps}")
        self.root = Path(root)
        self.i3d_weights, self.c3d_weights = i3d_weights, c3d_weights
        self.c3d_kwargs = dict(c3d_kwargs or {})  # C3D shape options; empty for TGAN2's network (tests shrink it)
        check_frame_count(num_frames, tuple(self.c3d_kwargs.get("input_size", C3D_INPUT_SIZE))[0])
        self.num_videos, self.videos_per_class = num_videos, videos_per_class
        self.prompt_kind, self.fold = prompts, fold
        self.i3d_size = i3d_size
        self.fvd_preset, self.is_preset = fvd_presets.fvd_preset(fvd_preset), is_presets.is_preset(is_preset)
        self.num_real_clips, self.real_split = num_real_clips, real_split
        self.real_clip_sampling, self.real_fps = real_clip_sampling, float(real_fps)
        self.real_frame_stride_setting = real_frame_stride
        if real_frame_stride != "auto":  # an explicit stride is checked now; "auto" once the generator is known
            frame_rate.real_frame_stride(real_frame_stride, self.real_fps, None)
        self.frame_stride: int | None = None if real_frame_stride == "auto" else real_frame_stride
        self.nets: dict[str, Any] = {}
        self.real_stats: dict[str, Any] = {}
        self.real_stats_cached = False

    def check_inputs(self) -> None:
        read_class_index(self.root)  # the dataset's own error names the expected layout and where to get it
        read_split(self.root, self.real_split, self.fold)
        require_file(self.i3d_weights, "I3D (eval.i3d_weights)", I3D_OFFICIAL)
        require_file(self.c3d_weights, "C3D (eval.c3d_weights)", C3D_OFFICIAL)
        self.is_preset.check(len(self.jobs()))

    def weight_files(self) -> dict[str, Path]:
        return {"i3d": Path(self.i3d_weights), "c3d": Path(self.c3d_weights)}

    def class_counts(self) -> np.ndarray:
        """Videos per class, indexed by the 0-based label of the dataset's classInd.txt."""
        if self.videos_per_class is not None:
            return np.full(max(read_class_index(self.root)) + 1, self.videos_per_class)
        return videos_per_class(self.num_videos, train_class_distribution(self.root, self.fold))

    def prompts(self) -> list[str]:
        names = read_class_index(self.root)  # {label: class name}
        prompt_of = dict(zip(UCF101_CLASSES, ucf101_prompts(self.prompt_kind)))
        unknown = sorted(set(names.values()) - set(prompt_of))
        if unknown:
            raise ValueError(f"classInd.txt names classes that are not UCF-101's: {unknown[:5]}")
        return [prompt_of[names[c]] for c, count in enumerate(self.class_counts()) for _ in range(int(count))]

    def settings(self) -> dict[str, Any]:
        stride = self.frame_stride if self.frame_stride is not None else "auto (resolved in prepare)"
        return {
            "protocol": self.name, "root": str(self.root), "fold": self.fold, "num_frames": self.num_frames,
            "num_videos": self.num_videos, "videos_per_class": self.videos_per_class, "prompts": self.prompt_kind,
            "seed": self.seed, "limit": self.limit,
            "fvd": {"network": "Inception-I3D Kinetics-400 (TF semantics, BN eps 1e-3)",
                    "embedding": "400-d logits averaged over time", "input": "2*u/255-1",
                    "preset": self.fvd_preset.record(self.i3d_size),
                    "covariance": "unbiased", "sqrtm": "symmetric eigendecomposition, float64",
                    "real": {"split": self.real_split, "num_clips": self.num_real_clips,
                             "clip_sampling": self.real_clip_sampling, "frame_stride": stride}},
            "is": {"network": "TGAN2 C3D (UCF-101)", "preprocess": "TGAN2: BGR, (x+1)*128 - mean, 112x112 "
                   "align_corners", "preset": self.is_preset.record(len(self.jobs()), self.seed)},
            "frame_rate": frame_rate.frame_rate_record(self.real_fps, stride, self.generated_fps,
                                                       self.real_frame_stride_setting),
        }

    def real_cache_key(self, i3d_hash: str) -> dict[str, Any]:
        """Everything the real statistics depend on."""
        return {"what": "ucf101 real I3D stats", "i3d_sha256": i3d_hash, "root": str(self.root.resolve()),
                "fold": self.fold, "split": self.real_split, "num_clips": self.num_real_clips,
                "clip_sampling": self.real_clip_sampling, "frame_stride": self.frame_stride, "seed": self.seed,
                "num_frames": self.num_frames, "size": self.i3d_size, "fvd_preset": self.fvd_preset.name,
                "crop": self.fvd_preset.crop}

    def real_fvd_stats(self, fvd: FrechetVideoDistance, i3d_hash: str) -> tuple[dict[str, Any], bool]:
        """(real raw moments + the real-clip report, whether they came from the cache)."""

        def compute() -> dict[str, Any]:
            # As many passes over the split as it would need with no video skipped: a few unusable videos cost
            # nothing, a mostly unusable split (wrong codec, clips too long for its videos) stops the run.
            passes = math.ceil(self.num_real_clips / max(1, len(read_split(self.root, self.real_split, self.fold))))
            report: dict[str, Any] = {}
            clips = real_clips(self.root, self.real_split, self.fold, self.num_frames, self.num_real_clips,
                               seed=self.seed, frame_stride=self.frame_stride, clip_sampling=self.real_clip_sampling,
                               max_passes=passes, report=report)
            span = (self.num_frames - 1) * self.frame_stride + 1
            hint = (f"eval.num_real_clips={self.num_real_clips} clips of eval.num_frames={self.num_frames} frames "
                    f"with eval.real_frame_stride={self.real_frame_stride_setting} (a clip spans {span} source "
                    f"frames) need that many usable videos over {passes} pass(es): lower eval.num_real_clips or "
                    f"the stride, or check data.root")
            for batch in batched(explained(clips, hint), self.score_batch_size):
                fvd.update(batch, real=True)
            return {**fvd.real_stats(), "report": report}

        return cached(self.cache_dir, self.real_cache_key(i3d_hash), compute)

    def _prepare(self, device: torch.device) -> None:
        self.frame_stride = frame_rate.real_frame_stride(self.real_frame_stride_setting, self.real_fps,
                                                         self.generated_fps)
        i3d = load_i3d(self.i3d_weights, device=device)  # strict: a CheckpointKeyError lists missing/unexpected keys
        c3d, mean = load_c3d(self.c3d_weights, device=device, **self.c3d_kwargs)
        if mean.shape[1] != self.num_frames:
            raise ValueError(f"the C3D mean in {self.c3d_weights} has {mean.shape[1]} frames; eval.num_frames is "
                             f"{self.num_frames}")
        fvd = FrechetVideoDistance(i3d, size=self.i3d_size, crop=self.fvd_preset.crop,
                                   batch_size=self.score_batch_size)
        self.real_stats, self.real_stats_cached = self.real_fvd_stats(fvd, file_sha256(self.i3d_weights))
        self.real_report = self.real_stats["report"]
        # kept on the CPU while the generator has the device; scoring moves them back
        self.nets = {"i3d": i3d.cpu(), "c3d": c3d.cpu(), "c3d_mean": mean.cpu()}

    def score(self, out_dir: Path, jobs: list[Job], device: torch.device) -> dict[str, Any]:
        if not self.prepared:
            self.prepare(device)
        fvd = FrechetVideoDistance(self.nets["i3d"].to(device), size=self.i3d_size, crop=self.fvd_preset.crop,
                                   batch_size=self.score_batch_size)
        fvd.load_real_stats(**{k: self.real_stats[k] for k in ("count", "sum", "outer")})
        inception = VideoInceptionScore(self.nets["c3d"].to(device), self.nets["c3d_mean"].to(device),
                                        chunk_size=self.score_batch_size)  # class probabilities, in video order
        for _, videos in generated_batches(out_dir, jobs, self.score_batch_size):
            fvd.update(videos, real=False)
            inception.update(videos)
        return {"fvd": float(fvd.compute()),
                **is_presets.preset_inception_score(dim_zero_cat(inception.probs), self.is_preset, self.seed),
                "num_real_clips": int(self.real_stats["count"]), "real_stats_cached": self.real_stats_cached}

