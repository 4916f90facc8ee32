"""How well a trained LaVie interpolation stage fills in frames, on held-out clips of the embedded synthetic dataset.

    python eval/interpolation_report.py logs/train/tiny_lavie_interpolation/<time>/checkpoints/last.ckpt
    python eval/interpolation_report.py RUN/checkpoints/last.ckpt --num 32 --steps 50

The model is rebuilt from the run's `config.yaml` and its weights read from the checkpoint (the EMA weights when
training kept an EMA). `--num` clips of the test split (never trained or validated on) are rendered at the run's
clip length and size; their key frames (every 4th) go through `interpolate` with the prompt, and every output frame
is compared with the clip's true frame. The same clips are filled in by:

- untrained:   the run's model at its initialisation (same config and seed, no training);
- key copy:    each frame is its conditioning, key frame (j + 1) // 4 (what the UNet is given);
- linear blend: frame 4k + r = (1 - r/4) key k + r/4 key k+1 (the classical baseline; a moving object ghosts).

Scores, on the frames between key frames (`between`) and on the key frames themselves (`keys`; the stage
re-synthesises them too): PSNR in dB on the [0, 1] scale of the squared error over all clips, L1 on the 0-255 scale,
and `object_iou` (mean over clips),
the intersection over union of the object's saturated pixels (`datamodules.synthetic.object_pixels`) with the true
frame's: a misplaced or ghosted object scores low. Writes interpolation_report.json, .md and .png (rows per clip:
truth, trained, linear blend) to `--out` (default: the run's `report/`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.synthetic import SyntheticVideoDataset, object_pixels  # noqa: E402
from datamodules.transforms import to_uint8  # noqa: E402
from datamodules.video_io import write_grid_png  # noqa: E402
from modules.lavie_interpolation import FRAME_RATE_FACTOR, check_interpolated_frames, copied_key_frames  # noqa: E402
from utils.generators import load_training_checkpoint  # noqa: E402


def load_models(checkpoint: Path) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(trained model, the same model at its initialisation, the run's data config) from a train.py run."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config_path = checkpoint.resolve().parent.parent / "config.yaml"
    if not checkpoint.is_file() or not config_path.is_file():
        raise FileNotFoundError(f"need a checkpoint from a train.py run directory (RUN/checkpoints/*.ckpt with "
                                f"RUN/config.yaml): {checkpoint}")
    cfg = OmegaConf.load(config_path)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(cfg.seed)  # train.py seeds before it builds the model: this is the run's initialisation
    untrained = instantiate(model_cfg, _convert_="all")
    trained = instantiate(model_cfg, _convert_="all")
    load_training_checkpoint(trained, checkpoint)
    return trained.eval(), untrained.eval(), OmegaConf.to_container(cfg.data, resolve=True)


def linear_blend(keys: torch.Tensor) -> torch.Tensor:
    """float [B, K, ...] -> [B, 4K - 3, ...]: frame 4k + r = (1 - r/4) key k + r/4 key k+1."""
    frames = []
    for k in range(keys.shape[1] - 1):
        for r in range(FRAME_RATE_FACTOR):
            frames.append((1 - r / FRAME_RATE_FACTOR) * keys[:, k] + r / FRAME_RATE_FACTOR * keys[:, k + 1])
    return torch.stack(frames + [keys[:, -1]], dim=1)


def scores(videos: np.ndarray, truth: np.ndarray, frames: list[int]) -> dict[str, float]:
    """PSNR (dB, of the mean squared error over all clips: a still clip copied exactly would make a per-clip mean
    infinite), L1 (0-255) and object IoU (mean over clips) on `frames` of uint8 videos [B, T, H, W, 3]."""
    a, b = videos[:, frames].astype(np.float64), truth[:, frames].astype(np.float64)
    mse = (((a - b) / 255) ** 2).mean()
    found, true = object_pixels(videos[:, frames]), object_pixels(truth[:, frames])
    iou = (found & true).reshape(len(a), -1).sum(1) / np.maximum((found | true).reshape(len(a), -1).sum(1), 1)
    return {"psnr": float(10 * np.log10(1 / max(mse, 1e-10))), "l1": float(np.abs(a - b).mean()),
            "object_iou": float(iou.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--num", type=int, default=16, help="held-out clips (test split)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's sampler)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's sampler)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    trained, untrained, data = load_models(args.checkpoint)
    frames = int(data["num_frames"])
    check_interpolated_frames(frames)
    dataset = SyntheticVideoDataset(args.num, frames, data["resolution"], seed=data.get("seed", 0), split="test")
    items = [dataset[i] for i in range(args.num)]
    truth = torch.stack([item["video"] for item in items])  # (N, T, C, H, W) in [-1, 1]
    prompts = [item["caption"] for item in items]
    keys = to_uint8(truth[:, ::FRAME_RATE_FACTOR])  # (N, K, H, W, 3)
    overrides = {key: value for key, value in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance))
                 if value is not None}

    results, videos, seconds = {}, {}, {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        start, outputs = time.time(), []
        for i in range(0, args.num, args.batch):
            outputs.append(model.interpolate(prompts[i:i + args.batch], keys[i:i + args.batch],
                                             seed=args.seed + i, **overrides))
        videos[name], seconds[name] = torch.cat(outputs).numpy(), time.time() - start
    key_frames = truth[:, ::FRAME_RATE_FACTOR]
    videos["key copy"] = to_uint8(copied_key_frames(key_frames.transpose(1, 2)).transpose(1, 2)).numpy()
    videos["linear blend"] = to_uint8(linear_blend(key_frames)).numpy()

    true = to_uint8(truth).numpy()
    between = [j for j in range(frames) if j % FRAME_RATE_FACTOR]
    key_positions = list(range(0, frames, FRAME_RATE_FACTOR))
    for name, video in videos.items():
        results[name] = {"between": scores(video, true, between), "keys": scores(video, true, key_positions)}

    out = args.out or args.checkpoint.resolve().parent.parent / "report"
    suffix = "" if args.guidance is None else f"_guidance{args.guidance:g}"
    out.mkdir(parents=True, exist_ok=True)
    settings = trained.sampler_settings(**overrides)
    record = {"checkpoint": str(args.checkpoint), "clips": args.num, "frames": frames, "split": "test",
              "sampler": {k: settings[k] for k in ("method", "num_inference_steps", "guidance_scale")},
              "seconds": seconds, "results": results}
    (out / f"interpolation_report{suffix}.json").write_text(json.dumps(record, indent=2))
    lines = [f"{args.num} held-out clips of {frames} frames, {settings['method']} {settings['num_inference_steps']} "
             f"steps, guidance {settings['guidance_scale']}", "",
             "| method | PSNR between (dB) | L1 between | object IoU between | PSNR keys (dB) | object IoU keys |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        b, k = result["between"], result["keys"]
        lines.append(f"| {name} | {b['psnr']:.2f} | {b['l1']:.2f} | {b['object_iou']:.3f} | {k['psnr']:.2f} | "
                     f"{k['object_iou']:.3f} |")
    (out / f"interpolation_report{suffix}.md").write_text("\n".join(lines) + "\n")
    shown = range(min(4, args.num))
    rows = [clip for i in shown for clip in (true[i], videos["trained"][i], videos["linear blend"][i])]
    write_grid_png(out / f"interpolation_report{suffix}.png", rows, max_frames=frames)
    print("\n".join(lines))
    print(f"wrote interpolation_report{suffix}.json, .md and .png to {out}")


if __name__ == "__main__":
    main()
