"""UCF-101 zero-shot protocol: FVD (Inception-I3D, Kinetics-400) against real UCF-101 clips, and the video
Inception Score (TGAN2's C3D fine-tuned on UCF-101), for videos generated from one prompt per class.

Videos per class: `num_videos` following the class distribution of the train split (10,000 by default), or
`videos_per_class` for each class (100 -> 10,100). Video i of the list is generated with seed `seed + i`; the list is
class-major (all videos of class 0, then class 1, ...), so a `limit` subset takes whole leading classes: use
`videos_per_class` with a smaller count for a class-balanced subset instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.ucf101 import (
    UCF101_CLASSES, read_class_index, real_clips, train_class_distribution, ucf101_prompts, videos_per_class,
)
from eval.generation import Job
from eval.metrics.c3d import OFFICIAL_FILES as C3D_OFFICIAL
from eval.metrics.c3d import load_c3d
from eval.metrics.frechet import FrechetVideoDistance
from eval.metrics.i3d import OFFICIAL_WEIGHTS_HINT as I3D_OFFICIAL
from eval.metrics.i3d import load_i3d
from eval.metrics.inception_score import VideoInceptionScore
from eval.protocols.base import Protocol, batched, cached, file_sha256, generated_batches, require_file

PROMPT_KINDS = ("class_name", "descriptive")
CROPS = ("center", "none")


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
        i3d_crop: str = "center",
        num_real_clips: int = 10_000,
        real_split: str = "train",
        real_clip_sampling: str = "seeded",
        real_frame_stride: int = 1,
        is_splits: int = 1,
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
        if i3d_crop not in CROPS:
            raise ValueError(f"eval.i3d_crop must be one of {CROPS}, got {i3d_crop!r}")
        if is_splits < 1 or num_real_clips < 2:
            raise ValueError("eval.is_splits must be >= 1 and eval.num_real_clips >= 2")
        self.root = Path(root)
        self.i3d_weights, self.c3d_weights = i3d_weights, c3d_weights
        self.c3d_kwargs = dict(c3d_kwargs or {})  # C3D shape options; empty for TGAN2's network (tests shrink it)
        self.num_videos, self.videos_per_class = num_videos, videos_per_class
        self.prompt_kind, self.fold = prompts, fold
        self.i3d_size, self.i3d_crop = i3d_size, i3d_crop
        self.num_real_clips, self.real_split = num_real_clips, real_split
        self.real_clip_sampling, self.real_frame_stride = real_clip_sampling, real_frame_stride
        self.is_splits = is_splits

    def check_inputs(self) -> None:
        read_class_index(self.root)  # the dataset's own error names the expected layout and where to get it
        require_file(self.i3d_weights, "I3D (eval.i3d_weights)", I3D_OFFICIAL)
        require_file(self.c3d_weights, "C3D (eval.c3d_weights)", C3D_OFFICIAL)

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
        return {
            "protocol": self.name, "root": str(self.root), "fold": self.fold, "num_frames": self.num_frames,
            "num_videos": self.num_videos, "videos_per_class": self.videos_per_class, "prompts": self.prompt_kind,
            "seed": self.seed, "limit": self.limit,
            "fvd": {"network": "Inception-I3D Kinetics-400 (TF semantics, BN eps 1e-3)",
                    "embedding": "400-d logits averaged over time", "input": "2*u/255-1",
                    "size": self.i3d_size, "crop": self.i3d_crop, "resize": "bilinear, align_corners=False",
                    "covariance": "unbiased", "sqrtm": "symmetric eigendecomposition, float64",
                    "real": {"split": self.real_split, "num_clips": self.num_real_clips,
                             "clip_sampling": self.real_clip_sampling, "frame_stride": self.real_frame_stride}},
            "is": {"network": "TGAN2 C3D (UCF-101)", "preprocess": "TGAN2: BGR, (x+1)*128 - mean, 112x112 "
                   "align_corners", "splits": self.is_splits, "eps": 1e-20},
        }

    def real_fvd_stats(self, fvd: FrechetVideoDistance, i3d_hash: str) -> tuple[dict[str, torch.Tensor], bool]:
        key = {"what": "ucf101 real I3D stats", "i3d_sha256": i3d_hash, **self.settings()["fvd"]["real"],
               "root": str(self.root.resolve()), "fold": self.fold, "num_frames": self.num_frames,
               "size": self.i3d_size, "crop": self.i3d_crop}

        def compute() -> dict[str, torch.Tensor]:
            clips = real_clips(self.root, self.real_split, self.fold, self.num_frames, self.num_real_clips,
                               seed=self.seed, frame_stride=self.real_frame_stride,
                               clip_sampling=self.real_clip_sampling)
            for batch in batched(clips, self.score_batch_size):
                fvd.update(batch, real=True)
            return fvd.real_stats()

        return cached(self.cache_dir, key, compute)

    def score(self, out_dir: Path, jobs: list[Job], device: torch.device) -> dict[str, Any]:
        i3d = load_i3d(self.i3d_weights, device=device)
        fvd = FrechetVideoDistance(i3d, size=self.i3d_size, crop=self.i3d_crop, batch_size=self.score_batch_size)
        stats, from_cache = self.real_fvd_stats(fvd, file_sha256(self.i3d_weights))
        fvd.load_real_stats(**stats)
        c3d, mean = load_c3d(self.c3d_weights, device=device, **self.c3d_kwargs)
        inception = VideoInceptionScore(c3d, mean, splits=self.is_splits, chunk_size=self.score_batch_size)
        for _, videos in generated_batches(out_dir, jobs, self.score_batch_size):
            fvd.update(videos, real=False)
            inception.update(videos)
        is_mean, is_std = inception.compute()
        return {"fvd": float(fvd.compute()), "is": float(is_mean), "is_std": float(is_std),
                "num_real_clips": int(stats["count"]), "real_stats_cached": from_cache}
