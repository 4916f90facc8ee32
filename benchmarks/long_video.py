"""Long videos clip by clip: peak memory and time of a generator's `generate(num_frames=F)` for 8 clips against 2
(issue 13: LaVie's recursive method; issue 14 adds VidRD's).

Each backbone is a CPU-sized model with random weights (the cost does not depend on the values), float32, one
prompt, guidance on (a doubled batch), a fixed number of denoising steps per clip (`--steps`). F is the number of
frames that takes exactly N clips for that backbone (`BACKBONES[name].frames(N)`). Each clip count is measured in a
fresh process, after the model is built and one warm-up clip is generated: on CPU the peak resident set during the
call (VmHWM, reset through /proc/self/clear_refs just before it) minus the resident set at that moment; on CUDA
max_memory_allocated minus memory_allocated before. It counts every transient buffer of the denoising, the clips
kept as uint8 video, and allocator overhead.

On CPU the children run with glibc's mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_=65536`): every tensor
buffer above it is its own mapping, returned to the system when freed, so the resident set follows the live tensors.
With glibc's default (a threshold that grows after frees, so freed buffers stay in a fragmenting heap) the peak of
this tiny model (~26 MiB of activations) moves by +-10 MiB from run to run whatever the clip count; that figure is
kept too (`memory_ratio_8_2_default_malloc`), and says how noisy it is.

* `<backbone>_memory_ratio_8_2`: peak growth for 8 clips / for 2 clips. Goal <= 1.1: memory flat in the number of
  clips (only one clip in the UNet at a time; the returned uint8 video itself grows, but is small next to the UNet's
  activations at these sizes).
* `<backbone>_time_ratio_8_2`: wall time for 8 clips / for 2 clips; 4.0 is linear in the clips (the number of UNet
  calls is exactly 4x).

Backbones: `lavie` (configs/model/lavie_long_tiny.yaml: `LaVieLong`, 8-frame clips at 32x32, each next clip
conditioned on the last frame before, 7 new frames per clip) and `vidrd` (configs/model/vidrd_tiny.yaml: `VidRD`,
8-frame clips at 32x32 through 16x16 space-to-depth latents, the iterative sampler with M=4, every clip's 8 frames
kept, so F = 8 x clips; each clip decoded and dropped before the next). Another backbone adds a `Backbone` entry to
`BACKBONES`; `--model NAME` measures one and rewrites only its entries of the results file, keeping the others'.

Usage: python benchmarks/long_video.py [--model lavie] [--steps 10] [--threads 1] [--device cpu|cuda]
Results: benchmarks/results/long_video_<device>.json and .md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_probe import current_rss, reset_peak_rss, vm_hwm  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MIB = 2**20
CLIPS = (2, 8)
MEMORY_GOAL = 1.1
PROMPT = "a red circle moving left on a dark background"


def compose_model(name: str, *overrides: str):
    """configs/model/<name>.yaml as train.py composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"model={name}", *overrides]).model


@dataclass(frozen=True)
class Backbone:
    description: str
    build: Callable[[int], torch.nn.Module]  # steps per clip -> a VideoGenerator in eval mode
    frames: Callable[[int], int]  # number of clips -> the frame count that takes exactly that many clips


def build_lavie(steps: int) -> torch.nn.Module:
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return instantiate(compose_model("lavie_long_tiny", f"model.sampler.num_inference_steps={steps}")).eval()


def build_vidrd(steps: int) -> torch.nn.Module:
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return instantiate(compose_model("vidrd_tiny", f"model.sampler.num_inference_steps={steps}")).eval()


LAVIE_CLIP = 8
VIDRD_CLIP = 8
BACKBONES: dict[str, Backbone] = {
    "lavie": Backbone(
        description=f"LaVieLong, configs/model/lavie_long_tiny.yaml ({LAVIE_CLIP}-frame clips at 32x32, pixel "
                    f"space; a clip after the first adds {LAVIE_CLIP - 1} frames)",
        build=build_lavie,
        frames=lambda clips: LAVIE_CLIP + (clips - 1) * (LAVIE_CLIP - 1),
    ),
    "vidrd": Backbone(
        description=f"VidRD, configs/model/vidrd_tiny.yaml ({VIDRD_CLIP}-frame clips at 32x32 through 16x16 "
                    "space-to-depth latents; iterative sampler M=4, alpha=4, beta=0.4; every clip's frames kept)",
        build=build_vidrd,
        frames=lambda clips: VIDRD_CLIP * clips,
    ),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def one_run(name: str, clips: int, steps: int, device: str) -> dict:
    """In this (fresh) process: build, warm up with one clip, then measure generate() over `clips` clips."""
    backbone = BACKBONES[name]
    model = backbone.build(steps).to(device)
    frames = backbone.frames(clips)
    model.generate([PROMPT], num_frames=backbone.frames(1), seed=0)  # warm-up: thread pools, kernel caches
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        base = current_rss()
    start = time.perf_counter()
    video = model.generate([PROMPT], num_frames=frames, seed=0)
    sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else vm_hwm()) - base
    if video.shape[1] != frames:
        raise RuntimeError(f"{name}: asked for {frames} frames, got {video.shape[1]}")
    return {"clips": clips, "frames": frames, "seconds": seconds, "peak_growth_mib": peak / MIB,
            "video_mib": video.numel() * video.element_size() / MIB,
            "parameters": sum(p.numel() for p in model.parameters())}


def isolated(name: str, clips: int, args, mmap_threshold: bool = True) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if mmap_threshold else {
        k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    command = [sys.executable, __file__, "--model", name, "--one-run", str(clips), "--steps", str(args.steps),
               "--threads", str(args.threads), "--device", args.device]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{name} with {clips} clips failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    lines = [f"# Long videos clip by clip ({report['device']})", "",
             "Peak memory and time of `generate(num_frames=F)` for the F that takes 8 clips against 2, each in a "
             "fresh process (`benchmarks/long_video.py`; method in its docstring).", "",
             "| backbone | memory ratio 8/2 (goal <= 1.1) | met | time ratio 8/2 (linear: 4.0) |",
             "| --- | ---: | --- | ---: |"]
    for name, entry in sorted(report["backbones"].items()):
        lines.append(f"| {name} | {entry['memory_ratio_8_2']:.3f} | {'yes' if entry['memory_ratio_8_2'] <= MEMORY_GOAL else 'no'} "
                     f"| {entry['time_ratio_8_2']:.2f} |")
    for name, entry in sorted(report["backbones"].items()):
        runs = entry["runs"]
        lines += ["", f"## {name}", "",
                  f"- model: {entry['description']}; {runs['2']['parameters']:,} parameters, random weights, float32, "
                  f"{entry['steps']} denoising steps per clip, guidance on",
                  f"- command: `{entry['command']}` ({entry['wall_s']:.0f} s), {entry['date']}, {entry['device_name']}, "
                  f"torch {entry['torch']}, {entry['threads']} thread(s) of {entry['cpus']} CPUs",
                  f"- 1/5/15-minute load average at start {entry['load_average']['start']}, at end "
                  f"{entry['load_average']['end']} (shared machine: the times are the noisier figure)",
                  f"- memory: {entry['mem_method']}", "",
                  "| clips | frames | peak growth (MiB) | of which the uint8 video (MiB) | seconds |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for run in runs.values():
            lines.append(f"| {run['clips']} | {run['frames']} | {run['peak_growth_mib']:.2f} | {run['video_mib']:.3f} "
                         f"| {run['seconds']:.1f} |")
        if entry.get("runs_default_malloc"):
            lines += ["", f"With glibc's default mmap threshold (a fragmenting heap; noisy at this size): memory ratio "
                      f"{entry['memory_ratio_8_2_default_malloc']:.3f}, peak growth "
                      + ", ".join(f"{r['clips']} clips {r['peak_growth_mib']:.2f} MiB"
                                  for r in entry["runs_default_malloc"].values()) + "."]
    return "\n".join(lines) + "\n"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lavie", choices=sorted(BACKBONES))
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per clip")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine more threads wait on each other)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one-run", type=int, help=argparse.SUPPRESS)  # child process: one clip count
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one_run:
        print(json.dumps(one_run(args.model, args.one_run, args.steps, args.device)))
        return

    started, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    device = args.device.split(":")[0]
    runs, default_malloc = {}, {}
    for clips in CLIPS:
        runs[str(clips)] = isolated(args.model, clips, args)
        print(f"{args.model}, {clips} clips: {runs[str(clips)]}", file=sys.stderr, flush=True)
    if device == "cpu":
        for clips in CLIPS:
            default_malloc[str(clips)] = isolated(args.model, clips, args, mmap_threshold=False)
            print(f"{args.model}, {clips} clips, glibc default: {default_malloc[str(clips)]}", file=sys.stderr,
                  flush=True)
    small, large = (runs[str(c)] for c in CLIPS)
    entry = {
        "description": BACKBONES[args.model].description,
        "command": " ".join(["python", "benchmarks/long_video.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name(args.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "steps": args.steps,
        "mem_method": ("max_memory_allocated minus memory_allocated before the call" if device == "cuda" else
                       "peak RSS (VmHWM, reset just before the call) minus RSS at that moment, glibc mmap threshold "
                       "fixed at 64 KiB"),
        "memory_ratio_8_2": large["peak_growth_mib"] / small["peak_growth_mib"],
        "time_ratio_8_2": large["seconds"] / small["seconds"],
        "runs": runs,
        "memory_ratio_8_2_default_malloc": (default_malloc[str(CLIPS[1])]["peak_growth_mib"]
                                            / default_malloc[str(CLIPS[0])]["peak_growth_mib"]
                                            if default_malloc else None),
        "runs_default_malloc": default_malloc,
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "wall_s": time.perf_counter() - started,
    }

    path = update_results(args.out / f"long_video_{device}.json", args.model, entry)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)


def update_results(path: Path, name: str, entry: dict) -> Path:
    """One file for every backbone: write `name`'s entries (its detail under "backbones" and the flat
    `<name>_memory_ratio_8_2`, `<name>_time_ratio_8_2`, `<name>_load_average`), keep the other backbones', and
    rewrite the markdown beside it from the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.setdefault("device", path.stem.rsplit("_", 1)[-1])
    report.setdefault("backbones", {})[name] = entry
    report[f"{name}_memory_ratio_8_2"] = entry["memory_ratio_8_2"]
    report[f"{name}_time_ratio_8_2"] = entry["time_ratio_8_2"]
    report[f"{name}_load_average"] = entry["load_average"]
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(report))
    return path


if __name__ == "__main__":
    main()
