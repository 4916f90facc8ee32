"""VidRD's temporal VAE decoder against the official numbers in `$FIXTURES_DIR/vidrd` (the decoder's Temp-Conv and a
whole up block with Temp-Conv, float32 and float64), its exact key layout (`keys_vae.json`, paper size on the meta
device), SD weights loading into it, and decoding with the clip's frame count or frame by frame."""
from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D
from safetensors.torch import save_file

from modules.components.checkpoints import CheckpointKeyError
from modules.components.temporal_conv import TemporalConvLayer
from modules.components.temporal_vae import (
    TemporalKLAutoencoder,
    TemporalUpDecoderBlock,
    decode_frames,
    is_temporal_key,
    rename_deprecated_attention,
)
from tests.vidrd_fixtures import DISCRIMINATION, DTYPES, FP32, TOLERANCE, expected, fixture_set, vidrd_fixture_dir

pytestmark = pytest.mark.usefixtures("single_thread")

# Stable Diffusion 2.1-base's VAE (`vae/config.json`; the same architecture as SD 1.x's)
SD21_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=768)
# A tiny VAE of the same block types: 2 levels, 16 and 32 channels, 8 GroupNorm groups
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                act_fn="silu", latent_channels=4, norm_num_groups=8, sample_size=16)


def official(fixtures_dir, stem):
    """(weights, float32 inputs/outputs, float64 outputs) of the VidRD fixture set `stem`."""
    return fixture_set(fixtures_dir / "vidrd", stem)


def layer_count(weights, prefix=""):
    """Temp-Conv layers in a state dict: its GroupNorms are convs.{4l}, its Conv3d convs.{4l+3}."""
    return sum(1 for key in weights if re.fullmatch(rf"{re.escape(prefix)}convs\.\d+\.weight", key)
               and weights[key].dim() == 5)


def load(module, weights, dtype):
    module.load_state_dict(weights, strict=True)  # fp16-stored fixture weights, cast by load_state_dict
    return module.to(dtype).eval()


@DTYPES
def test_temporal_conv_matches_official(fixtures_dir, dtype):
    weights, io, out64 = official(fixtures_dir, "temporal_conv_vae")
    channels = io["x"].shape[1]
    layer = load(TemporalConvLayer(channels, num_layers=layer_count(weights)), weights, dtype)
    with torch.no_grad():
        out = layer(io["x"].to(dtype))
        single = layer(io["x_f1"].to(dtype))
    torch.testing.assert_close(out, expected(io, out64, "out", dtype), **TOLERANCE[dtype])
    assert torch.equal(single, io["out_f1"].to(dtype))  # one frame: the input itself


def upblock(weights, dtype):
    """The fixture's up block: diffusers' UpDecoderBlock2D (its defaults: eps 1e-6, 32 groups) with Temp-Convs."""
    channels = weights["resnets.0.conv1.weight"].shape[0]
    resnets = len({key.split(".")[1] for key in weights if key.startswith("resnets.")})
    block = UpDecoderBlock2D(in_channels=channels, out_channels=channels, num_layers=resnets, add_upsample=True)
    plain = load(block, {k: v for k, v in weights.items() if not k.startswith("temp_convs.")}, dtype)
    temporal = TemporalUpDecoderBlock(UpDecoderBlock2D(in_channels=channels, out_channels=channels,
                                                       num_layers=resnets, add_upsample=True),
                                      temporal_layers=layer_count(weights, "temp_convs.0."))
    return plain, load(temporal, weights, dtype)


def fixture_frames(io):
    (name,) = [name for name in io if re.fullmatch(r"out_f\d+", name)]
    return name, int(name.removeprefix("out_f"))


@DTYPES
def test_vae_upblock_matches_official(fixtures_dir, dtype):
    weights, io, out64 = official(fixtures_dir, "vae_upblock")
    plain, block = upblock(weights, dtype)
    name, frames = fixture_frames(io)
    x = io["x"].to(dtype)
    with torch.no_grad():
        out = block(x, num_frames=frames)
        per_frame = block(x)  # num_frames=1: the official pipeline's decoding
        plain_out = plain(x)
    reference, tolerance = expected(io, out64, name, dtype), TOLERANCE[dtype]
    torch.testing.assert_close(out, reference, **tolerance)
    assert torch.equal(per_frame, plain_out)  # bit for bit the block without Temp-Conv
    if dtype == torch.float32:  # the official per-frame output (exact there; this diffusers rounds differently)
        torch.testing.assert_close(per_frame, io["out_num_frames1"], **FP32)
    # negative control: without temporal mixing the up block misses the official output clearly
    assert (per_frame - reference).abs().max() > DISCRIMINATION * tolerance["atol"]


def test_temporal_conv_pools_statistics_over_frames(fixtures_dir):
    """Negative control: GroupNorm statistics taken per frame (a 2D GroupNorm on each frame) miss the official
    Temp-Conv output clearly, so the parity test can tell the two apart."""
    weights, io, _ = official(fixtures_dir, "temporal_conv_vae")
    layer = load(TemporalConvLayer(io["x"].shape[1], num_layers=layer_count(weights)), weights, torch.float32)
    x = io["x"]
    h = x.transpose(1, 2).flatten(0, 1)  # (b F, C, H, W)
    with torch.no_grad():
        for module in layer.convs:
            if isinstance(module, torch.nn.Conv3d):
                h = module(h.unflatten(0, (x.shape[0], -1)).transpose(1, 2)).transpose(1, 2).flatten(0, 1)
            else:
                h = module(h)
    per_frame = x + h.unflatten(0, (x.shape[0], -1)).transpose(1, 2)
    assert (per_frame - io["out"]).abs().max() > DISCRIMINATION * FP32["atol"]


def official_vae_keys(fixtures_dir):
    path = vidrd_fixture_dir(fixtures_dir, ("keys_vae.json",), "VidRD VAE key layout") / "keys_vae.json"
    return json.loads(path.read_text())


def test_paper_size_layout_is_official(fixtures_dir):
    """SD 2.1's VAE with Temp-Convs, built on the meta device, has exactly the official keys and shapes (the
    mid-block attention under today's diffusers names); without its `temp_` keys it is diffusers' AutoencoderKL."""
    official = {key: tuple(shape) for key, shape in
                rename_deprecated_attention(official_vae_keys(fixtures_dir)).items()}
    with torch.device("meta"):
        model = TemporalKLAutoencoder(SD21_VAE)
        plain = AutoencoderKL(**SD21_VAE)
    ours = {key: tuple(value.shape) for key, value in model.vae.state_dict().items()}
    assert ours == official
    spatial = {key: shape for key, shape in ours.items() if not is_temporal_key(key)}
    assert spatial == {key: tuple(value.shape) for key, value in plain.state_dict().items()}
    temporal = [key for key in official if is_temporal_key(key)]
    assert temporal and all(key.startswith("decoder.up_blocks.") for key in temporal)


def test_deprecated_attention_names_are_renamed(fixtures_dir):
    keys = official_vae_keys(fixtures_dir)
    renamed = rename_deprecated_attention(keys)
    assert len(renamed) == len(keys)
    assert not any(re.search(r"\.(query|key|value|proj_attn)\.", key) for key in renamed)
    assert "decoder.mid_block.attentions.0.to_out.0.weight" in renamed


def tiny(temporal_decoding=True, clip_frames=4, seed=0):
    torch.manual_seed(seed)
    return TemporalKLAutoencoder(TINY_VAE, temporal_decoding=temporal_decoding, clip_frames=clip_frames).eval()


def randomise_temporal(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.vae.state_dict().items():
            if is_temporal_key(key):
                value.copy_(torch.randn(value.shape, generator=generator) * 0.2 + (1.0 if value.dim() == 1 and
                                                                                   "weight" in key else 0.0))


def sd_state_dict(plain: AutoencoderKL) -> dict[str, torch.Tensor]:
    """An SD VAE file as diffusers <= 0.14 wrote them (query/key/value/proj_attn)."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in plain.state_dict().items():
        for new, name in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{name}.")
        state[key] = value.clone()
    return state


def test_sd_weights_load_and_decode_as_sd(tmp_path):
    """An SD VAE folder (old attention names) loads strictly into the 2D part; the Temp-Convs start as identities,
    so temporal and frame-by-frame decoding both equal diffusers' AutoencoderKL."""
    torch.manual_seed(3)
    plain = AutoencoderKL(**TINY_VAE).eval()
    (tmp_path / "vae").mkdir()
    save_file(sd_state_dict(plain), str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    model = tiny()
    model.load_from_sd_folder(tmp_path)
    latents = torch.randn(2, 4, 6, 4, 4)
    frames = latents.transpose(1, 2).flatten(0, 1) / model.scaling_factor
    with torch.no_grad():
        reference = plain.decode(frames).sample.unflatten(0, (2, 6))
    torch.testing.assert_close(model.decode(latents), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.decode(latents, temporal=False), reference, atol=1e-6, rtol=0)


def test_bypass_is_the_2d_decoder_and_temporal_decoding_mixes_clips():
    """With trained (here random) Temp-Convs: frame-by-frame decoding is still the 2D decoder exactly (the official
    pipeline); temporal decoding differs and decodes each clip of `clip_frames` on its own."""
    model = tiny(clip_frames=4)
    randomise_temporal(model)
    plain = AutoencoderKL(**TINY_VAE).eval()
    plain.load_state_dict({k: v for k, v in model.vae.state_dict().items() if not is_temporal_key(k)})
    latents = torch.randn(2, 4, 10, 4, 4)  # clips of 4, 4 and 2 frames
    frames = latents.transpose(1, 2).flatten(0, 1) / model.scaling_factor
    with torch.no_grad():
        bypass = model.decode(latents, temporal=False)
        # (to rounding: the bypass decodes `decode_chunk_frames` frames per call, diffusers all 20 at once)
        torch.testing.assert_close(bypass, plain.decode(frames).sample.unflatten(0, (2, 10)), atol=1e-6, rtol=0)
        temporal = model.decode(latents)
        size = 4 * model.downsample_factor
        assert temporal.shape == bypass.shape == (2, 10, 3, size, size)
        assert (temporal - bypass).abs().max() > 1e-2
        for start, stop in ((0, 4), (4, 8), (8, 10)):
            clip = latents[:, :, start:stop]
            alone = decode_frames(model.vae, clip.transpose(1, 2).flatten(0, 1) / model.scaling_factor,
                                  num_frames=stop - start).unflatten(0, (2, stop - start))
            torch.testing.assert_close(temporal[:, start:stop], alone, atol=1e-6, rtol=0)


def test_official_checkpoint_loads_and_mismatches_are_named(tmp_path):
    """The fine-tuned VAE (official names, Temp-Convs included) loads strictly; a file without its Temp-Convs is
    refused naming the file and the missing keys."""
    source = tiny(seed=4)
    randomise_temporal(source)
    official = sd_state_dict(source.vae)
    path = tmp_path / "vae_finetuned.safetensors"
    save_file(official, str(path))
    model = tiny(seed=5)
    model.load_checkpoint(path)
    for key, value in source.vae.state_dict().items():
        assert torch.equal(model.vae.state_dict()[key], value), key
    spatial_only = tmp_path / "sd_vae.safetensors"
    save_file({k: v for k, v in official.items() if not is_temporal_key(k)}, str(spatial_only))
    with pytest.raises(CheckpointKeyError, match=r"(?s)sd_vae\.safetensors.*missing keys.*temp_convs"):
        model.load_checkpoint(spatial_only)


def test_bad_frame_grouping_is_named():
    weights = UpDecoderBlock2D(in_channels=16, out_channels=16, num_layers=1, resnet_groups=8)
    block = TemporalUpDecoderBlock(weights)
    with pytest.raises(ValueError, match="num_frames=4"):
        block(torch.randn(6, 16, 2, 2), num_frames=4)
    with pytest.raises(ValueError, match="clip_frames"):
        TemporalKLAutoencoder(TINY_VAE, clip_frames=0)
