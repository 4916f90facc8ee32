"""How well a trained LaVie super-resolution stage upsamples, against bicubic, on held-out synthetic clips.

    python eval/vsr_report.py logs/train/tiny_lavie_vsr/<time>/checkpoints/last.ckpt
    python eval/vsr_report.py RUN/checkpoints/last.ckpt --num 16 --steps 50 --noise-level 20
    python eval/vsr_report.py RUN/checkpoints/last.ckpt --num 32 --method posterior_mean

The model is rebuilt from the run's `config.yaml` and its weights read from the checkpoint. `--num` clips of the
synthetic test split (never trained or validated on) are rendered at the run's clip length and size; each is
area-downsampled by the model's scale and rounded to uint8 (a low-res video as a generator writes it), then
upsampled by `upsample` (with its caption) and by bicubic interpolation of the same uint8 frames. Scores against the
true clip: PSNR in dB on the [0, 1] scale of the squared error over all clips, and per clip (mean). Writes
vsr_report.json and .md to `--out` (default: the run's `report/`) and a png (rows per clip: truth, bicubic, model).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.synthetic import SyntheticVideoDataset  # noqa: E402
from datamodules.transforms import to_model_range, to_uint8  # noqa: E402
from datamodules.video_io import write_grid_png  # noqa: E402
from modules.lavie_vsr import bicubic_upsample, downsample  # noqa: E402
from utils.super_resolution import build_super_resolution  # noqa: E402


def psnr(mse: float) -> float:
    return float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))


def squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-clip mean squared error of uint8 videos on the [0, 1] scale."""
    return ((a.float() - b.float()) / 255).pow(2).flatten(1).mean(1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--num", type=int, default=8, help="held-out clips")
    parser.add_argument("--method", default=None,
                        help="sampler method: ddim, ddpm or posterior_mean (default: the model's sampler)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's sampler)")
    parser.add_argument("--noise-level", type=int, default=None, help="low-res noise level (default: the sampler's)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    run = args.checkpoint.resolve().parents[1]
    model = build_super_resolution(str(args.checkpoint), device="cpu", precision="fp32")
    data = json.loads(json.dumps(_run_data(run)))
    clips = SyntheticVideoDataset(args.num, data["num_frames"], tuple(data["resolution"]), seed=0, split="test")
    overrides = {k: v for k, v in {"method": args.method, "num_inference_steps": args.steps,
                                        "noise_level": args.noise_level}.items()
                 if v is not None}

    truth, low, captions = [], [], []
    for i in range(args.num):
        item = clips[i]
        truth.append(to_uint8(item["video"]))  # (T, H, W, 3)
        low.append(to_uint8(downsample(item["video"], model.scale)))
        captions.append(item["caption"])
    truth, low = torch.stack(truth), torch.stack(low)

    start = time.time()
    upsampled = torch.cat([
        model.upsample(low[i:i + args.batch], captions[i:i + args.batch], seed=args.seed + i, **overrides)
        for i in range(0, args.num, args.batch)
    ])
    seconds = time.time() - start
    bicubic = to_uint8(bicubic_upsample(to_model_range(low), model.scale))

    scores = {}
    for name, video in (("model", upsampled), ("bicubic", bicubic)):
        errors = squared_error(video, truth)
        scores[name] = {"psnr_db": psnr(errors.mean().item()),
                        "psnr_db_mean_per_clip": sum(psnr(e) for e in errors.tolist()) / len(errors),
                        "clips_better_than_bicubic": None}
    per_clip = squared_error(upsampled, truth) < squared_error(bicubic, truth)
    scores["model"]["clips_better_than_bicubic"] = f"{int(per_clip.sum())}/{args.num}"
    report = {
        "checkpoint": str(args.checkpoint), "clips": args.num, "split": "test",
        "clip": {"frames": data["num_frames"], "resolution": data["resolution"], "scale": model.scale},
        "sampler": model.sampler_settings(**overrides), "seconds_upsampling": round(seconds, 1), "scores": scores,
    }
    out = args.out or run / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vsr_report.json").write_text(json.dumps(report, indent=2))
    lines = ["| method | PSNR (dB, all clips) | mean per-clip PSNR (dB) |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['psnr_db']:.2f} | {v['psnr_db_mean_per_clip']:.2f} |" for k, v in scores.items()]
    (out / "vsr_report.md").write_text("\n".join(lines) + "\n")
    rows = min(args.num, 4)
    grid = torch.stack([v for i in range(rows) for v in (truth[i], bicubic[i], upsampled[i])])
    write_grid_png(out / "vsr_report.png", grid)
    print("\n".join(lines))
    print(f"clips where the model beats bicubic: {scores['model']['clips_better_than_bicubic']}; "
          f"upsampling took {seconds:.0f} s; wrote {out}")
    return report


def _run_data(run: Path) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    return {"num_frames": int(cfg.data.num_frames), "resolution": list(cfg.data.resolution)}


if __name__ == "__main__":
    main()
