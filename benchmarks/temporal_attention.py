"""Temporal attention: PyTorch SDPA vs the explicit einsum formula, at LaVie base shapes.

LaVie's temporal attention treats every spatial position of every video as a sequence of F = 16 frames, so it is
many (N = batch x H x W) very short sequences. Two implementations of the same maths are compared:

* ``sdpa``:   ``F.scaled_dot_product_attention`` with the relative-position bias as an additive (heads, F, F) float
  mask (for the ``module`` kind: ``TemporalAttention.forward``, which passes it as (1, heads, F, F) since this
  benchmark showed that form is faster on CPU);
* ``einsum``: ``softmax(einsum(q, k) + bias)`` then ``einsum(p, v)``, the formula of the official LaVie code
  (``TemporalAttention.explicit_forward``), which materialises the (N, heads, F, F) logits and probabilities;
* ``sdpa_4d`` (core only): SDPA with the same bias viewed as (1, heads, F, F). PyTorch's CPU dispatcher sends a 3-D
  float mask to the unfused MATH backend but a 4-D one to its fused (flash) CPU kernel, so the mask's rank alone
  changes the speed; the row records the backend each SDPA call gets.

Two kinds of workload:

* ``core``:   the attention itself on ready-made q, k, v (N, heads, F, dim_head) and the (heads, F, F) bias. This is
  where the two paths differ.
* ``module``: the whole ``TemporalAttention`` (projections, RoPE, bias lookup, attention, output projection),
  ``forward`` vs ``explicit_forward``. The projections are identical work in both paths and scale as N x C^2, so on
  a CPU they dominate and the ratio moves towards 1.

Shapes: a 320x512 video has a 40x64 latent; the UNet levels are (C=320, 40x64), (640, 20x32), (1280, 10x16), batch 2,
8 heads, so "real-level" cases use N = 2*40*64, 2*20*32, 2*10*16 and "same-N" cases keep N = 2*40*64 at every width.

Measurements (each (case, path) runs in a fresh process unless --no-isolate, so one path's allocations and
caches cannot affect the other's numbers):

* time: median wall time of ``--repeats`` calls after warm-up (CUDA calls synchronised), forward under
  ``torch.no_grad()`` or forward + backward of the output (w.r.t. the inputs, and the weights for ``module``);
* memory: CUDA: ``torch.cuda.max_memory_allocated()`` during the first full-size call minus the memory allocated
  before it (inputs and weights excluded). CPU: the process's peak resident set during that call minus its resident
  set just before it (Linux: VmHWM, reset through /proc/self/clear_refs right before the call), after a tiny
  warm-up call so thread pools and kernel caches are already paid for. It counts the output and every transient
  buffer the call allocates, plus allocator overhead and page granularity, so small cases read a few MiB of noise.
  A fresh process per measurement keeps memory freed by an earlier measurement (and kept by the allocator) from
  hiding this one's growth. Without clear_refs it falls back to ``ru_maxrss`` growth, reported as null when the
  call did not raise the process's earlier peak (then only an upper bound is known).

Usage: ``python benchmarks/temporal_attention.py [--quick] [--device cpu|cuda]``; results go to
``benchmarks/results/temporal_attention_<device>[_quick].json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
try:
    from modules.components.temporal_attention import TemporalAttention
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))
    from modules.components.temporal_attention import TemporalAttention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_probe import current_rss as _current_rss  # noqa: E402
from memory_probe import peak_rss as _peak_rss  # noqa: E402
from memory_probe import reset_peak_rss as _reset_peak_rss  # noqa: E402
from memory_probe import vm_hwm as _vm_hwm  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PATHS = ("sdpa", "einsum")  # compared on every case; time/mem ratios are sdpa / einsum
CORE_EXTRA_PATHS = ("sdpa_4d",)  # only for the core kind (the module has a single forward)
KINDS = ("core", "module")
MODES = ("forward", "forward+backward")
HEADS = 8
FRAMES = 16
BATCH = 2
#: LaVie base UNet levels for a 320x512 video: (channels, latent height, latent width)
LAVIE_LEVELS = ((320, 40, 64), (640, 20, 32), (1280, 10, 16))
#: sequences used to compare the two paths' outputs: every sequence is independent, so a slice checks the same maths
AGREEMENT_SEQUENCES = 64
MIB = 2**20


@dataclass(frozen=True)
class Case:
    name: str
    variant: str  # "real-level" (the UNet's own N at that width) or "same-N" (N of the first level)
    n: int  # sequences: batch x H x W
    channels: int
    frames: int = FRAMES
    heads: int = HEADS

    @property
    def dim_head(self) -> int:
        return self.channels // self.heads


def lavie_cases(quick: bool = False) -> list[Case]:
    """Real-level cases for the three widths, then same-N cases for the widths whose real N is smaller."""
    # --quick: batch 1 and a quarter of the latent side, a smoke run that keeps the channel widths.
    batch, shrink = (1, 4) if quick else (BATCH, 1)
    cases = [
        Case(f"L{i + 1}-c{c}", "real-level", batch * max(h // shrink, 1) * max(w // shrink, 1), c)
        for i, (c, h, w) in enumerate(LAVIE_LEVELS)
    ]
    first_n = cases[0].n
    cases += [Case(f"sameN-c{case.channels}", "same-N", first_n, case.channels) for case in cases[1:]]
    return cases


# --------------------------------------------------------------------------------------------- the two paths
def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # scale=1: LaVie scales q before the rotary encoding, so the inputs arrive pre-scaled
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def einsum_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    logits = torch.einsum("n h i d, n h j d -> n h i j", q, k) + bias
    return torch.einsum("n h i j, n h j d -> n h i d", logits.softmax(dim=-1), v)


@dataclass
class Workload:
    calls: dict[str, Callable[[], torch.Tensor]]  # path -> zero-argument call returning the output
    leaves: list[torch.Tensor]  # tensors whose .grad a backward pass fills
    grad_out: torch.Tensor  # upstream gradient, allocated up front so it is not charged to the call


def build_workload(case: Case, kind: str, device: str, dtype: torch.dtype, n: int, seed: int = 0,
                   requires_grad: bool = False) -> Workload:
    """Inputs (and for ``module`` the weights) of one case with ``n`` sequences; values are random (the cost does
    not depend on them), fixed by ``seed`` so both paths and the agreement check see the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "core":
        shape = (n, case.heads, case.frames, case.dim_head)
        q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
        q *= case.dim_head**-0.5  # keep the softmax unsaturated, as the real pre-scaled queries are
        q, k, v = (t.to(device, dtype).requires_grad_(requires_grad) for t in (q, k, v))
        bias = torch.randn(case.heads, case.frames, case.frames, generator=gen).to(device, dtype)
        calls = {
            "sdpa": lambda: sdpa_attention(q, k, v, bias),  # (heads, F, F) as TemporalAttention.forward passes it
            "einsum": lambda: einsum_attention(q, k, v, bias),
            "sdpa_4d": lambda: sdpa_attention(q, k, v, bias[None]),  # a view: no extra memory
        }
        leaves = [q, k, v]
        out_shape = shape
    elif kind == "module":
        torch.manual_seed(seed)
        # LaVie rotates 32 channels per head; narrower heads (tiny smoke cases) rotate all, as VideoUNet does
        attn = TemporalAttention(case.channels, case.heads, rotary_dim=min(32, case.dim_head)).to(device, dtype)
        attn.requires_grad_(requires_grad)
        x = torch.randn(n, case.frames, case.channels, generator=gen).to(device, dtype).requires_grad_(requires_grad)
        calls = {"sdpa": lambda: attn(x), "einsum": lambda: attn.explicit_forward(x)[0]}
        leaves = [x, *attn.parameters()]
        out_shape = x.shape
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    grad_out = torch.randn(out_shape, generator=gen).to(device, dtype) if requires_grad else torch.empty(0)
    return Workload(calls, leaves if requires_grad else [], grad_out)


def _step(workload: Workload, path: str, backward: bool) -> torch.Tensor:
    if not backward:
        with torch.no_grad():
            return workload.calls[path]()
    for leaf in workload.leaves:
        leaf.grad = None  # every call allocates its gradients afresh, like a training step after zero_grad
    out = workload.calls[path]()
    out.backward(workload.grad_out)
    return out.detach()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- measurement
def measure(case: Case, kind: str, path: str, mode: str = "forward", device: str = "cpu",
            dtype: torch.dtype = torch.float32, repeats: int = 3, warmup: int = 0, seed: int = 0) -> dict:
    """Time and peak memory of one path on one case, in this process. See the module docstring for what the
    memory number means; on CPU it needs a fresh process (``run_isolated``)."""
    if path not in paths_for(kind) or mode not in MODES:
        raise ValueError(f"path must be one of {paths_for(kind)} for kind {kind!r}, mode one of {MODES}")
    backward = mode == "forward+backward"

    # A tiny call first pays for one-time costs (thread pools, kernel/primitive caches, lazy CUDA init) so they
    # are charged neither to the memory nor the time of the real call.
    tiny = build_workload(case, kind, device, dtype, n=min(case.n, 2), seed=seed, requires_grad=backward)
    _step(tiny, path, backward)
    del tiny

    work = build_workload(case, kind, device, dtype, n=case.n, seed=seed, requires_grad=backward)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _step(work, path, backward)
        _sync(device)
        peak, mem_method = torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated - allocated before"
    else:
        if _reset_peak_rss():
            base = _current_rss()
            _step(work, path, backward)
            peak, mem_method = _vm_hwm() - base, "peak RSS (VmHWM, reset before the call) minus RSS before the call"
        else:
            base, high_water_before = _current_rss(), _peak_rss()
            _step(work, path, backward)
            high_water = _peak_rss()
            mem_method = "ru_maxrss growth over RSS before the call"
            # Only when the call raised the process's high-water mark is the peak of *this call* known.
            peak = high_water - base if base is not None and high_water > high_water_before else None

    for _ in range(warmup):  # the first full-size call above is already one warm-up call
        _step(work, path, backward)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        _step(work, path, backward)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {
        "path": path,
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "peak_mem_mib": None if peak is None else peak / MIB,
        "mem_method": mem_method,
    }


def paths_for(kind: str) -> tuple[str, ...]:
    return PATHS + CORE_EXTRA_PATHS if kind == "core" else PATHS


def sdpa_backend(case: Case, device: str, dtype: torch.dtype, mask_4d: bool = False) -> str:
    """The backend PyTorch's dispatcher picks for this case's SDPA call (private API; "unknown" if it moves)."""
    q = torch.zeros(2, case.heads, case.frames, case.dim_head, device=device, dtype=dtype)
    mask = torch.zeros((1,) * mask_4d + (case.heads, case.frames, case.frames), device=device, dtype=dtype)
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(q, q, q, mask, 0.0, False, scale=1.0)).name
    except Exception:  # noqa: BLE001 - purely informative
        return "unknown"


def agreement(case: Case, kind: str, mode: str = "forward", device: str = "cpu",
              dtype: torch.dtype = torch.float32, sequences: int = AGREEMENT_SEQUENCES, seed: int = 0) -> float:
    """Max abs difference of every path's output (and, for forward+backward, the gradients of all leaves) from the
    einsum path's, on the first ``sequences`` sequences of the case: a benchmark of paths that disagree would be
    meaningless."""
    backward = mode == "forward+backward"
    results = {}
    for path in paths_for(kind):
        work = build_workload(case, kind, device, dtype, n=min(case.n, sequences), seed=seed, requires_grad=backward)
        out = _step(work, path, backward)
        results[path] = [out, *(leaf.grad for leaf in work.leaves)]
    reference = results.pop("einsum")
    return max((a - b).abs().max().item() for other in results.values() for a, b in zip(other, reference, strict=True))


def _measure_in_child(threads: int | None, case: Case, kind: str, path: str, mode: str, device: str,
                      dtype: torch.dtype, repeats: int, warmup: int) -> dict:
    # a fresh process has torch's defaults: re-apply the settings main() made in the parent
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    return measure(case, kind, path, mode, device, dtype, repeats, warmup)


def run_isolated(case: Case, kind: str, path: str, mode: str, device: str, dtype: torch.dtype, repeats: int,
                 warmup: int, threads: int | None = None) -> dict:
    """``measure`` in a fresh process (see the module docstring for why).

    With the forkserver start method the process forks from a server that imported torch once (instead of paying
    the import for every measurement) and that never ran a computation, so no thread-pool or allocator state of
    this process is inherited; spawn (a clean interpreter) where forkserver does not exist. The server is shared by
    all measurements, so a new executor per measurement still costs only a fork.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "modules.components.temporal_attention"])
    else:
        context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_measure_in_child, threads, case, kind, path, mode, device, dtype, repeats,
                           warmup).result()


def run_case(case: Case, kind: str, mode: str = "forward", device: str = "cpu", dtype: torch.dtype = torch.float32,
             repeats: int = 3, warmup: int = 0, isolate: bool = True, threads: int | None = None) -> dict:
    """All paths on one case: their measurements, the time and memory ratios of each SDPA path over the einsum
    path (``time_ratio``/``mem_ratio`` for ``sdpa``, ``*_sdpa_4d`` for core cases), the SDPA backends the
    dispatcher picks, and the paths' agreement."""
    measured = {
        path: run_isolated(case, kind, path, mode, device, dtype, repeats, warmup, threads)
        if isolate else measure(case, kind, path, mode, device, dtype, repeats, warmup)
        for path in paths_for(kind)
    }
    einsum = measured["einsum"]
    row = {**asdict(case), "dim_head": case.dim_head, "kind": kind, "mode": mode, **measured}
    for path, suffix in (("sdpa", ""), ("sdpa_4d", "_sdpa_4d")):
        if path not in measured:
            continue
        mems = measured[path]["peak_mem_mib"], einsum["peak_mem_mib"]
        row["time_ratio" + suffix] = measured[path]["median_ms"] / einsum["median_ms"]  # < 1: SDPA faster
        # best-of-repeats ratio: other load on the machine only ever adds time, so this one is less noisy there
        row["time_ratio_min" + suffix] = measured[path]["min_ms"] / einsum["min_ms"]
        row["mem_ratio" + suffix] = mems[0] / mems[1] if None not in mems and mems[1] > 0 else None  # < 1: leaner
        # TemporalAttention.forward (the module kind) passes a 4-D mask
        row["backend" + suffix] = sdpa_backend(case, device, dtype, mask_4d=path == "sdpa_4d" or kind == "module")
    row["max_abs_diff"] = agreement(case, kind, mode, device, dtype)
    return row


# --------------------------------------------------------------------------------------------- reporting
def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# Temporal attention: SDPA vs einsum ({meta['device']})",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date']}",
        f"- device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, threads {meta['threads']}, "
        f"dtype {meta['dtype']}, python {meta['python']}",
        f"- time: median of {meta['repeats']} calls after warm-up; memory: {meta['mem_method']}",
        f"- 1-minute load average at start / end: {meta.get('load_average_1min', {}).get('start')} / "
        f"{meta.get('load_average_1min', {}).get('end')} ({meta.get('cpus')} CPUs; a load above the CPU count means "
        "other processes competed for them: the JSON also has best-of-repeats ratios, `time_ratio_min`)",
        f"- F = {FRAMES} frames in every case; ratios are SDPA / einsum (< 1 means SDPA is faster / leaner); "
        "SDPA passes the bias as (heads, F, F) like TemporalAttention.forward, SDPA-4D as (1, heads, F, F); "
        f"max diff: largest difference of an SDPA path's output (and gradients for forward+backward) from einsum's, "
        f"on {AGREEMENT_SEQUENCES} sequences",
        "- core: attention on given q, k, v + bias; module: whole TemporalAttention (projections, RoPE, bias,"
        " attention, output projection)",
        "",
        "| case | variant | N | C (heads x dim) | kind | mode | SDPA ms | SDPA-4D ms | einsum ms "
        "| time ratio | 4D time ratio | SDPA MiB | SDPA-4D MiB | einsum MiB | mem ratio | 4D mem ratio "
        "| backends (3D / 4D) | max diff |",
        "| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| --- | ---: |",
    ]
    for r in report["results"]:
        extra = r.get("sdpa_4d", {})
        lines.append(
            f"| {r['name']} | {r['variant']} | {r['n']} | {r['channels']} ({r['heads']}x{r['dim_head']}) "
            f"| {r['kind']} | {r['mode']} | {_fmt(r['sdpa']['median_ms'], 1)} | {_fmt(extra.get('median_ms'), 1)} "
            f"| {_fmt(r['einsum']['median_ms'], 1)} | {_fmt(r['time_ratio'])} | {_fmt(r.get('time_ratio_sdpa_4d'))} "
            f"| {_fmt(r['sdpa']['peak_mem_mib'], 1)} | {_fmt(extra.get('peak_mem_mib'), 1)} "
            f"| {_fmt(r['einsum']['peak_mem_mib'], 1)} | {_fmt(r['mem_ratio'])} | {_fmt(r.get('mem_ratio_sdpa_4d'))} "
            f"| {r['backend']} / {r.get('backend_sdpa_4d', '-')} | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller N (batch 1, quarter latent side): a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, help="extra warm-up calls (default 0 on CPU, 3 on CUDA)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--backward", choices=["none", "core", "all"],
                        help="kinds that also get forward+backward (default: core on CPU, all on CUDA)")
    parser.add_argument("--module", choices=["none", "real", "all"],
                        help="cases that also run the whole module (default: real-level on CPU, all on CUDA)")
    parser.add_argument("--no-isolate", action="store_true", help="measure in this process (CPU memory not valid)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = args.device.startswith("cuda")
    if on_cuda:
        # Parity is checked with TF32 off (fixtures README); keep the benchmark on the same numerics.
        torch.backends.cuda.matmul.allow_tf32 = False
    repeats = args.repeats or (20 if on_cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 0)
    backward_kinds = {"none": (), "core": ("core",), "all": KINDS}[args.backward or ("all" if on_cuda else "core")]
    module_cases = args.module or ("all" if on_cuda else "real")
    dtype = getattr(torch, args.dtype)

    plan = []
    for case in lavie_cases(args.quick):
        kinds = ["core"]
        if module_cases == "all" or (module_cases == "real" and case.variant == "real-level"):
            kinds.append("module")
        for kind in kinds:
            plan += [(case, kind, mode) for mode in MODES if mode == "forward" or kind in backward_kinds]

    results = []
    started = time.perf_counter()
    load_before = _load_average()
    for i, (case, kind, mode) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {case.name} N={case.n} C={case.channels} {kind} {mode}", file=sys.stderr, flush=True)
        row = run_case(case, kind, mode, args.device, dtype, repeats, warmup, isolate=not args.no_isolate,
                       threads=args.threads)
        print(f"    sdpa {row['sdpa']['median_ms']:.1f} ms, einsum {row['einsum']['median_ms']:.1f} ms, "
              f"time ratio {row['time_ratio']:.2f} (4D {_fmt(row.get('time_ratio_sdpa_4d'))}), "
              f"mem ratio {_fmt(row['mem_ratio'])} (4D {_fmt(row.get('mem_ratio_sdpa_4d'))})", file=sys.stderr, flush=True)
        results.append(row)

    device_tag = "cuda" if on_cuda else "cpu"
    report = {
        "meta": {
            "command": " ".join(["python", "benchmarks/temporal_attention.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device_tag,
            "device_name": _device_name(args.device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "dtype": args.dtype,
            "repeats": repeats,
            "warmup": warmup,
            "isolated": not args.no_isolate,
            "quick": args.quick,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if on_cuda else None,
            "mem_method": results[0]["sdpa"]["mem_method"] if results else None,
            "wall_s": time.perf_counter() - started,
            # other processes compete for the cores on a shared machine: the 1-minute load average tells how much
            "load_average_1min": {"start": load_before, "end": _load_average()},
        },
        "results": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"temporal_attention_{device_tag}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
