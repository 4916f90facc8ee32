"""Loong tokenizer throughput and memory: encode and decode frames per second, peak memory for 17 vs 65 frames.

The tokenizer is `experiment=tiny_loong_tokenizer`'s (random weights; speed does not depend on the values), on
clips of 17 and 65 frames at the tiny resolution (32x32 -> 4x4 tokens per latent frame). Operations:

* `encode`  : `LoongTokenizer.encode` (video -> token ids), the exact frame-by-frame path the language model uses;
* `decode`  : `LoongTokenizer.decode` (token ids -> video), also frame by frame;
* `encode_fast` / `decode_fast`: one convolution per clip (the training path: encoder + quantiser, decoder);
* `train_step`: forward + backward of the generator losses (L1 + codebook), what one training step costs.

Time: median of `--repeats` calls after one warm-up call; throughput = frames in the batch / time. Memory: each
measurement runs in a fresh process; on CPU the call's peak resident set minus the resident set before it (VmHWM
reset through /proc/self/clear_refs), on CUDA `max_memory_allocated` minus what was allocated before. Inputs and
weights are not counted.

Usage: python benchmarks/tokenizer.py [--device cpu|cuda] [--batch 2] [--repeats 3] [--frames 17 65]
Results: benchmarks/results/tokenizer_<device>.json and .md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_probe import current_rss, reset_peak_rss, vm_hwm  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
OPERATIONS = ("encode", "decode", "encode_fast", "decode_fast", "train_step")


def build_tokenizer(device: str):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=tiny_loong_tokenizer", "paths.root_dir=."])
    torch.manual_seed(0)
    return instantiate(cfg.model, _convert_="all").to(device), cfg


def operation(model, name: str, video: torch.Tensor, tokens: torch.Tensor):
    if name == "encode":
        return lambda: model.encode(video)
    if name == "decode":
        return lambda: model.decode(tokens)
    if name == "encode_fast":
        return lambda: model.quantizer(model.encoder(video.transpose(1, 2))).indices
    if name == "decode_fast":
        return lambda: model.decoder(model.quantizer.codes(tokens))
    if name == "train_step":
        def step():
            model.zero_grad(set_to_none=True)
            losses = model.generator_losses(video)
            losses["loss"].backward()
        return step
    raise ValueError(name)


def measure_one(name: str, frames: int, batch: int, device: str, repeats: int) -> dict:
    """One operation in this process: time and peak memory."""
    model, cfg = build_tokenizer(device)
    height, width = cfg.data.resolution
    training = name == "train_step"
    model.train(training)
    if training:
        model.discriminator = None  # the generator's step only; the discriminator's is a separate, smaller network
    video = torch.rand(batch, frames, 3, height, width, device=device) * 2 - 1
    with torch.no_grad():
        tokens = model.encode(video)
    fn = operation(model, name, video, tokens)
    grad = torch.enable_grad() if training else torch.no_grad()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with grad:
        # memory of the first call (cold: what a fresh process needs), then the timing
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            sync()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            reset_peak_rss()
            base = current_rss()
            fn()
            peak = vm_hwm() - base
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"operation": name, "frames": frames, "batch": batch, "resolution": [height, width],
            "tokens": list(tokens.shape[1:]), "seconds": seconds, "frames_per_second": batch * frames / seconds,
            "peak_memory_mib": peak / 2**20}


def run_isolated(name: str, frames: int, args) -> dict:
    command = [sys.executable, __file__, "--one", name, "--frames", str(frames), "--batch", str(args.batch),
               "--device", args.device, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{name} at {frames} frames failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Loong tokenizer (tiny) throughput and memory",
        "",
        f"{meta['date']}, device {meta['device']} ({meta['processor']}), {meta['threads']} threads, torch {meta['torch']}, "
        f"batch {meta['batch']}, median of {meta['repeats']}, load average at start {meta['load_average']}. "
        "Produced by `python benchmarks/tokenizer.py` (see its docstring for what each operation is).",
        "",
        "| operation | frames | tokens (T', H', W') | time per batch (s) | frames/s | peak memory (MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['operation']} | {r['frames']} | {tuple(r['tokens'])} | {r['seconds']:.3f} | "
                     f"{r['frames_per_second']:.1f} | {r['peak_memory_mib']:.1f} |")
    by = {(r["operation"], r["frames"]): r for r in rows}
    if all((op, f) in by for op in ("encode", "train_step") for f in (17, 65)):
        lines += ["", "Peak memory 65 vs 17 frames: "
                  + ", ".join(f"{op} x{by[(op, 65)]['peak_memory_mib'] / max(by[(op, 17)]['peak_memory_mib'], 1e-9):.2f}"
                              for op in OPERATIONS if (op, 17) in by and (op, 65) in by) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 65])
    parser.add_argument("--operations", nargs="+", default=list(OPERATIONS), choices=OPERATIONS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", choices=OPERATIONS, help=argparse.SUPPRESS)  # child process: one measurement
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure_one(args.one, args.frames[0], args.batch, args.device, args.repeats)))
        return

    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": args.device,
            "processor": platform.processor() or platform.machine(), "threads": args.threads,
            "torch": torch.__version__, "batch": args.batch, "repeats": args.repeats,
            "load_average": round(os.getloadavg()[0], 2)}
    rows = []
    for frames in args.frames:
        for name in args.operations:
            row = run_isolated(name, frames, args)
            print(f"{name:12s} {frames:3d} frames: {row['seconds']:.3f} s, {row['frames_per_second']:.1f} frames/s, "
                  f"{row['peak_memory_mib']:.1f} MiB", flush=True)
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"tokenizer_{args.device.split(':')[0]}"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(rows, meta))
    print(f"results: {args.out / (stem + '.md')}")


if __name__ == "__main__":
    main()
