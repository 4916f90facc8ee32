"""Write a few pictures of one synthetic "subject" to a folder: the images a CPU-sized LoRA is trained on.

    python scripts/make_lora_subject.py data/lora_subject --shape star --colour purple --num 6

The subject is one shape in one colour on one background (datamodules/synthetic.py's renderer), drawn at `--num`
different places, sizes and angles, as PNGs `subject_00.png`, ...; with `--caption` each gets it as a sidecar .txt
(otherwise the experiment's data.caption names it). experiment=tiny_lavie_lora trains on this folder with the caption
"a zorp on a dark background": a word the base model never saw, bound to the subject by the LoRA alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules.synthetic import BACKGROUNDS, COLOURS, SHAPES, Attributes, Layout, render  # noqa: E402


def write_subject(folder: Path, shape: str, colour: str, background: str, num: int, size: int, seed: int = 0,
                  caption: str | None = None) -> list[Path]:
    """`num` PNGs of the subject at random positions (within the frame), sizes and angles."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num):
        layout = Layout(cx=rng.uniform(0.35, 0.65), cy=rng.uniform(0.35, 0.65), radius=0.3 * rng.uniform(0.75, 1.1),
                        angle=rng.uniform(-0.3, 0.3), spin=1.0)
        frame = render(Attributes(shape, colour, "still", background), 1, (size, size), layout)[0]
        path = folder / f"subject_{i:02d}.png"
        Image.fromarray(frame).save(path)
        if caption:
            path.with_suffix(".txt").write_text(caption + "\n")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shape", choices=SHAPES, default="star")
    parser.add_argument("--colour", choices=COLOURS, default="purple")
    parser.add_argument("--background", choices=BACKGROUNDS, default="dark")
    parser.add_argument("--num", type=int, default=6)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--caption", default=None, help="also write it beside each image as <image>.txt")
    args = parser.parse_args()
    paths = write_subject(args.folder, args.shape, args.colour, args.background, args.num, args.size, args.seed,
                          args.caption)
    print(f"wrote {len(paths)} images of a {args.colour} {args.shape} on a {args.background} background to {args.folder}")


if __name__ == "__main__":
    main()
