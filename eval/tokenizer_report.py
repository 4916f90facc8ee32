"""How faithfully a trained video tokenizer reconstructs the embedded synthetic dataset, through `encode`/`decode`.

    python eval/tokenizer_report.py logs/train/tiny_loong_tokenizer/images/checkpoints/last.ckpt
    python eval/tokenizer_report.py RUN/checkpoints/last.ckpt --frames 17 --num 64

The model is rebuilt from the run's `config.yaml` (which train.py writes next to `checkpoints/`) and its weights
are read with `load_pretrained` (the EMA weights when training kept an EMA). `--num` held-out items of the val split
are tokenized with `encode` and decoded with `decode`, the exact path the language model uses, and scored:

- psnr:         dB on the [0, 1] scale, mean over videos;
- colour_kept:  fraction of videos whose reconstruction's object (its saturated pixels) is nearest to the colour
                that was drawn (`datamodules.synthetic.drawn_colour`, as `make demo` checks generated videos);
- object_iou:   intersection over union of the saturated-pixel masks of input and reconstruction, mean over videos:
                1.0 when the object's shape and place come back, low for blurred or misplaced objects;
- codes_used:   fraction of the codebook's entries among the report's tokens.

Writes `tokenizer_report_<T>f.json` and `tokenizer_report_<T>f.png` (one input row, then its reconstruction row, per
group of 8 videos; clips show their first, middle and last frame) to `--out` (default: the run's `report/`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.synthetic import SyntheticVideoDataset, attributes_for, drawn_colour, object_pixels  # noqa: E402
from datamodules.transforms import to_uint8  # noqa: E402
from modules.loong_tokenizer import psnr  # noqa: E402


def load_tokenizer(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """(tokenizer in eval mode, its run's data config) from `RUN/checkpoints/<name>.ckpt` and `RUN/config.yaml`."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    config_path = checkpoint.resolve().parent.parent / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: pass a checkpoint from a train.py run directory "
                                "(RUN/checkpoints/*.ckpt, with RUN/config.yaml next to it)")
    cfg = OmegaConf.load(config_path)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["init_from"] = None  # the weights come from `checkpoint`, not from the previous stage
    model = instantiate(model_cfg, _convert_="all")
    if not hasattr(model, "encode") or not hasattr(model, "decode"):
        raise TypeError(f"{model_cfg['_target_']} has no encode/decode: not a tokenizer run")
    model.load_pretrained(checkpoint)
    return model.eval(), OmegaConf.to_container(cfg.data, resolve=True)


def score(inputs: np.ndarray, reconstructions: np.ndarray, colours: list[str]) -> dict[str, list[float]]:
    """Per-video colour match and object IoU of uint8 videos [B, T, H, W, 3]."""
    kept, iou = [], []
    for video, reconstruction, colour in zip(inputs, reconstructions, colours):
        kept.append(float(drawn_colour(reconstruction) == colour))
        truth, found = object_pixels(video), object_pixels(reconstruction)
        iou.append(float((truth & found).sum() / max((truth | found).sum(), 1)))
    return {"colour_kept": kept, "object_iou": iou}


def grid(inputs: np.ndarray, reconstructions: np.ndarray, per_row: int = 8) -> np.ndarray:
    """uint8 [rows * (H+2), per_row * frames_shown * (W+2), 3]: each row of inputs above its reconstructions, every
    frame framed by a 1-pixel white border."""
    frames = inputs.shape[1]
    shown = [0] if frames == 1 else [0, frames // 2, frames - 1]
    rows = []
    for start in range(0, len(inputs), per_row):
        for videos in (inputs[start:start + per_row], reconstructions[start:start + per_row]):
            tiles = [np.pad(v[t], ((1, 1), (1, 1), (0, 0)), constant_values=255) for v in videos for t in shown]
            tiles += [np.full_like(tiles[0], 255)] * (per_row * len(shown) - len(tiles))
            rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def report(checkpoint: Path, frames: int | None = None, num: int = 64, batch_size: int = 8,
           out: Path | None = None) -> dict:
    """Reconstruct `num` val items, write the json and png (see the module docstring) and return the json's dict."""
    from PIL import Image
    from tqdm import tqdm

    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    torch.manual_seed(0)
    model, data = load_tokenizer(checkpoint)
    frames = frames or (1 if data.get("image_mode") else int(data["num_frames"]))
    resolution = data["resolution"]
    model.encoder.latent_shape(frames, *resolution)  # a clear error for a frame count the CNN cannot take
    image_mode, seed = frames == 1, int(data.get("seed", 0))
    dataset = SyntheticVideoDataset(num, frames, resolution, seed=seed, split="val", image_mode=image_mode)

    inputs, reconstructions, tokens, colours, psnrs = [], [], [], [], []
    for start in tqdm(range(0, num, batch_size), desc=f"encode/decode {frames}-frame items", unit="batch"):
        indices = range(start, min(start + batch_size, num))
        video = torch.stack([dataset[i]["video"] for i in indices])  # (B, T, C, H, W) in [-1, 1]
        ids = model.encode(video)  # (B, T', H', W')
        reconstruction = model.decode(ids)  # (B, T, C, H, W)
        psnrs += [psnr(r[None], v[None]).item() for r, v in zip(reconstruction, video)]
        inputs.append(to_uint8(video).numpy())
        reconstructions.append(to_uint8(reconstruction).numpy())
        tokens.append(ids.flatten())
        colours += [attributes_for(i, seed, "val", image_mode).colour for i in indices]
    inputs, reconstructions = np.concatenate(inputs), np.concatenate(reconstructions)  # (N, T, H, W, 3)
    per_video = score(inputs, reconstructions, colours)
    tokens = torch.cat(tokens)

    result = {
        "checkpoint": str(checkpoint),
        "frames": frames,
        "resolution": list(resolution),
        "videos": num,
        "tokens_per_video": int(tokens.numel() // num),
        "psnr": float(np.mean(psnrs)),
        "colour_kept": float(np.mean(per_video["colour_kept"])),
        "object_iou": float(np.mean(per_video["object_iou"])),
        "codes_used": float(torch.unique(tokens).numel() / model.quantizer.num_codes),
        "num_codes": int(model.quantizer.num_codes),
    }
    out = out or checkpoint.resolve().parent.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"tokenizer_report_{frames}f"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    Image.fromarray(grid(inputs[:16], reconstructions[:16])).save(stem.with_suffix(".png"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="RUN/checkpoints/*.ckpt of a tokenizer training run")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per item: 1 (images), 17, 65, ... (default: the run's data.num_frames)")
    parser.add_argument("--num", type=int, default=64, help="val items to reconstruct (default 64)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN/report)")
    args = parser.parse_args()
    try:
        result = report(args.checkpoint, args.frames, args.num, args.batch_size, args.out)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as error:
        sys.exit(f"error: {error}")
    print(json.dumps(result, indent=2))
    out = args.out or args.checkpoint.resolve().parent.parent / "report"
    print(f"written: {out}/tokenizer_report_{result['frames']}f.json and .png")


if __name__ == "__main__":
    main()
