"""Run one evaluation protocol on one backbone: generate (sharded, resumable) -> score -> results.json + table row.

    python eval/run_ucf101.py model=lavie_base model.pretrained.sd_path=DIR ... data.root=DIR
    python eval/run_msrvtt.py experiment=tiny_lavie ckpt_path=FILE eval.limit=100
    python eval/run_synthetic.py experiment=tiny_lavie ckpt_path=FILE
    torchrun --nproc_per_node 2 eval/run_ucf101.py ...          (each rank generates its share; rank 0 scores)

Every runner composes configs/evaluate.yaml; `eval=<protocol>` picks the protocol (and its dataset config), so
`python eval/run_ucf101.py eval=synthetic` is the synthetic protocol. Only the VideoGenerator contract is used.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from eval.distributed import barrier, distributed_context, init_distributed, rank_zero_first
from eval.generation import DEFAULT_FPS, check_manifest, finished, generate_shard, manifest_for, video_path
from eval.protocols.base import Protocol, file_sha256
from eval.video_check import FolderCheck, check_videos
from utils.cli import user_error_behind
from utils.generators import build_generator, pick_device

log = logging.getLogger("t2v")


def rank_device(cfg: DictConfig) -> torch.device:
    device = pick_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def files_in_config(node: Any, prefix: str = "model") -> dict[str, str]:
    """{dotted key: path} of every string in a model config that names an existing file (a cascade stage's
    `ckpt_path`, a tokenizer checkpoint, an official weight file, a LoRA): the videos depend on their contents, so a
    file replaced at the same path must not be mixed into a resumed evaluation folder. Folders are not followed."""
    found: dict[str, str] = {}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        dotted = f"{prefix}.{key}"
        if isinstance(value, (dict, list)):
            found.update(files_in_config(value, dotted))
        elif isinstance(value, str) and value and Path(value).is_file():
            found[dotted] = value
    return found


def generator_record(cfg: DictConfig, model: Any) -> dict[str, Any]:
    """What the videos depend on: model config, checkpoints (paths + hashes: the run's and every file the model
    config names), sampler settings, frames, precision."""
    ckpt = cfg.get("ckpt_path")
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    return {
        "model": cfg.model._target_,
        "model_config": model_config,
        "checkpoint": ckpt,
        "checkpoint_sha256": file_sha256(ckpt) if ckpt else None,
        "model_files_sha256": {key: file_sha256(path) for key, path in files_in_config(model_config).items()},
        "sampler": model.sampler_settings(),
        "precision": cfg.precision,
        "init_seed": cfg.seed,
    }


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def protocol_summary(settings: dict[str, Any]) -> str:
    """The protocol settings a score depends on, in one table cell: the short top-level settings (frames, split,
    seeds, limit, ...), each metric's preset and real-clip count, the real clips' frame stride, and the synthetic
    protocol's feature-net training settings (`default` = eval/synthetic_nets.py's defaults, the documented nets).
    Everything is in results.json."""
    parts = []
    for key, value in settings.items():
        if key == "protocol" or value is None or isinstance(value, (dict, list)):
            continue
        if isinstance(value, str) and (len(value) > 24 or "/" in value):
            continue  # descriptions and paths: in results.json
        parts.append(f"{key}={value}")
    for name, node in settings.items():
        if not isinstance(node, dict):
            continue
        preset = node.get("preset")
        if isinstance(preset, dict) and preset.get("name"):
            parts.append(f"{name}.preset={preset['name']}")
        real = node.get("real")
        if isinstance(real, dict) and real.get("num_clips") is not None:
            parts.append(f"{name}.real_clips={real['num_clips']}")
    stride = (settings.get("frame_rate") or {}).get("real_frame_stride")
    if stride is not None:
        parts.append(f"real_frame_stride={stride}")
    for kind, net in (settings.get("feature_nets") or {}).items():
        own = {k: v for k, v in net.items() if k not in ("num_frames", "resolution", "seed")}
        parts.append(f"{kind} net: " + (" ".join(f"{k}={v}" for k, v in own.items()) if own else "default"))
    return ", ".join(parts)


def sampler_summary(generator: dict[str, Any]) -> str:
    """The sampler settings the videos were made with (steps, guidance, size) and the precision; the frame count is
    the protocol's (generate is asked for it), not the sampler's default."""
    sampler = {k: v for k, v in (generator.get("sampler") or {}).items()
               if k != "num_frames" and v not in (None, "") and not isinstance(v, (dict, list))}
    parts = [f"{k}={v}" for k, v in sampler.items()]
    if generator.get("precision") not in (None, "fp32"):
        parts.append(f"precision={generator['precision']}")
    return ", ".join(parts) or "-"


def results_table(results: dict[str, Any]) -> str:
    """results.md: a markdown table row that names its run and the settings its numbers depend on, so rows of
    different runs can be put side by side: scores measured under other protocol settings, feature networks (their
    weight hashes) or sampler settings are not comparable. The full record is results.json, linked."""
    metrics = {k: v for k, v in results["metrics"].items() if not isinstance(v, (dict, list))}
    weights = ", ".join(f"{name} {w['sha256'][:10]}" for name, w in (results.get("weights") or {}).items()) or "-"
    generator = results["generator"]
    header = ["run", "checkpoint", "videos", *metrics, "protocol settings", "sampler", "feature-net weights",
              "all settings"]
    row = [results.get("run_name") or "-", generator.get("checkpoint") or "-", results["num_videos"],
           *metrics.values(), protocol_summary(results["protocol"]), sampler_summary(generator), weights,
           "[results.json](results.json)"]
    return ("| " + " | ".join(_cell(h) for h in header) + " |\n|" + "---|" * len(header) + "\n| "
            + " | ".join(_cell(v) for v in row) + " |\n")


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, out_dir / "results.json")
    (out_dir / "results.md").write_text(results_table(results))


def skip_record(protocol: Protocol, folder: FolderCheck) -> dict[str, Any]:
    """Every skip of the run, counted: real videos the real statistics left out (and why), generated videos that
    were invalid on disk and regenerated, temporary files of interrupted writes removed."""
    real = protocol.real_report or {}
    return {"real_videos": sum(real.get("skipped", {}).values()), "real_videos_by_reason": real.get("skipped", {}),
            "real_videos_examples": real.get("skipped_examples", {}),
            "generated_videos_regenerated": len(folder.invalid),
            "stray_temp_files_removed": len(folder.stray_temp_files)}


def evaluate(cfg: DictConfig) -> dict[str, Any] | None:
    """Check every input, generate this rank's share of the protocol's videos, then (rank 0) score them all.
    Returns the results on rank 0, None elsewhere.

    Before the first video is generated: the protocol's settings and files (every rank), then on rank 0, while the
    others wait, the output folder's manifest, the feature networks (strict key check) and the real-data statistics
    (`Protocol.prepare`), and a decode check of the videos already in the folder (invalid ones are regenerated)."""
    protocol: Protocol = instantiate(cfg.eval, _convert_="all")  # settings: presets, frame counts, ...
    protocol.check_inputs()  # datasets, weight files and the video count, before a generator is built
    if cfg.gen_batch_size < 1:
        raise ValueError(f"gen_batch_size must be at least 1, got {cfg.gen_batch_size}")
    rank, world_size = distributed_context()
    init_distributed(world_size)
    device = rank_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the rank's device for NCCL's object broadcast
    out_dir = Path(cfg.paths.output_dir)
    jobs = protocol.jobs()
    num_frames = protocol.num_frames

    torch.manual_seed(cfg.seed)  # the initialisation of a generator without a checkpoint is part of its identity
    model = build_generator(OmegaConf.merge(cfg, {"device": str(device)}))
    generator = generator_record(cfg, model)
    generated_fps = getattr(model, "fps", DEFAULT_FPS)  # what generate_shard writes into the mp4 files
    # What the videos depend on (prompts and seeds are in the jobs hash); scoring settings are not part of it, so
    # the same videos can be re-scored with other metric options.
    manifest = manifest_for(jobs, {"generator": generator, "num_frames": num_frames,
                                   "gen_batch_size": cfg.gen_batch_size})

    def before_generation() -> FolderCheck:
        check_manifest(out_dir, manifest)
        started = time.time()
        protocol.prepare(device, generated_fps)
        log.info("prepared the %s protocol's networks and real statistics in %.0f s", protocol.name,
                 time.time() - started)
        return check_videos(out_dir, jobs, num_frames)

    folder = rank_zero_first(rank, before_generation, is_user_error=lambda exc: user_error_behind(exc) is not None)
    if rank != 0:
        check_manifest(out_dir, manifest)

    started = time.time()
    written = generate_shard(model, jobs, out_dir, num_frames, cfg.gen_batch_size, rank, world_size,
                             fps=generated_fps, progress=rank == 0 or cfg.get("progress_all_ranks", False))
    log.info("rank %d: generated %d videos in %.0f s", rank, written, time.time() - started)
    del model
    barrier()
    # Rank 0 scores every video alone: leave the process group so that the metrics do not try to sync with
    # ranks that have finished.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if rank != 0:
        return None
    if not finished(jobs, out_dir):
        absent = [job.index for job in jobs if not video_path(out_dir, job.index).is_file()]
        raise RuntimeError(f"{len(absent)} videos are missing after generation (e.g. {absent[:5]}); re-run to finish")

    started = time.time()
    metrics = protocol.score(out_dir, jobs, device)
    results = {
        # the folder's name when run_name cannot be resolved (a config composed outside @hydra.main)
        "run_name": OmegaConf.select(cfg, "run_name", throw_on_resolution_failure=False) or out_dir.name,
        "protocol": protocol.settings(),
        "metrics": metrics,
        "num_videos": len(jobs),
        "videos": {**folder.record(), "generated_this_run": len(jobs) - folder.finished},
        "skipped": skip_record(protocol, folder),
        "real_clips": protocol.real_report,
        "generator": {k: v for k, v in generator.items() if k != "model_config"},
        "weights": {name: {"path": str(path), "sha256": file_sha256(path)}
                    for name, path in protocol.weight_files().items()},
        "gen_batch_size": cfg.gen_batch_size,
        "world_size": world_size,
        "score_seconds": round(time.time() - started, 1),
        "command": " ".join(sys.argv),
    }
    write_results(out_dir, results)
    summary = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    print(f"{protocol.name}: {summary}\nresults: {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return results
