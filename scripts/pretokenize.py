"""Encode a dataset once with the frozen video tokenizer into memory-mapped token shards (data=video_tokens).

    python scripts/pretokenize.py experiment=tiny_loong_17 out=data/tokens/tiny_loong_17
    python scripts/pretokenize.py experiment=tiny_loong_17 out=DIR model.tokenizer_checkpoint=CKPT data.train_size=5000
    python train.py experiment=tiny_loong_17 data=video_tokens data.path=DIR          # train from the shards

Every argument but the options below is a Hydra override of configs/train.yaml, as for train.py: the recipe's
`data` (its train and val splits) is encoded with its model's video tokenizer (`model.tokenizer`, weights from
`model.tokenizer_checkpoint`). Options: out=DIR (required), encode_batch=N (items encoded together, default 8),
device=auto|cpu|cuda|cuda:N (auto: the GPU when there is one).

Items are read in index order, not shuffled (training items with SeededItems' epoch-0 seed, validation items as
the validation loader reads them), so `data=video_tokens` with the same seed and batch size gives the batches of the
original datamodule; the format is described in datamodules/video_tokens.py.

Interrupted runs continue: a split is written to DIR/<split>.partial/ (codes first, then the item's line in
items.jsonl, so the lines count the finished items), renamed to DIR/<split>/ when complete, and meta.json says
`complete: true` only once every split is there. Running the same command again continues where it stopped;
a folder made with other settings (dataset, tokenizer) is refused rather than mixed.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from datamodules.base import BaseDataModule  # noqa: E402
from datamodules.joint import JointImageVideoDataset  # noqa: E402
from datamodules.resumable import SeededItems  # noqa: E402
from datamodules.video_tokens import (  # noqa: E402
    CODES_FILE,
    FORMAT_VERSION,
    IMAGE_CODES_FILE,
    ITEMS_FILE,
    META_FILE,
    PARTIAL_SUFFIX,
    SPLITS,
    VideoTokensDataModule,
    code_dtype,
    file_sha256,
    tokenizer_weights_sha256,
)
from utils.cli import user_errors_exit  # noqa: E402
from utils.progress import WorkProgress  # noqa: E402

OPTIONS = {"out": None, "encode_batch": "8", "device": "auto"}
ITEM_DRAWS = ("each item as the source dataset gives it in epoch 0 (train: SeededItems seed (seed, 0, index); val: "
              "as the validation loader reads it); per-access randomness (random clip starts or crops, random "
              "captions) is drawn once")


def parse_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """(options, Hydra overrides) from `key=value` arguments."""
    options, overrides = dict(OPTIONS), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in OPTIONS:
            options[key] = value
        else:
            overrides.append(arg)
    if not options["out"]:
        raise ValueError("out=DIR is required: the folder the token shards are written to (then data.path=DIR)")
    return options, overrides


def compose_recipe(overrides: list[str], out: Path) -> DictConfig:
    """configs/train.yaml with `overrides`; paths relative to the current folder as in train.py."""
    defaults = [f"paths.root_dir={Path.cwd()}", f"paths.output_dir={out}"]
    given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[d for d in defaults if d.split("=")[0] not in given] + overrides)


def build_tokenizer(model_cfg: DictConfig, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The recipe's frozen video tokenizer with its trained weights, and the checkpoint path."""
    if "tokenizer" not in model_cfg or "tokenizer_checkpoint" not in model_cfg:
        raise ValueError(f"model {model_cfg.get('_target_')} has no video tokenizer (model.tokenizer and "
                         "model.tokenizer_checkpoint): pretokenize encodes for token models (model=loong, "
                         "experiment=tiny_loong*)")
    checkpoint = model_cfg.tokenizer_checkpoint
    if not checkpoint or not Path(checkpoint).is_file():
        raise FileNotFoundError(f"video tokenizer checkpoint not found: {checkpoint} (model.tokenizer_checkpoint; "
                                "train it with python train.py experiment=tiny_loong_tokenizer, _17, _65, or pass "
                                "model.tokenizer_checkpoint=CKPT)")
    tokenizer = instantiate(model_cfg.tokenizer, _convert_="all")
    tokenizer.load_pretrained(checkpoint)
    return tokenizer.requires_grad_(False).eval().to(device), str(checkpoint)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------- meta.json
def write_json(path: Path, value: dict[str, Any]) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def fingerprint(meta: dict[str, Any]) -> dict[str, Any]:
    """What must be the same for a re-run to continue a folder: format, tokenizer weights, dataset, sizes."""
    data = {k: v for k, v in meta["data"].items() if k not in ("batch_size", "num_workers")}  # no effect on items
    return {"format_version": meta["format_version"], "weights_sha256": meta["tokenizer"]["weights_sha256"],
            "data": data, "video": meta["video"], "seed": meta["seed"],
            "items": {split: info["items"] for split, info in meta["splits"].items()}}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [key for key in new if old.get(key) != new[key]]


# ---------------------------------------------------------------------------------------------- items
def plain(value: Any) -> Any:
    """A JSON value for an item field (label, fps, is_image, ...); TypeError for what JSON cannot hold."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def split_item(item: dict[str, Any], images: int, dropped: set[str]) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                               dict[str, Any]]:
    """(video frames [T, C, H, W], appended images [M, 1, C, H, W] or None, the item's other fields as JSON)."""
    video = item["video"]  # (T + M, C, H, W)
    frames = video.shape[0] - images
    entry = {}
    for key, value in item.items():
        if key == "video":
            continue
        try:
            entry[key] = plain(value)
        except TypeError:
            dropped.add(key)
    return video[:frames], (video[frames:].unsqueeze(1) if images else None), entry


class SplitWriter:
    """DIR/<split>.partial/: code memmaps and items.jsonl, opened fresh or where an interrupted run left them."""

    def __init__(self, folder: Path, count: int, latent: tuple[int, int, int], images: int, dtype: np.dtype):
        self.folder, self.count = folder, count
        folder.mkdir(parents=True, exist_ok=True)
        shapes = {CODES_FILE: (count, *latent)}
        if images:
            shapes[IMAGE_CODES_FILE] = (count, images, 1, *latent[1:])
        self.arrays = {}
        for name, shape in shapes.items():
            path = folder / name
            if path.is_file():
                array = np.load(path, mmap_mode="r+")
                if array.shape != shape or array.dtype != dtype:
                    raise ValueError(f"{path} is {array.dtype} {array.shape}, expected {dtype} {shape}: remove "
                                     f"{folder} and run again")
            else:
                array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            self.arrays[name] = array
        self.done = self._finished_lines()
        self.lines = (folder / ITEMS_FILE).open("a", encoding="utf-8")

    def _finished_lines(self) -> int:
        """Items whose line was written completely (a half-written last line is cut off)."""
        path = self.folder / ITEMS_FILE
        if not path.is_file():
            return 0
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with path.open("r+b") as handle:
                handle.truncate(end)
        return data[:end].count(b"\n")

    def write(self, start: int, codes: np.ndarray, image_codes: np.ndarray | None, entries: list[dict]) -> None:
        """Codes first (flushed to the file), then the lines: a line means its item's codes are on disk."""
        stop = start + len(entries)
        self.arrays[CODES_FILE][start:stop] = codes
        if image_codes is not None:
            self.arrays[IMAGE_CODES_FILE][start:stop] = image_codes
        for array in self.arrays.values():
            array.flush()
        self.lines.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
        self.lines.flush()
        self.done = stop

    def close(self) -> None:
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        self.lines.flush()
        os.fsync(self.lines.fileno())
        self.lines.close()


# ---------------------------------------------------------------------------------------------- the run
def source_datasets(datamodule: BaseDataModule) -> dict[str, Any]:
    datamodule.setup("fit")
    return {split: datamodule.datasets.get(split) for split in SPLITS}


def read_item(dataset: Any, split: str, index: int, seed: int) -> dict[str, Any]:
    """Item `index` as the source datamodule's loader gives it in epoch 0."""
    if split == "train":
        return SeededItems(dataset, seed)[index]  # draw `index` = epoch 0, item index
    return dataset[index]


def skipped(dataset: Any) -> int:
    parts = [dataset.video_dataset, dataset.image_dataset] if isinstance(dataset, JointImageVideoDataset) else [dataset]
    return sum(int(getattr(part, "num_skipped", 0)) for part in parts)


def pretokenize(argv: Sequence[str]) -> Path:
    options, overrides = parse_args(argv)
    out = Path(options["out"]).resolve()
    encode_batch = int(options["encode_batch"])
    if encode_batch < 1:
        raise ValueError(f"encode_batch must be >= 1, got {encode_batch}")
    cfg = compose_recipe(overrides, out)
    target = cfg.data.get("_target_", "")
    if target.endswith(VideoTokensDataModule.__name__):
        raise ValueError("data=video_tokens is already tokens: pretokenize encodes a pixel dataset (data=synthetic, "
                         "video_text, ucf101, msrvtt, joint, images)")
    device = pick_device(options["device"])
    tokenizer, checkpoint = build_tokenizer(cfg.model, device)
    num_codes = int(tokenizer.quantizer.num_codes)
    dtype = code_dtype(num_codes)

    datamodule = instantiate(cfg.data, _convert_="all")
    if not isinstance(datamodule, BaseDataModule):
        raise ValueError(f"data {target} is not a BaseDataModule: pretokenize reads the shared datamodules")
    datasets = source_datasets(datamodule)
    if datasets["train"] is None:
        raise ValueError(f"{target} has no training data to encode")
    images = int(datamodule.images_per_video)
    first = read_item(datasets["train"], "train", 0, datamodule.seed)["video"]  # (T + M, C, H, W)
    frames, height, width = first.shape[0] - images, first.shape[2], first.shape[3]
    latent = tokenizer.encoder.latent_shape(frames, height, width)  # ValueError for a length the tokenizer can't take

    meta = {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "command": "python scripts/pretokenize.py " + " ".join(shlex.quote(a) for a in argv),
        "tokenizer": {"target": cfg.model.tokenizer.get("_target_"), "checkpoint": str(Path(checkpoint).resolve()),
                      "checkpoint_sha256": file_sha256(checkpoint),
                      "weights_sha256": tokenizer_weights_sha256(tokenizer), "num_codes": num_codes},
        "codes": {"dtype": dtype.name, "latent_shape": list(latent)},
        "video": {"num_frames": int(frames), "resolution": [int(height), int(width)],
                  "frame_stride": int(cfg.data.get("frame_stride") or 1), "images_per_video": images},
        "seed": int(datamodule.seed),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "item_draws": ITEM_DRAWS,
        "splits": {split: {"items": len(d) if d is not None else 0, "complete": False}
                   for split, d in datasets.items()},
        "device": str(device),
        "encode_batch": encode_batch,
    }
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META_FILE
    if meta_path.is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        changed = differences(old.get("fingerprint", {}), fingerprint(meta))
        if changed:
            raise ValueError(f"{out} holds token shards made with other settings ({', '.join(changed)} differ; made "
                             f"by: {old.get('command')}): choose another out= or remove {out}")
        if old.get("complete"):
            print(f"{out}: complete already ({old['command']})")
            return out
        meta["splits"] = old["splits"]
    meta["fingerprint"] = fingerprint(meta)
    write_json(meta_path, meta)  # complete: false until every split is written

    dropped: set[str] = set()
    for split, dataset in datasets.items():
        info = meta["splits"][split]
        if info["complete"] or dataset is None:
            info["complete"] = True
            continue
        partial, final = out / (split + PARTIAL_SUFFIX), out / split
        writer = SplitWriter(partial, info["items"], latent, images, dtype)
        with WorkProgress(f"pretokenizing {split}", total=info["items"], completed=writer.done, unit="items") as bar:
            for start in range(writer.done, info["items"], encode_batch):
                indices = range(start, min(start + encode_batch, info["items"]))
                parts = [split_item(read_item(dataset, split, i, datamodule.seed), images, dropped) for i in indices]
                video = torch.stack([p[0] for p in parts]).to(device)  # (b, T, C, H, W)
                codes = tokenizer.encode(video).cpu().numpy().astype(dtype)  # (b, T', H', W')
                image_codes = None
                if images:
                    stills = torch.cat([p[1] for p in parts]).to(device)  # (b * M, 1, C, H, W)
                    image_codes = tokenizer.encode(stills).cpu().numpy().astype(dtype)
                    image_codes = image_codes.reshape(len(parts), images, *image_codes.shape[1:])  # (b, M, 1, H', W')
                writer.write(start, codes, image_codes, [p[2] for p in parts])
                bar.update(writer.done)
        writer.close()
        if final.exists():  # left by a run whose meta.json update did not happen: the partial is the newer one
            shutil.rmtree(final)
        os.replace(partial, final)
        info.update(complete=True, skipped=skipped(dataset))
        write_json(meta_path, meta)
    if dropped:
        warnings.warn(f"item fields not stored (not JSON values): {sorted(dropped)}", stacklevel=2)
    meta["dropped_fields"] = sorted(dropped)
    meta["complete"] = True
    write_json(meta_path, meta)  # last: only now does data=video_tokens read the folder
    counts = ", ".join(f"{split} {info['items']}" for split, info in meta["splits"].items())
    print(f"wrote {counts} items of {dtype.name} codes {list(latent)} to {out}; train with: python train.py "
          f"{' '.join(shlex.quote(o) for o in overrides)} data=video_tokens data.path={shlex.quote(str(out))}")
    return out


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    pretokenize(argv)


if __name__ == "__main__":
    main()
