"""`make demo`: train the CPU-sized LaVie on the synthetic dataset, sample videos, check what they show.

It runs the README's own commands (train.py, then sample.py on the checkpoint it wrote), so the demo proves
what a researcher would type. The check reads each sampled video back with the dataset's own geometry
(`eval.synthetic_geometry`: the colour of its saturated pixels, the dataset shape whose outline fits them best,
and the motion of their centroid, area and outline) and compares that with what the prompt asked for.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.video_io import read_video  # noqa: E402
from eval.synthetic_geometry import Reading  # noqa: E402
from eval.synthetic_geometry import read_video as read_back  # noqa: E402
from eval.synthetic_nets import prompt_attributes  # noqa: E402

# One prompt per motion; together they name every shape, colour and background.
PROMPTS = [
    "a red circle moving left on a dark background",
    "a green square moving up on a light background",
    "a blue triangle growing on a gray background",
    "a yellow star moving right on a checkered background",
    "a purple cross rotating on a light background",
    "a cyan circle moving down on a gray background",
    "a red star shrinking on a dark background",
    "a green triangle standing still on a checkered background",
]
ATTRIBUTES = ("colour", "shape", "motion")

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
    report(record["videos"], sample_dir)
    print(f"\ntraining run:  {train_dir} (checkpoints/last.ckpt, csv/, tensorboard/, samples/)")
    print(f"videos:        {sample_dir} (*.mp4)")
    print(f"frame grid:    {sample_dir / 'grid.png'}")


def describe(colour: str | None, shape: str | None, motion: str | None) -> str:
    return " ".join(value or "-" for value in (colour, shape, motion))


def report(videos: list[dict], sample_dir: Path) -> dict[str, int]:
    """Print, per video, what its prompt asked and what it shows, then the matches per attribute; the same goes to
    sample_dir/check.json."""
    matches, rows = dict.fromkeys(ATTRIBUTES, 0), []
    print("\nasked (colour shape motion) -> drawn, read back by the dataset's geometry")
    for video in videos:
        asked = prompt_attributes(video["prompt"])
        drawn: Reading = read_back(read_video(sample_dir / video["file"]).numpy())
        for attribute in ATTRIBUTES:
            matches[attribute] += getattr(drawn, attribute) == getattr(asked, attribute)
        rows.append({"file": video["file"], "asked": asked._asdict(), "drawn": drawn._asdict()})
        print(f"  {describe(asked.colour, asked.shape, asked.motion):<30} -> "
              f"{describe(drawn.colour, drawn.shape, drawn.motion):<30} {video['file']}")
    total = len(videos)
    print("matches: " + ", ".join(f"{attribute} {matches[attribute]}/{total}" for attribute in ATTRIBUTES))
    (sample_dir / "check.json").write_text(json.dumps({"matches": matches, "videos": total, "rows": rows}, indent=1))
    return matches


if __name__ == "__main__":
    main()
