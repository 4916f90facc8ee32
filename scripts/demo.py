"""`make demo`: train the CPU-sized LaVie on the synthetic dataset, sample one video per colour, check the colours.

It runs the README's own commands (train.py, then sample.py on the checkpoint it wrote), so the demo proves
what a researcher would type. The colour check asks, for each sampled video, which of the dataset's colours its
saturated pixels are closest to, and compares that with the colour the prompt named.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.synthetic import RGB, drawn_colour  # noqa: E402
from datamodules.video_io import read_video  # noqa: E402

PROMPTS = [
    "a red circle moving left on a dark background",
    "a green square moving up on a light background",
    "a blue triangle growing on a gray background",
    "a yellow star moving right on a dark background",
    "a purple cross rotating on a light background",
    "a cyan circle moving down on a gray background",
]
def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], cwd=REPO, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="logs/demo", help="folder for the training run and the samples")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the tiny_lavie recipe's)")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    train_dir, sample_dir = out / "train", out / "samples"

    steps = [f"trainer.max_steps={args.steps}"] if args.steps else []
    run("train.py", "experiment=tiny_lavie", *steps, f"hydra.run.dir={train_dir}")
    prompt_list = "[" + ",".join(PROMPTS) + "]"
    run("sample.py", "experiment=tiny_lavie", f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}",
        f"prompts={prompt_list}", "num_seeds=2", f"hydra.run.dir={sample_dir}")

    record = json.loads((sample_dir / "samples.json").read_text())
    matches = 0
    print("\ncolour asked -> colour drawn")
    for video in record["videos"]:
        asked = next(name for name in RGB if f" {name} " in f" {video['prompt']} ")
        drawn = drawn_colour(read_video(sample_dir / video["file"]).numpy())
        matches += drawn == asked
        print(f"  {asked:>7} -> {drawn or 'none':<7} {video['file']}")
    print(f"colour match: {matches}/{len(record['videos'])}")
    print(f"\ntraining run:  {train_dir} (checkpoints/last.ckpt, csv/, tensorboard/, samples/)")
    print(f"videos:        {sample_dir} (*.mp4)")
    print(f"frame grid:    {sample_dir / 'grid.png'}")


if __name__ == "__main__":
    main()
