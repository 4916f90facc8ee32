"""LaVie's cascade (Wang et al. 2023, section 4 and Fig. 3) as one VideoGenerator: base -> interpolation -> x4 VSR.

The base model makes K key frames from the prompt (16 at 320x512), the interpolation stage makes 4K - 3 frames of
them (61; `modules/lavie_interpolation.py`), and the super-resolution stage upsamples every frame x4 (1280x2048;
`modules/lavie_vsr.py`, in 8-frame windows). Videos pass from stage to stage as uint8 frames, as the official
scripts pass them as video files: the interpolation stage encodes the base frames with its own VAE, the VSR stage
takes the interpolated frames as its low-resolution input.

It is a VideoGenerator (not a sample.py mode) so that sample.py and eval/ run it like any backbone, through
`generate` alone: `generate(prompts, num_frames=N)` gives N = 4K - 3 frames (the sampler's default N is
4 (base.sampler.num_frames - 1) + 1). Each stage is built from its own model config (the config nodes `base`,
`interpolation`, `super_resolution`: configs/model/<stage>.yaml plus `ckpt_path`, a train.py checkpoint of that
stage). `validate_config` checks every stage (its files, its settings) before any of them is built. The cascade does
not train: each stage trains on its own (train.py experiment=tiny_lavie / tiny_lavie_interpolation / tiny_lavie_vsr).

Seeds: video i's base stage uses seed s_i itself, so the cascade's key frames are what the base model alone gives
for that seed; the later stages use seeds derived from (s_i, stage), so their noise is not a copy of the base
stage's (every stage draws its noise from a CPU generator seeded per video: same seed, same video, in any batch).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from modules.base import ProgressHook, VideoGenerator, check_num_frames
from modules.lavie_interpolation import FRAME_RATE_FACTOR, check_interpolated_frames

# stage name (its config node) -> what it must be able to do (a method of its class)
STAGES = {"base": "generate", "interpolation": "interpolate", "super_resolution": "upsample"}
# the stages' model configs in configs/model/ (paper size, CPU size), for error messages
STAGE_CONFIGS = {"base": "lavie_base / lavie_tiny", "interpolation": "lavie_interpolation / lavie_interpolation_tiny",
                 "super_resolution": "lavie_vsr / lavie_vsr_tiny"}


def stage_seed(seed: int, stage: int) -> int:
    """The seed of stage `stage` (1, 2, ...) for a video of seed `seed`: a 64-bit hash of the pair (numpy's
    SeedSequence), so distinct videos and stages never share a noise stream."""
    return int(np.random.SeedSequence([seed % 2**64, stage]).generate_state(1, np.uint64)[0])


def stage_config(cfg: Any, name: str) -> tuple[DictConfig, str | None]:
    """(the stage's model config, its ckpt_path or None) from the cascade config's node `name`. The keys a train.py
    checkpoint of that model supersedes (`checkpoint_supersedes`) are set to null when a ckpt_path is given."""
    node = cfg.get(name) if cfg is not None else None
    if node is None or "_target_" not in node:
        raise ValueError(f"the cascade has no {name} stage: model.{name} must be a model config with a _target_ "
                         f"(configs/model/{STAGE_CONFIGS[name]}) and a ckpt_path")
    # a detached, writable copy (a composed config is read-only and refers to its parent)
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node)
    ckpt_path = node.pop("ckpt_path", None)
    if ckpt_path:
        for key in getattr(get_class(node._target_), "checkpoint_supersedes", ()):
            node[key] = None
    return node, ckpt_path


def in_stage(error: Exception, name: str) -> Exception:
    """`error` (a stage's config error) as the same type, its message naming the stage and its keys as the cascade's
    (model.pretrained.sd_path -> model.interpolation.pretrained.sd_path)."""
    message = re.sub(r"\bmodel\.(?!_)", f"model.{name}.", str(error))
    try:
        renamed = type(error)(f"{name} stage of the cascade: {message}")
    except TypeError:  # an exception type with another constructor: keep it as it is
        return error
    return renamed


class LaVieCascade(VideoGenerator):
    """The three stages as submodules `base`, `interpolation`, `super_resolution` (so `.to(device, dtype)` moves them
    all); each argument is a stage node of configs/model/lavie_cascade*.yaml (a model config plus `ckpt_path`)."""

    def __init__(self, base: Any, interpolation: Any, super_resolution: Any):
        super().__init__()
        nodes = {"base": base, "interpolation": interpolation, "super_resolution": super_resolution}
        self.validate_config(nodes)  # every stage before the first is built (a paper-size stage takes a while)
        self.checkpoints: dict[str, str | None] = {}
        for name, node in nodes.items():
            model_cfg, ckpt_path = stage_config(nodes, name)
            setattr(self, name, instantiate(model_cfg, _convert_="all"))
            self.checkpoints[name] = ckpt_path
        self.load_pretrained(**self.checkpoints)
        self.fps = self.interpolation.fps  # the frame rate the interpolation stage makes

    # ------------------------------------------------------------------ configuration and weights
    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Each stage in turn: a config of the right kind of model, its ckpt_path (a missing file is named with the
        stage and its config key), then the stage class's own checks; nothing is built."""
        for name, method in STAGES.items():
            model_cfg, ckpt_path = stage_config(cfg, name)
            target = get_class(model_cfg._target_)
            # a base stage is a text-to-video generator, not one of the later stages (whose classes have generate too)
            later = [m for m in ("interpolate", "upsample") if name == "base" and callable(getattr(target, m, None))]
            if later or not callable(getattr(target, method, None)):
                why = f"is a later stage (it has {later[0]}())" if later else f"has no {method}()"
                raise ValueError(f"model.{name}._target_ is {model_cfg._target_}, which {why}: the {name} stage must "
                                 f"be a LaVie {name.replace('_', '-')} model (configs/model/{STAGE_CONFIGS[name]})")
            if ckpt_path and not Path(ckpt_path).is_file():
                raise FileNotFoundError(f"{name} stage of the cascade: checkpoint not found: {ckpt_path} "
                                        f"(model.{name}.ckpt_path: a train.py checkpoint, RUN/checkpoints/last.ckpt)")
            validate = getattr(target, "validate_config", None)
            if validate is not None:
                try:
                    validate(model_cfg)
                except ValueError as error:
                    raise in_stage(error, name) from error
        key_frames = stage_config(cfg, "base")[0].sampler.num_frames
        if not isinstance(key_frames, int) or key_frames < 2:
            raise ValueError(f"model.base.sampler.num_frames must be at least 2 key frames for the interpolation "
                             f"stage, got {key_frames!r}")

    def load_pretrained(self, base: str | None = None, interpolation: str | None = None,
                        super_resolution: str | None = None) -> None:
        """train.py checkpoints of the stages (their official weights come through each stage's `pretrained`)."""
        from utils.generators import load_training_checkpoint  # entry-script plumbing; imported late (no cycle)

        for name, path in (("base", base), ("interpolation", interpolation), ("super_resolution", super_resolution)):
            if path:
                load_training_checkpoint(getattr(self, name), path)

    # ------------------------------------------------------------------ training
    NOT_TRAINED = ("the cascade does not train: train each stage on its own (e.g. experiment=tiny_lavie, "
                   "tiny_lavie_interpolation, tiny_lavie_vsr) and give their checkpoints to model=lavie_cascade as "
                   "model.base.ckpt_path, model.interpolation.ckpt_path and model.super_resolution.ckpt_path")

    def setup(self, stage: str) -> None:
        if stage == "fit":  # train.py stops here, before the first step
            raise ValueError(self.NOT_TRAINED)

    def configure_optimizers(self) -> Any:  # defined so that Lightning reaches setup() and its message
        raise ValueError(self.NOT_TRAINED)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        raise ValueError(self.NOT_TRAINED)

    # ------------------------------------------------------------------ sampling
    def key_frames(self, num_frames: int | None) -> int:
        """The base stage's frame count K for an output of `num_frames` = 4K - 3 (None: the base sampler's K)."""
        if num_frames is None:
            return self.base.sampler_settings()["num_frames"]
        return check_interpolated_frames(check_num_frames(num_frames))

    def _stage_overrides(self, overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
        unknown = set(overrides) - set(STAGES)
        if unknown:
            raise ValueError(f"the cascade takes sampler overrides per stage ({', '.join(STAGES)}: e.g. "
                             f"base={{'num_inference_steps': 25}}), got {sorted(unknown)}")
        stage = {name: dict(overrides.get(name) or {}) for name in STAGES}
        for name, settings in stage.items():
            # the cascade sets these itself: the frame counts follow from num_frames, each input is the stage before
            fixed = sorted(set(settings) & {"num_frames", "input_videos"})
            if fixed:
                raise ValueError(f"{name} override {fixed}: the cascade sets it (give num_frames = 4K - 3 to "
                                 "generate, or sample.py's num_frames)")
        return stage

    def sampler_settings(self, num_frames: int | None = None, **overrides: Any) -> dict[str, Any]:
        """Each stage's settings for a video of `num_frames` frames, with `overrides` (one dict per stage)."""
        stage = self._stage_overrides(overrides)
        keys = self.key_frames(num_frames)
        frames = FRAME_RATE_FACTOR * (keys - 1) + 1
        return {
            "num_frames": frames,
            "base": self.base.sampler_settings(**stage["base"], num_frames=keys),
            "interpolation": {**self.interpolation.sampler_settings(**stage["interpolation"], num_frames=frames),
                              "input_videos": "the base stage's videos"},
            "super_resolution": self.super_resolution.sampler_settings(**stage["super_resolution"]),
        }

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        num_frames: int | None = None,
        seed: int | list[int] = 0,
        progress: ProgressHook | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        """uint8 [B, 4K - 3, 4H, 4W, 3]: the last stage's videos (`generate_stages` keeps every stage's)."""
        return self.generate_stages(prompts, num_frames, seed, progress, **overrides)["super_resolution"]

    @torch.no_grad()
    def generate_stages(
        self,
        prompts: list[str],
        num_frames: int | None = None,
        seed: int | list[int] = 0,
        progress: ProgressHook | None = None,
        **overrides: Any,
    ) -> dict[str, torch.Tensor]:
        """Every stage's uint8 videos: base [B, K, H, W, 3], interpolation [B, 4K - 3, H', W', 3] (H' x W' its
        sampler's size) and super_resolution [B, 4K - 3, 4H', 4W', 3]. `progress` counts the denoising steps of all
        three stages together."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("generate needs a non-empty list of prompts")
        settings = self.sampler_settings(num_frames, **overrides)
        stage = self._stage_overrides(overrides)
        keys, frames = settings["base"]["num_frames"], settings["num_frames"]
        seeds = self.seeds_for(prompts, seed)
        windows = math.ceil(frames / settings["super_resolution"]["window_frames"])
        steps = [settings["base"]["num_inference_steps"], settings["interpolation"]["num_inference_steps"],
                 windows * settings["super_resolution"]["num_inference_steps"]]

        def stage_progress(index: int) -> ProgressHook | None:
            if progress is None:
                return None

            def report(done: int, total: int) -> None:
                steps[index] = total  # what the stage reports wins over the plan (a one-step sampler, say)
                progress(sum(steps[:index]) + done, sum(steps))
            return report

        base = self.base.generate(prompts, num_frames=keys, seed=seeds, progress=stage_progress(0), **stage["base"])
        interpolation = self.interpolation.generate(
            prompts, num_frames=frames, seed=[stage_seed(s, 1) for s in seeds], progress=stage_progress(1),
            **{**stage["interpolation"], "input_videos": list(base)})
        upsampled = self.super_resolution.upsample(
            interpolation, prompts, seed=[stage_seed(s, 2) for s in seeds], progress=stage_progress(2),
            **stage["super_resolution"])
        return {"base": base, "interpolation": interpolation.cpu(), "super_resolution": upsampled.cpu()}
