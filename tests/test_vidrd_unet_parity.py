"""VidRD's temporal layers against the official ReuseAndDiffuse numbers in `$FIXTURES_DIR/vidrd` (see its README):
Temp-Conv (`temporal_conv_unet_*`), the Temp-Attn residual sub-block (`temporal_attn_c{C}_*`, every width and frame
count the set holds) and a whole transformer block (`block_c128_*`), in float32 and float64, with the single-frame
behaviour and negative controls. Sizes come from the tensors; only tolerances and file layout are written here.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from einops import rearrange

from modules.components import video_unet
from modules.components.temporal_conv import TemporalConvLayer
from modules.components.video_unet import VIDRD_DESIGN, SpatioTemporalBlock, frame_position_encoding
from tests.vidrd_fixtures import (
    DISCRIMINATION, DTYPES, FP32, FP32_PROBS, TOLERANCE, attention_widths, expected, fixture_set, suffixes,
    vidrd_fixture_dir, weights_as,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def vidrd_dir(fixtures_dir: Path) -> Path:
    return vidrd_fixture_dir(fixtures_dir, ("temporal_conv_unet_weights.safetensors",
                                            "block_c128_weights.safetensors"), "VidRD")


# ------------------------------------------------------------------------------------------------------ Temp-Conv
def temporal_conv(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> TemporalConvLayer:
    """The Temp-Conv the weights describe (channels and layer count from their shapes), loaded strictly."""
    convs = sorted(int(k.split(".")[1]) for k in weights if k.endswith(".weight") and weights[k].ndim == 5)
    layer = TemporalConvLayer(weights["convs.0.weight"].shape[0], num_layers=len(convs))
    layer.load_state_dict(weights_as(weights, dtype), strict=True)
    return layer.to(dtype).eval()


# The UNet's (4 layers) and the VAE decoder's (3 layers): one TemporalConvLayer with num_layers
TEMPORAL_CONVS = pytest.mark.parametrize("stem", ["temporal_conv_unet", "temporal_conv_vae"], ids=["unet", "vae"])


@TEMPORAL_CONVS
@DTYPES
def test_temporal_conv_matches_the_official_layer(vidrd_dir, dtype, stem):
    weights, io, out64 = fixture_set(vidrd_dir, stem)
    layer = temporal_conv(weights, dtype)
    with torch.no_grad():
        out = layer(io["x"].to(dtype))
    torch.testing.assert_close(out, expected(io, out64, "out", dtype), **TOLERANCE[dtype])


@TEMPORAL_CONVS
def test_temporal_conv_passes_a_single_frame_unchanged(vidrd_dir, stem):
    weights, io, _ = fixture_set(vidrd_dir, stem)
    with torch.no_grad():
        out = temporal_conv(weights, torch.float32)(io["x_f1"])
    assert torch.equal(out, io["out_f1"])


def test_per_frame_group_norm_misses_the_temporal_conv_fixture(vidrd_dir):
    """Negative control: the same layer with GroupNorm statistics per frame (not pooled over frames)."""
    weights, io, _ = fixture_set(vidrd_dir, "temporal_conv_unet")
    layer = temporal_conv(weights, torch.float32)
    x = io["x"]
    h = x
    with torch.no_grad():
        for module in layer.convs:
            if isinstance(module, torch.nn.GroupNorm):
                frames = h.shape[2]
                h = rearrange(module(rearrange(h, "b c f h w -> (b f) c h w")), "(b f) c h w -> b c f h w", f=frames)
            else:
                h = module(h)
    miss = (x + h - io["out"]).abs().max().item()
    assert miss > DISCRIMINATION * FP32["atol"], miss


# ------------------------------------------------------------------------------------------------------ Temp-Attn
def vidrd_block(channels: int, heads: int, dtype: torch.dtype, design=VIDRD_DESIGN, cross_attention_dim: int = 32,
                ) -> SpatioTemporalBlock:
    spatial = BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim=cross_attention_dim,
                                    activation_fn="geglu")
    return SpatioTemporalBlock(spatial, design=design).to(dtype).eval()


def temporal_attention_case(root: Path, channels: int, dtype: torch.dtype, design=VIDRD_DESIGN):
    """(block with the fixture's Temp-Attn weights, io, out64). Heads from the stored attention probabilities."""
    weights, io, out64 = fixture_set(root, f"temporal_attn_c{channels}")
    heads = io[f"attn_probs_f{suffixes(io, 'attn_probs')[0]}"].shape[1]
    block = vidrd_block(channels, heads, dtype, design)
    temporal = {k: v for k, v in block.state_dict().items() if k.startswith(("temp_norm.", "temp_attn."))}
    assert sorted(temporal) == sorted(weights), "Temp-Attn keys differ from the official layout"
    missing, unexpected = block.load_state_dict(weights_as(weights, dtype), strict=False)
    assert not unexpected and not set(missing) & set(weights)
    return block, io, out64


def check_sub_block(block, io, out64, channels: int, frames: int, dtype: torch.dtype, tol: dict) -> None:
    """The LayerNorm, the attention (output and probabilities) and the sub-block output against the fixture."""
    seen = {}
    hooks = [block.temporal_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("norm_in", o)),
             block.temporal_attention.register_forward_hook(lambda m, a, o: seen.__setitem__("attn_out", o))]
    with torch.no_grad():
        out = block.temporal_residual(io[f"h_f{frames}"].to(dtype), frames, frames)
        _, probs = block.temporal_attention.explicit_forward(seen["norm_in"])
    for hook in hooks:
        hook.remove()
    where = f"C={channels} F={frames} {dtype}"
    if dtype == torch.float32:  # intermediates are stored for the float32 run only
        torch.testing.assert_close(seen["norm_in"], io[f"norm_in_f{frames}"], **FP32)
        torch.testing.assert_close(probs, io[f"attn_probs_f{frames}"], **FP32_PROBS)
    torch.testing.assert_close(seen["attn_out"], expected(io, out64, f"attn_out_f{frames}", dtype), **tol,
                               msg=lambda m: f"{where} attn_out: {m}")
    torch.testing.assert_close(out, expected(io, out64, f"block_out_f{frames}", dtype), **tol,
                               msg=lambda m: f"{where} block_out: {m}")


def test_frame_embedding_is_the_official_sinusoid(vidrd_dir):
    """`get_sin_pos_embedding` is computed in float32; ours agrees to a float32 rounding step (a few of its
    values differ by one ulp, as vectorised exp/sin differ between CPUs)."""
    for channels in attention_widths(vidrd_dir):
        _, io, _ = fixture_set(vidrd_dir, f"temporal_attn_c{channels}")
        for frames in suffixes(io, "pos_emb"):
            pe = frame_position_encoding(frames, channels, torch.device("cpu"), torch.float32)
            torch.testing.assert_close(pe, io[f"pos_emb_f{frames}"], atol=1e-6, rtol=0)


@DTYPES
def test_temporal_attention_matches_the_official_sub_block(vidrd_dir, dtype):
    """Every width and frame count of the set, our own frame embedding. In float64 its float32 ulps (the test
    above) move the outputs by ~5e-8, so float64 is held to a float32-level tolerance here and to the float64 one
    in the next test, given the official embedding."""
    tol = TOLERANCE[dtype] if dtype == torch.float32 else dict(atol=1e-6, rtol=0.0)
    for channels in attention_widths(vidrd_dir):
        block, io, out64 = temporal_attention_case(vidrd_dir, channels, dtype)
        for frames in [f for f in suffixes(io, "h") if f > 1]:
            check_sub_block(block, io, out64, channels, frames, dtype, tol)


def test_temporal_attention_matches_the_float64_run_given_the_official_embedding(vidrd_dir, monkeypatch):
    """float64 to the README's 1e-10 with the stored `pos_emb_f{F}` in place of our float32 sinusoid."""
    stored = {}
    for channels in attention_widths(vidrd_dir):
        _, io, _ = fixture_set(vidrd_dir, f"temporal_attn_c{channels}")
        stored.update({(f, channels): io[f"pos_emb_f{f}"] for f in suffixes(io, "pos_emb")})
    monkeypatch.setattr(video_unet, "frame_position_encoding",
                        lambda frames, dim, device, dtype: stored[(frames, dim)].to(device, dtype))
    for channels in attention_widths(vidrd_dir):
        block, io, out64 = temporal_attention_case(vidrd_dir, channels, torch.float64)
        for frames in [f for f in suffixes(io, "h") if f > 1]:
            check_sub_block(block, io, out64, channels, frames, torch.float64, TOLERANCE[torch.float64])


def test_frame_embedding_only_before_attention_misses_the_fixture(vidrd_dir):
    """Negative control: the sinusoid added to the attention's input but not to the residual stream (as LaVie's
    `frame_positions` option does) misses the official output."""
    design = replace(VIDRD_DESIGN, residual_frame_embedding=False)
    for channels in attention_widths(vidrd_dir):
        block, io, _ = temporal_attention_case(vidrd_dir, channels, torch.float32, design)
        block.frame_positions = True
        frames = max(suffixes(io, "h"))
        with torch.no_grad():
            out = block.temporal_residual(io[f"h_f{frames}"], frames, frames)
        miss = (out - io[f"block_out_f{frames}"]).abs().max().item()
        assert miss > DISCRIMINATION * FP32["atol"], (channels, miss)


def test_single_frame_keeps_the_official_frame_embedding_and_skips_attention(vidrd_dir):
    """The single-frame quirk, kept as the official value: a one-frame video leaves the sub-block as h + pe[0]
    (pe[0] = (0, 1, 0, 1, ...)), its temporal attention skipped. Attending over the one frame (LaVie's
    behaviour) would not give the official value."""
    for channels in attention_widths(vidrd_dir):
        block, io, _ = temporal_attention_case(vidrd_dir, channels, torch.float32)
        with torch.no_grad():
            out = block.temporal_residual(io["h_f1"], 1, 1)
        assert torch.equal(out, io["block_out_f1"]), channels
        attending, _, _ = temporal_attention_case(vidrd_dir, channels, torch.float32,
                                                  replace(VIDRD_DESIGN, attend_single_frame=True))
        with torch.no_grad():
            miss = (attending.temporal_residual(io["h_f1"], 1, 1) - io["block_out_f1"]).abs().max().item()
        assert miss > DISCRIMINATION * FP32["atol"], (channels, miss)


# ---------------------------------------------------------------------------------------------------- whole block
def whole_block(root: Path, dtype: torch.dtype, design=VIDRD_DESIGN):
    weights, io, out64 = fixture_set(root, "block_c128")
    channels = weights["norm1.weight"].shape[0]
    heads = channels // 64  # dim_head is 64 in every official block (README)
    block = vidrd_block(channels, heads, dtype, design, cross_attention_dim=weights["attn2.to_k.weight"].shape[1])
    block.load_state_dict(weights_as(weights, dtype), strict=True)
    return block, io, out64


def run_block(block: SpatioTemporalBlock, io: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    h, text = io["h"].to(dtype), io["encoder_hidden_states"].to(dtype)
    frames = h.shape[0] // text.shape[0]
    context = text.repeat_interleave(frames, dim=0)  # per video, repeated per frame (Transformer3DModel)
    with torch.no_grad():
        return block(h, encoder_hidden_states=context,
                     cross_attention_kwargs={"video_frames": frames, "total_frames": frames})


# The whole-block fixture stores no frame embedding: in float64 our float32 sinusoid's ulps (see
# test_frame_embedding_is_the_official_sinusoid) move the output by ~2.5e-7 (2% of its values moved by one ulp move it
# by ~1.3e-7), so float64 is held to 1e-6 here; the sub-block test above holds the rest of the maths to 1e-10.
BLOCK_TOLERANCE = {torch.float32: TOLERANCE[torch.float32], torch.float64: dict(atol=1e-6, rtol=0.0)}


@DTYPES
def test_whole_block_matches_the_official_block(vidrd_dir, dtype):
    block, io, out64 = whole_block(vidrd_dir, dtype)
    torch.testing.assert_close(run_block(block, io, dtype), expected(io, out64, "out", dtype), **BLOCK_TOLERANCE[dtype])


def test_temporal_attention_after_feed_forward_misses_the_block_fixture(vidrd_dir):
    """Negative control for the order of sub-layers: temporal attention after the feed-forward (LaVie's
    interpolation order) instead of between cross-attention and feed-forward."""
    block, io, _ = whole_block(vidrd_dir, torch.float32, replace(VIDRD_DESIGN, temporal_attention_after="feed_forward"))
    miss = (run_block(block, io, torch.float32) - io["out"]).abs().max().item()
    assert miss > DISCRIMINATION * FP32["atol"], miss


def test_temporal_conv_in_the_unet_layout_matches_the_official_layer(vidrd_dir):
    """The hook the UNet runs after a ResNet (`after_resnet`) takes ((B F), C, H, W) rows, frames fastest: fed the
    fixture's input in that layout it gives the official output; appended image frames pass unchanged."""
    from modules.components.video_group_norm import FrameLayout

    weights, io, _ = fixture_set(vidrd_dir, "temporal_conv_unet")
    layer = temporal_conv(weights, torch.float32)
    x, frames = io["x"], io["x"].shape[2]
    layer.layout = FrameLayout()
    layer.layout.set(frames, frames)
    with torch.no_grad():
        out = layer.after_resnet(None, (), rearrange(x, "b c f h w -> (b f) c h w"))
    torch.testing.assert_close(rearrange(out, "(b f) c h w -> b c f h w", f=frames), io["out"], **FP32)

    images = torch.randn(x.shape[0], x.shape[1], 2, *x.shape[3:])
    layer.layout.set(frames, frames + 2)
    with torch.no_grad():
        out = layer.after_resnet(None, (), rearrange(torch.cat([x, images], 2), "b c f h w -> (b f) c h w"))
    out = rearrange(out, "(b f) c h w -> b c f h w", f=frames + 2)
    torch.testing.assert_close(out[:, :, :frames], io["out"], **FP32)
    assert torch.equal(out[:, :, frames:], images)
