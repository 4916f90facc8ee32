"""What a LoRA changes in a tiny LaVie's samples: the same prompts and seeds with and without it, read back by the
synthetic dataset's geometry (eval/synthetic_geometry.py: drawn colour, shape, motion).

    python scripts/lora_report.py logs/tiny_lavie_lora/RUN/lora.safetensors [--base BASE.ckpt] [--seeds 4]

Subject prompts name the subject's word ("a zorp moving left on a light background": new motions and backgrounds
the LoRA's images never showed); control prompts are captions of the base's own data, to see what else the LoRA
changes. Prints one line per prompt (colour / shape / motion read in each seed's video, base -> LoRA) and the
totals, and writes report.json and the videos (base_*.mp4, lora_*.mp4) to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from datamodules.video_io import write_grid_png, write_video  # noqa: E402
from eval.synthetic_geometry import read_video  # noqa: E402

SUBJECT_PROMPTS = [
    "a zorp on a dark background",               # the training caption
    "a zorp moving left on a dark background",
    "a zorp moving up on a light background",
    "a zorp growing on a gray background",
]
CONTROL_PROMPTS = [
    "a red circle moving left on a dark background",
    "a green square moving up on a light background",
    "a blue triangle growing on a gray background",
    "a yellow cross moving right on a dark background",
]


def build(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("sample", overrides=[*overrides, f"paths.root_dir={REPO}", "paths.output_dir=."])
    return instantiate(cfg.model, _convert_="all").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lora", type=Path, help="a LoRA file (RUN/lora.safetensors) or a LoRA run's checkpoint")
    parser.add_argument("--base", type=Path, default=None, help="base checkpoint (default: the model config's)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--out", type=Path, default=None, help="default: beside the LoRA file, lora_report/")
    args = parser.parse_args()
    out = args.out or args.lora.parent / "lora_report"
    out.mkdir(parents=True, exist_ok=True)
    base_option = [f"model.base_checkpoint={args.base}"] if args.base else []
    # the base model, and the same base with the LoRA: LaVieLoRA with an untrained (B = 0) adapter is the base exactly
    models = {"base": build(["model=lavie_lora_tiny", *base_option]),
              "lora": build(["model=lavie_lora_tiny", *base_option, f"model.lora.path={args.lora}"])}
    rows, totals = [], Counter()
    grid = []
    for kind, prompts in (("subject", SUBJECT_PROMPTS), ("control", CONTROL_PROMPTS)):
        for p, prompt in enumerate(prompts):
            row = {"prompt": prompt, "kind": kind}
            for name, model in models.items():
                with torch.no_grad():
                    videos = model.generate([prompt] * args.seeds, seed=100 * p, num_inference_steps=args.steps)
                readings = [read_video(v.numpy()) for v in videos]
                row[name] = [r._asdict() for r in readings]
                for s, video in enumerate(videos):
                    write_video(out / f"{name}_{kind}{p}_seed{s}.mp4", video, fps=8)
                grid.append(videos[0])
                for r in readings:
                    if kind == "subject":
                        totals[f"{name} subject: purple"] += r.colour == "purple"
                        totals[f"{name} subject: star"] += r.shape == "star"
                        totals[f"{name} subject: purple star"] += r.colour == "purple" and r.shape == "star"
                    else:
                        words = prompt.split()
                        totals[f"{name} control: colour as asked"] += r.colour == words[1]
                        totals[f"{name} control: purple"] += r.colour == "purple"
            rows.append(row)
            cells = lambda name: " ".join(f"{r['colour']}/{r['shape']}/{r['motion']}" for r in row[name])  # noqa: E731
            print(f"{prompt!r}\n  base: {cells('base')}\n  lora: {cells('lora')}")
    per_kind = args.seeds * len(SUBJECT_PROMPTS)
    print(f"\nout of {per_kind} videos per kind ({args.seeds} seeds x {len(SUBJECT_PROMPTS)} prompts):")
    for key in sorted(totals):
        print(f"  {key}: {totals[key]}/{per_kind}")
    write_grid_png(out / "grid.png", torch.stack(grid))
    (out / "report.json").write_text(json.dumps({"lora": str(args.lora), "seeds": args.seeds, "steps": args.steps,
                                                 "totals": dict(totals), "videos": rows}, indent=2))
    print(f"videos, grid.png (first seed; per prompt: base, LoRA) and report.json in {out}")


if __name__ == "__main__":
    main()
