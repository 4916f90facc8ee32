"""LaVie personalised by LoRA on its spatial layers (paper, section 5.6 "Personalized T2V generation").

A trained LaVie (the base weights) with a LoRA adapter on the spatial attention projections of every spatio-temporal
block (modules/components/lora.py); everything else is frozen: temporal layers, the rest of the UNet, the text
encoder and the autoencoder. Trained on a few captioned images (T=1 items: they skip temporal attention), so the
adapter learns a subject and the base's temporal layers still make it move.

    python train.py experiment=tiny_lavie_lora                                   # CPU recipe: a LoRA on a few images
    python sample.py model=lavie_lora_tiny model.lora.path=RUN/lora.safetensors prompts='["..."]'

Weights: `base_checkpoint` is a train.py checkpoint of LaVie (all of its weights) or the official `lavie_base.pt`
(UNet; the rest from `pretrained.sd_path`); `lora.path` is a LoRA file (`save_lora`'s .safetensors, or a LoRA run's
checkpoint) to load instead of starting a new adapter. A LoRA run's checkpoints hold the adapter and its config, not
the base weights (`on_save_checkpoint`), and the run writes `lora.safetensors` beside `checkpoints/` when training
ends.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from modules.components.checkpoints import key_mismatch_error, load_state_dict_checked, read_state_dict
from modules.components.lora import (
    SPATIAL_ATTENTION_TARGETS,
    add_spatial_lora,
    check_lora_settings,
    load_lora,
    lora_config_dict,
    lora_parameters,
    save_lora,
)
from modules.lavie import LaVie, PretrainedConfigError

LORA_DEFAULTS = {"rank": 4, "alpha": 4, "dropout": 0.0, "targets": list(SPATIAL_ATTENTION_TARGETS), "path": None,
                 "save_on_train_end": True}


class LaVieLoRA(LaVie):
    """`LaVie` plus a spatial LoRA. `lora`: rank, alpha, dropout, targets (layer names inside a transformer block),
    path (a trained LoRA to load; null: a new adapter, B = 0), save_on_train_end (write RUN/lora.safetensors)."""

    def __init__(self, *args: Any, lora: dict[str, Any] | None = None, base_checkpoint: str | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lora = self.lora_settings(lora)
        self.base_checkpoint = base_checkpoint
        if base_checkpoint:
            self.load_base(base_checkpoint)
        self.requires_grad_(False)  # base weights, temporal layers, text encoder, autoencoder: all frozen
        if self.lora["path"]:
            load_lora(self.unet, self.lora["path"])
        else:
            add_spatial_lora(self.unet, self.lora["rank"], self.lora["alpha"], self.lora["targets"],
                             self.lora["dropout"])
        for _, parameter in lora_parameters(self):
            parameter.requires_grad_(True)
        # A LoRA run's checkpoints hold the adapter alone (on_save_checkpoint); resuming one loads it non-strictly and
        # on_load_checkpoint checks its keys instead.
        self.strict_loading = False

    # ------------------------------------------------------------------ config and weights
    @staticmethod
    def lora_settings(lora: Any) -> dict[str, Any]:
        unknown = set(lora or {}) - set(LORA_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown model.lora setting(s) {sorted(unknown)}; known: {sorted(LORA_DEFAULTS)}")
        settings = {**LORA_DEFAULTS, **dict(lora or {})}
        settings["targets"] = list(settings["targets"]) if settings["targets"] is not None else None
        check_lora_settings(settings["rank"], settings["alpha"], settings["targets"], settings["dropout"])
        return settings

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Before building: LoRA values, and base weights to adapt (a LoRA on a random UNet means nothing)."""
        super().validate_config(cfg)
        lora = cls.lora_settings(cfg.get("lora"))
        if lora["path"] and not Path(lora["path"]).is_file():
            raise FileNotFoundError(f"LoRA file not found: {lora['path']} (model.lora.path)")
        base = cfg.get("base_checkpoint")
        if base and not Path(base).is_file():
            raise PretrainedConfigError(f"base checkpoint not found: {base} (model.base_checkpoint)")
        if not base and not (cfg.get("pretrained") or {}).get("checkpoint"):
            raise PretrainedConfigError(
                "a LoRA adapts a trained LaVie: set model.base_checkpoint=RUN/checkpoints/last.ckpt (a train.py "
                "checkpoint of the base model, e.g. make demo's logs/demo/train/checkpoints/last.ckpt) or "
                "model.pretrained.checkpoint=lavie_base.pt with model.pretrained.sd_path=DIR"
            )

    def load_base(self, path: str | Path) -> None:
        """The base model's weights: a train.py checkpoint of LaVie (every weight, strictly) or the official
        lavie_base.pt (the UNet; `LaVie.load_pretrained`). A LoRA run's checkpoint is refused by name."""
        checkpoint = read_state_dict(path)
        if "lora_config" in checkpoint:
            raise PretrainedConfigError(f"{path} is a LoRA run's checkpoint (adapter only), not a base model: give it "
                                        "as model.lora.path and the base model's checkpoint as model.base_checkpoint")
        if "state_dict" not in checkpoint:
            self.load_pretrained(checkpoint=path)
            return
        load_state_dict_checked(self, checkpoint["state_dict"], path)

    # ------------------------------------------------------------------ checkpoints hold the adapter alone
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: parameter.detach() for name, parameter in lora_parameters(self)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        adapter = set(self.adapter_state_dict())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in adapter}
        checkpoint["lora_config"] = lora_config_dict(self.unet)
        checkpoint["lora_base_checkpoint"] = str(self.base_checkpoint) if self.base_checkpoint else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming a LoRA run: its checkpoint must hold exactly this adapter (Lightning then loads it non-strictly,
        the base weights staying those of base_checkpoint)."""
        expected = {k: v.shape for k, v in self.adapter_state_dict().items()}
        state = checkpoint.get("state_dict", {})
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k])}"
                 for k, v in state.items() if k in expected and v.shape != expected[k]]
        if missing or unexpected or wrong:
            raise key_mismatch_error("the checkpoint to resume does not hold this model's LoRA adapter:",
                                     missing, unexpected, wrong)

    def save_lora(self, path: str | Path) -> Path:
        return save_lora(self.unet, path)

    @rank_zero_only
    def on_train_end(self) -> None:
        if self.lora["save_on_train_end"]:
            path = self.save_lora(Path(self.trainer.default_root_dir) / "lora.safetensors")
            print(f"LoRA adapter written to {path}")

    # ------------------------------------------------------------------ what is trained
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
