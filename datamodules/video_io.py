"""Reading and writing videos with PyAV, plus a PNG contact sheet for quick looks.

Every writer goes through `atomic_output`: a file appears under its final name only once it is complete, so an
interrupted run never leaves a half-written mp4 that a resumable job would mistake for a finished one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from fractions import Fraction
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import torch
from PIL import Image

# What a broken or truncated file can make PyAV raise while opening, demuxing or decoding.
DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)


class MediaReadError(RuntimeError):
    """A media file that cannot be used; datasets skip (and count) these instead of crashing mid-epoch."""

    kind = "file"

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read {self.kind} {self.path}: {reason}")


class VideoReadError(MediaReadError):
    """A video that cannot be used: missing, not decodable, or shorter than the clip asked for."""

    kind = "video"


class VideoInfo(NamedTuple):
    num_frames: int
    fps: float
    height: int
    width: int


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path` (atomic on POSIX).

    The temporary file keeps the target's suffix so format-sniffing writers (PyAV, Pillow) pick the right format.
    It lives in the same folder because os.replace is only atomic within one filesystem.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _as_uint8_frames(frames: torch.Tensor | np.ndarray, ndim: int = 4) -> np.ndarray:
    """uint8 array [..., H, W, 3] from a tensor or ndarray, with a clear error for the wrong layout."""
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim != ndim or array.shape[-1] != 3:
        want = "[T, H, W, 3]" if ndim == 4 else "[B, T, H, W, 3]"
        raise ValueError(f"expected frames shaped {want} (channels last), got {tuple(array.shape)}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {array.dtype}; convert with datamodules.transforms.to_uint8")
    return array


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Frame count, frame rate and size of the first video stream, without decoding frames."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(path, "file does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(path, "file has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            num_frames = stream.frames
            if not num_frames:
                # Some containers (webm, some mkv) do not store a frame count: count packets, which needs no decoding.
                num_frames = sum(1 for packet in container.demux(stream) if packet.size)
            return VideoInfo(int(num_frames), fps, stream.height, stream.width)
    except DECODE_ERRORS as error:
        raise VideoReadError(path, f"not a readable video ({error})") from error


def read_video(
    path: str | os.PathLike, num_frames: int | None = None, start: int = 0, stride: int = 1
) -> torch.Tensor:
    """Decode frames start, start + stride, ... (`num_frames` of them, or all to the end) as uint8 [T, H, W, 3].

    Raises VideoReadError when the file is missing, cannot be decoded, or has fewer frames than asked for.
    Decoding stops as soon as the clip is complete, so a short clip from the start of a long video is cheap.
    """
    if start < 0 or stride < 1 or (num_frames is not None and num_frames < 1):
        raise ValueError(f"need start >= 0, stride >= 1, num_frames >= 1; got {start=}, {stride=}, {num_frames=}")
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(path, "file does not exist")
    frames: list[np.ndarray] = []
    decoded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(path, "file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame + slice threads: several times faster on long clips
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                if index >= start and (index - start) % stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if num_frames is not None and len(frames) == num_frames:
                        break
    except DECODE_ERRORS as error:
        raise VideoReadError(path, f"not a readable video ({error})") from error
    if not frames or (num_frames is not None and len(frames) < num_frames):
        wanted = "at least one frame" if num_frames is None else f"{num_frames} frames"
        raise VideoReadError(
            path, f"too short: {decoded} decodable frames, need {wanted} from frame {start} with stride {stride}"
        )
    try:
        clip = np.stack(frames)  # (T, H, W, 3)
    except ValueError as error:  # frame size changes mid-stream
        raise VideoReadError(path, f"frames have different sizes ({error})") from error
    return torch.from_numpy(clip)


def write_video(path: str | os.PathLike, frames: torch.Tensor | np.ndarray, fps: float = 8, crf: int = 18) -> Path:
    """Write uint8 frames [T, H, W, 3] as an H.264/yuv420p mp4 that ordinary players and browsers open.

    yuv420p stores colour at half resolution, so H.264 needs even sizes and its crop field cannot express an odd
    size either: odd heights/widths are padded by repeating the last row/column, and the file is 1 px larger.
    `crf` 18 is visually lossless, which keeps small synthetic videos faithful for evaluation.
    """
    clip = _as_uint8_frames(frames)
    height, width = clip.shape[1:3]
    clip = np.pad(clip, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")  # (T, H', W', 3), even
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    path = Path(path)
    with atomic_output(path) as tmp:
        # faststart puts the index first so players (and browsers) can start before reading the whole file.
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))  # 29.97 -> 30000/1001
            stream.width, stream.height = clip.shape[2], clip.shape[1]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(crf), "preset": "medium"}
            for array in clip:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())  # flush the frames the encoder still holds
    return path


def write_grid_png(
    path: str | os.PathLike,
    videos: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    max_frames: int = 8,
    gap: int = 2,
) -> Path:
    """One PNG with a row per video and up to `max_frames` evenly spaced frames per row, `gap` px of white between.

    `videos` is uint8 [B, T, H, W, 3] or a list of [T, H, W, 3] (lengths may differ; shorter rows end early).
    """
    clips = [_as_uint8_frames(v) for v in videos]
    if not clips:
        raise ValueError("write_grid_png needs at least one video")
    height, width = clips[0].shape[1:3]
    if any(c.shape[1:3] != (height, width) for c in clips):
        raise ValueError(f"all videos must share one frame size, got {[c.shape[1:3] for c in clips]}")
    columns = min(max_frames, max(len(c) for c in clips))
    canvas = np.full(
        (len(clips) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=np.uint8
    )
    for row, clip in enumerate(clips):
        picks = np.linspace(0, len(clip) - 1, min(columns, len(clip))).round().astype(int)
        for column, frame_index in enumerate(picks):
            top, left = row * (height + gap), column * (width + gap)
            canvas[top : top + height, left : left + width] = clip[frame_index]
    path = Path(path)
    with atomic_output(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path
