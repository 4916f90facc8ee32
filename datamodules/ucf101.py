"""UCF-101 in its official on-disk layout: training clips, real clips for FVD statistics, and the class prompts.

The layout is what the two official archives from https://www.crcv.ucf.edu/data/UCF101.php unpack to:

    ROOT/UCF-101/<ClassName>/v_<ClassName>_gXX_cYY.avi      UCF101.rar (13,320 videos, 25 fps, 320x240)
    ROOT/ucfTrainTestlist/classInd.txt                       UCF101TrainTestSplits-RecognitionTask.zip
    ROOT/ucfTrainTestlist/trainlist0{1,2,3}.txt
    ROOT/ucfTrainTestlist/testlist0{1,2,3}.txt

classInd.txt has lines "1 ApplyEyeMakeup" (1-based); trainlists have "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1",
testlists the path alone. Labels here are 0-based: the classInd index minus one, so they mean the same class whether
classInd lists all 101 classes or a subset with their official indices.

Captions are the class name split into lower-case words ("ApplyEyeMakeup" -> "apply eye makeup", see
`class_caption`), or the descriptive prompt of eval/prompts/ucf101_descriptive.txt with captions="descriptive".
"""
from __future__ import annotations

import os
import re
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule, ManifestDataset, Resolution, UnreadableFileWarning, as_resolution
from datamodules.images import JointImagesFromManifest
from datamodules.transforms import to_uint8, video_transform
from datamodules.video_io import MediaReadError, VideoReadError, read_video, video_info

# The 101 classes in classInd.txt order (index 0 here is "1 ApplyEyeMakeup" there).
UCF101_CLASSES = (
    "ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam", "BandMarching", "BaseballPitch",
    "Basketball", "BasketballDunk", "BenchPress", "Biking", "Billiards", "BlowDryHair", "BlowingCandles",
    "BodyWeightSquats", "Bowling", "BoxingPunchingBag", "BoxingSpeedBag", "BreastStroke", "BrushingTeeth",
    "CleanAndJerk", "CliffDiving", "CricketBowling", "CricketShot", "CuttingInKitchen", "Diving", "Drumming",
    "Fencing", "FieldHockeyPenalty", "FloorGymnastics", "FrisbeeCatch", "FrontCrawl", "GolfSwing", "Haircut",
    "Hammering", "HammerThrow", "HandstandPushups", "HandstandWalking", "HeadMassage", "HighJump", "HorseRace",
    "HorseRiding", "HulaHoop", "IceDancing", "JavelinThrow", "JugglingBalls", "JumpingJack", "JumpRope", "Kayaking",
    "Knitting", "LongJump", "Lunges", "MilitaryParade", "Mixing", "MoppingFloor", "Nunchucks", "ParallelBars",
    "PizzaTossing", "PlayingCello", "PlayingDaf", "PlayingDhol", "PlayingFlute", "PlayingGuitar", "PlayingPiano",
    "PlayingSitar", "PlayingTabla", "PlayingViolin", "PoleVault", "PommelHorse", "PullUps", "Punch", "PushUps",
    "Rafting", "RockClimbingIndoor", "RopeClimbing", "Rowing", "SalsaSpin", "ShavingBeard", "Shotput",
    "SkateBoarding", "Skiing", "Skijet", "SkyDiving", "SoccerJuggling", "SoccerPenalty", "StillRings",
    "SumoWrestling", "Surfing", "Swing", "TableTennisShot", "TaiChi", "TennisSwing", "ThrowDiscus",
    "TrampolineJumping", "Typing", "UnevenBars", "VolleyballSpiking", "WalkingWithDog", "WallPushups",
    "WritingOnBoard", "YoYo",
)  # fmt: skip

VIDEO_DIR = "UCF-101"
SPLIT_DIR = "ucfTrainTestlist"
SPLITS = ("train", "test", "all")  # "all": train + test of a fold, i.e. every video (what many T2V papers train on)
FOLDS = (1, 2, 3)
CLIP_SAMPLING = ("first", "center", "random", "seeded", "uniform")
DESCRIPTIVE_PROMPTS = Path(__file__).resolve().parents[1] / "eval" / "prompts" / "ucf101_descriptive.txt"

_OFFICIAL = "https://www.crcv.ucf.edu/data/UCF101.php"
_LAYOUT = (
    "    {root}/UCF-101/<ClassName>/v_<ClassName>_gXX_cYY.avi   (from UCF101.rar)\n"
    "    {root}/ucfTrainTestlist/classInd.txt, trainlist0{{1,2,3}}.txt, testlist0{{1,2,3}}.txt   "
    "(from UCF101TrainTestSplits-RecognitionTask.zip)\n"
    f"Both archives are published at {_OFFICIAL}; unpack them into one folder and point data.root at it."
)


def _missing(root: Path, what: Path) -> FileNotFoundError:
    return FileNotFoundError(f"UCF-101: {what} not found. Expected the official layout:\n" + _LAYOUT.format(root=root))


# ----------------------------------------------------------------------------------------------- names and prompts


def class_caption(name: str) -> str:
    """"ApplyEyeMakeup" -> "apply eye makeup": CamelCase split into lower-case words ("YoYo" -> "yo yo")."""
    return " ".join(word.lower() for word in re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+", name))


def read_descriptive_prompts(path: str | os.PathLike = DESCRIPTIVE_PROMPTS) -> dict[str, str]:
    """{class name: prompt} from `ClassName<TAB>prompt` lines, checked to be the 101 classes in classInd order."""
    path = Path(path)
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [i + 1 for i, row in enumerate(rows) if len(row) != 2 or not row[1].strip()]
    if bad:
        raise ValueError(f"{path}: lines {bad[:5]} are not 'ClassName<TAB>prompt'")
    names = tuple(name for name, _ in rows)
    if names != UCF101_CLASSES:
        wrong = next((i for i, (a, b) in enumerate(zip(names, UCF101_CLASSES)) if a != b), min(len(names), 101))
        raise ValueError(
            f"{path} must list the 101 UCF-101 classes in classInd.txt order; it has {len(names)} lines and line "
            f"{wrong + 1} is {names[wrong] if wrong < len(names) else 'missing'!r}, expected {UCF101_CLASSES[wrong]!r}"
        )
    return {name: prompt.strip() for name, prompt in rows}


def ucf101_prompts(kind: str = "class_name", path: str | os.PathLike = DESCRIPTIVE_PROMPTS) -> list[str]:
    """The 101 evaluation prompts in class order: "class_name" (`class_caption` words) or "descriptive" (the file)."""
    if kind == "class_name":
        return [class_caption(name) for name in UCF101_CLASSES]
    if kind == "descriptive":
        return list(read_descriptive_prompts(path).values())
    raise ValueError(f"kind must be 'class_name' or 'descriptive', got {kind!r}")


# ------------------------------------------------------------------------------------------------ the split files


def read_class_index(root: str | os.PathLike) -> dict[int, str]:
    """{0-based class index: class name} from ROOT/ucfTrainTestlist/classInd.txt, in index order.

    The official file lists all 101 classes ("1 ApplyEyeMakeup" ... "101 YoYo"); a subset with the official indices
    also works, and keeps each class's label.
    """
    root = Path(root)
    path = root / SPLIT_DIR / "classInd.txt"
    if not path.is_file():
        raise _missing(root, path)
    index: dict[int, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) < 1:
            raise ValueError(f"{path}:{number}: expected '<1-based index> <ClassName>', got {line!r}")
        if int(fields[0]) - 1 in index or fields[1] in index.values():
            raise ValueError(f"{path}:{number}: class index or name listed twice: {line!r}")
        index[int(fields[0]) - 1] = fields[1]
    if not index:
        raise ValueError(f"{path} lists no classes")
    return dict(sorted(index.items()))


def class_names(root: str | os.PathLike | None = None) -> list[str]:
    """Class names by 0-based label: UCF101_CLASSES without a root, else from classInd.txt ("" for unlisted indices)."""
    if root is None:
        return list(UCF101_CLASSES)
    index = read_class_index(root)
    return [index.get(i, "") for i in range(max(index) + 1)]


def read_split(root: str | os.PathLike, split: str = "train", fold: int = 1) -> list[tuple[str, int]]:
    """(path relative to ROOT/UCF-101, 0-based label) for each video of trainlist0{fold} / testlist0{fold}, in file
    order; "all" is the train list followed by the test list. Train labels are checked against the folder's class."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, got {fold!r}")
    if split == "all":
        return read_split(root, "train", fold) + read_split(root, "test", fold)
    root = Path(root)
    labels = {name: label for label, name in read_class_index(root).items()}
    path = root / SPLIT_DIR / f"{split}list0{fold}.txt"
    if not path.is_file():
        raise _missing(root, path)
    videos = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        relative = fields[0].replace("\\", "/")
        class_name = relative.split("/")[0]
        if "/" not in relative or class_name not in labels:
            raise ValueError(
                f"{path}:{number}: expected '<ClassName>/v_<ClassName>_gXX_cYY.avi' with a class of classInd.txt, "
                f"got {line!r}"
            )
        label = labels[class_name]
        if len(fields) > 1 and int(fields[1]) - 1 != label:
            raise ValueError(
                f"{path}:{number}: label {fields[1]} disagrees with classInd.txt ({class_name} is {label + 1})"
            )
        videos.append((relative, label))
    return videos


def train_class_distribution(root: str | os.PathLike, fold: int = 1) -> np.ndarray:
    """Videos per class in trainlist0{fold}: int64 [num_classes], indexed by 0-based label (101 long officially)."""
    num_classes = max(read_class_index(root)) + 1
    labels = [label for _, label in read_split(root, "train", fold)]
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def videos_per_class(num_videos: int, distribution: np.ndarray) -> np.ndarray:
    """Split `num_videos` over classes in proportion to `distribution` (counts or weights), summing exactly.

    Largest-remainder rounding; ties go to the lower class index, so the result is deterministic.
    """
    weights = np.asarray(distribution, dtype=np.float64)
    if weights.ndim != 1 or weights.sum() <= 0 or (weights < 0).any():
        raise ValueError(f"distribution must be non-negative counts with a positive sum, got {distribution}")
    exact = num_videos * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")  # largest remainder first, lower index on ties
    counts[order[: num_videos - counts.sum()]] += 1
    return counts


# ------------------------------------------------------------------------------------------------------- clips


def stable_key(name: str) -> int:
    """A seed key for a video that is the same in every process and on every machine (hash() is salted)."""
    return zlib.crc32(name.encode("utf-8"))


def read_clip(
    path: str | os.PathLike,
    num_frames: int,
    frame_stride: int = 1,
    sampling: str = "first",
    seed: int = 0,
    key: int | tuple[int, ...] = 0,
) -> tuple[torch.Tensor, float]:
    """uint8 [T, H, W, 3] and its frame rate: `num_frames` frames `frame_stride` apart, placed by `sampling`:

    - "first": from frame 0; "center": the middle of the video;
    - "random": a random start from torch's RNG (training; Lightning's seed_everything seeds it per worker);
    - "seeded": a random start fixed by (seed, key), the same on every read (evaluation);
    - "uniform": spread over the whole video, with the largest integer stride (at least `frame_stride`) that fits,
      centred.
    Raises VideoReadError for unreadable videos and videos shorter than the clip.
    """
    if sampling not in CLIP_SAMPLING:
        raise ValueError(f"clip sampling must be one of {CLIP_SAMPLING}, got {sampling!r}")
    info = video_info(path)
    if sampling == "uniform" and num_frames > 1:
        frame_stride = max(frame_stride, (info.num_frames - 1) // (num_frames - 1))
    span = (num_frames - 1) * frame_stride + 1  # source frames one clip covers
    if info.num_frames < span:
        raise VideoReadError(path, f"too short: {info.num_frames} frames, a clip needs {span}")
    room = info.num_frames - span + 1  # possible start frames
    if sampling in ("center", "uniform"):
        start = (room - 1) // 2
    elif sampling == "random":
        start = int(torch.randint(room, ()))
    elif sampling == "seeded":
        start = int(np.random.default_rng([seed, *np.atleast_1d(key)]).integers(room))
    else:
        start = 0
    return read_video(path, num_frames, start, frame_stride), info.fps / frame_stride


def _find_file(path: Path) -> Path:
    """`path`, or a file in its folder whose name differs only in case (UCF-101 spells HandstandPushups both ways)."""
    if path.is_file() or not path.parent.is_dir():
        return path
    name = path.name.lower()
    return next((p for p in sorted(path.parent.iterdir()) if p.name.lower() == name), path)


class UCF101Dataset(ManifestDataset):
    """Clips of the videos in a split of a fold, captioned with their class; items carry `label` (0-based).

    Unreadable, missing and too-short videos are skipped with a warning and counted (see ManifestDataset).
    `captions` is "class_name" ("apply eye makeup") or "descriptive" (eval/prompts/ucf101_descriptive.txt).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        fold: int = 1,
        num_frames: int = 16,
        resolution: Resolution = (128, 128),
        frame_stride: int = 1,
        clip_sampling: str = "first",
        captions: str = "class_name",
        random_crop: bool = False,
        seed: int = 0,
    ):
        if clip_sampling not in CLIP_SAMPLING:
            raise ValueError(f"clip_sampling must be one of {CLIP_SAMPLING}, got {clip_sampling!r}")
        root = Path(root)
        videos = read_split(root, split, fold)
        if not (root / VIDEO_DIR).is_dir():
            raise _missing(root, root / VIDEO_DIR)
        names = read_class_index(root)
        if captions == "descriptive":
            prompts = read_descriptive_prompts()
            caption_of = {label: prompts[name] for label, name in names.items() if name in prompts}
        elif captions == "class_name":
            caption_of = {label: class_caption(name) for label, name in names.items()}
        else:
            raise ValueError(f"captions must be 'class_name' or 'descriptive', got {captions!r}")
        # the official split list is the manifest
        self.set_entries(root / SPLIT_DIR / f"{split}list0{fold}.txt",
                         [(root / VIDEO_DIR / relative, caption_of[label]) for relative, label in videos], seed)
        self.videos = videos  # (relative path, label), in entry order
        # key (pass 0, path): "seeded" clips are the first-pass clips of real_clips with the same seed
        self._meta = {root / VIDEO_DIR / relative: (label, (0, stable_key(relative))) for relative, label in videos}
        self.root, self.split, self.fold = root, split, fold
        self.num_frames, self.frame_stride, self.clip_sampling = int(num_frames), int(frame_stride), clip_sampling
        self.transform = video_transform(as_resolution(resolution), random_crop)
        self.check_readable()  # no readable video: a clear error now, not in a DataLoader worker mid-epoch

    def load(self, path: Path, caption: str) -> dict[str, Any]:
        label, key = self._meta[path]
        frames, fps = read_clip(
            _find_file(path), self.num_frames, self.frame_stride, self.clip_sampling, self.seed, key
        )  # (T, H, W, 3)
        return {"video": self.transform(frames), "caption": caption, "label": label, "fps": fps, "is_image": False}


def real_clips(
    root: str | os.PathLike,
    split: str = "train",
    fold: int = 1,
    num_frames: int = 16,
    num_clips: int | None = None,
    seed: int = 0,
    frame_stride: int = 1,
    clip_sampling: str = "seeded",
    resolution: Resolution | None = None,
    max_passes: int | None = None,
    report: dict[str, Any] | None = None,
) -> Iterator[torch.Tensor]:
    """Real uint8 clips [T, H, W, 3] for FVD statistics, the same ones on every run.

    Videos are visited in a permutation of the split fixed by `seed`; with more clips than videos the permutation
    repeats and each pass takes other clips ("seeded": start drawn from (seed, pass, video path)). Unreadable and
    too-short videos are skipped (warned about and counted once, with an UnreadableFileWarning) and the next video
    is used, so the first k clips of a longer request are the clips of a shorter one. `num_clips` None: one clip per
    video. Frames keep the file's size unless `resolution` (H, W) is given (resize to cover, centre crop).

    A ValueError names the split and how many videos were skipped and why (too short, unreadable, missing) when a
    whole pass gives no clip, or when `num_clips` clips do not fit in `max_passes` passes (None: no limit; the
    evaluation protocols allow the passes a split without skipped videos would need, so a few skipped videos cost
    nothing and a mostly unusable split stops the run). `report`, when given, is filled in while clips are drawn:
    {"videos": videos in the split, "passes": passes begun, "clips": clips yielded, "skipped": {reason: count},
    "skipped_examples": {reason: [up to 5 paths]}, "clip_fps": {frame rate of the clips as read: clips}}.
    """
    root = Path(root)
    videos = sorted(relative for relative, _ in read_split(root, split, fold))
    if not (root / VIDEO_DIR).is_dir():
        raise _missing(root, root / VIDEO_DIR)
    transform = None if resolution is None else video_transform(as_resolution(resolution))
    total = len(videos) if num_clips is None else int(num_clips)
    order = np.random.default_rng(seed).permutation(len(videos))
    report = {} if report is None else report
    report.update(videos=len(videos), passes=0, clips=0, skipped={}, skipped_examples={}, clip_fps={})
    skipped: dict[str, list[str]] = {}  # reason -> relative paths, each video once

    def too_few() -> ValueError:
        lists = f"trainlist0{fold}.txt + testlist0{fold}.txt" if split == "all" else f"{split}list0{fold}.txt"
        reasons = ", ".join(f"{len(paths)} {reason} (e.g. {paths[0]})" for reason, paths in skipped.items())
        return ValueError(
            f"UCF-101 {split} split ({lists}, {len(videos)} videos under {root}): only {report['clips']} of {total} "
            f"real clips of {num_frames} frames (frame stride {frame_stride}) in {report['passes']} pass(es) over "
            f"the split; skipped {sum(map(len, skipped.values()))} videos: {reasons or 'none'}"
        )

    yielded, pass_index, unreadable = 0, 0, set()
    while yielded < total:
        if max_passes is not None and pass_index >= max_passes:
            raise too_few()
        report["passes"] = pass_index + 1
        yielded_before = yielded
        for position in order:
            if yielded == total:
                return
            relative = videos[position]
            if relative in unreadable:  # warned about on the first pass
                continue
            try:
                clip, fps = read_clip(
                    _find_file(root / VIDEO_DIR / relative), num_frames, frame_stride, clip_sampling, seed,
                    (pass_index, stable_key(relative)),
                )  # (T, H, W, 3)
            except MediaReadError as error:
                unreadable.add(relative)
                reason = ("too short" if error.reason.startswith("too short") else
                          "missing" if error.reason == "file does not exist" else "unreadable")
                skipped.setdefault(reason, []).append(relative)
                report["skipped"][reason] = len(skipped[reason])
                report["skipped_examples"][reason] = skipped[reason][:5]
                warnings.warn(
                    f"skipping {error}; skipped {len(unreadable)} unreadable {error.kind}s so far",
                    UnreadableFileWarning,
                    stacklevel=2,
                )
                continue
            yielded += 1
            report["clips"] = yielded
            report["clip_fps"][f"{fps:g}"] = report["clip_fps"].get(f"{fps:g}", 0) + 1  # file fps / stride
            yield clip if transform is None else to_uint8(transform(clip))
        if yielded == yielded_before:
            raise too_few()
        pass_index += 1


class UCF101DataModule(JointImagesFromManifest, BaseDataModule):
    """UCF-101 batches (with `label`) from the official split files; validation takes the first clip of each video.
    `images_per_video` > 0 with `image_manifest` gives joint mode (images from an image-caption manifest)."""

    def __init__(
        self,
        root: str | os.PathLike,
        fold: int = 1,
        train_split: str = "train",
        val_split: str | None = None,
        num_frames: int = 16,
        resolution: Resolution = (128, 128),
        frame_stride: int = 1,
        clip_sampling: str = "random",
        captions: str = "class_name",
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
        self.root, self.fold = Path(root), int(fold)
        self.splits = {"train": train_split, "val": val_split}
        self.num_frames, self.frame_stride, self.clip_sampling = num_frames, frame_stride, clip_sampling
        self.resolution, self.captions, self.random_crop = as_resolution(resolution), captions, random_crop

    def build_dataset(self, split: str) -> Dataset | None:
        if self.splits[split] is None:
            return None
        train = split == "train"
        return UCF101Dataset(
            self.root,
            self.splits[split],
            self.fold,
            self.num_frames,
            self.resolution,
            self.frame_stride,
            clip_sampling=self.clip_sampling if train else "first",
            captions=self.captions,
            random_crop=self.random_crop and train,
            seed=self.seed,
        )
