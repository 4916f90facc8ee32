"""Frame strip of a long video from sample.py, one row per clip, with what each clip shows.

Reads an mp4 (e.g. `python sample.py experiment=tiny_vidrd ... num_frames=64`), writes a PNG whose row k holds the
frames of clip k (`--clip` frames each: VidRD keeps every clip's N frames), and prints, per clip, the colour, shape
and motion the synthetic dataset's geometry reads back (eval/synthetic_geometry.py) and the mean absolute pixel
change (0-255) across the clip boundary against that inside the clips.

    python scripts/vidrd_frame_strip.py RUN/000_..._seed0.mp4 docs/vidrd/tiny_vidrd_64_frames.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.video_io import read_video, write_grid_png  # noqa: E402
from eval.synthetic_geometry import read_video as read_geometry  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", type=Path)
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--clip", type=int, default=8, help="frames per clip (a row)")
    args = parser.parse_args()
    frames = np.asarray(read_video(args.video))
    clips = [frames[i:i + args.clip] for i in range(0, len(frames), args.clip)]
    write_grid_png(args.out, clips, max_frames=args.clip)
    steps = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # change frame t -> t+1
    boundary = [args.clip * k - 1 for k in range(1, len(clips)) if args.clip * k < len(frames)]
    report = {"frames": len(frames), "clips": [read_geometry(c)._asdict() for c in clips],
              "jump_across_clips": float(steps[boundary].mean()) if boundary else None,
              "step_inside_clips": float(np.delete(steps, boundary).mean())}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
