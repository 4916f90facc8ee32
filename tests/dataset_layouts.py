"""Tiny datasets in the official on-disk formats of UCF-101 and MSR-VTT, and in the caption-manifest layouts of
data=video_text and data=images, for tests (import these helpers).

Videos are real encoded files (UCF-101: MPEG-4 Part 2 in AVI, like the originals; MSR-VTT: H.264 mp4) of flat
frames whose red channel is `frame_level(k)` in frame k, so a decoded clip tells which frames it holds. Each file
is a few KB and writes in milliseconds.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from datamodules.ucf101 import UCF101_CLASSES
from datamodules.video_io import write_video

UCF101_DEFAULT_CLASSES = ("ApplyEyeMakeup", "Archery", "YoYo")  # official labels 0, 2, 100
_UCF_GROUPS = 25  # groups g01..g25 per class; fold f tests on groups 7(f-1)+1 .. 7f and trains on the rest


def frame_level(k: int) -> int:
    """Red value of frame k in every written video (16, 24, ... up to frame 29)."""
    return 16 + 8 * k


def decoded_levels(frames) -> list[int]:
    """Frame indices of a uint8 [T, H, W, 3] clip of unresized test frames, read back from the red channel."""
    red = np.asarray(frames)[..., 0].reshape(len(frames), -1).mean(axis=1)
    return [int(round((value - frame_level(0)) / 8)) for value in red]


def _frames(num_frames: int, size: tuple[int, int], green: int, blue: int) -> np.ndarray:
    frames = np.empty((num_frames, *size, 3), np.uint8)  # (T, H, W, 3)
    for k in range(num_frames):
        frames[k] = (frame_level(k), green, blue)
    return frames


def write_avi(path: Path, frames: np.ndarray, fps: int = 25) -> Path:
    """MPEG-4 Part 2 (the Xvid codec of the UCF-101 files) in an AVI container, high quality."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = 4_000_000
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
        container.mux(stream.encode())
    return path


def _write_broken(path: Path, kind: str, frames: np.ndarray, writer) -> None:
    if kind == "corrupt":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(np.random.default_rng(0).bytes(3000))
    elif kind == "short":
        writer(path, frames[:2])
    # "missing": listed in the annotations, not written


# ------------------------------------------------------------------------------------------------------- UCF-101


def ucf101_video(class_name: str, index: int) -> str:
    """Relative path (as in the split lists) of video `index` of a class written by write_ucf101.

    Videos 0, 1, 2 fall in the test groups of folds 1, 2, 3 and video 3 is in no test group; then it repeats
    with the next group (video 4 is g02, fold 1), so any 4 consecutive videos give every fold train and test videos.
    """
    group = 1 + 7 * (index % 4) + index // 4
    if index < 0 or group > _UCF_GROUPS or (index % 4 < 3 and index // 4 >= 7):
        raise ValueError(f"write_ucf101 supports up to 16 videos per class, got index {index}")
    return f"{class_name}/v_{class_name}_g{group:02d}_c01.avi"


def ucf101_fold_of(relative: str) -> int | None:
    """The fold whose test list holds this video (None: train in every fold)."""
    group = int(relative.rsplit("_g", 1)[1][:2])
    return (group - 1) // 7 + 1 if group <= 21 else None


@dataclass
class UCF101Layout:
    root: Path
    classes: tuple[str, ...]
    videos: list[str]  # relative paths, all listed in the split files
    broken: dict[str, str] = field(default_factory=dict)  # relative path -> "corrupt" | "short" | "missing"

    def label(self, relative: str) -> int:
        return UCF101_CLASSES.index(relative.split("/")[0])

    def expected(self, split: str, fold: int) -> list[tuple[str, int]]:
        test = [v for v in self.videos if ucf101_fold_of(v) == fold]
        train = [v for v in self.videos if ucf101_fold_of(v) != fold]
        chosen = {"train": train, "test": test, "all": train + test}[split]
        return [(v, self.label(v)) for v in chosen]


def write_ucf101(
    root: str | Path,
    classes: Sequence[str] = UCF101_DEFAULT_CLASSES,
    videos_per_class: int = 4,
    num_frames: int = 16,
    size: tuple[int, int] = (32, 40),
    corrupt: Iterable[str] = (),
    short: Iterable[str] = (),
    missing: Iterable[str] = (),
    full_class_index: bool = False,
    fps: int = 25,
) -> UCF101Layout:
    """ROOT/UCF-101/<Class>/v_<Class>_gXX_c01.avi and ROOT/ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt.

    `classes` are real UCF-101 names with their official labels; classInd.txt lists all 101 classes
    (`full_class_index`) or only these, with official indices. `corrupt` / `short` / `missing` name videos (see
    `ucf101_video`) written as random bytes / as 2 frames / not at all; all stay in the split lists. Official
    files use CRLF line ends, and so do these.
    """
    root = Path(root)
    classes = sorted(classes, key=UCF101_CLASSES.index)
    broken = {**{v: "corrupt" for v in corrupt}, **{v: "short" for v in short}, **{v: "missing" for v in missing}}
    videos = [ucf101_video(name, j) for name in classes for j in range(videos_per_class)]
    videos.sort(key=lambda v: (UCF101_CLASSES.index(v.split("/")[0]), v))  # official order: class, group, clip
    unknown = set(broken) - set(videos)
    if unknown:
        raise ValueError(f"broken videos {sorted(unknown)} are not among the written ones")
    for position, relative in enumerate(videos):
        label = UCF101_CLASSES.index(relative.split("/")[0])
        frames = _frames(num_frames, size, green=(40 + 2 * label) % 256, blue=(30 + 10 * position) % 256)
        path = root / "UCF-101" / relative
        if relative in broken:
            _write_broken(path, broken[relative], frames, lambda p, f: write_avi(p, f, fps))
        else:
            write_avi(path, frames, fps)

    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    listed = UCF101_CLASSES if full_class_index else classes
    _write_lines(lists / "classInd.txt", [f"{UCF101_CLASSES.index(name) + 1} {name}" for name in listed])
    layout = UCF101Layout(root, tuple(classes), videos, broken)
    for fold in (1, 2, 3):
        train = [f"{v} {label + 1}" for v, label in layout.expected("train", fold)]
        _write_lines(lists / f"trainlist0{fold}.txt", train)
        _write_lines(lists / f"testlist0{fold}.txt", [v for v, _ in layout.expected("test", fold)])
    return layout


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_bytes("".join(f"{line}\r\n" for line in lines).encode("utf-8"))


# ------------------------------------------------------------------------------------------------------- MSR-VTT


def msrvtt_split_of(number: int) -> str:
    return "train" if number < 6513 else "validate" if number < 7010 else "test"


def msrvtt_caption(number: int, k: int) -> str:
    return f"video {number} caption {k}"


@dataclass
class MSRVTTLayout:
    root: Path
    captions: dict[str, list[str]]  # video_id -> captions in file order, every split
    broken: dict[str, str] = field(default_factory=dict)  # video_id -> "corrupt" | "short" | "missing"

    def split(self, name: str) -> list[str]:
        return [v for v in self.captions if msrvtt_split_of(int(v[5:])) == name]


def write_msrvtt(
    root: str | Path,
    video_ids: Iterable[int | str] = (7010, 7011, 7012, 7013, 8000, 9999),
    train_ids: Iterable[int | str] = (0, 1, 2, 6513),
    captions_per_video: int = 3,
    num_frames: int = 12,
    size: tuple[int, int] = (32, 32),
    video_layout: str = "all",
    corrupt: Iterable[int | str] = (),
    short: Iterable[int | str] = (),
    missing: Iterable[int | str] = (),
    combined_json: bool = False,
    fps: int = 15,
) -> MSRVTTLayout:
    """Test videos `video_ids` and train/validate videos `train_ids` (split by the official number ranges) with
    MSR-VTT 2016 jsons: ROOT/test_videodatainfo.json and ROOT/train_val_videodatainfo.json, or with
    `combined_json` one ROOT/MSRVTT_data.json (CLIP4Clip). Videos go to ROOT/videos/all/ (`video_layout` "all")
    or ROOT/TrainValVideo/ and ROOT/TestVideo/ ("split"). Sentences interleave videos, as a real file may.
    """
    root = Path(root)
    as_id = lambda v: v if isinstance(v, str) else f"video{v}"  # noqa: E731
    ids = sorted({as_id(v) for v in [*video_ids, *train_ids]}, key=lambda v: int(v[5:]))
    broken = {
        **{as_id(v): "corrupt" for v in corrupt}, **{as_id(v): "short" for v in short},
        **{as_id(v): "missing" for v in missing},
    }
    captions = {v: [msrvtt_caption(int(v[5:]), k) for k in range(captions_per_video)] for v in ids}
    for position, video_id in enumerate(ids):
        number = int(video_id[5:])
        if video_layout == "all":
            folder = root / "videos" / "all"
        elif video_layout == "split":
            folder = root / ("TestVideo" if number >= 7010 else "TrainValVideo")
        else:
            raise ValueError(f"video_layout must be 'all' or 'split', got {video_layout!r}")
        frames = _frames(num_frames, size, green=(40 + 3 * position) % 256, blue=number % 256)
        path = folder / f"{video_id}.mp4"
        if video_id in broken:
            _write_broken(path, broken[video_id], frames, lambda p, f: write_video(p, f, fps=fps))
        else:
            write_video(path, frames, fps=fps)

    def document(chosen: list[str]) -> dict:
        videos = [
            {"category": number % 20, "url": f"https://www.youtube.com/watch?v=test{number}", "video_id": v,
             "start time": 1.0, "end time": 11.0, "split": msrvtt_split_of(number), "id": number}
            for v in chosen for number in [int(v[5:])]
        ]
        sentences = [{"caption": captions[v][k], "video_id": v} for k in range(captions_per_video) for v in chosen]
        for sen_id, sentence in enumerate(sentences):
            sentence["sen_id"] = sen_id
        return {"info": {"year": 2016, "version": "1.0", "contributor": "tests"}, "videos": videos,
                "sentences": sentences}

    if combined_json:
        (root / "MSRVTT_data.json").write_text(json.dumps(document(ids)))
    else:
        (root / "test_videodatainfo.json").write_text(json.dumps(document([v for v in ids if int(v[5:]) >= 7010])))
        train_val = [v for v in ids if int(v[5:]) < 7010]
        (root / "train_val_videodatainfo.json").write_text(json.dumps(document(train_val)))
    return MSRVTTLayout(root, captions, broken)


# ------------------------------------------------------------------------------------------- caption manifests


def looping_frames(num_frames: int, size: tuple[int, int] = (16, 16), green: int = 40, blue: int = 100) -> np.ndarray:
    """uint8 [T, H, W, 3] of any length (frame_level runs out of uint8 after 30 frames): frame k is flat, with red
    frame_level(k % 30); for recipes that need long clips rather than frames that say which they are."""
    frames = np.empty((num_frames, *size, 3), np.uint8)  # (T, H, W, 3)
    for k in range(num_frames):
        frames[k] = (frame_level(k % 30), green, blue)
    return frames


def write_video_text(
    root: str | Path,
    num_videos: int = 4,
    num_frames: int = 16,
    size: tuple[int, int] = (32, 32),
    corrupt: Iterable[int] = (),
    short: Iterable[int] = (),
    missing: Iterable[int] = (),
    fps: int = 8,
) -> Path:
    """The layout of data=video_text: ROOT/train.csv (header `video,caption`, paths relative to ROOT) listing
    ROOT/videos/v<i>.mp4 captioned "video <i>". `corrupt` / `short` / `missing` name indices written as random
    bytes / as 2 frames / not at all; all stay in the manifest. Returns the manifest."""
    root = Path(root)
    broken = {**{i: "corrupt" for i in corrupt}, **{i: "short" for i in short}, **{i: "missing" for i in missing}}
    lines = ["video,caption"]
    for i in range(num_videos):
        frames = looping_frames(num_frames, size, green=(40 + 20 * i) % 256)
        path = root / "videos" / f"v{i}.mp4"
        if i in broken:
            _write_broken(path, broken[i], frames, lambda p, f: write_video(p, f, fps=fps))
        else:
            write_video(path, frames, fps=fps)
        lines.append(f"videos/v{i}.mp4,video {i}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def write_image_captions(
    root: str | Path,
    num_images: int = 4,
    size: tuple[int, int] = (24, 32),
    corrupt: Iterable[int] = (),
    missing: Iterable[int] = (),
) -> Path:
    """The layout of data=images: ROOT/train.csv (header `image,caption`, paths relative to ROOT) listing
    ROOT/images/im<i>.png, flat colour (red 40 * i), captioned "image <i>"; `corrupt` / `missing` indices are
    written as a truncated PNG / not at all. Returns the manifest."""
    root, corrupt, missing = Path(root), set(corrupt), set(missing)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image,caption"]
    for i in range(num_images):
        path = root / "images" / f"im{i}.png"
        if i in corrupt:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
        elif i not in missing:
            Image.new("RGB", (size[1], size[0]), ((40 * i) % 256, 0, 0)).save(path)
        lines.append(f"images/im{i}.png,image {i}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"
