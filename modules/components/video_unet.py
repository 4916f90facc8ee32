"""A Stable Diffusion UNet inflated to video (LaVie base, section 4.1).

Every 2D layer runs per frame (frames folded into the batch), and each transformer block becomes a
spatio-temporal block: spatial self-attention, cross-attention, temporal self-attention, feed-forward. The class
is diffusers' `UNet2DConditionModel` with its transformer blocks swapped, so parameter names are exactly those of
the SD UNet (which loads strictly) plus, per block, the official LaVie temporal keys `norm_temp.*`, `attn_temp.*`.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from einops import rearrange
from torch import nn

from modules.components.checkpoints import load_diffusers_weights, load_state_dict_checked
from modules.components.temporal_attention import TemporalAttention

TEMPORAL_KEY_MARKERS = (".attn_temp.", ".norm_temp.")


class SpatioTemporalBlock(nn.Module):
    """LaVie's ST-Transformer block. Adopts the spatial sub-modules of a diffusers `BasicTransformerBlock`
    (same names, same weights) and adds `norm_temp` + `attn_temp` between cross-attention and feed-forward.

    Hidden states arrive as ((B F), HW, C); the number of frames comes through `cross_attention_kwargs`, which
    diffusers hands to every transformer block: `video_frames` frames take part in temporal attention, the
    frames after them (images of joint image-video training) pass through it unchanged.
    """

    def __init__(self, spatial: BasicTransformerBlock, rotary_dim: int = 32):
        super().__init__()
        if spatial.norm_type != "layer_norm" or spatial.only_cross_attention or spatial.attn2 is None:
            raise ValueError("only Stable Diffusion style blocks (layer norm, self- then cross-attention) are inflated")
        self.norm1, self.attn1 = spatial.norm1, spatial.attn1
        self.norm2, self.attn2 = spatial.norm2, spatial.attn2
        self.norm3, self.ff = spatial.norm3, spatial.ff
        dim, heads = spatial.attn1.query_dim, spatial.attn1.heads
        self.norm_temp = nn.LayerNorm(dim)
        self.attn_temp = TemporalAttention(dim, heads, rotary_dim=rotary_dim)
        # Zero output projection: at initialisation the block (and the UNet) equals its 2D version per frame.
        nn.init.zeros_(self.attn_temp.to_out[0].weight)
        nn.init.zeros_(self.attn_temp.to_out[0].bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        class_labels: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
    ) -> torch.Tensor:
        # Same positional signature as BasicTransformerBlock: Transformer2DModel's checkpointing calls it that way.
        kwargs = cross_attention_kwargs or {}
        if "video_frames" not in kwargs:
            raise RuntimeError("SpatioTemporalBlock needs cross_attention_kwargs['video_frames']; call VideoUNet.forward")
        video_frames, total_frames = kwargs["video_frames"], kwargs["total_frames"]

        hidden_states = self.attn1(self.norm1(hidden_states), attention_mask=attention_mask) + hidden_states
        hidden_states = self.attn2(
            self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask
        ) + hidden_states

        tokens = hidden_states.shape[1]
        x = rearrange(hidden_states, "(b f) d c -> (b d) f c", f=total_frames)
        video, images = x[:, :video_frames], x[:, video_frames:]
        video = video + self.attn_temp(self.norm_temp(video))
        x = torch.cat([video, images], dim=1)
        hidden_states = rearrange(x, "(b d) f c -> (b f) d c", d=tokens)

        return self.ff(self.norm3(hidden_states)) + hidden_states


class VideoUNet(UNet2DConditionModel):
    """`UNet2DConditionModel` (same constructor arguments) whose transformer blocks attend over time too.

    forward(sample [B, C, F, H, W], timestep [B] or scalar, encoder_hidden_states, num_image_frames=0)
    -> noise prediction [B, C_out, F, H, W]. `encoder_hidden_states` is [B, L, D] (one prompt for every frame)
    or [B, 1 + M, L, D]: the video's prompt, then one prompt per appended image (LaVie's joint training layout).
    """

    #: channels of each head rotated by the temporal rotary encoding (LaVie: RotaryEmbedding(32))
    rotary_dim = 32

    @functools.wraps(UNet2DConditionModel.__init__)  # keeps the config signature diffusers' from_config reads
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for transformer in self.modules():
            blocks = getattr(transformer, "transformer_blocks", None)
            if blocks is None:
                continue
            for i, block in enumerate(blocks):
                if isinstance(block, BasicTransformerBlock):
                    blocks[i] = SpatioTemporalBlock(block, rotary_dim=min(self.rotary_dim, block.attn1.inner_dim // block.attn1.heads))

    def temporal_blocks(self) -> Iterator[SpatioTemporalBlock]:
        return (m for m in self.modules() if isinstance(m, SpatioTemporalBlock))

    @staticmethod
    def is_temporal_key(key: str) -> bool:
        return any(marker in f".{key}" for marker in TEMPORAL_KEY_MARKERS)

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        return (p for name, p in self.named_parameters() if self.is_temporal_key(name))

    def load_image_unet_weights(self, source: str | Path | dict[str, torch.Tensor]) -> None:
        """Load a 2D SD UNet (a diffusers `unet/` folder or a state dict): every key must match, and only the
        temporal layers may be absent (they keep their initialisation)."""
        temporal = [k for k in self.state_dict() if self.is_temporal_key(k)]
        if isinstance(source, dict):
            load_state_dict_checked(self, source, "2D UNet state dict", allowed_missing=temporal)
        else:
            load_diffusers_weights(self, source, strict=False, allowed_missing=temporal)

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        num_image_frames: int = 0,
    ) -> torch.Tensor:
        batch, _, frames, _, _ = sample.shape
        video_frames = frames - num_image_frames
        if video_frames < 1:
            raise ValueError(f"{frames} frames leave no video frame after {num_image_frames} image frames")

        timestep = torch.as_tensor(timestep, device=sample.device)
        timestep = timestep.expand(batch) if timestep.ndim == 0 else timestep
        timestep = timestep.repeat_interleave(frames)  # (B F)

        if encoder_hidden_states.ndim == 3:  # one prompt for all frames
            context = encoder_hidden_states.repeat_interleave(frames, dim=0)
        else:  # [B, 1 + M, L, D]: video prompt for the video frames, then one prompt per image frame
            if encoder_hidden_states.shape[1] != 1 + num_image_frames:
                raise ValueError(
                    f"encoder_hidden_states has {encoder_hidden_states.shape[1]} prompts per sample, "
                    f"expected 1 + {num_image_frames} image prompts"
                )
            index = torch.tensor([0] * video_frames + list(range(1, num_image_frames + 1)), device=sample.device)
            context = rearrange(encoder_hidden_states[:, index], "b f l d -> (b f) l d")

        x = rearrange(sample, "b c f h w -> (b f) c h w")
        frame_info = {"video_frames": video_frames, "total_frames": frames}
        out = super().forward(x, timestep, context, cross_attention_kwargs=frame_info).sample
        return rearrange(out, "(b f) c h w -> b c f h w", b=batch)
