"""LoRA (Hu et al. 2022) on the spatial layers of a `VideoUNet`, through peft as diffusers does it.

LaVie personalises its base model by LoRA on the spatial layers, trained on a few images, with the temporal modules
frozen (paper, section 5.6). "Spatial layers" here are the Stable Diffusion UNet's own attention projections in every
spatio-temporal block, the targets of diffusers' SD LoRA recipe (`train_text_to_image_lora.py`: to_q, to_k, to_v,
to_out.0): self-attention `attn1.*` and cross-attention `attn2.*`. The temporal attention has projections of the same
names (`attn_temp.to_q`, ...), so the targets are named per block (`attn1.to_q`) and matched only under
`SpatioTemporalBlock`s, never by a bare suffix; a target inside a temporal layer is refused.

The adapter is injected with diffusers' `add_adapter` (peft's `inject_adapter_in_model`; B starts at zero, so an
untrained adapter leaves the UNet's output unchanged). A LoRA file is one safetensors file with the adapter weights
alone, keyed as `peft.get_peft_model_state_dict` gives them (`...attn1.to_q.lora_A.weight`), and the peft LoraConfig
as JSON under the metadata key diffusers' `save_lora_adapter` uses, so the file says its own rank, alpha and targets.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from modules.components.checkpoints import key_mismatch_error
from modules.components.video_unet import SpatioTemporalBlock, VideoUNet

#: diffusers' SD LoRA targets (to_q, to_k, to_v, to_out.0) in both spatial attentions of each block
SPATIAL_ATTENTION_TARGETS = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2")
                                  for proj in ("to_q", "to_k", "to_v", "to_out.0"))
#: safetensors metadata key of the adapter's LoraConfig (diffusers' LORA_ADAPTER_METADATA_KEY)
METADATA_KEY = "lora_adapter_metadata"
ADAPTER_NAME = "default"


class LoRAFileError(ValueError):
    """A LoRA file that is missing, unreadable, or does not fit the model; the message names the file."""


def check_lora_settings(rank: Any, alpha: Any, targets: Any, dropout: Any = 0.0) -> None:
    """Refuse bad config values before a model is built, naming the key."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"model.lora.rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"model.lora.alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"model.lora.dropout must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"model.lora.targets must be a non-empty list of layer names inside a transformer block "
                         f"(e.g. {list(SPATIAL_ATTENTION_TARGETS)}), got {targets!r}")
    temporal = [t for t in targets if VideoUNet.is_temporal_key(t)]
    if temporal:
        raise ValueError(f"model.lora.targets {temporal} are temporal layers; LaVie's LoRA trains spatial layers only "
                         "and keeps the temporal ones frozen")


def spatial_target_pattern(targets: Sequence[str]) -> str:
    """The peft `target_modules` regex (peft full-matches module names) for `targets` inside any transformer block."""
    names = "|".join(re.escape(t) for t in targets)
    return rf".*\.transformer_blocks\.\d+\.({names})"


def add_spatial_lora(unet: VideoUNet, rank: int, alpha: float, targets: Sequence[str] = SPATIAL_ATTENTION_TARGETS,
                     dropout: float = 0.0) -> LoraConfig:
    """Inject a LoRA adapter (B = 0) into `targets` of every spatio-temporal block of `unet`; returns its config."""
    check_lora_settings(rank, alpha, list(targets), dropout)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True,
                        target_modules=spatial_target_pattern(targets))
    _inject(unet, config, targets)
    return config


def _inject(unet: VideoUNet, config: LoraConfig, targets: Iterable[str] | None = None) -> None:
    if getattr(unet, "peft_config", None):
        raise ValueError("this UNet already holds a LoRA adapter; build a fresh model to load another")
    pattern = config.target_modules if isinstance(config.target_modules, str) else None
    if pattern is None:
        raise LoRAFileError(f"LoRA target_modules must be a regex, got {config.target_modules!r}")
    blocks = [name for name, module in unet.named_modules() if isinstance(module, SpatioTemporalBlock)]
    matched = [name for name, _ in unet.named_modules() if re.fullmatch(pattern, name)]
    outside = [n for n in matched if VideoUNet.is_temporal_key(n + ".") or not any(n.startswith(b + ".") for b in blocks)]
    if outside:
        raise ValueError(f"LoRA targets {outside[:4]} are not spatial layers of a spatio-temporal block")
    for target in targets or ():
        if not any(name.endswith("." + target) for name in matched):
            raise ValueError(f"model.lora.targets: no layer {target!r} in this UNet's transformer blocks")
    if not matched:
        raise ValueError(f"LoRA targets match no layer of this UNet (pattern {pattern!r})")
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)  # diffusers: peft.inject_adapter_in_model + set_adapter


def lora_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapter's parameters (peft names them `lora_A` / `lora_B`), with their names in `module`."""
    return [(n, p) for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_state_dict(unet: VideoUNet) -> dict[str, torch.Tensor]:
    """The adapter's weights alone, keyed as peft saves them (no adapter name)."""
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}


def lora_config_dict(unet: VideoUNet) -> dict[str, Any]:
    """The adapter's LoraConfig as plain JSON values (no peft enums: a checkpoint holding it loads weights_only)."""
    config = unet.peft_config[ADAPTER_NAME].to_dict()
    return json.loads(json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}))


def save_lora(unet: VideoUNet, path: str | Path) -> Path:
    """Write the adapter of `unet` to `path` (.safetensors): its weights and its LoraConfig, nothing of the base."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a LoRA file is written as .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(unet), str(path),
              metadata={"format": "pt", METADATA_KEY: json.dumps(lora_config_dict(unet), sort_keys=True)})
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter weights, LoraConfig dict) from a LoRA file written by `save_lora`, or from a LoRA run's Lightning
    checkpoint (`LaVieLoRA` stores both there). Raises LoRAFileError naming the file when it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise LoRAFileError(f"LoRA file not found: {path} (model.lora.path)")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                state = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for truncated or foreign files
            raise LoRAFileError(f"{path} is not a readable safetensors LoRA file ({error})") from error
        if METADATA_KEY not in metadata:
            raise LoRAFileError(f"{path} has no '{METADATA_KEY}' metadata (rank, alpha, targets): it was not written "
                                "by save_lora / diffusers' save_lora_adapter")
        try:
            config = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as error:
            raise LoRAFileError(f"{path}: unreadable '{METADATA_KEY}' metadata ({error})") from error
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise LoRAFileError(f"{path} is not a readable LoRA file or checkpoint ({error})") from error
        if not isinstance(checkpoint, dict) or "lora_config" not in checkpoint or "state_dict" not in checkpoint:
            raise LoRAFileError(f"{path} is not a LoRA file: expected a .safetensors written by save_lora, or a "
                                "checkpoint of a LoRA run (train.py with a LaVieLoRA model)")
        config, prefix = checkpoint["lora_config"], "unet."
        state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        state = {re.sub(rf"\.{ADAPTER_NAME}\.", ".", k, count=1): v for k, v in state.items()}
    if not state:
        raise LoRAFileError(f"{path} holds no adapter weights")
    return state, config


def load_lora(unet: VideoUNet, path: str | Path) -> LoraConfig:
    """Inject the adapter described by the file at `path` into `unet` and load its weights, strictly: every key the
    adapter has must be in the file with its shape, and the file must hold nothing else."""
    state, config_dict = read_lora(path)
    bad = [k for k in state if ".lora_A." not in k and ".lora_B." not in k]
    if bad:
        raise LoRAFileError(f"{path} holds weights that are not LoRA adapter weights: {bad[:4]}"
                            f"{' ...' if len(bad) > 4 else ''}")
    try:
        config = LoraConfig(**{k: v for k, v in config_dict.items() if k != "peft_type"})
    except (TypeError, ValueError) as error:
        raise LoRAFileError(f"{path}: its LoRA config cannot be read by peft ({error})") from error
    _inject(unet, config)
    expected = lora_state_dict(unet)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                   for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        unet.delete_adapters(ADAPTER_NAME)
        raise LoRAFileError(str(key_mismatch_error(f"LoRA file {path} does not fit this UNet:", missing, unexpected,
                                                   wrong_shape)))
    set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    return config
