"""CLIP text conditioning: a transformers `CLIPTextModel` and its tokenizer.

Paper-size models read both from a Stable Diffusion folder (`text_encoder/`, `tokenizer/`). CPU-sized models have
no pretrained text encoder offline, so they build a small `CLIPTextModel` from a config and tokenise with CLIP's
BPE vocabulary as open_clip ships it (the same 49,408 tokens SD's tokenizer has).
"""
from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from modules.components.checkpoints import load_diffusers_weights

CONTEXT_LENGTH = 77


def write_clip_tokenizer_files(out_dir: str | Path) -> Path:
    """Write CLIP's tokenizer in the SD/transformers folder layout (vocab.json, merges.txt, configs), built from
    open_clip's bundled BPE merges, so tokenizers exist without any download."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # the CLIP vocabulary's merge list
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH, "do_lower_case": True, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir


@functools.lru_cache(maxsize=1)
def bundled_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer from open_clip's bundled vocabulary, written once per process to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="clip_tokenizer_") as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp))


class ClipTextEncoder(nn.Module):
    """Prompts -> per-token embeddings [B, 77, D] (the last hidden state, as Stable Diffusion conditions on).

    Build with `ClipTextEncoder(config={...})` (random init, bundled tokenizer) or `ClipTextEncoder.from_sd_folder`.
    """

    def __init__(
        self,
        config: dict[str, Any] | CLIPTextConfig,
        tokenizer: CLIPTokenizer | None = None,
        max_length: int = CONTEXT_LENGTH,
    ):
        super().__init__()
        if not isinstance(config, CLIPTextConfig):
            config = CLIPTextConfig(**config)
        self.model = CLIPTextModel(config)
        self.tokenizer = tokenizer or bundled_clip_tokenizer()
        # Stable Diffusion conditions on all 77 positions. A small encoder trained from scratch learns faster with
        # fewer: with 77, the padding positions take most of the cross-attention at first, and only the attribute
        # that dominates the pixels (the background) gets encoded there early on.
        if not 1 < max_length <= config.max_position_embeddings:
            raise ValueError(f"max_length must be in 2..{config.max_position_embeddings}, got {max_length}")
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def load_from_sd_folder(self, sd_path: str | Path) -> None:
        """Replace weights and tokenizer with those of an SD folder's `text_encoder/` and `tokenizer/`."""
        sd_path = Path(sd_path)
        tokenizer_dir = sd_path / "tokenizer"
        if not (tokenizer_dir / "vocab.json").is_file():
            raise FileNotFoundError(f"no CLIP tokenizer at {tokenizer_dir} (expected vocab.json and merges.txt there)")
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        load_diffusers_weights(self.model, sd_path / "text_encoder", strict=True)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.model.device)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.model(self.token_ids(prompts)).last_hidden_state  # (B, max_length, D)

