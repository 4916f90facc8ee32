"""Inception Score presets (`eval.is_preset`): which of the N generated videos enter which score, and how the reported
mean and std arise. The per-subset formula is TGAN2's (`eval.metrics.inception_score.inception_score`).

- single_split (the default since the first version of this protocol, so earlier numbers stay reproducible): one
  score over all N videos; its std is 0 by construction.
- tgan2: 10 runs of 2,048 videos, one split each; mean and std (ddof 0, numpy's default) over the runs. TGAN2's
  UCF-101 evaluation samples 2,048 fresh videos per loop, 10 loops (pfnet-research/tgan2 README and
  `tgan2/evaluations/inception_score.py`; the loop count is its scripts').
- stylegan_v: 2,048 videos, rows shuffled with numpy RandomState(42), 10 consecutive splits; mean and std over the
  splits, no eps (universome/stylegan-v `src/metrics/video_inception_score.py`, metric `isv2048_ucf`).

Subsets: the protocol's video list is class-major (all videos of class 0, then class 1, ...), so consecutive blocks
would hold a few classes each. A preset with a subset size reads one seeded permutation of 0..N-1
(numpy default_rng(eval.seed)) as a ring: run r takes positions [r * size, (r + 1) * size) modulo N, sorted into
generation order. The runs are disjoint when runs * size <= N; otherwise every video is used
floor or ceil(runs * size / N) times, never twice in one run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eval.metrics.inception_score import inception_score


@dataclass(frozen=True)
class ISPreset:
    name: str
    subset_size: int | None  # videos per run; None: all N
    runs: int  # independent subsets; with runs > 1 the std is over runs
    splits: int  # consecutive splits within a run; with splits > 1 the std is over splits
    eps: float  # added to every probability (TGAN2: 1e-20; StyleGAN-V: none)
    shuffle_seed: int | None  # numpy RandomState seed that shuffles a run's rows before splitting (StyleGAN-V: 42)
    reference: str

    def videos_needed(self) -> int:
        return self.subset_size or self.splits

    def check(self, num_videos: int) -> None:
        """Raise a ValueError that says what to set when `num_videos` generated videos are too few for this preset."""
        if num_videos < self.videos_needed():
            raise ValueError(
                f"eval.is_preset={self.name} scores {self.runs} subset(s) of {self.videos_needed():,} generated "
                f"videos, but this run generates {num_videos:,}; generate at least {self.videos_needed():,} "
                f"(eval.num_videos / eval.videos_per_class, without a smaller eval.limit) or choose "
                f"eval.is_preset=single_split")

    def record(self, num_videos: int, seed: int) -> dict[str, Any]:
        """The preset with its concrete settings and the subsets it draws from `num_videos`, for results.json."""
        size = self.subset_size or num_videos
        uses = -(-self.runs * size // num_videos) if num_videos else 0
        std = "0 (one split of one run)" if self.runs == 1 and self.splits == 1 else (
            f"ddof 0 over the {self.runs} runs" if self.runs > 1 else f"ddof 0 over the {self.splits} splits")
        return {"name": self.name, "subset_size": size, "runs": self.runs, "splits": self.splits, "eps": self.eps,
                "shuffle_before_splitting": None if self.shuffle_seed is None else
                f"numpy RandomState({self.shuffle_seed}).shuffle", "std": std,
                "subset_rule": "all videos" if self.subset_size is None else
                "ring of a seeded permutation of 0..N-1 (numpy default_rng(seed)); run r takes positions "
                "[r*size, (r+1)*size) mod N",
                "subset_seed": seed, "videos_available": num_videos,
                "disjoint": self.runs * size <= num_videos, "max_runs_per_video": uses,
                "reference": self.reference}


IS_PRESETS = {
    preset.name: preset
    for preset in (
        ISPreset("single_split", None, 1, 1, 1e-20, None,
                 "this project's protocol since its first version (default: earlier numbers stay reproducible)"),
        ISPreset("tgan2", 2048, 10, 1, 1e-20, None,
                 "pfnet-research/tgan2: 10 sampling loops of 2,048 videos, inception_score(splits=1)"),
        ISPreset("stylegan_v", 2048, 1, 10, 0.0, 42,
                 "universome/stylegan-v src/metrics/video_inception_score.py (isv2048_ucf: 2,048 videos, "
                 "10 splits after RandomState(42) shuffling)"),
    )
}


def is_preset(name: str) -> ISPreset:
    if name not in IS_PRESETS:
        raise ValueError(f"eval.is_preset must be one of {sorted(IS_PRESETS)}, got {name!r} "
                         f"(docs/evaluation_protocols.md describes each)")
    return IS_PRESETS[name]


def is_subsets(num_videos: int, preset: ISPreset, seed: int) -> list[np.ndarray]:
    """The video indices of each run, each sorted (generation order); see the module docstring for the rule."""
    preset.check(num_videos)
    if preset.subset_size is None:
        return [np.arange(num_videos)]
    ring = np.random.default_rng(seed).permutation(num_videos)
    size = preset.subset_size
    return [np.sort(ring[np.arange(r * size, (r + 1) * size) % num_videos]) for r in range(preset.runs)]


def preset_inception_score(probs: torch.Tensor, preset: ISPreset, seed: int) -> dict[str, Any]:
    """{"is": mean, "is_std": std[, "is_runs": per-run scores]} of class probabilities (N, classes) in video order."""
    probs = torch.as_tensor(probs)
    per_run = []
    for indices in is_subsets(len(probs), preset, seed):
        rows = probs[torch.from_numpy(indices)]
        if preset.shuffle_seed is not None:  # StyleGAN-V shuffles the rows it generated before splitting
            order = np.arange(len(rows))
            np.random.RandomState(preset.shuffle_seed).shuffle(order)
            rows = rows[torch.from_numpy(order)]
        per_run.append(inception_score(rows, preset.splits, preset.eps))
    if preset.runs == 1:
        mean, std = per_run[0]
        return {"is": mean, "is_std": std}
    means = np.array([m for m, _ in per_run])
    return {"is": float(means.mean()), "is_std": float(means.std()), "is_runs": [float(m) for m in means]}
