"""Loong's autoregressive decoding: cached step cost against position, the KV cache against full recomputation, the
cost of guidance, and memory over clip-by-clip extension (issue 12's decoding benchmark).

The decoder is a mid-size `LlamaDecoder` with Loong's vocabulary (default 8 layers x 512 wide, SwiGLU 1408, 8 heads
of 64, 40,202 ids, untied embeddings: 66,865,664 parameters, of which the two 40,202 x 512 embedding tables are
41,166,848 and the rest 25,698,816), random weights (the cost does not depend on the values), float32. Every
forward runs under `torch.inference_mode()` and asks for the last position's logits only (`last_only=True`), as the
sampler does. Measurements:

* `step_ms_at[pos]`: one cached step, batch 1: the cache is filled to `pos` by one prefill, then one token at
  position `pos` is fed again and again (rewinding; the cache's length stays pos + 1). The positions are measured
  round-robin (one step at each position per round, `--step-rounds` rounds), so load from other processes falls on
  all of them alike; the median per position. `flatness_ratio` = step at 4096 / step at 256.
  `attention_ms_at[pos]` times SDPA alone on one layer's cache-shaped keys and values (one query over pos + 1 keys),
  times the number of layers: the part of the step that grows with the position.
* `cache_speedup_1k`: generating 1,024 tokens after a prefix of P = 255 (Loong's 252-token text budget plus
  <sot> <eot> <soi>). Token i is drawn from the logits of a forward over P + i tokens (i = 0..1023, the last token
  is drawn, not fed: lengths P..P+1023, as `sample_video_tokens` does). Cached: one prefill of P, then 1,023
  one-token steps, every one timed. Full recomputation: a forward without a cache over each length (also
  `last_only`). Timing all 1,024 recomputations would take ~20 minutes on one core, so the lengths are split into
  8 strata of 128 consecutive lengths; each stratum is timed at its middle length (P + 128 s + 64, median of
  `--recompute-repeats` forwards) and counted 128 times (the midpoint rule, exact where the cost is linear in the
  length, a slight underestimate where the attention's quadratic term shows). Each stratum's recomputation is timed
  right after that stratum's 128 cached steps, so both see the same load. Ratio = estimated recomputation total /
  measured cached total (prefill included). Only the decoder is timed on both sides (no top-k, no noise).
* `cfg_cost_ratio`: `sample_video_tokens` itself, batch 1, after the same P = 255 prefix, with guidance (scale 7.5:
  the doubled batch [cond; uncond] through one cache) and without (no uncond prefix: batch 1). A step is the time
  between two consecutive `progress` calls: the decoder's forward, guidance, top-k and noise of one token.
  `--cfg-rounds` rounds alternate the two, `--cfg-tokens` tokens each; the median step per mode.
* `extension_memory_ratio`: the decoder side of Loong.generate's clip-by-clip extension (modules/loong.py), 8 clips
  against 2. One cache of batch 2 (guidance), allocated once for one window, serves every clip; each clip is a
  `sample_video_tokens` call after [text prefix (255); context], the first clip drawing 256 tokens, every later
  clip continuing from the previous clip's last 64 tokens and drawing 192 (the window stays 255 + 256 positions).
  The video tokenizer is replaced by its `extend_from: tokens` path (the context is the raw previous tokens), so no
  tokenizer runs: this is the decoder's and the sampler's memory, not the decoding of frames. Measured in a fresh
  process per clip count (after a warm-up forward, and after the model is built): on CPU, the process's peak
  resident set (VmHWM, reset through /proc/self/clear_refs just before the cache is allocated) minus its resident
  set at that moment; on CUDA max_memory_allocated minus memory_allocated before. It counts the cache, every
  transient buffer of the prefills and steps, the tokens kept, and allocator overhead.

Goals (issue 12): flatness <= 1.5, cache speedup >= 20, cfg cost <= 2.1, extension memory <= 1.1. The machine may be
shared: the report keeps the load average at start and end, and ratios come from measurements taken side by side.

Usage: python benchmarks/ar_decoding.py [--threads 1] [--device cpu|cuda] [--quick]
Results: benchmarks/results/ar_decoding_<device>[_quick].json and .md
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_probe import current_rss, reset_peak_rss, vm_hwm  # noqa: E402

from modules.components.llama import LlamaConfig, LlamaDecoder  # noqa: E402
from modules.components.loong_sequence import LoongVocab, build_prefix  # noqa: E402
from modules.samplers.autoregressive import sample_video_tokens  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MIB = 2**20
GOALS = {  # key: (comparison, bound)
    "flatness_ratio": ("<=", 1.5),
    "cache_speedup_1k": (">=", 20.0),
    "cfg_cost_ratio": ("<=", 2.1),
    "extension_memory_ratio": ("<=", 1.1),
}


def settings(quick: bool) -> dict:
    """Sizes of one run. --quick: a 2-layer, 128-wide decoder, small positions and counts (a smoke run)."""
    if quick:
        return dict(layers=2, width=128, ffn=352, heads=4, positions=[32, 64, 128], text_budget=13, generate=64,
                    strata=4, first_clip=32, overlap=8, clips=[2, 4], max_seq_len=512)
    return dict(layers=8, width=512, ffn=1408, heads=8, positions=[256, 1024, 4096], text_budget=252, generate=1024,
                strata=8, first_clip=256, overlap=64, clips=[2, 8], max_seq_len=4608)


def build_decoder(s: dict, device: str) -> tuple[LlamaDecoder, LoongVocab]:
    vocab = LoongVocab()  # the paper's: 32,000 text + 8,192 video + 10 special = 40,202 ids
    cfg = LlamaConfig(vocab_size=vocab.size, hidden_size=s["width"], intermediate_size=s["ffn"],
                      num_layers=s["layers"], num_heads=s["heads"], max_seq_len=s["max_seq_len"])
    torch.manual_seed(0)
    return LlamaDecoder(cfg).to(device).eval(), vocab


def parameter_counts(decoder: LlamaDecoder) -> dict:
    total = sum(p.numel() for p in decoder.parameters())
    embeddings = decoder.embed_tokens.weight.numel() + decoder.lm_head.weight.numel()
    return {"total": total, "embedding_tables": embeddings, "without_embedding_tables": total - embeddings}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device: str) -> float:
    """Wall seconds of one call."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def prefix_tokens(vocab: LoongVocab, text_budget: int, batch: int, device: str, seed: int = 0) -> torch.Tensor:
    """A full-budget caption of random text ids in Loong's prefix layout: LongTensor [batch, text_budget + 3]."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, vocab.text_size, (batch, text_budget), generator=gen).tolist()
    return build_prefix(text, vocab, text_budget, device=device)


def random_video_ids(vocab: LoongVocab, shape: tuple[int, ...], device: str, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab.video_size, shape, generator=gen) + vocab.video_offset).to(device)


# ------------------------------------------------------------------------------------------ step cost vs position
@torch.inference_mode()
def step_cost(decoder: LlamaDecoder, vocab: LoongVocab, positions: list[int], rounds: int, device: str) -> dict:
    caches, fills = {}, {}
    for pos in positions:
        caches[pos] = decoder.allocate_cache(1, pos + 1)
        tokens = random_video_ids(vocab, (1, pos), device)
        fills[pos] = timed(lambda: decoder(tokens, 0, caches[pos], last_only=True), device)
    token = random_video_ids(vocab, (1, 1), device, seed=2)
    for pos in positions:  # warm-up: one step each
        decoder(token, pos, caches[pos], last_only=True)
    times = {pos: [] for pos in positions}
    for _ in range(rounds):
        for pos in positions:
            times[pos].append(timed(lambda: decoder(token, pos, caches[pos], last_only=True), device))
    return {
        "step_ms_at": {str(p): 1e3 * statistics.median(t) for p, t in times.items()},
        "step_min_ms_at": {str(p): 1e3 * min(t) for p, t in times.items()},
        "prefill_s_at": {str(p): s for p, s in fills.items()},
        "rounds": rounds,
    }


@torch.inference_mode()
def attention_cost(decoder: LlamaDecoder, positions: list[int], rounds: int, device: str) -> dict:
    """SDPA alone, one query over pos + 1 keys and values of one layer, x layers (median of `rounds`)."""
    cfg = decoder.config
    gen = torch.Generator().manual_seed(3)
    out = {}
    for pos in positions:
        shape = (1, cfg.num_kv_heads, pos + 1, cfg.head_dim)
        keys = torch.randn(1, cfg.num_kv_heads, pos + 1, cfg.head_dim, generator=gen).to(device)
        values = torch.randn(shape, generator=gen).to(device)
        query = torch.randn(1, cfg.num_heads, 1, cfg.head_dim, generator=gen).to(device)
        call = lambda: F.scaled_dot_product_attention(query, keys, values)  # noqa: E731
        call()
        out[str(pos)] = 1e3 * cfg.num_layers * statistics.median(timed(call, device) for _ in range(rounds))
    return out


# ------------------------------------------------------------------------------------------ cache vs recomputation
@torch.inference_mode()
def cache_speedup(decoder: LlamaDecoder, vocab: LoongVocab, text_budget: int, generate: int, strata: int,
                  repeats: int, device: str, log) -> dict:
    prefix = prefix_tokens(vocab, text_budget, 1, device)  # (1, P)
    P = prefix.shape[1]
    sequence = torch.cat([prefix, random_video_ids(vocab, (1, generate), device)], 1)  # (1, P + generate)
    width = generate // strata
    if width * strata != generate:
        raise ValueError(f"{generate} tokens do not split into {strata} equal strata")
    cache = decoder.allocate_cache(1, P + generate - 1)
    decoder(sequence[:, :P], 0, cache, last_only=True)  # warm-up of the prefill shape
    cache.reset()

    cached_s, recompute_s, recompute_at = [], [], []
    prefill_s = timed(lambda: decoder(sequence[:, :P], 0, cache, last_only=True), device)  # draws token 0
    for s in range(strata):
        # cached: the steps that draw tokens s*width .. (s+1)*width-1; step at position p feeds token p - P
        first = max(s * width, 1)
        steps = [timed(lambda: decoder(sequence[:, P + i - 1:P + i], P + i - 1, cache, last_only=True), device)
                 for i in range(first, (s + 1) * width)]
        cached_s.append(sum(steps) + (prefill_s if s == 0 else 0.0))
        # full recomputation of this stratum: lengths P + s*width .. P + (s+1)*width - 1, timed at the middle
        length = P + s * width + width // 2
        t = statistics.median(timed(lambda: decoder(sequence[:, :length], last_only=True), device)
                              for _ in range(repeats))
        recompute_at.append({"length": length, "forward_s": t})
        recompute_s.append(t * width)
        log(f"  stratum {s + 1}/{strata}: cached {cached_s[-1]:.2f} s, recompute at length {length}: {t:.3f} s "
            f"x {width} = {recompute_s[-1]:.1f} s")
    cached, recomputed = sum(cached_s), sum(recompute_s)
    return {"prefix_length": P, "tokens": generate, "strata": strata, "recompute_repeats": repeats,
            "cached_s": cached, "cached_prefill_s": prefill_s, "cached_s_per_stratum": cached_s,
            "recompute_s_estimated": recomputed, "recompute_at": recompute_at,
            "cache_speedup": recomputed / cached}


# ------------------------------------------------------------------------------------------ guidance cost
@torch.inference_mode()
def cfg_cost(decoder: LlamaDecoder, vocab: LoongVocab, text_budget: int, tokens: int, rounds: int,
             device: str) -> dict:
    cond = prefix_tokens(vocab, text_budget, 1, device)
    uncond = build_prefix([[]], vocab, text_budget, device=device)
    steps = {"guided": [], "unguided": []}

    def run(mode: str) -> None:
        stamps = []
        sample_video_tokens(decoder, cond, uncond if mode == "guided" else None, tokens, vocab, top_k=50,
                            guidance_scale=7.5, generators=[torch.Generator(device).manual_seed(0)],
                            progress=lambda done, total: (sync(device), stamps.append(time.perf_counter())))
        steps[mode] += [b - a for a, b in zip(stamps, stamps[1:])]  # one forward + guidance + draw each

    run("guided")  # warm-up
    run("unguided")
    steps = {"guided": [], "unguided": []}
    for _ in range(rounds):
        run("guided")
        run("unguided")
    guided, unguided = statistics.median(steps["guided"]), statistics.median(steps["unguided"])
    return {"step_ms_guided": 1e3 * guided, "step_ms_unguided": 1e3 * unguided,
            "step_min_ms_guided": 1e3 * min(steps["guided"]), "step_min_ms_unguided": 1e3 * min(steps["unguided"]),
            "steps_per_mode": len(steps["guided"]),
            "prefix_length": cond.shape[1], "cfg_cost_ratio": guided / unguided}


# ------------------------------------------------------------------------------------------ extension memory
@torch.inference_mode()
def extension_memory(clips: int, s: dict, device: str) -> dict:
    """In this (fresh) process: the decoder-side memory of `clips` clips through one cache (see the docstring)."""
    decoder, vocab = build_decoder(s, device)
    cond_text = prefix_tokens(vocab, s["text_budget"], 1, device)
    uncond_text = build_prefix([[]], vocab, s["text_budget"], device=device)
    first, overlap = s["first_clip"], s["overlap"]
    window = cond_text.shape[1] + first - 1  # every window: prefix + context + new tokens, the last one not fed
    gen = [torch.Generator(device).manual_seed(0)]
    decoder(cond_text, last_only=True)  # warm-up: thread pools, kernel caches
    sync(device)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        base = current_rss()
    cache = decoder.allocate_cache(2, window)
    pointers = cache.keys.data_ptr(), cache.values.data_ptr()
    pieces, context = [], None
    for index in range(clips):
        cond, uncond, new = cond_text, uncond_text, first
        if context is not None:
            cond, uncond = torch.cat([cond_text, context], 1), torch.cat([uncond_text, context], 1)
            new = first - overlap
        ids = sample_video_tokens(decoder, cond, uncond, new, vocab, top_k=50, guidance_scale=7.5, generators=gen,
                                  cache=cache)
        pieces.append(ids)
        context = ids[:, -overlap:]  # extend_from: tokens (no tokenizer)
    sync(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = vm_hwm() - base
    return {"clips": clips, "window": window, "tokens_drawn": sum(p.shape[1] for p in pieces),
            "peak_growth_mib": peak / MIB,
            "cache_mib": (cache.keys.numel() + cache.values.numel()) * cache.keys.element_size() / MIB,
            "cache_reallocated": (cache.keys.data_ptr(), cache.values.data_ptr()) != pointers}


def extension_isolated(clips: int, args) -> dict:
    command = [sys.executable, __file__, "--one-extension", str(clips), "--threads", str(args.threads),
               "--device", args.device] + (["--quick"] if args.quick else [])
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"extension with {clips} clips failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ report
def goals_met(report: dict) -> dict:
    met = {}
    for key, (op, bound) in GOALS.items():
        value = report[key]
        met[key] = {"value": value, "goal": f"{op} {bound}", "met": value <= bound if op == "<=" else value >= bound}
    return met


def markdown(r: dict) -> str:
    m, counts = r["meta"], r["parameters"]
    lines = [
        f"# Autoregressive decoding ({m['device']})",
        "",
        f"- command: `{m['command']}` ({m['wall_s']:.0f} s)",
        f"- date (UTC): {m['date']}; {m['device_name']}, torch {m['torch']}, {m['threads']} thread(s) of "
        f"{m['cpus']} CPUs, {m['dtype']}",
        f"- 1/5/15-minute load average at start {m['load_average']['start']}, at end {m['load_average']['end']} "
        f"(the machine is shared; ratios come from measurements taken side by side, interleaved)",
        f"- decoder: {m['shape']}; {counts['total']:,} parameters, of which {counts['embedding_tables']:,} are the "
        f"two {m['vocab_size']:,}-row embedding tables (input and lm_head, untied) and "
        f"{counts['without_embedding_tables']:,} the rest; random weights; every forward `last_only=True`",
        "",
        "| measure | value | goal | met |",
        "| --- | ---: | --- | --- |",
    ]
    for key, g in r["goals_met"].items():
        lines.append(f"| `{key}` | {g['value']:.2f} | {g['goal']} | {'yes' if g['met'] else 'no'} |")
    lines += ["", "From the fastest step of each kind instead of the median (contention only adds time): "
              + ", ".join(f"`{k}` {v:.2f}" for k, v in r["ratios_from_min"].items()) + "."]
    steps, attn = r["step_ms_at"], r["attention_ms_at"]
    lines += ["", "| position | cached step, batch 1 (median ms) | min ms | of which attention (SDPA x layers, ms) "
              "| prefill to it (s) |", "| ---: | ---: | ---: | ---: | ---: |"]
    for pos in steps:
        lines.append(f"| {pos} | {steps[pos]:.1f} | {r['step_detail']['step_min_ms_at'][pos]:.1f} | {attn[pos]:.1f} "
                     f"| {r['step_detail']['prefill_s_at'][pos]:.2f} |")
    c, g, e = r["cache_detail"], r["cfg_detail"], r["extension_detail"]
    largest = e[max(e, key=int)]
    lines += [
        "",
        f"- cache speedup: {c['tokens']} tokens after a {c['prefix_length']}-token prefix. Cached: prefill + "
        f"{c['tokens'] - 1} steps, all timed: {c['cached_s']:.1f} s. Full recomputation (a forward without cache "
        f"over each length {c['prefix_length']}..{c['prefix_length'] + c['tokens'] - 1}): {c['strata']} strata of "
        f"{c['tokens'] // c['strata']} lengths, each timed at its middle length (median of {c['recompute_repeats']}) "
        f"and counted {c['tokens'] // c['strata']} times (midpoint rule), each right after its stratum's cached "
        f"steps: {c['recompute_s_estimated']:.0f} s estimated.",
        f"- guidance: `sample_video_tokens` after a {g['prefix_length']}-token prefix, time between progress calls "
        f"(forward + guidance + top-k draw), median of {g['steps_per_mode']} steps per mode, modes alternated: "
        f"{g['step_ms_guided']:.1f} ms guided (batch 2 through the cache) vs {g['step_ms_unguided']:.1f} ms.",
        f"- extension memory: decoder side of clip-by-clip extension (one cache of batch 2 for a {largest['window']}-"
        f"position window, first clip {m['first_clip']} tokens, then {m['first_clip'] - m['overlap']} new after "
        f"{m['overlap']} context tokens; `extend_from: tokens`, no tokenizer), fresh process per count, "
        f"{m['mem_method']}: "
        + ", ".join(f"{k} clips {v['peak_growth_mib']:.1f} MiB ({v['tokens_drawn']} tokens)" for k, v in e.items())
        + f"; the cache itself is {largest['cache_mib']:.1f} MiB, "
        + ("re-allocated (a bug)." if any(v["cache_reallocated"] for v in e.values()) else "never re-allocated."),
    ]
    if r.get("notes"):
        lines += ["", *[f"- {n}" for n in r["notes"]]]
    return "\n".join(lines) + "\n"


def explain_misses(r: dict) -> list[str]:
    """For each missed goal: by how much, and the measurements that say where the cost is."""
    notes, g = [], r["goals_met"]
    if not g["flatness_ratio"]["met"]:
        pos = list(r["step_ms_at"])
        lo, hi = pos[0], pos[-1]
        grow = r["step_ms_at"][hi] - r["step_ms_at"][lo]
        attn_grow = r["attention_ms_at"][hi] - r["attention_ms_at"][lo]
        kv = r["kv_cache_mib_read_per_step"]
        notes.append(
            f"flatness missed by {r['flatness_ratio'] - 1.5:.2f} ({r['flatness_ratio']:.2f} vs <= 1.5; "
            f"{r['ratios_from_min']['flatness_ratio']:.2f} from the fastest steps): the step grows by {grow:.1f} ms "
            f"from position {lo} to {hi}, and SDPA alone (one query over the cache, x layers) by {attn_grow:.1f} ms. "
            f"A batch-1 step reads {r['weights_mib_read_per_step']:.0f} MiB of float32 weights (layers + lm_head) "
            f"whatever the position, and the cache's keys and values: {kv[lo]:.0f} MiB at {lo}, {kv[hi]:.0f} MiB at "
            f"{hi}. At this model size on a CPU the attention over 4,096 cached positions is a large share of the "
            f"step; the share shrinks as the weights grow (the 3B decoder reads ~12.5 GiB of float32 weights per "
            f"step against ~2.5 GiB of cache at 4,096, batch 1).")
    if not g["cache_speedup_1k"]["met"]:
        c = r["cache_detail"]
        notes.append(f"cache speedup missed by {20 - r['cache_speedup_1k']:.1f}: cached {c['cached_s']:.1f} s against "
                     f"an estimated {c['recompute_s_estimated']:.1f} s of recomputation.")
    if not g["cfg_cost_ratio"]["met"]:
        c = r["cfg_detail"]
        notes.append(f"guidance cost missed by {r['cfg_cost_ratio'] - 2.1:.2f}: {c['step_ms_guided']:.1f} ms guided "
                     f"against {c['step_ms_unguided']:.1f} ms ({r['ratios_from_min']['cfg_cost_ratio']:.2f} from the "
                     f"fastest steps).")
    if not g["extension_memory_ratio"]["met"]:
        notes.append(f"extension memory missed by {r['extension_memory_ratio'] - 1.1:.2f}.")
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine two threads wait on each other "
                             "for time slices and the step times measure the scheduler)")
    parser.add_argument("--step-rounds", type=int, default=20)
    parser.add_argument("--recompute-repeats", type=int, default=3)
    parser.add_argument("--cfg-rounds", type=int, default=3)
    parser.add_argument("--cfg-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a tiny decoder and small sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one-extension", type=int, help=argparse.SUPPRESS)  # child process: one memory measurement
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = settings(args.quick)
    if args.one_extension:
        print(json.dumps(extension_memory(args.one_extension, s, args.device)))
        return

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    decoder, vocab = build_decoder(s, args.device)
    counts = parameter_counts(decoder)
    cfg = decoder.config
    log(f"decoder: {counts['total']:,} parameters ({counts['without_embedding_tables']:,} without embeddings)")

    log("step cost against position ...")
    steps = step_cost(decoder, vocab, s["positions"], args.step_rounds, args.device)
    attention = attention_cost(decoder, s["positions"], args.step_rounds, args.device)
    log(f"  {steps['step_ms_at']}, attention {attention}")
    log("cache against full recomputation ...")
    cache = cache_speedup(decoder, vocab, s["text_budget"], s["generate"], s["strata"], args.recompute_repeats,
                          args.device, log)
    log("guidance cost ...")
    cfg_cost_detail = cfg_cost(decoder, vocab, s["text_budget"], args.cfg_tokens, args.cfg_rounds, args.device)
    log(f"  {cfg_cost_detail}")
    log("extension memory (fresh processes) ...")
    extension = {}
    for clips in s["clips"]:
        extension[str(clips)] = extension_isolated(clips, args)
        log(f"  {clips} clips: {extension[str(clips)]}")
    small, large = (extension[str(c)] for c in s["clips"])

    positions = [str(p) for p in s["positions"]]
    bytes_per = decoder.lm_head.weight.element_size()
    weights_read = (counts["without_embedding_tables"] + decoder.lm_head.weight.numel()) * bytes_per / MIB
    kv_read = {p: 2 * cfg.num_layers * cfg.num_kv_heads * (int(p) + 1) * cfg.head_dim * bytes_per / MIB
               for p in positions}
    report = {
        "meta": {
            "command": " ".join(["python", "benchmarks/ar_decoding.py", *sys.argv[1:]]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": args.device.split(":")[0],
            "device_name": _device_name(args.device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "dtype": "float32",
            "quick": args.quick,
            "shape": f"{cfg.num_layers} layers x {cfg.hidden_size} wide, SwiGLU {cfg.intermediate_size}, "
                     f"{cfg.num_heads} heads of {cfg.head_dim}, vocabulary {cfg.vocab_size:,}, max_seq_len "
                     f"{cfg.max_seq_len}",
            "vocab_size": cfg.vocab_size,
            "first_clip": s["first_clip"],
            "overlap": s["overlap"],
            "mem_method": ("max_memory_allocated minus memory_allocated before the cache"
                           if args.device.startswith("cuda")
                           else "peak RSS (VmHWM, reset just before the cache is allocated) minus RSS at that moment"),
            "load_average": {"start": load_start, "end": None},
            "wall_s": None,
        },
        "parameters": counts,
        "load_average": None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameter_count": counts["total"],
        "step_ms_at": steps["step_ms_at"],
        "flatness_ratio": steps["step_ms_at"][positions[-1]] / steps["step_ms_at"][positions[0]],
        "cache_speedup_1k": cache["cache_speedup"],
        "cfg_cost_ratio": cfg_cost_detail["cfg_cost_ratio"],
        "extension_memory_ratio": large["peak_growth_mib"] / small["peak_growth_mib"],
        # the same ratios from the fastest step of each kind: contention from other processes only adds time
        "ratios_from_min": {
            "flatness_ratio": steps["step_min_ms_at"][positions[-1]] / steps["step_min_ms_at"][positions[0]],
            "cfg_cost_ratio": cfg_cost_detail["step_min_ms_guided"] / cfg_cost_detail["step_min_ms_unguided"],
        },
        "attention_ms_at": attention,
        "weights_mib_read_per_step": weights_read,
        "kv_cache_mib_read_per_step": kv_read,
        "step_detail": steps,
        "cache_detail": cache,
        "cfg_detail": cfg_cost_detail,
        "extension_detail": extension,
    }
    report["goals_met"] = goals_met(report)
    report["notes"] = explain_misses(report)
    load_end = [round(x, 2) for x in os.getloadavg()]
    report["meta"]["load_average"]["end"] = load_end
    report["load_average"] = {"start": load_start, "end": load_end}
    report["meta"]["wall_s"] = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"ar_decoding_{report['meta']['device']}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    log(f"wrote {stem}.json and {stem}.md")


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


if __name__ == "__main__":
    main()
