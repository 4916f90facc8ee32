"""The evaluation protocol offline, on the embedded synthetic dataset (`eval=synthetic`).

Same pipeline as UCF-101 (sharded resumable generation, FVD, IS), with feature networks the project trains itself
on the synthetic dataset (eval/synthetic_nets.py, trained on first use and cached): an I3D-architecture net whose
time-averaged joint-class logits are the FVD embedding, and a C3D-architecture net whose joint-class
(shape x colour x motion) probabilities give the Inception Score. Text alignment: the accuracy with which the I3D
net recognises, in each generated video, the shape, colour and motion its prompt asked for.

Prompts are the captions of the dataset's test split (items 0..N-1); the real side of FVD is the rendered test
videos themselves (items 0..num_real_clips-1), uint8 like the generated ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from datamodules.synthetic import caption_for, render_item
from eval.generation import Job
from eval.metrics.frechet import FrechetDistance
from eval.metrics.inception_score import inception_score
from eval.protocols.base import Protocol, batched, cached, file_sha256, generated_batches
from eval.synthetic_nets import ATTRIBUTE_VALUES, ATTRIBUTES, ensure_feature_net, feature_net_path, prompt_attributes


class SyntheticProtocol(Protocol):
    name = "synthetic"

    def __init__(
        self,
        num_videos: int = 256,
        num_frames: int = 8,
        resolution: int = 32,
        dataset_seed: int = 0,
        split: str = "test",
        num_real_clips: int = 512,
        is_splits: int = 1,
        feature_nets: dict[str, dict[str, Any]] | None = None,
        net_dir: str | None = None,
        seed: int = 0,
        score_batch_size: int = 32,
        cache_dir: str | None = None,
        limit: int | None = None,
    ):
        super().__init__(num_frames, seed, score_batch_size, cache_dir, limit)
        if num_videos < 2 or num_real_clips < 2:
            raise ValueError("eval.num_videos and eval.num_real_clips must be at least 2 (covariances)")
        self.num_videos, self.resolution = num_videos, resolution
        self.dataset_seed, self.split = dataset_seed, split
        self.num_real_clips, self.is_splits = num_real_clips, is_splits
        self.net_settings = {kind: {"num_frames": num_frames, "resolution": resolution, "seed": dataset_seed,
                                    **(feature_nets or {}).get(kind, {})} for kind in ("i3d", "c3d")}
        self.net_dir = Path(net_dir) if net_dir else None

    def check_inputs(self) -> None:
        if self.net_dir is None:
            raise ValueError("eval.net_dir must name a folder for the synthetic feature networks")

    def net_paths(self) -> dict[str, Path]:
        return {kind: feature_net_path(kind, self.net_dir, settings) for kind, settings in self.net_settings.items()}

    def weight_files(self) -> dict[str, Path]:
        return self.net_paths()

    def prompts(self) -> list[str]:
        prompts = []
        for index in range(self.num_videos):
            attributes, _ = render_item(index, 1, (8, 8), self.dataset_seed, self.split)  # cheap: attributes only
            prompts.append(caption_for(*attributes))
        return prompts

    def settings(self) -> dict[str, Any]:
        return {
            "protocol": self.name, "num_videos": self.num_videos, "num_frames": self.num_frames,
            "resolution": self.resolution, "dataset_seed": self.dataset_seed, "split": self.split,
            "seed": self.seed, "limit": self.limit, "prompts": "captions of the split's items 0..N-1",
            "fvd": {"network": "I3D architecture trained on the synthetic dataset (joint shape/colour/motion classes)",
                    "embedding": "joint-class logits averaged over time", "covariance": "unbiased",
                    "real": {"split": self.split, "num_clips": self.num_real_clips}},
            "is": {"network": "C3D architecture trained on the synthetic dataset", "splits": self.is_splits,
                   "eps": 1e-20},
            "text_alignment": "accuracy of the I3D net's marginal shape/colour/motion prediction vs the prompt",
            "feature_nets": self.net_settings,
        }

    def real_clips(self) -> list[torch.Tensor]:
        return [torch.from_numpy(render_item(i, self.num_frames, (self.resolution, self.resolution),
                                             self.dataset_seed, self.split)[1]) for i in range(self.num_real_clips)]

    def score(self, out_dir: Path, jobs: list[Job], device: torch.device) -> dict[str, Any]:
        nets = {kind: ensure_feature_net(kind, self.net_dir, settings, device=device)
                for kind, settings in self.net_settings.items()}
        i3d, c3d = nets["i3d"], nets["c3d"]
        key = {"what": "synthetic real I3D stats", "i3d_sha256": file_sha256(self.net_paths()["i3d"]),
               **self.settings()["fvd"]["real"], "num_frames": self.num_frames, "resolution": self.resolution,
               "dataset_seed": self.dataset_seed}

        def real_stats() -> dict[str, torch.Tensor]:
            side = FrechetDistance(i3d.num_classes)
            for batch in batched(iter(self.real_clips()), self.score_batch_size):
                side.update(i3d.embedding(batch).double(), real=True)
            return side.real_stats()

        stats, from_cache = cached(self.cache_dir, key, real_stats)
        fvd = FrechetDistance(i3d.num_classes)
        fvd.load_real_stats(**stats)
        probs, correct, counted = [], {a: 0 for a in ATTRIBUTES}, {a: 0 for a in ATTRIBUTES}
        for chunk, videos in generated_batches(out_dir, jobs, self.score_batch_size):
            fvd.update(i3d.embedding(videos).double(), real=False)
            probs.append(c3d.probs(videos).double())
            predicted = i3d.attribute_predictions(videos)
            for k, job in enumerate(chunk):
                asked = prompt_attributes(job.prompt)
                for attribute in ATTRIBUTES:
                    wanted = getattr(asked, attribute)
                    if wanted is None:
                        continue
                    drawn = ATTRIBUTE_VALUES[attribute][int(predicted[attribute][k])]
                    correct[attribute] += int(drawn == wanted)
                    counted[attribute] += 1
        is_mean, is_std = inception_score(torch.cat(probs), self.is_splits)
        accuracy = {f"acc_{a}": correct[a] / counted[a] for a in ATTRIBUTES if counted[a]}
        return {"fvd": float(fvd.compute()), "is": is_mean, "is_std": is_std, **accuracy,
                "text_alignment": sum(accuracy.values()) / len(accuracy), "num_real_clips": int(stats["count"]),
                "real_stats_cached": from_cache}
