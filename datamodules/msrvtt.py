"""MSR-VTT (Microsoft Research, Xu et al. CVPR 2016) in its distributed layouts: the caption list of the evaluation
protocol (one caption per test video) and captioned clips for training.

    ROOT/test_videodatainfo.json         test split: 2,990 videos, video7010 ... video9999, 20 captions each
    ROOT/train_val_videodatainfo.json    train (video0 ... video6512) and validate (video6513 ... video7009)
    ROOT/videos/all/video<N>.mp4         all 10,000 videos, as in the MSRVTT.zip mirror (Frozen in Time, CLIP4Clip)
    or ROOT/TrainValVideo/ + ROOT/TestVideo/   as in the original release (the `video_dirs` option lists both)

The json files are the MSR-VTT 2016 format: {"info": ..., "videos": [{"video_id": "video7010", "category": ..,
"url": .., "start time": .., "end time": .., "split": "test", "id": 7010}, ...], "sentences": [{"caption": "...",
"video_id": "video7010", "sen_id": ...}, ...]}. CLIP4Clip's MSRVTT_data.json is the same format with all splits in
one file, and is used when the per-split file is absent.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule, ManifestDataset, Resolution, as_resolution
from datamodules.images import JointImagesFromManifest
from datamodules.transforms import video_transform
from datamodules.ucf101 import CLIP_SAMPLING, read_clip, stable_key

SPLITS = ("train", "validate", "test")
SPLIT_SIZES = {"train": 6513, "validate": 497, "test": 2990}  # videos per split in the official release
_ALL_SPLITS = ("MSRVTT_data.json", "msrvtt_data/MSRVTT_data.json")  # CLIP4Clip's msrvtt_data.zip
ANNOTATION_FILES = {
    "train": ("train_val_videodatainfo.json", *_ALL_SPLITS),
    "validate": ("train_val_videodatainfo.json", *_ALL_SPLITS),
    "test": ("test_videodatainfo.json", *_ALL_SPLITS),
}
VIDEO_DIRS = ("videos/all", "TrainValVideo", "TestVideo")
CAPTION_RULES = ("seeded", "first")  # one fixed caption per video; datasets also take "random" (training)

_WHERE = (
    "MSR-VTT 2016 is released by Microsoft Research (test_videodatainfo.json and train_val_videodatainfo.json with "
    "TestVideo/ and TrainValVideo/); the videos are mirrored as MSRVTT.zip (MSRVTT/videos/all/) and the annotations "
    "as msrvtt_data.zip (MSRVTT_data.json) in the READMEs of github.com/m-bain/frozen-in-time and "
    "github.com/ArrowLuo/CLIP4Clip."
)


def _split_name(split: str | None) -> str | None:
    split = "validate" if split == "val" else split
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (or 'val', or None for all), got {split!r}")
    return split


def video_number(video_id: str) -> int:
    """7010 for "video7010"; other ids get a stable hash, so seeded choices still depend on the id alone."""
    match = re.fullmatch(r"video(\d+)", video_id)
    return int(match.group(1)) if match else stable_key(video_id)


def _order(video_id: str) -> tuple[int, int, str]:
    match = re.fullmatch(r"video(\d+)", video_id)
    return (0, int(match.group(1)), "") if match else (1, 0, video_id)


def find_annotation(root: str | os.PathLike, split: str = "test") -> Path:
    """The first of ANNOTATION_FILES[split] under `root`; FileNotFoundError naming the layout if none exists."""
    root, split = Path(root), _split_name(split) or "test"
    candidates = [root / name for name in ANNOTATION_FILES[split]]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"MSR-VTT: no annotation file for the {split} split; looked for {', '.join(map(str, candidates))}. Expected "
        f"the MSR-VTT 2016 layout: {root}/test_videodatainfo.json (test, {SPLIT_SIZES['test']:,} videos), "
        f"{root}/train_val_videodatainfo.json (train and validate), videos as {root}/videos/all/video<N>.mp4 or in "
        f"{root}/TrainValVideo/ and {root}/TestVideo/. {_WHERE}"
    )


def read_msrvtt_annotations(json_path: str | os.PathLike, split: str | None = "test") -> dict[str, list[str]]:
    """{video_id: captions} for the videos whose "split" is `split` (None: all), in video-number order; each video's
    captions in file order, stripped of surrounding whitespace."""
    path, split = Path(json_path), _split_name(split)
    if not path.is_file():
        raise FileNotFoundError(
            f"MSR-VTT annotation {path} not found; expected an MSR-VTT 2016 json such as test_videodatainfo.json. "
            + _WHERE
        )
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict) or not {"videos", "sentences"} <= data.keys():
        raise ValueError(f"{path} is not in the MSR-VTT 2016 format ({{'videos': [...], 'sentences': [...]}})")
    ids = [video["video_id"] for video in data["videos"] if split is None or video.get("split") == split]
    if not ids:
        found = sorted({str(video.get("split")) for video in data["videos"]})
        raise ValueError(f"{path} has no videos of split {split!r}; its splits are {found}")
    annotations: dict[str, list[str]] = {video_id: [] for video_id in sorted(ids, key=_order)}
    for sentence in data["sentences"]:
        captions = annotations.get(sentence["video_id"])
        if captions is not None:
            captions.append(str(sentence["caption"]).strip())
    uncaptioned = [video_id for video_id, captions in annotations.items() if not captions]
    if uncaptioned:
        raise ValueError(f"{path}: {len(uncaptioned)} videos have no caption, e.g. {uncaptioned[:3]}")
    return annotations


def select_captions(annotations: dict[str, list[str]], rule: str = "seeded", seed: int = 0) -> list[tuple[str, str]]:
    """One (video_id, caption) per video, in the order of `annotations`.

    "seeded": caption number `np.random.default_rng([seed, N]).integers(len(captions))` of video N ("videoN"), over
    its captions in file order; "first": the first caption in file order. Either way a video's caption depends only
    on the video (and seed), never on which other videos are evaluated.
    """
    if rule not in CAPTION_RULES:
        raise ValueError(f"rule must be one of {CAPTION_RULES}, got {rule!r}")
    chosen = []
    for video_id, captions in annotations.items():
        if rule == "first":
            pick = 0
        else:
            pick = int(np.random.default_rng([seed, video_number(video_id)]).integers(len(captions)))
        chosen.append((video_id, captions[pick]))
    return chosen


def find_videos(root: str | os.PathLike, video_dirs: Sequence[str] = VIDEO_DIRS) -> dict[str, Path]:
    """{video_id: mp4 path} over the existing `video_dirs` (relative to `root` unless absolute; first one wins)."""
    root = Path(root)
    folders = [root / folder for folder in video_dirs if (root / folder).is_dir()]
    if not folders:
        raise FileNotFoundError(
            f"MSR-VTT: no video folder under {root}; looked for {', '.join(str(root / f) for f in video_dirs)}. "
            f"Expected {root}/videos/all/video0.mp4 ... video9999.mp4, or {root}/TrainValVideo/ and "
            f"{root}/TestVideo/ (set video_dirs for another layout). {_WHERE}"
        )
    videos: dict[str, Path] = {}
    for folder in folders:
        with os.scandir(folder) as entries:  # one listing per folder, not one stat per video
            for entry in entries:
                if entry.name.endswith(".mp4"):
                    videos.setdefault(entry.name[: -len(".mp4")], Path(entry.path))
    return videos


class MSRVTTDataset(ManifestDataset):
    """Clips of the videos of a split, one caption each (`captions`: "seeded" or "first", see select_captions), or
    a random caption of the video on every read ("random", training; torch's RNG, which seed_everything seeds).

    Items carry `video_id`. Videos missing from every folder are warned about once here, then skipped with a
    warning and counted like unreadable ones (see ManifestDataset).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "test",
        annotation: str | os.PathLike | None = None,
        video_dirs: Sequence[str] = VIDEO_DIRS,
        num_frames: int = 16,
        resolution: Resolution = (128, 128),
        frame_stride: int = 1,
        clip_sampling: str = "first",
        captions: str = "seeded",
        random_crop: bool = False,
        seed: int = 0,
    ):
        if clip_sampling not in CLIP_SAMPLING:
            raise ValueError(f"clip_sampling must be one of {CLIP_SAMPLING}, got {clip_sampling!r}")
        if captions not in (*CAPTION_RULES, "random"):
            raise ValueError(f"captions must be one of {(*CAPTION_RULES, 'random')}, got {captions!r}")
        root, split = Path(root), _split_name(split)
        annotation = find_annotation(root, split) if annotation is None else Path(annotation)
        self.annotations = read_msrvtt_annotations(annotation, split)
        found = find_videos(root, video_dirs)
        fallback = next(root / folder for folder in video_dirs if (root / folder).is_dir())
        paths = {video_id: found.get(video_id, fallback / f"{video_id}.mp4") for video_id in self.annotations}
        missing = [video_id for video_id in self.annotations if video_id not in found]
        if missing:
            warnings.warn(
                f"MSR-VTT {split}: {len(missing)} of {len(paths)} videos are in none of "
                f"{[str(root / f) for f in video_dirs]}, e.g. {missing[:3]}; they will be skipped and counted",
                stacklevel=2,
            )
        if len(missing) == len(paths):
            raise FileNotFoundError(
                f"MSR-VTT {split}: none of the {len(paths)} videos of {annotation} is in "
                f"{[str(root / f) for f in video_dirs]}. {_WHERE}"
            )
        fixed = select_captions(self.annotations, "first" if captions == "random" else captions, seed)
        # the annotation json is the manifest
        self.set_entries(annotation, [(paths[video_id], caption) for video_id, caption in fixed], seed)
        self._video_ids = {paths[video_id]: video_id for video_id, _ in fixed}
        self.split, self.captions = split, captions
        self.num_frames, self.frame_stride, self.clip_sampling = int(num_frames), int(frame_stride), clip_sampling
        self.transform = video_transform(as_resolution(resolution), random_crop)
        self.check_readable()  # no readable video: a clear error now, not in a DataLoader worker mid-epoch

    def load(self, path: Path, caption: str) -> dict[str, Any]:
        video_id = self._video_ids[path]
        if self.captions == "random":
            captions = self.annotations[video_id]
            caption = captions[int(torch.randint(len(captions), ()))]
        frames, fps = read_clip(
            path, self.num_frames, self.frame_stride, self.clip_sampling, self.seed, (0, video_number(video_id))
        )  # (T, H, W, 3)
        video = self.transform(frames)  # (T, C, H, W)
        return {"video": video, "caption": caption, "video_id": video_id, "fps": fps, "is_image": False}


class MSRVTTDataModule(JointImagesFromManifest, BaseDataModule):
    """MSR-VTT batches: training reads a random caption of each video on every access; validation the seeded one
    and the first clip. `images_per_video` > 0 with `image_manifest` gives joint mode (images from an image-caption
    manifest)."""

    def __init__(
        self,
        root: str | os.PathLike,
        train_split: str = "train",
        val_split: str | None = None,
        train_annotation: str | os.PathLike | None = None,
        val_annotation: str | os.PathLike | None = None,
        video_dirs: Sequence[str] = VIDEO_DIRS,
        num_frames: int = 16,
        resolution: Resolution = (256, 256),
        frame_stride: int = 1,
        clip_sampling: str = "random",
        random_crop: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        images_per_video: int = 0,
        image_manifest: str | os.PathLike | None = None,
        image_column: str = "image",
        image_caption_column: str = "caption",
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, images_per_video=images_per_video, seed=seed)
        self.save_hyperparameters(logger=False)
        self.use_image_manifest(images_per_video, image_manifest, image_column, image_caption_column)
        self.root, self.video_dirs = Path(root), tuple(video_dirs)
        self.splits = {"train": train_split, "val": val_split}
        self.annotation_files = {"train": train_annotation, "val": val_annotation}
        self.num_frames, self.frame_stride, self.clip_sampling = num_frames, frame_stride, clip_sampling
        self.resolution, self.random_crop = as_resolution(resolution), random_crop

    def build_dataset(self, split: str) -> Dataset | None:
        if self.splits[split] is None:
            return None
        train = split == "train"
        return MSRVTTDataset(
            self.root,
            self.splits[split],
            self.annotation_files[split],
            self.video_dirs,
            self.num_frames,
            self.resolution,
            self.frame_stride,
            clip_sampling=self.clip_sampling if train else "first",
            captions="random" if train else "seeded",
            random_crop=self.random_crop and train,
            seed=self.seed,
        )
