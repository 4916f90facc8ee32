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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from datamodules.synthetic import caption_for, render_item
from eval.generation import Job
from eval.metrics.frechet import FrechetDistance
from eval.presets import inception_score as is_presets
from eval.protocols.base import Protocol, batched, cached, file_sha256, generated_batches
from eval.synthetic_nets import ATTRIBUTE_VALUES, ATTRIBUTES, ensure_feature_net, feature_net_path, prompt_attributes


def attribute_accuracy(prompts: Sequence[str], predictions: Mapping[str, Sequence[int] | torch.Tensor],
                       ) -> dict[str, float]:
    """Text alignment of N videos: `predictions[attribute][k]` is the index into ATTRIBUTE_VALUES[attribute] that the
    recogniser saw in video k, made from `prompts[k]`. Returns acc_<attribute> (the share of the videos whose prompt
    names that attribute in which the recognised value is the named one; attributes no prompt names are left out)
    and text_alignment, the mean of those accuracies."""
    accuracy = {}
    for attribute in ATTRIBUTES:
        predicted = [int(p) for p in predictions[attribute]]
        if len(predicted) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(predicted)} {attribute} predictions")
        asked = [getattr(prompt_attributes(prompt), attribute) for prompt in prompts]
        hits = [ATTRIBUTE_VALUES[attribute][p] == wanted for p, wanted in zip(predicted, asked) if wanted is not None]
        if hits:
            accuracy[f"acc_{attribute}"] = sum(hits) / len(hits)
    if not accuracy:
        raise ValueError("no prompt names a shape, colour or motion: text alignment is undefined")
    return {**accuracy, "text_alignment": sum(accuracy.values()) / len(accuracy)}


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
        is_preset: str = "single_split",
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
        self.num_real_clips = num_real_clips
        self.is_preset = is_presets.is_preset(is_preset)
        self.net_settings = {kind: {"num_frames": num_frames, "resolution": resolution, "seed": dataset_seed,
                                    **(feature_nets or {}).get(kind, {})} for kind in ("i3d", "c3d")}
        self.net_dir = Path(net_dir) if net_dir else None
        self.nets: dict[str, Any] = {}
        self.real_stats: dict[str, Any] = {}
        self.real_stats_cached = False

    def check_inputs(self) -> None:
        if self.net_dir is None:
            raise ValueError("eval.net_dir must name a folder for the synthetic feature networks")
        self.is_preset.check(len(self.jobs()))

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
            "is": {"network": "C3D architecture trained on the synthetic dataset",
                   "preset": self.is_preset.record(len(self.jobs()), self.seed)},
            "text_alignment": "accuracy of the I3D net's marginal shape/colour/motion prediction vs the prompt",
            "feature_nets": self.net_settings,
            "frame_rate": {"real_fps": None, "generated_fps": self.generated_fps,
                           "note": "real clips are rendered at the protocol's frame count; no frame rate"},
        }

    def real_clips(self) -> list[torch.Tensor]:
        return [torch.from_numpy(render_item(i, self.num_frames, (self.resolution, self.resolution),
                                             self.dataset_seed, self.split)[1]) for i in range(self.num_real_clips)]

    def _prepare(self, device: torch.device) -> None:
        """Train (first use) or load both feature nets, and compute or load the real statistics."""
        self.nets = {kind: ensure_feature_net(kind, self.net_dir, settings, device=device)
                     for kind, settings in self.net_settings.items()}
        i3d = self.nets["i3d"]
        key = {"what": "synthetic real I3D stats", "i3d_sha256": file_sha256(self.net_paths()["i3d"]),
               **self.settings()["fvd"]["real"], "num_frames": self.num_frames, "resolution": self.resolution,
               "dataset_seed": self.dataset_seed}

        def real_stats() -> dict[str, Any]:
            side = FrechetDistance(i3d.num_classes)
            for batch in batched(iter(self.real_clips()), self.score_batch_size):
                side.update(i3d.embedding(batch).double(), real=True)
            return {**side.real_stats(), "report": {"videos": self.num_real_clips, "clips": self.num_real_clips,
                                                    "skipped": {}}}  # rendered: nothing to skip

        self.real_stats, self.real_stats_cached = cached(self.cache_dir, key, real_stats)
        self.real_report = self.real_stats["report"]
        self.nets = {kind: net.cpu() for kind, net in self.nets.items()}  # the generator has the device meanwhile

    def score(self, out_dir: Path, jobs: list[Job], device: torch.device) -> dict[str, Any]:
        if not self.prepared:
            self.prepare(device)
        i3d, c3d = self.nets["i3d"].to(device), self.nets["c3d"].to(device)
        fvd = FrechetDistance(i3d.num_classes)
        fvd.load_real_stats(**{k: self.real_stats[k] for k in ("count", "sum", "outer")})
        probs, predicted = [], {a: [] for a in ATTRIBUTES}
        for _, videos in generated_batches(out_dir, jobs, self.score_batch_size):
            fvd.update(i3d.embedding(videos).double(), real=False)
            probs.append(c3d.probs(videos).double())
            for attribute, values in i3d.attribute_predictions(videos).items():
                predicted[attribute].append(values)
        predicted = {a: torch.cat(values) for a, values in predicted.items()}
        return {"fvd": float(fvd.compute()),
                **is_presets.preset_inception_score(torch.cat(probs), self.is_preset, self.seed),
                **attribute_accuracy([job.prompt for job in jobs], predicted),
                "num_real_clips": int(self.real_stats["count"]), "real_stats_cached": self.real_stats_cached}
