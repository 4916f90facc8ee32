"""Score a `model=vidrd_vae` checkpoint on held-out synthetic clips: reconstruction PSNR and frame-difference error
(|frame-to-frame change of the reconstruction - that of the real clip|, a flicker measure) of the temporal decoder
(Temp-Convs over the clip's frames) against frame-by-frame decoding (the official pipeline; the 2D decoder).

    python scripts/vidrd_vae_report.py logs/train/tiny_vidrd_vae/temporal/checkpoints/last.ckpt [--clips 64]

The model and the clips (validation split, frames, resolution, seed) come from the run's config.yaml beside
`checkpoints/`. Writes `vidrd_vae_report.json` into the run folder and prints it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.synthetic import SyntheticVideoDataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--clips", type=int, default=64, help="held-out clips (validation split)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    run = args.checkpoint.resolve().parents[1]
    cfg = OmegaConf.load(run / "config.yaml")
    model_cfg = cfg.model
    model_cfg.init_from, model_cfg.pretrained = None, {"required": False}
    model = instantiate(model_cfg, _convert_="all").eval()
    model.autoencoder.load_checkpoint(args.checkpoint)
    frames = max(int(cfg.data.num_frames), 8)  # a 2D stage is measured on clips too
    clips = SyntheticVideoDataset(args.clips, frames, tuple(cfg.data.resolution), seed=int(cfg.data.seed), split="val")
    totals: dict[str, float] = {}
    for start in range(0, args.clips, args.batch):
        video = torch.stack([clips[i]["video"] for i in range(start, min(start + args.batch, args.clips))])
        for key, value in model.measure(video).items():
            totals[key] = totals.get(key, 0.0) + float(value) * len(video)
    report = {key: round(value / args.clips, 4) for key, value in totals.items()}
    report.update(checkpoint=str(args.checkpoint), clips=args.clips, frames=frames,
                  resolution=list(cfg.data.resolution))
    (run / "vidrd_vae_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
