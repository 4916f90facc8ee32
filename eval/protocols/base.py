"""What every evaluation protocol shares: its prompt list, its settings, reading back the generated videos,
weight-file hashes and the on-disk cache of real-data statistics.

A protocol is built from `configs/eval/<name>.yaml` (`_target_`), so the runner never dispatches on names.
"""
from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.progress import track

from datamodules.video_io import read_video
from eval.generation import Job, plan_jobs, video_path


class Protocol(ABC):
    """One benchmark: which videos to generate (prompts, frames, count) and how to score them."""

    name: str = "protocol"
    prepared: bool = False  # set by `prepare`
    generated_fps: float | None = None  # the generator's frame rate, given to `prepare`
    real_report: dict[str, Any] | None = None  # how the real clips were drawn and which videos were skipped (why)

    def __init__(self, num_frames: int, seed: int = 0, score_batch_size: int = 8, cache_dir: str | None = None,
                 limit: int | None = None):
        if num_frames < 1 or score_batch_size < 1:
            raise ValueError("num_frames and score_batch_size must be at least 1")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive number of videos or null, got {limit}")
        self.num_frames = num_frames
        self.seed = seed
        self.score_batch_size = score_batch_size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.limit = limit

    @abstractmethod
    def check_inputs(self) -> None:
        """Raise a clear error for a missing dataset or weight file, or a video count the settings cannot score,
        before any generator is built. Cheap: every rank runs it."""

    def prepare(self, device: torch.device, generated_fps: float | None = None) -> None:
        """Load the feature networks (strict key check) and compute or load the real-data statistics: everything
        scoring needs, so that wrong weights or too little real data stop the run before the first video is
        generated. The runner calls it on rank 0 before generation (the other ranks wait); `score` calls it when
        nobody did. `generated_fps` is the generator's frame rate (for frame-rate matching and the record)."""
        self.generated_fps = generated_fps
        self._prepare(device)
        self.prepared = True

    def _prepare(self, device: torch.device) -> None:
        """The protocol's part of `prepare`; nothing by default."""

    @abstractmethod
    def prompts(self) -> list[str]:
        """The full prompt list in protocol order: video i is generated from prompts()[i] with seed seed + i."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Every setting a number depends on; written next to every number."""

    @abstractmethod
    def score(self, out_dir: Path, jobs: list[Job], device: torch.device) -> dict[str, Any]:
        """Metrics of the generated videos of `jobs` (read back from `out_dir`)."""

    def weight_files(self) -> dict[str, Path]:
        """Feature-network weight files by name, hashed into the results."""
        return {}

    def jobs(self) -> list[Job]:
        jobs = plan_jobs(self.prompts(), self.seed)
        return jobs[: self.limit] if self.limit else jobs


def generated_batches(out_dir: Path, jobs: list[Job], batch_size: int, description: str = "scoring",
                      ) -> Iterator[tuple[list[Job], torch.Tensor]]:
    """The generated videos of `jobs`, decoded from disk, as uint8 [B, T, H, W, 3] batches in index order.
    Scoring always reads the files, so a resumed run scores exactly the bytes an uninterrupted run wrote."""
    chunks = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    for chunk in track(chunks, description=description):
        yield chunk, torch.stack([read_video(video_path(out_dir, job.index)) for job in chunk])


def batched(clips: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    batch: list[torch.Tensor] = []
    for clip in clips:
        batch.append(torch.as_tensor(clip))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached(cache_dir: Path | None, key: dict[str, Any], compute: Callable[[], dict[str, Any]],
           ) -> tuple[dict[str, Any], bool]:
    """`compute()` once per `key` (protocol settings + weight hashes), kept on disk under cache_dir. The value is a
    dict of tensors and plain data (str, int, float, lists, dicts: what torch.load(weights_only=True) accepts).
    Returns (value, whether it came from the cache)."""
    if cache_dir is None:
        return compute(), False
    name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{name}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == json.dumps(key, sort_keys=True, default=str):
            return stored["value"], True
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"key": json.dumps(key, sort_keys=True, default=str), "value": value}, tmp)
    os.replace(tmp, path)
    return value, False


def require_file(path: str | Path | None, what: str, official: str) -> Path:
    """A weight file named in the config, or a FileNotFoundError that says what it is and where it comes from."""
    if not path:
        raise FileNotFoundError(f"no {what} weight file configured; {official}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path}; {official}")
    return path
