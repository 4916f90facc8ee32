"""Sharded, resumable generation of an evaluation set: video i of the protocol is always the same video.

Video `i` is seeded with `base_seed + i` and batched with the other videos of its fixed block
`[k * batch_size, (k + 1) * batch_size)`, so its pixels do not depend on how many processes ran, which of them
ran it, or whether the run was interrupted (floating-point results can depend on batch composition, so the
blocks never change). Rank r of W takes the blocks k with k % W == r. Each video is written atomically under
its index; a re-run skips finished blocks and regenerates a partly finished block whole, writing only its
missing videos (which files count as finished is decided once per run, before generation, by eval/video_check.py:
a damaged file is deleted there and so regenerated here). `manifest.json` pins the prompts, seeds and generator
settings of the folder, so videos of another model or protocol are never mixed into a score.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datamodules.video_io import write_video
from utils.progress import WorkProgress

MANIFEST = "manifest.json"
DEFAULT_FPS = 8  # written into the mp4 of a generator without an `fps` attribute


@dataclass(frozen=True)
class Job:
    index: int  # global index in the protocol's list
    prompt: str
    seed: int


def plan_jobs(prompts: list[str], base_seed: int = 0) -> list[Job]:
    return [Job(i, prompt, base_seed + i) for i, prompt in enumerate(prompts)]


def video_path(out_dir: str | Path, index: int) -> Path:
    return Path(out_dir) / "videos" / f"{index:06d}.mp4"


def blocks(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]


def shard(jobs: list[Job], batch_size: int, rank: int, world_size: int) -> list[list[Job]]:
    """The blocks rank `rank` of `world_size` generates."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return [block for k, block in enumerate(blocks(jobs, batch_size)) if k % world_size == rank]


def manifest_for(jobs: list[Job], settings: dict[str, Any]) -> dict[str, Any]:
    prompts_hash = hashlib.sha256(json.dumps([asdict(j) for j in jobs]).encode()).hexdigest()
    return {"num_videos": len(jobs), "jobs_sha256": prompts_hash, "settings": settings}


def check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the folder's manifest, or refuse a folder whose videos were made with other jobs or settings."""
    path = out_dir / MANIFEST
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != json.loads(json.dumps(manifest)):
            raise ValueError(
                f"{out_dir} holds videos generated with other prompts, seeds or generator settings "
                f"(see {path}); use another output folder, or delete it to start over"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)


def missing(block: list[Job], out_dir: Path) -> list[Job]:
    return [job for job in block if not video_path(out_dir, job.index).is_file()]


def generate_shard(
    model: Any,
    jobs: list[Job],
    out_dir: str | Path,
    num_frames: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    fps: int | None = None,
    progress: bool = True,
) -> int:
    """Generate this rank's missing videos with `model.generate` (the VideoGenerator contract); return how many
    were written. Videos leave the device as uint8 right after each block, so nothing piles up on the GPU."""
    out_dir = Path(out_dir)
    mine = shard(jobs, batch_size, rank, world_size)
    todo = [block for block in mine if missing(block, out_dir)]
    total = sum(len(b) for b in mine)
    done = total - sum(len(missing(b, out_dir)) for b in todo)
    written = 0
    # Counted in videos, moved on after every denoising step of a block (a block of videos can take minutes); the
    # videos finished before this run count as done but not towards the rate the time left is computed from.
    with WorkProgress(f"generating (rank {rank}/{world_size})", total=total, completed=done, unit="videos",
                      enabled=progress, every_seconds=60) as bar:
        for block in todo:
            wanted = {job.index for job in missing(block, out_dir)}
            start = bar.completed

            def step_done(step: int, steps: int, start: float = start, size: int = len(wanted)) -> None:
                bar.update(start + size * step / steps)

            videos = model.generate([job.prompt for job in block], num_frames=num_frames,
                                    seed=[job.seed for job in block], progress=step_done)
            if videos.ndim != 5 or videos.shape[:2] != (len(block), num_frames):
                # a video of another length would be deleted as invalid by every later run, and never scored
                raise ValueError(f"{type(model).__name__}.generate returned videos of shape {tuple(videos.shape)} "
                                 f"for {len(block)} prompts and num_frames={num_frames}; expected "
                                 f"({len(block)}, {num_frames}, H, W, 3): check the model's sampler settings")
            for job, video in zip(block, videos):
                if job.index in wanted:
                    write_video(video_path(out_dir, job.index), video.cpu(),
                                fps=fps or getattr(model, "fps", DEFAULT_FPS))
                    written += 1
            bar.update(start + len(wanted))
            del videos
    return written


def finished(jobs: list[Job], out_dir: str | Path) -> bool:
    return all(video_path(out_dir, job.index).is_file() for job in jobs)
