"""A Stable Diffusion UNet inflated to video (LaVie base, section 4.1).

Every 2D layer runs with the frames folded into the batch, and each transformer block becomes a spatio-temporal
block: spatial self-attention, cross-attention, temporal self-attention, feed-forward (LaVie base; the block's design
is a set of named options, `TemporalBlockDesign`, which also give LaVie's interpolation UNet). As in the official
LaVie UNet, the ResNet GroupNorms and `conv_norm_out` take their statistics over all frames of a video (`VideoGroupNorm`); the
transformers' input GroupNorm stays per frame. The class is diffusers' `UNet2DConditionModel` with its transformer
blocks and those norms swapped, so parameter names are exactly those of the SD UNet (which loads strictly) plus, per
block, the official LaVie temporal keys `norm_temp.*`, `attn_temp.*`.

`conditioning_channels` widens `conv_in` for inputs concatenated after the noisy sample (LaVie's interpolation stage:
the key frames' latents copied to the positions of the frames between them); the new input channels start at zero
when 2D or lower-stage weights are loaded, so the UNet starts as the one it was initialised from.

The same mechanism inflates VidRD's UNet (SD 2.1-base; `VIDRD_UNET_OPTIONS`, `config_from_vidrd`): Temp-Conv
(`modules/components/temporal_conv.py`) after every ResNet, kept beside the ResNets as `temp_convs.n` (the official
keys), and Temp-Attn in each transformer block under the official names `temp_norm`, `temp_attn`, with the official
sinusoidal frame embedding added to the residual stream; its spatial ResNets run per frame (docs/vidrd.md).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from einops import rearrange
from torch import nn

from modules.components.checkpoints import find_weight_file, load_state_dict_checked, read_state_dict
from modules.components.temporal_attention import TemporalAttention
from modules.components.temporal_conv import TemporalConvLayer
from modules.components.video_group_norm import FrameLayout, VideoGroupNorm

# LaVie's temporal keys, then VidRD's (every VidRD temporal key has `temp_` in its name)
TEMPORAL_KEY_MARKERS = (".attn_temp.", ".norm_temp.", ".temp_attn.", ".temp_norm.", ".temp_convs.")
# State-dict names of a block's temporal LayerNorm and attention, per `TemporalBlockDesign.temporal_keys`
TEMPORAL_LAYER_NAMES = {"lavie": ("norm_temp", "attn_temp"), "vidrd": ("temp_norm", "temp_attn")}
# Constructor arguments of the official `UNet3DConditionModel`s that are not VideoUNet arguments: `use_first_frame`
# (sparse-causal spatial attention) and `use_relative_position` (no effect on the temporal layers either stage uses;
# it stays False in both official configs) become `TemporalBlockDesign` options.
LAVIE_ONLY_ARGUMENTS = ("use_first_frame", "use_relative_position")


@dataclass(frozen=True)
class TemporalBlockDesign:
    """How a spatio-temporal block is put together; the defaults are LaVie's base UNet.

    temporal_attention_after  "cross_attention": self-attn, cross-attn, temporal attn, feed-forward (LaVie base);
                              "feed_forward": self-attn, cross-attn, feed-forward, temporal attn (LaVie interpolation)
    temporal_rope             rotary encoding of the frame index in temporal attention (base: yes; interpolation: no)
    temporal_position_bias    T5-style relative-position bias in temporal attention (base: yes; interpolation: no)
    spatial_attention         "full": each frame attends to its own tokens; "sparse_causal": to the tokens of frame 0
                              and frame i-1 (LaVie interpolation's `SparseCausalAttention`, Tune-A-Video's)
    temporal_keys             state-dict names of the temporal LayerNorm and attention: "lavie" (`norm_temp`,
                              `attn_temp`) or "vidrd" (`temp_norm`, `temp_attn`)
    residual_frame_embedding  VidRD's `add_temp_embed`: the sinusoidal embedding of each frame's index is added to the
                              residual stream before the temporal sub-block (so it reaches the temporal attention's
                              input and everything after it), x = h + pe; out = x + attn(norm(x))
    attend_single_frame       a one-frame video still goes through temporal attention (LaVie). False: it skips it
                              (VidRD's official block: `identity + 0 * temporal`), keeping its frame embedding
    """

    temporal_attention_after: str = "cross_attention"
    temporal_rope: bool = True
    temporal_position_bias: bool = True
    spatial_attention: str = "full"
    temporal_keys: str = "lavie"
    residual_frame_embedding: bool = False
    attend_single_frame: bool = True

    def __post_init__(self) -> None:
        if self.temporal_attention_after not in ("cross_attention", "feed_forward"):
            raise ValueError(f"temporal_attention_after must be cross_attention or feed_forward, "
                             f"got {self.temporal_attention_after!r}")
        if self.spatial_attention not in ("full", "sparse_causal"):
            raise ValueError(f"spatial_attention must be full or sparse_causal, got {self.spatial_attention!r}")
        if self.temporal_keys not in TEMPORAL_LAYER_NAMES:
            raise ValueError(f"temporal_keys must be one of {sorted(TEMPORAL_LAYER_NAMES)}, got {self.temporal_keys!r}")


LAVIE_BASE_DESIGN = TemporalBlockDesign()
LAVIE_INTERPOLATION_DESIGN = TemporalBlockDesign(
    temporal_attention_after="feed_forward", temporal_rope=False, temporal_position_bias=False,
    spatial_attention="sparse_causal",
)
# VidRD (ReuseAndDiffuse `BasicTransformerBlock(add_temp_attn=True, add_temp_embed=True)`): self-, cross-, temporal
# attention, feed-forward; a plain attention over frames (no RoPE, no bias table) after the frame embedding.
VIDRD_DESIGN = TemporalBlockDesign(
    temporal_rope=False, temporal_position_bias=False, temporal_keys="vidrd", residual_frame_embedding=True,
    attend_single_frame=False,
)
# The VideoUNet arguments that, added to an SD 2.1 UNet config, make VidRD's video UNet: the block design above,
# Temp-Conv (4 layers, dropout 0.1) after every ResNet, spatial ResNets per frame (the official UNet3D runs its 2D
# ResNets on frames folded into the batch; only the Temp-Conv GroupNorms pool over frames).
VIDRD_UNET_OPTIONS = dict(
    temporal_attention_after=VIDRD_DESIGN.temporal_attention_after, temporal_rope=VIDRD_DESIGN.temporal_rope,
    temporal_position_bias=VIDRD_DESIGN.temporal_position_bias, spatial_attention=VIDRD_DESIGN.spatial_attention,
    temporal_keys=VIDRD_DESIGN.temporal_keys, residual_frame_embedding=VIDRD_DESIGN.residual_frame_embedding,
    attend_single_frame=VIDRD_DESIGN.attend_single_frame,
    group_norm_over_frames=False, temporal_conv_layers=4, temporal_conv_dropout=0.1,
)
# The official `UNet3DConditionModel` flags (ReuseAndDiffuse `model/modules/unet.py`) and the values VIDRD_UNET_OPTIONS
# implements; `config_from_vidrd` refuses others.
VIDRD_OFFICIAL_FLAGS = dict(add_temp_transformer=False, add_temp_attn_only_on_upblocks=False,
                            prepend_first_frame=False, add_temp_embed=True, add_temp_conv=True, add_temp_attn=True)


def config_from_lavie(config: dict, stage: str = "base") -> dict:
    """VideoUNet arguments from an official LaVie UNet config (its diffusers JSON): the same arguments with the 3D
    block names of `<stage>/models/unet_blocks.py` as the diffusers 2D blocks VideoUNet inflates.

    `stage="base"`: `base/models/unet.py` (no sparse-causal attention). `stage="interpolation"`:
    `interpolation/models/unet.py`, whose block design is `LAVIE_INTERPOLATION_DESIGN` (full spatial attention when
    its `use_first_frame` is off) and whose `in_channels` count the noisy latent (`out_channels` of them) and then the
    copied key-frame latents (`conditioning_channels`)."""
    if stage not in ("base", "interpolation"):
        raise ValueError(f"stage must be base or interpolation, got {stage!r}")
    if stage == "base" and config.get("use_first_frame"):
        raise ValueError("use_first_frame (sparse-causal attention) is the interpolation UNet's: "
                         "use stage='interpolation'")
    arguments = {k: v for k, v in config.items() if not k.startswith("_") and k not in LAVIE_ONLY_ARGUMENTS}
    for key in ("down_block_types", "up_block_types"):
        arguments[key] = [name.replace("3D", "2D") for name in arguments[key]]
    if "mid_block_type" in arguments:
        arguments["mid_block_type"] = arguments["mid_block_type"].replace("3D", "2D")
    if stage == "interpolation":
        design = LAVIE_INTERPOLATION_DESIGN
        arguments.update(
            temporal_attention_after=design.temporal_attention_after, temporal_rope=design.temporal_rope,
            temporal_position_bias=design.temporal_position_bias,
            spatial_attention="sparse_causal" if config.get("use_first_frame") else "full",
            in_channels=config["out_channels"], conditioning_channels=config["in_channels"] - config["out_channels"],
        )
    return arguments


def config_from_vidrd(config: Mapping) -> dict:
    """VideoUNet arguments for VidRD's video UNet from an SD 2.1 UNet config (diffusers' `unet/config.json`) or the
    official UNet3D config (the same, its block names in 3D and its `add_temp_*` flags, which must be the released
    model's: `VIDRD_OFFICIAL_FLAGS`)."""
    arguments = {k: v for k, v in config.items() if not k.startswith("_") and k not in VIDRD_OFFICIAL_FLAGS}
    unsupported = {k: config[k] for k, v in VIDRD_OFFICIAL_FLAGS.items() if k in config and config[k] != v}
    if unsupported:
        raise ValueError(f"VidRD UNet flags {unsupported} are not supported; the released model uses "
                         f"{ {k: VIDRD_OFFICIAL_FLAGS[k] for k in unsupported} }")
    for key in ("down_block_types", "up_block_types"):
        if key in arguments:
            arguments[key] = [name.replace("3D", "2D") for name in arguments[key]]
    if "mid_block_type" in arguments:
        arguments["mid_block_type"] = arguments["mid_block_type"].replace("3D", "2D")
    # VideoUNet options already in `config` (an ablation such as temporal_conv_layers=0) take precedence
    return {**VIDRD_UNET_OPTIONS, **arguments}


def sparse_causal_context(hidden_states: torch.Tensor, video_frames: int, total_frames: int) -> torch.Tensor:
    """Keys and values of sparse-causal attention for ((B F), D, C) tokens: frame i's are the tokens of frame 0
    followed by those of frame max(i - 1, 0), ((B F), 2D, C), as in LaVie's `SparseCausalAttention` (frame 0 sees
    its own tokens twice, which leaves softmax attention unchanged). Appended image frames see their own tokens
    twice: plain self-attention."""
    first = [0] * video_frames + list(range(video_frames, total_frames))
    previous = [0] + list(range(video_frames - 1)) + list(range(video_frames, total_frames))
    x = rearrange(hidden_states, "(b f) d c -> b f d c", f=total_frames)
    return rearrange(torch.cat([x[:, first], x[:, previous]], dim=2), "b f d c -> (b f) d c")


def with_conditioning_channels(state_dict: Mapping[str, torch.Tensor], conv_in_channels: int
                               ) -> dict[str, torch.Tensor]:
    """`state_dict` with `conv_in.weight` widened to `conv_in_channels` inputs by zeros, when it has fewer (a 2D SD
    UNet or a lower stage's UNet for a UNet with conditioning channels): the new inputs start with no effect, as the
    official interpolation UNet is initialised (`from_pretrained_2d`: new conv_in channels zero)."""
    state = dict(state_dict)
    weight = state.get("conv_in.weight")
    if weight is not None and weight.ndim == 4 and weight.shape[1] < conv_in_channels:
        extra = weight.new_zeros(weight.shape[0], conv_in_channels - weight.shape[1], *weight.shape[2:])
        state["conv_in.weight"] = torch.cat([weight, extra], dim=1)
    return state


def frame_position_encoding(frames: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal encoding of each frame's index, [frames, dim] (Vaswani et al.; what AnimateDiff's motion modules
    add before temporal attention). Weight-free, so checkpoints keep LaVie's keys."""
    position = torch.arange(frames, device=device, dtype=torch.float32)[:, None]
    rates = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(frames, dim, device=device)
    encoding[:, 0::2] = torch.sin(position * rates)
    encoding[:, 1::2] = torch.cos(position * rates[: dim // 2])
    return encoding.to(dtype)


def coordinate_grid(sample: torch.Tensor, video_frames: int) -> torch.Tensor:
    """[B, 3, F, H, W]: x, y and frame time, each from -1 to 1 across the frame or the video's frames; appended
    image frames (after the video frames) are stills and get time 0."""
    batch, _, frames, height, width = sample.shape
    kwargs = {"device": sample.device, "dtype": sample.dtype}
    xs = torch.linspace(-1, 1, width, **kwargs).view(1, 1, width).expand(frames, height, width)
    ys = torch.linspace(-1, 1, height, **kwargs).view(1, height, 1).expand(frames, height, width)
    time = torch.zeros(frames, **kwargs)
    time[:video_frames] = torch.linspace(-1, 1, video_frames, **kwargs) if video_frames > 1 else 0
    ts = time.view(frames, 1, 1).expand(frames, height, width)
    return torch.stack([xs, ys, ts]).unsqueeze(0).expand(batch, -1, -1, -1, -1)


class SpatioTemporalBlock(nn.Module):
    """LaVie's ST-Transformer block (and VidRD's). Adopts the spatial sub-modules of a diffusers
    `BasicTransformerBlock` (same names, same weights) and adds a temporal LayerNorm + attention (`norm_temp` +
    `attn_temp` in LaVie, `temp_norm` + `temp_attn` in VidRD), placed and built as `design` says (LaVie base:
    between cross-attention and feed-forward, with RoPE and the relative-position bias; VidRD: same place, plain
    attention after its residual frame embedding).

    Hidden states arrive as ((B F), HW, C); the number of frames comes through `cross_attention_kwargs`, which
    diffusers hands to every transformer block: `video_frames` frames take part in temporal attention, the
    frames after them (images of joint image-video training) pass through it unchanged.
    """

    def __init__(self, spatial: BasicTransformerBlock, rotary_dim: int = 32, frame_positions: bool = False,
                 design: TemporalBlockDesign = LAVIE_BASE_DESIGN):
        super().__init__()
        self.frame_positions = frame_positions
        self.design = design
        if spatial.norm_type != "layer_norm" or spatial.only_cross_attention or spatial.attn2 is None:
            raise ValueError("only Stable Diffusion style blocks (layer norm, self- then cross-attention) are inflated")
        self.norm1, self.attn1 = spatial.norm1, spatial.attn1
        self.norm2, self.attn2 = spatial.norm2, spatial.attn2
        self.norm3, self.ff = spatial.norm3, spatial.ff
        dim, heads = spatial.attn1.query_dim, spatial.attn1.heads
        self._temporal_names = TEMPORAL_LAYER_NAMES[design.temporal_keys]
        attention = TemporalAttention(dim, heads, rotary_dim=rotary_dim if design.temporal_rope else 0,
                                      relative_position_bias=design.temporal_position_bias)
        # Zero output projection: at initialisation the temporal attention adds nothing (the block is its 2D
        # version per frame, plus VidRD's frame embedding where the design has it).
        nn.init.zeros_(attention.to_out[0].weight)
        nn.init.zeros_(attention.to_out[0].bias)
        self.add_module(self._temporal_names[0], nn.LayerNorm(dim))
        self.add_module(self._temporal_names[1], attention)

    @property
    def temporal_norm(self) -> nn.LayerNorm:
        """The temporal LayerNorm, whatever its state-dict name (`norm_temp` or `temp_norm`)."""
        return getattr(self, self._temporal_names[0])

    @property
    def temporal_attention(self) -> TemporalAttention:
        """The temporal attention, whatever its state-dict name (`attn_temp` or `temp_attn`)."""
        return getattr(self, self._temporal_names[1])

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

        normed = self.norm1(hidden_states)
        # sparse-causal: keys and values from frames 0 and i-1 (the same projections, other tokens)
        context = (sparse_causal_context(normed, video_frames, total_frames)
                   if self.design.spatial_attention == "sparse_causal" else None)
        hidden_states = self.attn1(normed, encoder_hidden_states=context, attention_mask=attention_mask) + hidden_states
        hidden_states = self.attn2(
            self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask
        ) + hidden_states

        if self.design.temporal_attention_after == "cross_attention":
            hidden_states = self.temporal_residual(hidden_states, video_frames, total_frames)
            return self.ff(self.norm3(hidden_states)) + hidden_states
        hidden_states = self.ff(self.norm3(hidden_states)) + hidden_states
        return self.temporal_residual(hidden_states, video_frames, total_frames)

    def temporal_residual(self, hidden_states: torch.Tensor, video_frames: int, total_frames: int) -> torch.Tensor:
        """The temporal residual sub-block over the video frames of each token, ((B F), D, C) in and out:
        x + attn(norm(x)), with x = h + pe(frame) where the design adds the frame embedding to the residual stream
        (VidRD). Appended image frames (after `video_frames`) pass unchanged."""
        tokens = hidden_states.shape[1]
        x = rearrange(hidden_states, "(b f) d c -> (b d) f c", f=total_frames)
        video, images = x[:, :video_frames], x[:, video_frames:]
        if self.design.residual_frame_embedding:
            # computed in float32, then cast, as the official get_sin_pos_embedding
            video = video + frame_position_encoding(video_frames, video.shape[-1], video.device, video.dtype)
        if video_frames > 1 or self.design.attend_single_frame:
            normed = self.temporal_norm(video)
            if self.frame_positions:
                normed = normed + frame_position_encoding(video_frames, normed.shape[-1], normed.device, normed.dtype)
            video = video + self.temporal_attention(normed)
        x = torch.cat([video, images], dim=1)
        return rearrange(x, "(b d) f c -> (b f) d c", d=tokens)


class VideoUNet(UNet2DConditionModel):
    """`UNet2DConditionModel` (same constructor arguments) whose transformer blocks attend over time too.

    forward(sample [B, C, F, H, W], timestep [B] or scalar, encoder_hidden_states, num_image_frames=0)
    -> noise prediction [B, C_out, F, H, W]. `encoder_hidden_states` is [B, L, D] (one prompt for every frame)
    or [B, 1 + M, L, D]: the video's prompt, then one prompt per appended image (LaVie's joint training layout).
    The last M = `num_image_frames` frames are images: they skip temporal attention and are normalised on their own,
    so each is the 2D UNet on that image and neither it nor the video depends on the other.
    """

    #: channels of each head rotated by the temporal rotary encoding (LaVie: RotaryEmbedding(32))
    rotary_dim = 32

    @functools.wraps(UNet2DConditionModel.__init__)  # keeps the config signature diffusers' from_config reads
    def __init__(self, *args, group_norm_over_frames: bool = True, frame_positions: bool = False,
                 coordinate_channels: bool = False, frame_embedding: bool = False, conditioning_channels: int = 0,
                 temporal_attention_after: str = "cross_attention", temporal_rope: bool = True,
                 temporal_position_bias: bool = True, spatial_attention: str = "full", temporal_keys: str = "lavie",
                 residual_frame_embedding: bool = False, attend_single_frame: bool = True,
                 temporal_conv_layers: int = 0, temporal_conv_dropout: float = 0.1, **kwargs):
        """The block design (`temporal_attention_after`, `temporal_rope`, `temporal_position_bias`,
        `spatial_attention`, `temporal_keys`, `residual_frame_embedding`, `attend_single_frame`; defaults: LaVie
        base) is a `TemporalBlockDesign`, shared by every transformer block. `VIDRD_UNET_OPTIONS` gives VidRD's.

        `temporal_conv_layers=L` puts a Temp-Conv of L layers (VidRD: 4, dropout `temporal_conv_dropout` 0.1) after
        every ResNet of every down, mid and up block (`temporal_conv.py`); 0 (LaVie) puts none.

        `conditioning_channels=N` widens `conv_in` by N input channels for a `conditioning` tensor that `forward`
        concatenates after the sample (LaVie interpolation: N = 4, the copied key-frame latents). `in_channels`
        stays the noisy sample's channels (the coordinate channels below included), so conv_in takes
        in_channels + N; the N new input channels start at zero.

        `group_norm_over_frames=True` (LaVie's official UNet) takes the statistics of every ResNet GroupNorm and
        of `conv_norm_out` over all frames of a video (`VideoGroupNorm`); False keeps them per frame, the 2D UNet on
        each frame (a backbone whose ResNets are per frame chooses that).

        `frame_positions=True` adds a sinusoidal encoding of the frame index to every temporal attention's input.
        LaVie has none (its rotary encoding is relative only), which cannot tell frame 0 from frame 7 in a noisy
        clip: a model trained from scratch then places a moving object at its average position in every frame.
        Off by default (the official architecture); the CPU-sized recipe turns it on (docs/tiny_lavie.md)."""
        if frame_embedding:
            if kwargs.get("class_embed_type") not in (None, "timestep"):
                raise ValueError("frame_embedding uses the UNet's class embedding; leave class_embed_type unset")
            kwargs["class_embed_type"] = "timestep"
        super().__init__(*args, **kwargs)
        self.design = TemporalBlockDesign(temporal_attention_after, temporal_rope, temporal_position_bias,
                                          spatial_attention, temporal_keys, residual_frame_embedding,
                                          attend_single_frame)
        self.conditioning_channels = int(conditioning_channels)
        if self.conditioning_channels:
            self._widen_conv_in(self.conditioning_channels)
        self.frame_positions = frame_positions
        # `frame_embedding=True`: each frame's index goes through the timestep's sinusoid and an MLP of its own
        # (diffusers' class embedding of type "timestep") and is added to that frame's time embedding, so every
        # ResNet, and through it every cross-attention query, knows which frame it is working on: where a moving
        # object is depends on the motion word and the frame index together. Appended image frames get index -1.
        # Zero-initialised output layer: at initialisation the UNet is the one without it. Not in LaVie; off by
        # default (docs/tiny_lavie.md).
        self.frame_embedding = frame_embedding
        if frame_embedding:
            nn.init.zeros_(self.class_embedding.linear_2.weight)
            nn.init.zeros_(self.class_embedding.linear_2.bias)
        # `coordinate_channels=True`: three channels (x, y, normalised frame time, each in [-1, 1]) are appended to
        # the input (CoordConv, Liu et al. 2018), so conv_in takes in_channels = data channels + 3. Convolutions
        # otherwise learn where they are only from zero padding, slowly; a shape or a trajectory is a function of
        # where. Off by default (the official architecture); see docs/tiny_lavie.md.
        self.coordinate_channels = coordinate_channels
        self.group_norm_over_frames = group_norm_over_frames
        # set by forward, read by every VideoGroupNorm: the norms sit in diffusers blocks that pass no frame count
        self.frame_layout = FrameLayout()
        if group_norm_over_frames:
            self._pool_group_norms_over_frames()
        for transformer in self.modules():
            blocks = getattr(transformer, "transformer_blocks", None)
            if blocks is None:
                continue
            for i, block in enumerate(blocks):
                if isinstance(block, BasicTransformerBlock):
                    blocks[i] = self._temporal_block(block)
        if temporal_conv_layers < 0:
            raise ValueError(f"temporal_conv_layers must be >= 0, got {temporal_conv_layers}")
        if temporal_conv_layers:
            self._add_temporal_convs(int(temporal_conv_layers), float(temporal_conv_dropout))

    def _add_temporal_convs(self, layers: int, dropout: float) -> None:
        """VidRD's Temp-Conv after every ResNet: each down, mid and up block gets `temp_convs`, one per ResNet,
        beside its `resnets` (the official keys, e.g. `mid_block.temp_convs.1`), and each ResNet's output goes
        through its Temp-Conv by a forward hook, since diffusers' 2D blocks call their ResNets themselves. So the
        order is the official one: ResNet, Temp-Conv, then the block's attention or the next ResNet."""
        blocks = [*self.down_blocks, *([self.mid_block] if self.mid_block is not None else []), *self.up_blocks]
        groups = self.config.norm_num_groups
        for block in blocks:
            block.temp_convs = nn.ModuleList(
                TemporalConvLayer(resnet.out_channels, self.frame_layout, layers, groups=groups, dropout=dropout)
                for resnet in block.resnets
            )
            for resnet, temp_conv in zip(block.resnets, block.temp_convs):
                resnet.register_forward_hook(temp_conv.after_resnet)

    def _temporal_block(self, block: BasicTransformerBlock) -> nn.Module:
        """The spatio-temporal block that replaces one of diffusers' transformer blocks (a UNet of another design,
        e.g. LaVie's VSR UNet, returns its own)."""
        return SpatioTemporalBlock(
            block, rotary_dim=min(self.rotary_dim, block.attn1.inner_dim // block.attn1.heads),
            frame_positions=self.frame_positions, design=self.design,
        )

    def _widen_conv_in(self, extra: int) -> None:
        """conv_in with `extra` more input channels, zero-initialised: at initialisation the conditioning has no
        effect and the UNet is the one without it."""
        old = self.conv_in
        self.conv_in = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, padding=old.padding)
        with torch.no_grad():
            self.conv_in.weight[:, : old.in_channels].copy_(old.weight)
            self.conv_in.weight[:, old.in_channels :].zero_()
            self.conv_in.bias.copy_(old.bias)

    def _pool_group_norms_over_frames(self) -> None:
        """Swap the ResNets' `norm1`, `norm2` and `conv_norm_out` for `VideoGroupNorm`s (same parameters). The
        transformers' input GroupNorm is left per frame, as in LaVie (it runs after `b c f h w -> (b f) c h w`)."""
        for resnet in self.modules():
            if isinstance(resnet, ResnetBlock2D):
                for name in ("norm1", "norm2"):
                    norm = getattr(resnet, name)
                    if type(norm) is not nn.GroupNorm:
                        raise ValueError(f"group_norm_over_frames needs GroupNorm ResNets, found {type(norm).__name__}")
                    setattr(resnet, name, VideoGroupNorm(norm, self.frame_layout))
        if self.conv_norm_out is not None:
            self.conv_norm_out = VideoGroupNorm(self.conv_norm_out, self.frame_layout)

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
        if isinstance(source, Mapping):
            state, name = source, "2D UNet state dict"
        else:
            name = find_weight_file(source)
            state = read_state_dict(name)
        # conditioning channels: conv_in's new inputs start at zero (a 2D UNet has none)
        state = with_conditioning_channels(state, self.conv_in.in_channels)
        load_state_dict_checked(self, state, name, allowed_missing=temporal)

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        num_image_frames: int = 0,
        conditioning: torch.Tensor | None = None,
        class_labels: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """`conditioning` [B, conditioning_channels, F, H, W]: concatenated after the sample (and its coordinate
        channels), as LaVie's interpolation sampler concatenates [x_t, copied key frames]."""
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

        if self.coordinate_channels:
            sample = torch.cat([sample, coordinate_grid(sample, video_frames)], dim=1)
        given = 0 if conditioning is None else conditioning.shape[1]
        if given != self.conditioning_channels:
            raise ValueError(f"this UNet takes {self.conditioning_channels} conditioning channels, got {given}")
        if conditioning is not None:
            sample = torch.cat([sample, conditioning.to(sample.dtype)], dim=1)
        x = rearrange(sample, "b c f h w -> (b f) c h w")
        self.frame_layout.set(video_frames, frames)
        frame_info = {"video_frames": video_frames, "total_frames": frames}
        frame_index = None
        if self.frame_embedding:
            index = torch.full((frames,), -1.0, device=sample.device)
            index[:video_frames] = torch.arange(video_frames, device=sample.device, dtype=index.dtype)
            frame_index = index.repeat(batch)  # (B F), frames fastest as in x
        if class_labels is not None:  # one label per video (the x4 upscaler's noise level), for each of its frames
            if self.frame_embedding:
                raise ValueError("class_labels and frame_embedding both use the class embedding")
            labels = torch.as_tensor(class_labels, device=sample.device)
            frame_index = (labels.expand(batch) if labels.ndim == 0 else labels).repeat_interleave(frames)
        out = super().forward(x, timestep, context, class_labels=frame_index, cross_attention_kwargs=frame_info).sample
        return rearrange(out, "(b f) c h w -> b c f h w", b=batch)


def vidrd_video_unet(**config) -> VideoUNet:
    """VidRD's video UNet from SD 2.1 UNet arguments (diffusers' `unet/config.json` keys, or the official UNet3D
    config): `VideoUNet(**config_from_vidrd(config))`, the target of `configs/model/vidrd_unet/*.yaml`."""
    return VideoUNet(**config_from_vidrd(config))
