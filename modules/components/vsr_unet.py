"""LaVie's video super-resolution UNet (Wang et al. 2023, section 4.3): the Stable Diffusion x4 upscaler inflated.

The official `UNet3DVSRModel` (Vchitect/LaVie `vsr/models/unet.py`) is the x4 upscaler's UNet (`in_channels` 7: the
noisy latent, then the low-resolution RGB frames at latent size; the low-res noise level through a class embedding
of 1000 entries; spatial attention that attends to the text only in the three upper levels) with temporal layers:

- in every transformer block, temporal attention with RoPE and the relative-position bias (LaVie base's) between
  cross-attention and feed-forward (`norm_temporal`, `attn_temporal`);
- in every transformer (`Transformer3DModel`), before its input norm, a residual block of (3, 1, 1) convolutions
  over time (`resblock_temporal`, the official `ResnetBlock3DCNN`);
- after every down block, the mid block and every up block, a `TemporalModule3D`: a (5, 1, 1) temporal residual
  block, a 2D residual block (`resblocks_3d_s`) and a zero-initialised 1x1 `shift_conv`, added to its input. With
  the official `temporal_module_config` (`attention_block_types: ["", ""]`) it has no attention.

`VSRUNet` builds it the way `VideoUNet` builds LaVie's base UNet: diffusers' `UNet2DConditionModel` (here with the
x4 upscaler's configuration) with its transformer blocks swapped, its ResNet GroupNorms pooled over frames, and the
temporal layers added. The transformers' temporal convolution runs before each transformer (a forward pre-hook),
the temporal modules after the down, mid and up blocks (forward hooks: the down blocks' skip connections keep the
values before the temporal module, as officially), so diffusers' forward stays the one forward. Parameter names are
the official ones; `tests/test_lavie_vsr_parity.py` checks the outputs against the official UNet's.

All GroupNorms that the official code applies to (b, c, f, h, w) tensors take their statistics over the video's
frames: the ResNets', `conv_norm_out`, and those of the three temporal residual blocks; the transformers' input norm
stays per frame.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from einops import rearrange
from torch import nn

from modules.components.temporal_attention import RotaryEmbedding, TemporalAttention
from modules.components.video_group_norm import FrameLayout, VideoGroupNorm
from modules.components.video_unet import VideoUNet

#: official constructor arguments of `UNet3DVSRModel` that are VSRUNet arguments of their own (the others are
#: diffusers' UNet2DConditionModel arguments)
VSR_ARGUMENTS = ("down_temporal_idx", "up_temporal_idx", "mid_temporal", "max_noise_level")
#: official arguments that must have these values here (the released model's): `video_condition` (multi-scale
#: low-res copies into the temporal modules) is off in `vsr/sample.py`; sparse-causal attention is the interpolation
#: stage's
FIXED_ARGUMENTS = {"video_condition": False, "use_first_frame": False}
ROTARY_DIM = 32  # the official shared RotaryEmbedding(32)


def config_from_lavie_vsr(config: dict) -> dict:
    """VSRUNet arguments from the official `UNet3DVSRModel` config (its diffusers JSON, e.g. `vsr/configs/
    unet_3d_config.json` with `video_condition` false): the 3D block names as diffusers' 2D ones, `in_channels`
    split into the noisy latent's (`out_channels`) and the low-res frames' (`low_res_channels`)."""
    for key, value in FIXED_ARGUMENTS.items():
        if config.get(key, value) != value:
            raise ValueError(f"{key}={config[key]!r} is not supported (the released VSR model has {key}={value})")
    module = config.get("temporal_module_config") or {}
    if any(module.get("attention_block_types", ["", ""])):
        raise ValueError("temporal modules with attention (temporal_module_config.attention_block_types) are not "
                         "supported; the released VSR model has none")
    dropped = {"temporal_module_config", "use_relative_position", "freeze_pretrained_2d_upsampler", *FIXED_ARGUMENTS}
    arguments = {k: v for k, v in config.items() if not k.startswith("_") and k not in dropped}
    for key in ("down_block_types", "up_block_types"):
        arguments[key] = [name.replace("3D", "2D") for name in arguments[key]]
    arguments["mid_block_type"] = arguments.get("mid_block_type", "UNetMidBlock3DCrossAttn").replace("3D", "2D")
    arguments["low_res_channels"] = config["in_channels"] - config["out_channels"]
    arguments["in_channels"] = config["out_channels"]
    return arguments


class TemporalConvBlock(nn.Module):
    """The official `ResnetBlock3DCNN`: a residual block of two convolutions over time only ((k, 1, 1), then
    (3, 1, 1)), GroupNorm statistics over the video's frames, an optional time embedding between them.
    Input and output ((B F), C, H, W), frames in the batch as everywhere in the UNet."""

    def __init__(self, channels: int, layout: FrameLayout, kernel: int = 3, temb_channels: int | None = None,
                 groups: int = 32, eps: float = 1e-6, pool_frames: bool = True):
        super().__init__()
        self.layout = layout
        self.pool_frames = pool_frames  # False: per-frame GroupNorm statistics (VSRUNet(group_norm_over_frames=False))
        self.norm1 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv1 = nn.Conv3d(channels, channels, (kernel, 1, 1), padding=((kernel - 1) // 2, 0, 0))
        self.time_emb_proj = nn.Linear(temb_channels, channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv2 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        frames = self.layout.total_frames
        if frames is None or self.layout.video_frames != frames:
            raise RuntimeError("TemporalConvBlock needs a video without appended images; call VSRUNet.forward")
        video = rearrange(x, "(b f) c h w -> b c f h w", f=frames)
        h = self.conv1(F.silu(self._norm(self.norm1, video)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + rearrange(self.time_emb_proj(F.silu(temb)), "(b f) c -> b c f 1 1", f=frames)
        h = self.conv2(F.silu(self._norm(self.norm2, h)))
        return rearrange(video + h, "b c f h w -> (b f) c h w")

    def _norm(self, norm: nn.GroupNorm, video: torch.Tensor) -> torch.Tensor:
        if self.pool_frames:  # nn.GroupNorm on (b, c, f, h, w): statistics over the frames, the official call
            return norm(video)
        frames = video.shape[2]
        return rearrange(norm(rearrange(video, "b c f h w -> (b f) c h w")), "(b f) c h w -> b c f h w", f=frames)


class TemporalModule(nn.Module):
    """The official `TemporalModule3D` without attention: x + shift_conv(resblocks_3d_s(resblocks_3d_t(x))), the
    1x1 `shift_conv` zero-initialised, so a new module starts as the identity."""

    def __init__(self, channels: int, temb_channels: int, layout: FrameLayout, groups: int = 32,
                 pool_frames: bool = True):
        super().__init__()
        self.resblocks_3d_t = TemporalConvBlock(channels, layout, kernel=5, temb_channels=temb_channels, groups=groups,
                                                pool_frames=pool_frames)
        spatial = ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=temb_channels,
                                groups=groups, eps=1e-6)
        if pool_frames:
            spatial.norm1 = VideoGroupNorm(spatial.norm1, layout)
            spatial.norm2 = VideoGroupNorm(spatial.norm2, layout)
        self.resblocks_3d_s = spatial
        self.shift_conv = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.shift_conv.weight)
        nn.init.zeros_(self.shift_conv.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.resblocks_3d_s(self.resblocks_3d_t(x, temb), temb)
        return x + self.shift_conv(h)


class NoTemporalModule(nn.Module):
    """A level without a temporal module (the official `EmptyTemporalModule3D`, no parameters)."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return x


class VSRSpatioTemporalBlock(nn.Module):
    """The VSR transformer block: attn1 (to the text in the x4 upscaler's only-cross-attention levels, self-attention
    otherwise), attn2 (text), temporal attention (`norm_temporal`, `attn_temporal`: RoPE + relative-position bias,
    LaVie base's `TemporalAttention` with the UNet's one shared rotary encoding), feed-forward. Adopts the spatial
    sub-modules of a diffusers `BasicTransformerBlock` (same names, same weights)."""

    def __init__(self, spatial: BasicTransformerBlock, rotary_emb: RotaryEmbedding):
        super().__init__()
        if spatial.norm_type != "layer_norm" or spatial.attn2 is None:
            raise ValueError("only Stable Diffusion style blocks (layer norm, attn1 then cross-attention) are inflated")
        self.only_cross_attention = spatial.only_cross_attention
        self.norm1, self.attn1 = spatial.norm1, spatial.attn1
        self.norm2, self.attn2 = spatial.norm2, spatial.attn2
        self.norm3, self.ff = spatial.norm3, spatial.ff
        dim, heads = spatial.attn1.query_dim, spatial.attn1.heads
        if dim // heads < rotary_emb.dim:
            raise ValueError(f"head dim {dim // heads} is below the rotary dim {rotary_emb.dim} (the official VSR "
                             "UNet's RotaryEmbedding(32) needs heads of at least 32 channels)")
        self.norm_temporal = nn.LayerNorm(dim)
        self.attn_temporal = TemporalAttention(dim, heads, rotary_dim=rotary_emb.dim)
        self.attn_temporal.rotary_emb = rotary_emb  # one instance for the whole UNet, as officially
        # zero output projection: a new block adds nothing over the 2D upscaler's block
        nn.init.zeros_(self.attn_temporal.to_out[0].weight)
        nn.init.zeros_(self.attn_temporal.to_out[0].bias)

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
        # Same positional signature as BasicTransformerBlock (Transformer2DModel may call it positionally).
        frames = (cross_attention_kwargs or {}).get("total_frames")
        if frames is None:
            raise RuntimeError("VSRSpatioTemporalBlock needs cross_attention_kwargs['total_frames']; call VSRUNet")
        context = encoder_hidden_states if self.only_cross_attention else None
        hidden_states = self.attn1(self.norm1(hidden_states), encoder_hidden_states=context,
                                   attention_mask=attention_mask) + hidden_states
        hidden_states = self.attn2(self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states,
                                   attention_mask=encoder_attention_mask) + hidden_states
        tokens = hidden_states.shape[1]
        x = rearrange(hidden_states, "(b f) d c -> (b d) f c", f=frames)
        x = x + self.attn_temporal(self.norm_temporal(x))
        hidden_states = rearrange(x, "(b d) f c -> (b f) d c", d=tokens)
        return self.ff(self.norm3(hidden_states)) + hidden_states


def _temporal_conv_first(transformer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of each transformer: its `resblock_temporal` runs on the input before the transformer's
    norm, and the transformer's residual is taken after it (the official `Transformer3DModel.forward`)."""
    if args:
        return (transformer.resblock_temporal(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": transformer.resblock_temporal(kwargs["hidden_states"])}


class VSRUNet(VideoUNet):
    """`UNet2DConditionModel` arguments (the x4 upscaler's config.json, `in_channels` being the noisy latent's
    channels) plus the VSR ones; `config_from_lavie_vsr` maps the official JSON to them.

    forward(sample [B, C, F, H, W], timestep, low_res [B, low_res_channels, F, H, W], encoder_hidden_states [B, L, D],
    noise_level [B] or scalar) -> [B, out_channels, F, H, W], as the official `unet(x, t, low_res,
    encoder_hidden_states=..., class_labels=noise_level)`: the low-res frames are concatenated after the sample.

    `low_res_channels` widens conv_in (7 inputs for the x4 upscaler). `down_temporal_idx`, `up_temporal_idx`: the
    levels with a temporal module after them; `mid_temporal`: one after the mid block. `temporal_norm_groups`: the
    GroupNorm groups of the temporal residual blocks (32, hard-coded officially). `max_noise_level`: the largest
    low-res noise level accepted (the x4 upscaler's 350)."""

    @functools.wraps(UNet2DConditionModel.__init__)  # keeps the config signature diffusers' from_config reads
    def __init__(self, *args, low_res_channels: int = 3, down_temporal_idx: tuple[int, ...] = (0, 1, 2, 3),
                 up_temporal_idx: tuple[int, ...] = (0, 1, 2, 3), mid_temporal: bool = True,
                 temporal_norm_groups: int = 32, max_noise_level: int = 350, **kwargs):
        if not kwargs.get("num_class_embeds"):
            raise ValueError("the VSR UNet embeds the low-res noise level as a class: set num_class_embeds (1000)")
        super().__init__(*args, **kwargs)
        self.temporal_rotary_emb = self.__dict__.pop("_shared_rotary")
        self.low_res_channels = int(low_res_channels)
        self.max_noise_level = int(max_noise_level)
        self._widen_input(self.low_res_channels)

        layout, temb = self.frame_layout, self.time_embedding.linear_2.out_features
        pool = self.group_norm_over_frames  # the temporal blocks' GroupNorms follow the UNet's choice
        for transformer in self.modules():
            if getattr(transformer, "transformer_blocks", None) is not None:
                transformer.resblock_temporal = TemporalConvBlock(transformer.in_channels, layout,
                                                                  groups=temporal_norm_groups, pool_frames=pool)
                transformer.register_forward_pre_hook(_temporal_conv_first, with_kwargs=True)

        channels = list(self.config.block_out_channels)

        def module(level_channels: int, present: bool) -> nn.Module:
            if not present:
                return NoTemporalModule()
            return TemporalModule(level_channels, temb, layout, temporal_norm_groups, pool_frames=pool)

        self.down_temporal_blocks = nn.ModuleList(module(c, i in down_temporal_idx) for i, c in enumerate(channels))
        self.mid_temporal_block = module(channels[-1], mid_temporal)
        self.up_temporal_blocks = nn.ModuleList(
            module(c, i in up_temporal_idx) for i, c in enumerate(reversed(channels)))
        # bound methods (with their UNet) rather than closures, so a deep copy of the UNet hooks its own modules
        for i, block in enumerate(self.down_blocks):
            block.register_forward_hook(functools.partial(self._temporal_after_block, "down", i), with_kwargs=True)
        self.mid_block.register_forward_hook(functools.partial(self._temporal_after_block, "mid", 0), with_kwargs=True)
        for i, block in enumerate(self.up_blocks):
            block.register_forward_hook(functools.partial(self._temporal_after_block, "up", i), with_kwargs=True)

    def _temporal_block(self, block: BasicTransformerBlock) -> nn.Module:
        """VideoUNet's hook for the transformer blocks it inflates: the VSR block, with one rotary encoding shared
        by every block (the official `temporal_rotary_emb`, registered once the blocks are built)."""
        # kept outside the module registry until VideoUNet has finished walking its modules (registering a module
        # while `self.modules()` is iterated would mutate the registry under the walk)
        if "_shared_rotary" not in self.__dict__:
            self.__dict__["_shared_rotary"] = RotaryEmbedding(ROTARY_DIM)
        return VSRSpatioTemporalBlock(block, self.__dict__["_shared_rotary"])

    def _widen_input(self, extra: int) -> None:
        """conv_in takes `extra` more inputs (the low-res frames): a new convolution over all of them, initialised as
        any (the x4 upscaler's own conv_in has these 7 inputs, so pretrained weights replace it whole; a model trained
        from scratch learns from the low-res frames from its first step)."""
        old = self.conv_in
        self.conv_in = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, padding=old.padding)

    def _temporal_after_block(self, where: str, index: int, block: nn.Module, args: tuple, kwargs: dict,
                              output):
        """Forward hook of the down, mid and up blocks: their output through the level's temporal module. The time
        embedding is the block's own input (`temb`; the mid block takes it positionally)."""
        temb = kwargs["temb"] if "temb" in kwargs else args[1]
        if where == "down":
            sample, skips = output  # the skip connections keep the values before the temporal module
            return self.down_temporal_blocks[index](sample, temb), skips
        module = self.mid_temporal_block if where == "mid" else self.up_temporal_blocks[index]
        return module(output, temb)

    @staticmethod
    def is_temporal_key(key: str) -> bool:
        """The layers LaVie adds to the 2D upscaler (official `from_pretrained_2d`: every key naming 'temporal');
        the paper trains only these."""
        return "temporal" in key

    def temporal_modules(self) -> Iterator[nn.Module]:
        return (m for m in self.modules() if isinstance(m, (TemporalModule, TemporalConvBlock, VSRSpatioTemporalBlock)))

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        low_res: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        noise_level: torch.Tensor | int,
    ) -> torch.Tensor:
        if low_res.shape[1] != self.low_res_channels or low_res.shape[2:] != sample.shape[2:]:
            raise ValueError(f"low_res must be [B, {self.low_res_channels}, F, H, W] at the sample's size "
                             f"{tuple(sample.shape[2:])}, got {tuple(low_res.shape)}")
        noise_level = torch.as_tensor(noise_level, device=sample.device)
        if (noise_level < 0).any() or (noise_level > self.max_noise_level).any():
            raise ValueError(f"noise_level must be in [0, {self.max_noise_level}], got {noise_level.tolist()}")
        if encoder_hidden_states.ndim != 3:
            raise ValueError("the VSR UNet takes one prompt per video: encoder_hidden_states [B, L, D]")
        x = torch.cat([sample, low_res.to(sample.dtype)], dim=1)
        return super().forward(x, timestep, encoder_hidden_states, class_labels=noise_level)
