"""MSR-VTT zero-shot protocol: one caption per test video (2,990 videos), CLIPSIM with CLIP ViT-B/32.

The caption of each video is chosen by a seeded rule that depends only on the video (datamodules.msrvtt.
select_captions), so a subset (`limit`: the first N test videos in video-number order) scores the same captions
the full run does. Only the annotation json is needed: CLIPSIM compares generated videos with their prompts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from datamodules.msrvtt import find_annotation, read_msrvtt_annotations, select_captions
from eval.generation import Job
from eval.metrics.clipsim import CLIPSIM, OFFICIAL, load_clip
from eval.protocols.base import Protocol, generated_batches, require_file


class MSRVTTProtocol(Protocol):
    name = "msrvtt"

    def __init__(
        self,
        root: str,
        clip_weights: str | None,
        annotation: str | None = None,
        split: str = "test",
        caption_rule: str = "seeded",
        clip_model: str = "ViT-B-32",
        clip_model_kwargs: dict[str, Any] | None = None,
        num_frames: int = 16,
        seed: int = 0,
        score_batch_size: int = 8,
        cache_dir: str | None = None,
        limit: int | None = None,
    ):
        super().__init__(num_frames, seed, score_batch_size, cache_dir, limit)
        self.root, self.annotation, self.split = Path(root), annotation, split
        self.caption_rule, self.clip_weights, self.clip_model = caption_rule, clip_weights, clip_model
        self.clip_model_kwargs = dict(clip_model_kwargs or {})  # tests shrink the towers; empty for the real one
        self.clip = None

    def annotation_path(self) -> Path:
        return Path(self.annotation) if self.annotation else find_annotation(self.root, self.split)

    def check_inputs(self) -> None:
        read_msrvtt_annotations(self.annotation_path(), self.split)
        require_file(self.clip_weights, "CLIP (eval.clip_weights)", OFFICIAL)

    def weight_files(self) -> dict[str, Path]:
        return {"clip": Path(self.clip_weights)}

    def captions(self) -> list[tuple[str, str]]:
        annotations = read_msrvtt_annotations(self.annotation_path(), self.split)
        return select_captions(annotations, self.caption_rule, self.seed)

    def prompts(self) -> list[str]:
        return [caption for _, caption in self.captions()]

    def settings(self) -> dict[str, Any]:
        return {
            "protocol": self.name, "annotation": str(self.annotation_path()), "split": self.split,
            "caption_rule": self.caption_rule, "seed": self.seed, "num_frames": self.num_frames, "limit": self.limit,
            "clipsim": {"model": f"open_clip {self.clip_model} (QuickGELU, OpenAI weights)",
                        "score": "cosine(image, text) per frame, mean over frames then videos; raw, not x100",
                        "preprocess": "shorter side to 224 bicubic (antialiased), centre crop, CLIP mean/std"},
            "frame_rate": {"generated_fps": self.generated_fps, "note": "CLIPSIM averages frames; no real videos"},
        }

    def _prepare(self, device: torch.device) -> None:
        # strict key check now, not after generation; CLIP scores any number of frames, and needs no real data
        self.clip = load_clip(self.clip_weights, self.clip_model, device="cpu", **self.clip_model_kwargs)

    def score(self, out_dir: Path, jobs: list[Job], device: torch.device) -> dict[str, Any]:
        if not self.prepared:
            self.prepare(device)
        metric = CLIPSIM(self.clip.to(device), model_name=self.clip_model)
        video_ids = [video_id for video_id, _ in self.captions()]
        per_video = {}
        for chunk, videos in generated_batches(out_dir, jobs, self.score_batch_size):
            scores = metric.video_scores(videos, [job.prompt for job in chunk])
            metric.sum += scores.sum()
            metric.count += len(scores)
            per_video.update({video_ids[job.index]: float(s) for job, s in zip(chunk, scores)})
        return {"clipsim": float(metric.compute()), "per_video": per_video}
