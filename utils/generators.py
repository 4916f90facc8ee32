"""Build a VideoGenerator from a config and a train.py checkpoint: shared by sample.py and the eval runners."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from callbacks.finite_guard import first_non_finite
from modules.base import VideoGenerator, validate_model_config
from modules.components.checkpoints import load_state_dict_checked, read_state_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_training_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Weights from a train.py checkpoint (a Lightning .ckpt whose state_dict matches the configured model)."""
    checkpoint = read_state_dict(path)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint from train.py (no 'state_dict' entry); official "
                         "weights are loaded with the model's pretrained options instead")
    bad = first_non_finite(checkpoint["state_dict"].items())
    if bad is not None:
        raise ValueError(f"{path} holds non-finite weights (e.g. {bad}): it was written by a run that diverged; "
                         "sample from an earlier checkpoint of that run")
    load_state_dict_checked(model, checkpoint["state_dict"], path)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_config_for(cfg: DictConfig) -> DictConfig:
    """cfg.model, with the keys the model's class lists in `checkpoint_supersedes` set to null when a train.py
    checkpoint (cfg.ckpt_path) will provide those weights anyway."""
    target = get_class(cfg.model._target_)
    keys = getattr(target, "checkpoint_supersedes", ()) if cfg.get("ckpt_path") else ()
    if not keys:
        return cfg.model
    model = cfg.model.copy()
    for key in keys:
        model[key] = None
    return model


def check_generator_options(cfg: DictConfig) -> None:
    """Everything about the generator that can be checked before building it (fast failure on bad input)."""
    if cfg.precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {cfg.precision!r}")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path not found: {cfg.ckpt_path}")
    validate_model_config(model_config_for(cfg), require_generator=True)  # before a paper-size model is built


def build_generator(cfg: DictConfig) -> VideoGenerator:
    """cfg.model (+ cfg.ckpt_path when set) on cfg.device in cfg.precision, in eval mode."""
    check_generator_options(cfg)
    model: VideoGenerator = instantiate(model_config_for(cfg), _convert_="all")
    if cfg.get("ckpt_path"):
        load_training_checkpoint(model, cfg.ckpt_path)
    return model.to(device=pick_device(cfg.device), dtype=DTYPES[cfg.precision]).eval()
