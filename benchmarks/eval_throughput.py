"""Evaluation throughput: videos per second through the three feature networks, and the Fréchet distance's time.

* I3D (FVD): official Inception-I3D (width 1, 400 classes), 16 frames, uint8 videos at 224x224 (no resize), the
  `FrechetVideoDistance.embed` path (`i3d_input` + time-averaged logits);
* C3D (IS): TGAN2's C3D (78M parameters), 16 frames at 112x112 after TGAN2's preprocessing from 128x171 uint8
  videos, the `VideoInceptionScore.update` path;
* CLIP (CLIPSIM): open_clip ViT-B/32, 16 frames per video at 224x224, per-frame image embeddings + one text
  embedding per video, the `CLIPSIM.video_scores` path;
* Fréchet distance: `frechet_distance` on 400-d statistics (float64 eigendecompositions), and the whole
  `FrechetDistance.compute` from raw moments of 10,000 + 10,000 features.

All networks have random weights (the official ones cannot be downloaded here; speed does not depend on the values).
Each timing is the median of `--repeats` batched calls after one warm-up call.

Usage: python benchmarks/eval_throughput.py [--device cpu|cuda] [--batch 8] [--repeats 3]
Results: benchmarks/results/eval_throughput_<device>.json and .md
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eval.metrics.c3d import C3D  # noqa: E402
from eval.metrics.clipsim import CLIPSIM  # noqa: E402
from eval.metrics.frechet import FrechetDistance, FrechetVideoDistance, frechet_distance  # noqa: E402
from eval.metrics.i3d import InceptionI3d  # noqa: E402
from eval.metrics.inception_score import VideoInceptionScore  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def timed(fn, repeats: int, device: torch.device) -> float:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def videos(batch: int, frames: int, height: int, width: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, frames, height, width, 3), dtype=torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="videos per call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []

    fvd = FrechetVideoDistance(InceptionI3d().to(device), batch_size=args.batch)
    batch = videos(args.batch, 16, 224, 224).to(device)
    rows.append(("I3D (FVD embedding)", "16x224x224", timed(lambda: fvd.embed(batch), args.repeats, device)))
    del fvd

    c3d = C3D().to(device).eval()
    inception = VideoInceptionScore(c3d, torch.zeros(3, 16, 112, 112, device=device), chunk_size=args.batch)
    batch = videos(args.batch, 16, 128, 171).to(device)
    rows.append(("C3D (IS probabilities)", "16x128x171 -> 112x112",
                 timed(lambda: inception.update(batch), args.repeats, device)))
    del inception, c3d

    import open_clip

    clip = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).to(device).eval()
    clipsim = CLIPSIM(clip, chunk_size=args.batch * 16)
    batch = videos(args.batch, 16, 224, 224)
    prompts = ["a person playing the guitar"] * args.batch
    rows.append(("CLIP ViT-B/32 (CLIPSIM)", "16x224x224",
                 timed(lambda: clipsim.video_scores(batch, prompts), args.repeats, device)))
    del clipsim, clip

    features = torch.randn(10_000, 400, dtype=torch.float64)
    mu, sigma = features.mean(0), torch.cov(features.T)
    mu2, sigma2 = mu + 0.1, sigma * 1.1
    distance_s = timed(lambda: frechet_distance(mu, sigma, mu2, sigma2), max(args.repeats, 5), torch.device("cpu"))
    metric = FrechetDistance(400)
    metric.update(features, real=True)
    metric.update(features * 1.1 + 0.1, real=False)

    def compute() -> None:
        metric._computed = None  # torchmetrics caches compute(); time the computation itself
        metric.compute()

    compute_s = timed(compute, max(args.repeats, 5), torch.device("cpu"))

    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
        "repeats": args.repeats, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "networks": [{"network": name, "input": shape, "seconds_per_batch": round(s, 4),
                      "videos_per_second": round(args.batch / s, 3)} for name, shape, s in rows],
        "frechet_distance_400d_ms": round(distance_s * 1000, 2),
        "frechet_compute_from_moments_400d_ms": round(compute_s * 1000, 2),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"eval_throughput_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Evaluation throughput ({result['device_name'] or device}, torch {torch.__version__}, "
             f"{result['threads']} threads, batch {args.batch})", "",
             "| network | input | s / batch | videos / s |", "|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['input']} | {r['seconds_per_batch']} | {r['videos_per_second']} |"
              for r in result["networks"]]
    lines += ["", f"Fréchet distance, 400-d statistics: {result['frechet_distance_400d_ms']} ms; "
              f"FrechetDistance.compute from raw moments: {result['frechet_compute_from_moments_400d_ms']} ms", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
