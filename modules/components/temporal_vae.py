"""VidRD's temporal VAE decoder: Stable Diffusion 2.1's `AutoencoderKL` with a Temp-Conv after each ResNet of each
decoder up block (paper section 3.2, "we reform and fine-tune the decoder of autoencoder by injecting temporal
layers"); the encoder and the decoder's mid block stay 2D.

The state-dict layout is the official one (ReuseAndDiffuse `TemporalAutoencoderKL`, `$FIXTURES_DIR/vidrd/
keys_vae.json`): the diffusers AutoencoderKL keys plus `decoder.up_blocks.{k}.temp_convs.{n}.convs.{0,4,8}`
(GroupNorm) and `.convs.{3,7,11}` (Conv3d). Without the `temp_` keys it is diffusers' AutoencoderKL, so SD VAE
weights load unchanged; files written by diffusers <= 0.14 (the official ones, and SD folders of that time) name
the mid-block attention `query/key/value/proj_attn`, which `load_official_state_dict` renames as diffusers does.

Decoding: `temporal_decoding=True` decodes a video clip by clip with the clip's frame count, so the Temp-Convs mix
the clip's frames; `False` decodes each frame alone, where every Temp-Conv returns its input: what the official
pipeline does (`decode_latents` calls `vae.decode` without `num_frames`), equal to the plain 2D decoder.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D
from einops import rearrange
from torch import nn

from modules.components.autoencoders import KLAutoencoder
from modules.components.checkpoints import find_weight_file, load_state_dict_checked, read_state_dict
from modules.components.temporal_conv import TemporalConvLayer

# diffusers <= 0.14 names of the VAE mid-block attention projections -> today's (diffusers renames them on load too)
_DEPRECATED_ATTENTION = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class TemporalUpDecoderBlock(nn.Module):
    """A diffusers `UpDecoderBlock2D` (its ResNets and upsampler, same keys) with a Temp-Conv after each ResNet
    (`TemporalConvLayer`, shared with the UNet; 3 layers here, GroupNorm groups as the ResNets': SD's 32, the
    official value, and fewer for tiny configs).

    Input and output are frames (b * F, C, H, W), row = video * F + frame. `num_frames=1` (what diffusers'
    `Decoder` passes: nothing) skips the Temp-Convs, so the block is then exactly the 2D block."""

    def __init__(self, block: UpDecoderBlock2D, temporal_layers: int = 3, dropout: float = 0.1):
        super().__init__()
        self.resnets = block.resnets
        self.temp_convs = nn.ModuleList(
            TemporalConvLayer(resnet.out_channels, num_layers=temporal_layers, groups=resnet.norm2.num_groups,
                              dropout=dropout)
            for resnet in block.resnets)
        self.upsamplers = block.upsamplers

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                num_frames: int = 1) -> torch.Tensor:
        if hidden_states.shape[0] % num_frames:
            raise ValueError(f"{hidden_states.shape[0]} frames are not whole videos of num_frames={num_frames}")
        for resnet, temp_conv in zip(self.resnets, self.temp_convs):
            hidden_states = resnet(hidden_states, temb=temb)  # per frame
            if num_frames > 1:
                video = rearrange(hidden_states, "(b f) c h w -> b c f h w", f=num_frames)
                hidden_states = rearrange(temp_conv(video), "b c f h w -> (b f) c h w")
        for upsampler in self.upsamplers or ():
            hidden_states = upsampler(hidden_states)
        return hidden_states


def inflate_decoder(vae: AutoencoderKL, temporal_layers: int = 3, dropout: float = 0.1) -> AutoencoderKL:
    """Give every decoder up block of `vae` its Temp-Convs (in place), the official layout; returns `vae`."""
    vae.decoder.up_blocks = nn.ModuleList(
        TemporalUpDecoderBlock(block, temporal_layers, dropout) for block in vae.decoder.up_blocks)
    return vae


def decode_frames(vae: AutoencoderKL, latents: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
    """Decode unscaled latents (b * F, c, h, w), row = video * F + frame, into frames (b * F, 3, H, W), the
    Temp-Convs mixing each video's `num_frames` frames. Diffusers' `Decoder.forward` with `num_frames` passed to the
    up blocks (with num_frames=1 it equals `vae.decode(latents).sample`)."""
    if vae.post_quant_conv is not None:
        latents = vae.post_quant_conv(latents)
    decoder = vae.decoder
    hidden = decoder.mid_block(decoder.conv_in(latents), None)
    for block in decoder.up_blocks:
        hidden = block(hidden, None, num_frames=num_frames)
    return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(hidden)))


def rename_deprecated_attention(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VAE state dict with diffusers <= 0.14 mid-block attention names (`query`, `key`, `value`, `proj_attn`) under
    today's (`to_q`, `to_k`, `to_v`, `to_out.0`); other keys unchanged."""
    renamed = {}
    for key, value in state_dict.items():
        match = _DEPRECATED_ATTENTION.match(key)
        if match:
            key = f"{match.group(1)}.{_ATTENTION_NAMES[match.group(2)]}.{key[match.end():]}"
        renamed[key] = value
    return renamed


def is_temporal_key(key: str) -> bool:
    return ".temp_convs." in key


class TemporalKLAutoencoder(KLAutoencoder):
    """VidRD's VAE as a frame autoencoder: videos [B, T, C, H, W] in [-1, 1] <-> latents [B, c, T, h, w] (scaled by
    `scaling_factor`); the encoder is SD's, per frame.

    `temporal_decoding=True` decodes `clip_frames` frames at a time (the sampler's clip; a shorter last chunk with
    its own count), so each Temp-Conv sees one clip; `False` decodes frame by frame as the official pipeline does
    (`decode_chunk_frames` at a time), bypassing the Temp-Convs.
    """

    def __init__(self, config: dict[str, Any], scaling_factor: float = 0.18215, decode_chunk_frames: int = 8,
                 temporal_layers: int = 3, temporal_dropout: float = 0.1, temporal_decoding: bool = True,
                 clip_frames: int = 8):
        super().__init__(config, scaling_factor=scaling_factor, decode_chunk_frames=decode_chunk_frames)
        if clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {clip_frames}")
        inflate_decoder(self.vae, temporal_layers, temporal_dropout)
        self.temporal_decoding = temporal_decoding
        self.clip_frames = clip_frames

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, temporal: bool | None = None) -> torch.Tensor:
        """Frames [B, T, 3, H, W] of latents [B, c, T, h, w]; `temporal` overrides `temporal_decoding`."""
        if not (self.temporal_decoding if temporal is None else temporal):
            return super().decode(latents)
        clips = []
        for clip in latents.split(self.clip_frames, dim=2):  # all videos' clip k at once
            frames = rearrange(clip, "b c f h w -> (b f) c h w") / self.scaling_factor
            decoded = decode_frames(self.vae, frames, num_frames=clip.shape[2])
            clips.append(rearrange(decoded, "(b f) c h w -> b f c h w", b=latents.shape[0]))
        return torch.cat(clips, dim=1)

    def load_official_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str | Path,
                                 temporal: bool = True) -> None:
        """Load a VAE state dict (official VidRD layout, or SD's without `temp_` keys when `temporal` is False,
        the Temp-Convs then keeping their identity start) strictly; a mismatch raises CheckpointKeyError naming
        `source` and every missing, unexpected or misshapen key."""
        allowed = () if temporal else [key for key in self.vae.state_dict() if is_temporal_key(key)]
        load_state_dict_checked(self.vae, rename_deprecated_attention(state_dict), source, allowed_missing=allowed)

    def load_from_sd_folder(self, sd_path: str | Path) -> None:
        """SD 2.1's VAE from `<sd_path>/vae` (2D weights; the Temp-Convs start as identities)."""
        path = find_weight_file(Path(sd_path) / "vae")
        self.load_official_state_dict(read_state_dict(path), path, temporal=False)

    def load_checkpoint(self, path: str | Path) -> None:
        """The fine-tuned temporal VAE (official layout, every `temp_` key required): a VAE state dict, or a
        Lightning checkpoint of the `model=vidrd_vae` stage (its `autoencoder.vae.*` weights)."""
        self.load_official_state_dict(vae_state_dict(read_state_dict(path)), path, temporal=True)


#: where a `model=vidrd_vae` training checkpoint (modules/vidrd_vae.py) keeps the VAE's weights
STAGE_PREFIX = "autoencoder.vae."


def vae_state_dict(state: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """The VAE weights of a loaded file: a Lightning checkpoint of the vidrd_vae stage (its `state_dict`'s
    `autoencoder.vae.*` entries, the EMA weights when training kept an EMA) or a plain VAE state dict, as is."""
    inner = state.get("state_dict", state)
    if any(key.startswith(STAGE_PREFIX) for key in inner):
        return {key[len(STAGE_PREFIX):]: value for key, value in inner.items() if key.startswith(STAGE_PREFIX)}
    return state
