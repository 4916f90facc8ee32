"""Does a tiny LaVie long-video run keep colour and shape across the clip boundaries?

Generates `--frames` frames (default 22: three 8-frame clips, 8 + 7 + 7) for make demo's eight prompts and two seeds
with a train.py checkpoint of experiment=tiny_lavie_long, and with the same model before fine-tuning (`--base`: the
base run's checkpoint loaded through `init_from`, conditioning inputs at zero, so each clip is an independent
text-to-video clip: the control). For each video it reads every clip's colour and shape back with the synthetic
dataset's geometry (eval/synthetic_geometry.py) and prints:

* `colour kept` / `shape kept`: later clips whose colour (shape) reads the same as clip 1's;
* `colour asked`: clips whose colour is the prompt's;
* `jump`: mean absolute pixel change (0-255) from the last frame of a clip to the first new frame of the next,
  against `step`: the mean change between consecutive frames inside the clips (a continuation that keeps the
  scene has jump ~ step; independent clips jump far more).

It writes the numbers to `<out>/long_video_check.json` and a frame strip (first rows: fine-tuned; then the control)
to `<out>/long_video_strip.png`.

    python scripts/lavie_long_check.py RUN/checkpoints/last.ckpt --base logs/demo/train/checkpoints/last.ckpt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.video_io import write_grid_png  # noqa: E402
from eval.synthetic_geometry import read_video as read_back  # noqa: E402
from eval.synthetic_nets import prompt_attributes  # noqa: E402
from scripts.demo import PROMPTS  # noqa: E402
from utils.generators import load_training_checkpoint  # noqa: E402


def build(checkpoint: Path | None, base: Path | None, steps: int):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["model=lavie_long_tiny", f"model.sampler.num_inference_steps={steps}"])
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    if checkpoint is not None:
        load_training_checkpoint(model, checkpoint)
    else:
        model.init_from_base(base)
    return model.eval()


def clip_ranges(frames: int, clip: int) -> list[range]:
    ranges, start = [range(0, min(clip, frames))], min(clip, frames)
    while start < frames:
        ranges.append(range(start, min(start + clip - 1, frames)))
        start += clip - 1
    return ranges


def measure(model, seeds: list[int], frames: int) -> tuple[dict, torch.Tensor]:
    videos = torch.cat([model.generate(PROMPTS, num_frames=frames, seed=[s * len(PROMPTS) + i for i in
                                                                         range(len(PROMPTS))]) for s in seeds])
    prompts = PROMPTS * len(seeds)
    clip = model.sampler["clip_frames"]
    ranges = clip_ranges(frames, clip)
    counts = {"colour_kept": 0, "shape_kept": 0, "colour_asked": 0, "later_clips": 0, "clips": 0}
    jumps, steps, rows = [], [], []
    for prompt, video in zip(prompts, videos):
        readings = [read_back(video[list(r)].numpy()) for r in ranges]
        asked = prompt_attributes(prompt)
        counts["clips"] += len(readings)
        counts["colour_asked"] += sum(r.colour == asked.colour for r in readings)
        for r in readings[1:]:
            counts["later_clips"] += 1
            counts["colour_kept"] += r.colour is not None and r.colour == readings[0].colour
            counts["shape_kept"] += r.shape is not None and r.shape == readings[0].shape
        v = video.float()
        diffs = (v[1:] - v[:-1]).abs().mean(dim=(1, 2, 3))  # change from frame i to i + 1
        boundaries = [r.start - 1 for r in ranges[1:]]
        jumps += [diffs[b].item() for b in boundaries]
        steps += [d.item() for i, d in enumerate(diffs) if i not in boundaries]
        rows.append({"prompt": prompt, "clips": [r._asdict() for r in readings]})
    summary = {**counts, "jump": sum(jumps) / max(len(jumps), 1), "step": sum(steps) / max(len(steps), 1),
               "videos": rows}
    return summary, videos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="train.py checkpoint of experiment=tiny_lavie_long")
    parser.add_argument("--base", type=Path, help="the base run's checkpoint: also measure the model before "
                                                  "fine-tuning (independent clips), the control")
    parser.add_argument("--frames", type=int, default=22)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per clip")
    parser.add_argument("--out", type=Path, default=None, help="default: the checkpoint's run folder")
    args = parser.parse_args()
    out = args.out or args.checkpoint.parent.parent
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    results, strips = {}, []
    models = {"fine_tuned": (args.checkpoint, None)}
    if args.base:
        models["before_fine_tuning"] = (None, args.base)
    for name, (checkpoint, base) in models.items():
        summary, videos = measure(build(checkpoint, base, args.steps), seeds, args.frames)
        results[name] = summary
        strips += list(videos[:4])
        print(f"{name}: colour kept {summary['colour_kept']}/{summary['later_clips']} later clips, shape kept "
              f"{summary['shape_kept']}/{summary['later_clips']}, colour asked {summary['colour_asked']}/"
              f"{summary['clips']} clips; jump at a boundary {summary['jump']:.1f} vs step inside a clip "
              f"{summary['step']:.1f} (mean |change| of 0-255 pixels)", flush=True)
    (out / "long_video_check.json").write_text(json.dumps({"frames": args.frames, "seeds": seeds, **results},
                                                          indent=1))
    write_grid_png(out / "long_video_strip.png", torch.stack(strips), max_frames=args.frames)
    print(f"wrote {out / 'long_video_check.json'} and {out / 'long_video_strip.png'}")


if __name__ == "__main__":
    main()
