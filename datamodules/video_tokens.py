"""Pre-tokenised video: the frozen video tokenizer's codes of a dataset, encoded once by scripts/pretokenize.py
and read back from memory-mapped shards (`data=video_tokens data.path=DIR`), so a token model (Loong) trains
without decoding videos or running the tokenizer at every step.

    DIR/meta.json            format version, tokenizer (checkpoint, sha256 of its weights, codebook size), clip
                             length and resolution, the dataset config the shards were encoded from, per split the
                             item count, and `complete`: true only once every split is written (always last)
    DIR/<split>/codes.npy    uint16 [N, T', H', W'] (uint8 / uint16 / uint32: the smallest that holds the codebook)
    DIR/<split>/image_codes.npy   [N, M, 1, H', W']: the M images appended to each clip in joint mode
    DIR/<split>/items.jsonl  one line per item: caption, image_captions (joint mode), the other plain fields
                             (label, fps, is_image)
    DIR/<split>.partial/     the same while pretokenize writes the split; renamed to <split>/ once complete

A batch is the shared batch format (docs/design.md) with the codes in place of the pixels:
`video_codes` LongTensor [B, T', H', W'], `caption`, and in joint mode `image_codes` LongTensor [B, M, 1, H', W']
with `image_captions`; `label`, `fps`, `is_image` when the source dataset has them. There is no `video`.

Order, seeding and exact resumption are the source datamodule's (BaseDataModule, datamodules/resumable.py): the
same `seed` and `batch_size` give the batches of the datamodule the shards were encoded from, in the same order,
and a checkpoint resumes mid-epoch at the same batch. Item i is encoded as the source dataset gives it for the
first epoch (training items under SeededItems' epoch-0 seed, validation items as the validation loader reads them):
datasets with no per-access randomness (synthetic; first/center/seeded clips; validation) give exactly the
on-the-fly batches of every epoch, while random clip starts, random crops or MSR-VTT's random caption are drawn
once and then repeat every epoch.

The codes are only valid for the tokenizer that made them: in `train_dataloader` / `val_dataloader` the datamodule
compares the training module's `tokenizer` (codebook size, weights hash) with `meta.json`, and stops with a
ValueError on a mismatch (`check_tokenizer`, also callable directly).
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule, as_resolution

FORMAT_VERSION = 1
META_FILE = "meta.json"
CODES_FILE, IMAGE_CODES_FILE, ITEMS_FILE = "codes.npy", "image_codes.npy", "items.jsonl"
PARTIAL_SUFFIX = ".partial"
SPLITS = ("train", "val")
#: the tokenizer submodules whose weights decide the codes (the decoder does not): what `weights_sha256` hashes
CODE_WEIGHTS = ("encoder", "quantizer")
COMMAND = "python scripts/pretokenize.py experiment=<recipe> out={path} [model.tokenizer_checkpoint=CKPT]"


class IncompleteShardsError(ValueError):
    """The shard folder was not finished (an interrupted scripts/pretokenize.py)."""


class TokenizerMismatchError(ValueError):
    """The shards were encoded by another tokenizer than the model's."""


def code_dtype(num_codes: int) -> np.dtype:
    """The smallest unsigned integer type that holds the ids 0 .. num_codes - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_codes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"a codebook of {num_codes} codes does not fit 32 bits")


def tokenizer_weights_sha256(tokenizer: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the tokenizer's encoder and quantizer tensors (parameters
    and buffers): the same for the same weights whatever the device or checkpoint file they came from."""
    digest = hashlib.sha256()
    for part in CODE_WEIGHTS:
        for name, tensor in sorted(getattr(tokenizer, part).state_dict().items()):
            value = tensor.detach().cpu().contiguous()
            digest.update(f"{part}.{name}:{value.dtype}:{tuple(value.shape)};".encode())
            digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The meta.json of a finished shard folder; FileNotFoundError / IncompleteShardsError / ValueError naming the
    command that makes (or finishes) it otherwise."""
    root = Path(path)
    make = COMMAND.format(path=shlex.quote(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(f"no token shards at {root} (data.path): make them once with\n  {make}")
    meta_file = root / META_FILE
    if not meta_file.is_file():
        raise IncompleteShardsError(f"{root} has no {META_FILE}: not a finished token shard folder (an interrupted or "
                                    f"failed scripts/pretokenize.py?). Make it with\n  {make}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise IncompleteShardsError(f"{meta_file} is not valid json ({error}); make the shards again with\n  {make}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{root} holds token shards of format version {meta.get('format_version')}, this code reads "
                         f"version {FORMAT_VERSION}: make them again with\n  {make}")
    if not meta.get("complete"):
        done = ", ".join(f"{split} {_items_done(root, split, info)}/{info.get('items', '?')} items"
                         for split, info in (meta.get("splits") or {}).items())
        again = meta.get("command") or make
        raise IncompleteShardsError(f"the token shards at {root} are incomplete ({done or 'nothing written'}): "
                                    f"scripts/pretokenize.py was interrupted. Run it again to continue where it "
                                    f"stopped:\n  {again}")
    return meta


def _items_done(root: Path, split: str, info: dict[str, Any]) -> int:
    """Items of `split` written so far: all when complete, else the finished lines of the partial folder."""
    if info.get("complete"):
        return int(info.get("items", 0))
    lines = root / (split + PARTIAL_SUFFIX) / ITEMS_FILE
    return lines.read_bytes().count(b"\n") if lines.is_file() else 0


class VideoTokensDataset(Dataset):
    """Items of one split of a shard folder: {"video_codes": LongTensor [T', H', W'], "caption", ...}.

    The code arrays are opened with np.load(mmap_mode="r") on first use in each process (DataLoader workers open
    their own maps rather than receive pickled arrays)."""

    def __init__(self, folder: str | os.PathLike, images_per_video: int = 0):
        self.folder = Path(folder)
        self.images_per_video = int(images_per_video)
        with (self.folder / ITEMS_FILE).open(encoding="utf-8") as handle:
            self.items = [json.loads(line) for line in handle if line.strip()]
        self._codes: np.ndarray | None = None
        self._image_codes: np.ndarray | None = None
        count = len(self.codes)
        if count != len(self.items):
            raise IncompleteShardsError(f"{self.folder}: {count} codes but {len(self.items)} items in {ITEMS_FILE}; "
                                        "the shards are damaged, make them again with scripts/pretokenize.py")

    @property
    def codes(self) -> np.ndarray:
        if self._codes is None:
            self._codes = np.load(self.folder / CODES_FILE, mmap_mode="r")
        return self._codes

    @property
    def image_codes(self) -> np.ndarray:
        if self._image_codes is None:
            self._image_codes = np.load(self.folder / IMAGE_CODES_FILE, mmap_mode="r")
        return self._image_codes

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_codes": None, "_image_codes": None}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} items")
        entry = self.items[index]
        item = {"video_codes": torch.from_numpy(self.codes[index].astype(np.int64))}  # (T', H', W')
        if self.images_per_video:
            item["image_codes"] = torch.from_numpy(self.image_codes[index].astype(np.int64))  # (M, 1, H', W')
        item.update(entry)  # caption, image_captions, label, fps, is_image as the source dataset gave them
        return item


class VideoTokensDataModule(BaseDataModule):
    """Train/val batches of video codes from a shard folder made by scripts/pretokenize.py (see the module doc).

    `num_frames`, `resolution`, `images_per_video` and `frame_stride` are what a recipe asks of any dataset: null
    takes the shards' own, any other value must be what the shards were made with (a ValueError says how to make
    matching ones). `seed` null is the shards' seed, so batches come in the order of the datamodule they were
    encoded from; `batch_size` is the recipe's. `check_tokenizer` false skips the tokenizer check at
    dataloader creation (not recommended).
    """

    def __init__(
        self,
        path: str,
        num_frames: int | None = None,
        resolution: int | Sequence[int] | None = None,
        frame_stride: int | None = None,
        images_per_video: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int | None = None,
        check_tokenizer: bool = True,
    ):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        video = self.meta["video"]
        size = None if resolution is None else list(as_resolution(resolution))
        wanted = {"num_frames": num_frames, "resolution": size, "images_per_video": images_per_video,
                  "frame_stride": frame_stride}
        wrong = {k: v for k, v in wanted.items() if v is not None and v != video[k]}
        if wrong:
            asked = ", ".join(f"data.{k}={v}" for k, v in wrong.items())
            held = ", ".join(f"{k} {video[k]}" for k in wrong)
            raise ValueError(f"the token shards at {self.path} hold {held}, but the recipe asks for {asked}: make "
                             f"shards for this recipe with\n  {COMMAND.format(path='NEW_DIR')}\n(the shards were "
                             f"made by: {self.meta.get('command', '?')})")
        super().__init__(batch_size=batch_size, num_workers=num_workers, images_per_video=0,
                         seed=self.meta["seed"] if seed is None else seed)
        self.save_hyperparameters(logger=False)
        # BaseDataModule's joint mode appends pixels: here the images are in the shards, so it stays off (0) and
        # this counts the images each item carries
        self.shard_images_per_video = int(video["images_per_video"])
        self.check_tokenizer_enabled = check_tokenizer
        self._tokenizer_checked = False

    def build_dataset(self, split: str) -> Dataset | None:
        info = self.meta["splits"].get(split) or {}
        if not info.get("items"):
            return None
        dataset = VideoTokensDataset(self.path / split, self.shard_images_per_video)
        if len(dataset) != info["items"]:
            raise IncompleteShardsError(f"{self.path / split} holds {len(dataset)} items, {META_FILE} says "
                                        f"{info['items']}: the shards are damaged, make them again")
        return dataset

    # ---- the tokenizer the codes belong to ------------------------------------------------------------------
    def check_tokenizer(self, tokenizer: nn.Module) -> None:
        """ValueError unless `tokenizer` (a LoongTokenizer, or anything with `quantizer.num_codes` and encoder /
        quantizer weights) is the one the shards were encoded with: same codebook size, same weights hash."""
        recorded = self.meta["tokenizer"]
        source = f"the token shards at {self.path} (made from {recorded.get('checkpoint')})"
        num_codes = tokenizer.quantizer.num_codes
        if num_codes != recorded["num_codes"]:
            raise TokenizerMismatchError(
                f"{source} hold codes of a {recorded['num_codes']}-code tokenizer, but the model's video tokenizer "
                f"has {num_codes} codes: make the shards with this model's tokenizer "
                f"({COMMAND.format(path='NEW_DIR')}, model.tokenizer_checkpoint = the model's)")
        weights = tokenizer_weights_sha256(tokenizer)
        if weights != recorded["weights_sha256"]:
            raise TokenizerMismatchError(
                f"{source} were encoded by another video tokenizer than the model's (encoder/quantizer weights "
                f"sha256 {recorded['weights_sha256'][:12]}... vs the model's {weights[:12]}...): codes of one "
                f"tokenizer mean nothing to another. Set model.tokenizer_checkpoint to the checkpoint the shards "
                f"were made from, or make new shards with the model's tokenizer ({COMMAND.format(path='NEW_DIR')})")

    def _check_model(self) -> None:
        """The training module's tokenizer against the shards, once, when Lightning asks for the first dataloader:
        after the module's setup and any checkpoint restore, so the weights compared are the ones that train."""
        if self._tokenizer_checked or not self.check_tokenizer_enabled or self.trainer is None:
            return
        module = self.trainer.lightning_module
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None or not hasattr(tokenizer, "quantizer"):
            raise ValueError(f"data=video_tokens gives video tokenizer codes, not pixels: {type(module).__name__} "
                             "has no video tokenizer (`tokenizer`) to read them. Train a token model (model=loong, "
                             "experiment=tiny_loong*), or use the dataset the shards were made from")
        self.check_tokenizer(tokenizer)
        self._tokenizer_checked = True

    def train_dataloader(self):
        self._check_model()
        return super().train_dataloader()

    def val_dataloader(self):
        self._check_model()
        return super().val_dataloader()
