"""Tiny random-weight Stable Diffusion 1.4 folders and LaVie checkpoints in the official on-disk layouts.

No pretrained weights can be downloaded in tests, so these helpers write what `CompVis/stable-diffusion-v1-4`
and `lavie_base.pt` look like, with small random weights saved exactly as diffusers / transformers save them:

    <root>/unet/          config.json + diffusion_pytorch_model.safetensors   (UNet2DConditionModel)
    <root>/vae/           config.json + diffusion_pytorch_model.safetensors   (AutoencoderKL)
    <root>/text_encoder/  config.json + model.safetensors                     (transformers CLIPTextModel)
    <root>/tokenizer/     vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
    <root>/scheduler/     scheduler_config.json                              (PNDMScheduler, SD 1.4's values)
    <root>/model_index.json

    lavie_base.pt         torch.save({"ema": unet_state_dict})
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# SD block types at a tiny size: 3 levels (SD has 4), cross-attention at the two upper ones and in the mid block.
# attention_head_dim is SD's (misnamed) number of heads: 2 heads of 16 and 32 channels, so LaVie's temporal
# attention rotates 16 and 32 (all) channels of each head.
TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
}

# Three levels: a downsampling factor of 4 (SD's is 8).
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
}

# CLIP's full vocabulary (the tokenizer is the real one), a tiny transformer.
TINY_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}

# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json
SD14_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Perturb every floating-point parameter by seeded Gaussian noise, so weights are reproducible and differ
    from any fresh initialisation. The noise has the spread of the parameter's own initialisation (activations
    keep their scale); constant parameters (norm weights and biases, zero-initialised layers) get `scale`."""
    generator = torch.Generator().manual_seed(seed)
    for _, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        if not param.is_floating_point():
            continue
        spread = param.float().std().item() if param.numel() > 1 else 0.0
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * (spread if spread > 0 else scale)
        param.add_(noise.to(param.dtype))
    return module


def write_tiny_sd_folder(root: str | Path, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Write a Stable-Diffusion-1.4-layout folder with random tiny weights; return the component configs
    ({"unet", "vae", "text_encoder", "scheduler"}) a matching model is built from."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from modules.components.text_encoder import write_clip_tokenizer_files

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    configs = {
        "unet": dict(TINY_UNET),
        "vae": dict(TINY_VAE),
        "text_encoder": dict(TINY_TEXT_ENCODER),
        "scheduler": dict(SD14_SCHEDULER),
    }
    torch.manual_seed(seed)
    unet = randomize_(UNet2DConditionModel(**configs["unet"]), seed + 1)
    unet.save_pretrained(root / "unet")
    vae = randomize_(AutoencoderKL(**configs["vae"]), seed + 2)
    vae.save_pretrained(root / "vae")
    text_encoder = randomize_(CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])), seed + 3)
    text_encoder.save_pretrained(root / "text_encoder")
    write_clip_tokenizer_files(root / "tokenizer")
    PNDMScheduler.from_config(configs["scheduler"]).save_pretrained(root / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return configs


def write_lavie_checkpoint(path: str | Path, unet_state_dict: dict[str, torch.Tensor]) -> Path:
    """The official `lavie_base.pt` layout: the UNet's (EMA) state dict under "ema"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ema": {k: v.detach().clone() for k, v in unet_state_dict.items()}}, path)
    return path


def tiny_lavie_base_config(
    configs: dict[str, dict[str, Any]],
    sd_path: str | Path | None = None,
    checkpoint: str | Path | None = None,
    **overrides: Any,
) -> DictConfig:
    """configs/model/lavie_base.yaml with its unet, text encoder and autoencoder configs replaced by the tiny
    ones `write_tiny_sd_folder` returned, a CPU-sized sampler, and the given pretrained paths."""
    cfg = OmegaConf.load(CONFIGS / "model" / "lavie_base.yaml")
    cfg.unet = OmegaConf.create({"_target_": cfg.unet._target_, "_convert_": "all", **configs["unet"]})
    cfg.text_encoder.config = OmegaConf.create(configs["text_encoder"])
    cfg.autoencoder.config = OmegaConf.create(configs["vae"])
    cfg.sampler.num_inference_steps = 2
    cfg.sampler.num_frames = 3
    cfg.sampler.height = cfg.sampler.width = 32
    cfg.pretrained.sd_path = None if sd_path is None else str(sd_path)
    cfg.pretrained.checkpoint = None if checkpoint is None else str(checkpoint)
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))
