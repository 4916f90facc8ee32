"""Which generated videos on disk count as finished: checked once per run, before generation, on rank 0.

A file reaches its final name only once it is complete (datamodules.video_io.atomic_output renames finished files),
but it can be damaged afterwards (a copy or sync cut short, a full disk). So a video counts as finished only when it
decodes to exactly the protocol's frame count at the frame size most videos of the folder have; any other is
deleted, so that generation regenerates it (with its whole fixed block: the bytes are those an uninterrupted run
writes), and counted in the log and in results.json. Temporary files of killed writes (`.<stem>.<random>.tmp.mp4`
from atomic_output, or a `*.tmp` of other writers) are removed too. Each file is decoded once (no RGB conversion):
at 10,000 videos this is the price of never scoring a damaged file, and it shows a progress bar.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
from rich.progress import track

from datamodules.video_io import DECODE_ERRORS
from eval.generation import Job, video_path

log = logging.getLogger("t2v")

STRAY_TEMP = re.compile(r"^\..+\.tmp\.mp4$|\.tmp$")  # atomic_output's temporary names, and `*.tmp`


@dataclass
class FolderCheck:
    """What the check found: finished videos, removed invalid ones (index -> why) and removed temporary files."""

    expected: int
    finished: int = 0
    invalid: dict[int, str] = field(default_factory=dict)
    stray_temp_files: list[str] = field(default_factory=list)
    frame_size: tuple[int, int] | None = None

    def record(self) -> dict[str, Any]:
        return {"expected": self.expected, "finished_before_this_run": self.finished,
                "regenerated": len(self.invalid),
                "regenerated_why": {str(i): why for i, why in sorted(self.invalid.items())[:50]},
                "stray_temp_files_removed": len(self.stray_temp_files),
                "frame_size": list(self.frame_size) if self.frame_size else None}


def decoded_shape(path: Path) -> tuple[int, int, int] | str:
    """(frames, height, width) that `path` decodes to, or why it does not decode."""
    frames, size = 0, None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no video stream"
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames, size = frames + 1, (frame.height, frame.width)
    except DECODE_ERRORS as error:
        return f"does not decode ({type(error).__name__}: {error})"
    return (frames, *size) if size else "no decodable frame"


def remove_stray_temp_files(videos_dir: Path) -> list[str]:
    removed = []
    for path in sorted(videos_dir.iterdir()) if videos_dir.is_dir() else []:
        if path.is_file() and STRAY_TEMP.search(path.name):
            path.unlink()
            removed.append(path.name)
    return removed


def check_videos(out_dir: str | Path, jobs: list[Job], num_frames: int, progress: bool = True) -> FolderCheck:
    """Decode every existing video of `jobs` once; delete (and count) the ones that are not finished videos."""
    out_dir = Path(out_dir)
    report = FolderCheck(expected=len(jobs))
    report.stray_temp_files = remove_stray_temp_files(out_dir / "videos")
    present = [job.index for job in jobs if video_path(out_dir, job.index).is_file()]
    shapes = {index: decoded_shape(video_path(out_dir, index))
              for index in track(present, description="checking finished videos", disable=not progress)}
    sizes = Counter(shape[1:] for shape in shapes.values() if isinstance(shape, tuple) and shape[0] == num_frames)
    report.frame_size = sizes.most_common(1)[0][0] if sizes else None  # ties: the size seen first, in index order
    for index, shape in shapes.items():
        if isinstance(shape, str):
            why = shape
        elif shape[0] != num_frames:
            why = f"{shape[0]} frames, expected {num_frames}"
        elif shape[1:] != report.frame_size:
            why = f"frame size {shape[1]}x{shape[2]}, the folder's is {report.frame_size[0]}x{report.frame_size[1]}"
        else:
            report.finished += 1
            continue
        report.invalid[index] = why
        video_path(out_dir, index).unlink()
    if report.invalid or report.stray_temp_files:
        log.warning("%s: %d finished videos; %d invalid ones deleted to be regenerated (e.g. %s), %d temporary "
                    "files of interrupted writes removed", out_dir, report.finished, len(report.invalid),
                    "; ".join(f"{i:06d}.mp4: {why}" for i, why in list(report.invalid.items())[:3]) or "-",
                    len(report.stray_temp_files))
    else:
        log.info("%s: %d finished videos, all valid", out_dir, report.finished)
    return report
