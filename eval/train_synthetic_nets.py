"""Train the feature networks of `eval=synthetic` (a small I3D for FVD, a small C3D for IS) on the embedded dataset.

    python eval/train_synthetic_nets.py                       # both nets, protocol defaults, into data/synthetic_nets
    python eval/train_synthetic_nets.py --kind i3d --steps 600 --out-dir /tmp/nets

Each net is written as {out-dir}/{kind}.safetensors with a {kind}.json sidecar (settings, classes, train/val
accuracy per attribute); `eval.synthetic_nets.load_feature_net(path)` loads it. The eval runner itself calls
`ensure_feature_net`, which trains on first use and caches by settings, so running this script is optional.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from eval.synthetic_nets import DEFAULT_DIR, KINDS, train_feature_net  # noqa: E402


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=(*KINDS, "both"), default="both")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32, help="the protocol's (square) frame size")
    parser.add_argument("--steps", type=int, default=None, help="default: the kind's DEFAULT_SETTINGS")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=float, default=None)
    parser.add_argument("--net-resolution", type=int, default=None, help="the size the backbone sees")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--val-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for these small nets on a busy machine; 0 = torch's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    overrides = {k: getattr(args, k) for k in ("width", "net_resolution", "lr", "val_size")
                 if getattr(args, k) is not None}
    paths = []
    for kind in KINDS if args.kind == "both" else (args.kind,):
        path = train_feature_net(kind, args.num_frames, args.resolution, args.steps, args.batch_size, args.seed,
                                 out=args.out_dir / f"{kind}.safetensors", progress=not args.no_progress,
                                 device=args.device, **overrides)
        meta = json.loads(path.with_suffix(".json").read_text())
        print(f"{kind}: {path}  {meta['train_seconds']} s  val accuracy {meta['accuracy'].get('val')}")
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
