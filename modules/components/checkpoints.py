"""Loading weights from local files with errors that say exactly what is wrong."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

# Weight file names used by diffusers and transformers folders, in the order we prefer them.
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
# Keys older checkpoints carry that current library versions no longer store (non-persistent buffers).
BENIGN_UNEXPECTED = ("text_model.embeddings.position_ids",)


class CheckpointKeyError(RuntimeError):
    """A state dict whose keys do not match the model; the message lists the missing and unexpected keys."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch pickle (.bin, .pt, .ckpt), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    # weights_only: a checkpoint is data; refuse pickled code
    return torch.load(path, map_location="cpu", weights_only=True)


def find_weight_file(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"weights folder not found: {folder}")
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no weight file in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str | Path,
    allowed_missing: Iterable[str] = (),
) -> None:
    """Load strictly, except for `allowed_missing` keys (e.g. new temporal layers when loading a 2D UNet).

    Shape mismatches and any other missing or unexpected key raise CheckpointKeyError naming `source`.
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in BENIGN_UNEXPECTED}
    expected = module.state_dict()
    allowed = set(allowed_missing)
    missing = set(expected) - set(state_dict) - allowed
    unexpected = set(state_dict) - set(expected)
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        raise key_mismatch_error(f"checkpoint {source} does not match {type(module).__name__}:",
                                 missing, unexpected, wrong_shape)
    module.load_state_dict(state_dict, strict=False)


def key_mismatch_error(header: str, missing: list[str], unexpected: list[str], wrong_shape: list[str]
                       ) -> CheckpointKeyError:
    """The one error every strict loader raises: `header`, then the missing, unexpected and misshapen keys."""
    parts = [header]
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong_shape:
        parts.append(f"shape mismatches: {_listing(wrong_shape)}")
    return CheckpointKeyError("\n  ".join(parts))


def load_diffusers_weights(module: nn.Module, folder: str | Path, strict: bool = True,
                           allowed_missing: Iterable[str] = ()) -> None:
    """Load the weight file of a diffusers/transformers model folder (e.g. `sd/unet`) into `module`."""
    path = find_weight_file(folder)
    load_state_dict_checked(module, read_state_dict(path), path, allowed_missing=() if strict else allowed_missing)
