"""A super-resolution stage (LaVie's VSR, `modules.lavie_vsr.LaVieVSR`) built from a config or a checkpoint, for
sample.py's `super_resolution=` post-process and eval/vsr_report.py.

`spec` is one of:
- a train.py checkpoint of a VSR run (`RUN/checkpoints/last.ckpt`): the model is the run's (`RUN/config.yaml`, which
  train.py writes), with the checkpoint's weights;
- a yaml file: a model config (with `_target_`), or a run's config.yaml (its `model:` node);
- the name of a model config in configs/model/ (e.g. `lavie_vsr`; official weights through its `pretrained` paths).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from modules.base import validate_model_config
from utils.generators import DTYPES, load_training_checkpoint, pick_device

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


def super_resolution_config(spec: str) -> tuple[DictConfig, Path | None]:
    """(model config, train.py checkpoint or None) that `spec` names."""
    path = Path(spec)
    if path.suffix in CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"super_resolution checkpoint not found: {path}")
        run_config = path.resolve().parents[1] / "config.yaml"
        if not run_config.is_file():
            raise FileNotFoundError(f"{path} has no run config at {run_config} (train.py writes it beside "
                                    "checkpoints/); give super_resolution a model config instead")
        return OmegaConf.load(run_config).model, path
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"super_resolution config not found: {path}")
        cfg = OmegaConf.load(path)
    elif (MODEL_CONFIGS / f"{spec}.yaml").is_file():
        cfg = OmegaConf.load(MODEL_CONFIGS / f"{spec}.yaml")
    else:
        raise FileNotFoundError(f"super_resolution={spec!r} is neither a checkpoint, a yaml file nor a config in "
                                f"{MODEL_CONFIGS}")
    if "_target_" not in cfg and "model" in cfg:  # a run's config.yaml
        cfg = cfg.model
    return cfg, None


def build_super_resolution(spec: str, device: str = "auto", precision: str = "fp32") -> Any:
    """The super-resolution model `spec` names, on `device` in `precision`, in eval mode."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    cfg, checkpoint = super_resolution_config(spec)
    target = get_class(cfg._target_)
    if not callable(getattr(target, "upsample", None)):
        raise ValueError(f"super_resolution={spec!r} is a {cfg._target_}, not a super-resolution stage (a model with "
                         "upsample(videos, prompts), e.g. model lavie_vsr)")
    validate_model_config(cfg)
    model = instantiate(cfg, _convert_="all")
    if checkpoint is not None:
        load_training_checkpoint(model, checkpoint)
    return model.to(device=pick_device(device), dtype=DTYPES[precision]).eval()
