"""Generate videos for prompts with any backbone and write them as mp4 files, a png grid and samples.json.

    python sample.py experiment=tiny_lavie ckpt_path=RUN/checkpoints/last.ckpt prompts='["a red circle moving left"]'
    python sample.py experiment=tiny_lavie ckpt_path=... prompts_file=prompts.txt num_seeds=2
    python sample.py model=lavie_base model.pretrained.sd_path=DIR model.pretrained.checkpoint=lavie_base.pt
    python sample.py experiment=tiny_lavie ckpt_path=... prompts=... super_resolution=VSR_RUN/checkpoints/last.ckpt

Only the VideoGenerator contract is used: a new backbone needs nothing here.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.video_io import write_grid_png, write_video
from modules.base import VideoGenerator, check_num_frames
from utils.cli import user_errors_exit
from utils.generators import build_generator
from utils.progress import WorkProgress
from utils.super_resolution import build_super_resolution

log = logging.getLogger("t2v")
GRID_MAX_VIDEOS = 16


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.get("prompts") is not None and cfg.get("prompts_file") is not None:
        raise ValueError("give prompts or prompts_file, not both")
    if cfg.get("prompts_file") is not None:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file not found: {path} (expected a text file, one prompt per line)")
        prompts = [line.strip() for line in path.read_text().splitlines()]
    elif cfg.get("prompts") is not None:
        prompts = [cfg.prompts] if isinstance(cfg.prompts, str) else list(cfg.prompts)
    else:
        raise ValueError("no prompts: pass prompts='[\"a red circle moving left\"]' or prompts_file=FILE")
    prompts = [str(p).strip() for p in prompts if str(p).strip()]
    if not prompts:
        raise ValueError("the prompt list is empty")
    return prompts


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "prompt"


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def weights_record(model_cfg: DictConfig) -> dict:
    """The weight files a model config names: its `pretrained` paths and, for a model made of stages (model nodes with
    a `_target_` and a `ckpt_path`, e.g. model=lavie_cascade), each stage's `ckpt_path` and `pretrained` paths."""
    record = {"pretrained": OmegaConf.to_container(model_cfg.get("pretrained") or OmegaConf.create(), resolve=True)}
    stages = {name: {"checkpoint": node.get("ckpt_path"),
                     "pretrained": OmegaConf.to_container(node.get("pretrained") or OmegaConf.create(), resolve=True)}
              for name, node in model_cfg.items()
              if isinstance(node, DictConfig) and "_target_" in node and "ckpt_path" in node}
    if stages:
        record["stages"] = stages
    return record


def sample(cfg: DictConfig) -> Path:
    prompts = read_prompts(cfg)
    if cfg.num_seeds < 1 or cfg.batch_size < 1:
        raise ValueError("num_seeds and batch_size must be at least 1")
    if cfg.num_frames is not None:
        check_num_frames(cfg.num_frames)  # before a paper-size model is built
    stage = cfg.model.get("super_resolution")
    if cfg.get("super_resolution") and isinstance(stage, DictConfig) and "_target_" in stage:
        raise ValueError(f"{cfg.model._target_} ends with its own super-resolution stage (model.super_resolution): "
                         "drop super_resolution=, which would upsample its videos once more; set that stage with "
                         "model.super_resolution.ckpt_path / model.super_resolution.* instead")
    model: VideoGenerator = build_generator(cfg)
    # optional post-process: a super-resolution stage upsamples every video (LaVie's VSR; Loong's paper, too, puts an
    # off-the-shelf super-resolution stage after its generator)
    upsampler = (build_super_resolution(cfg.super_resolution, cfg.device, cfg.precision)
                 if cfg.get("super_resolution") else None)

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(p, prompt, cfg.seed + p * cfg.num_seeds + k) for p, prompt in enumerate(prompts) for k in range(cfg.num_seeds)]
    record = {
        "model": cfg.model._target_,
        "checkpoint": cfg.get("ckpt_path"),
        **weights_record(cfg.model),
        "num_frames": cfg.num_frames,  # as asked; each video's entry records the frames it has
        "sampler": model.sampler_settings(),
        "fps": model.fps,
        "super_resolution": None if upsampler is None else {"from": cfg.super_resolution,
                                                             "sampler": upsampler.sampler_settings()},
        "videos": [],
    }
    grid_videos = []
    batches = [jobs[i : i + cfg.batch_size] for i in range(0, len(jobs), cfg.batch_size)]
    # The bar counts denoising (or token) steps, which `generate` reports: a batch of videos can take minutes, so a
    # bar over batches would sit at 0% for most of a short run.
    with WorkProgress(f"generating {len(jobs)} videos", unit="steps", every_seconds=10) as bar:
        for k, batch in enumerate(batches):
            def step_done(done: int, steps: int, k: int = k) -> None:
                bar.total = steps * len(batches)
                bar.update(k * steps + done)

            videos = model.generate([prompt for _, prompt, _ in batch], num_frames=cfg.num_frames,
                                    seed=[seed for _, _, seed in batch], progress=step_done)
            if bar.total is None or bar.unit == "batches":  # a generate that does not report its steps
                bar.unit, bar.total = "batches", len(batches)
                bar.update(k + 1)
            if upsampler is not None:
                videos = upsampler.upsample(videos, [prompt for _, prompt, _ in batch], seed=[s for _, _, s in batch])
            for (p, prompt, seed), video in zip(batch, videos):
                path = out_dir / f"{p:03d}_{slug(prompt)}_seed{seed}.mp4"
                write_video(path, video, fps=model.fps)
                record["videos"].append({"prompt": prompt, "seed": seed, "file": path.name,
                                         "frames": int(video.shape[0])})
                if len(grid_videos) < GRID_MAX_VIDEOS:
                    grid_videos.append(video)
            write_json_atomic(out_dir / "samples.json", record)  # after every batch: an interrupted run keeps its list
    write_grid_png(out_dir / "grid.png", torch.stack(grid_videos))
    print(f"wrote {len(jobs)} videos, grid.png and samples.json to {out_dir}")
    return out_dir


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
