"""The interpolation UNet computes what LaVie's official one computes: `<fixtures root>/lavie/unet_interp_tiny_*`.

The fixtures (see their README) hold the official interpolation `UNet3DConditionModel`'s constructor config, its
random weights and its outputs in float64 and float32 for inputs of F frames (`_f{F}`), whose 8 channels are the
noisy latent and then the copied key-frame latents, plus a negative control that is not official (the float64 output
with every GroupNorm per frame). The weights go through the project's checkpoint path (`model.pretrained.checkpoint`,
`LaVieInterpolation.load_pretrained`). Every number compared comes from the files; only tolerances (the README's) and
the layout (file and tensor names) are written here, so the tests hold for any fixture set of that layout. Wrong
block designs are built and must miss the official outputs, so the parity checks can fail.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from modules.components.checkpoints import CheckpointKeyError
from modules.components.video_unet import config_from_lavie
from modules.lavie_interpolation import LaVieInterpolation
from tests.lavie_fixtures import DISCRIMINATION, FP32, FP64, fixture_tensors, frame_counts, lavie_fixture_dir
from tests.sd_layout import CONFIGS, TINY_TEXT_ENCODER, TINY_VAE, write_lavie_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

# Layout of the fixture set
CONFIG = "unet_interp_tiny_config.json"
WEIGHTS = "unet_interp_tiny_weights.safetensors"
IO = "unet_interp_tiny_io.safetensors"
BASE_WEIGHTS = "unet_base_tiny_weights.safetensors"  # a base-stage UNet of the same sizes


@pytest.fixture(scope="module")
def lavie_dir(fixtures_dir: Path) -> Path:
    return lavie_fixture_dir(fixtures_dir, (CONFIG, WEIGHTS, IO, BASE_WEIGHTS), "LaVie UNet")


def cases(lavie_dir: Path) -> list[int]:
    return frame_counts(lavie_dir / IO)


def interpolation_config(lavie_dir: Path, checkpoint: Path | None = None, **unet_options):
    """configs/model/lavie_interpolation.yaml with the fixture's UNet (its official config as VideoUNet arguments)
    and tiny text encoder and VAE of matching widths (never run here)."""
    cfg = OmegaConf.load(CONFIGS / "model" / "lavie_interpolation.yaml")
    unet = config_from_lavie(json.loads((lavie_dir / CONFIG).read_text()), stage="interpolation")
    cfg.unet = OmegaConf.create({"_target_": cfg.unet._target_, "_convert_": "all", **unet, **unet_options})
    cfg.text_encoder.config = OmegaConf.create({**TINY_TEXT_ENCODER, "hidden_size": unet["cross_attention_dim"]})
    cfg.autoencoder.config = OmegaConf.create({**TINY_VAE, "latent_channels": unet["out_channels"]})
    cfg.sampler.num_frames, cfg.sampler.height, cfg.sampler.width = 5, 32, 32
    cfg.pretrained.init_from_sd = False
    cfg.pretrained.checkpoint = None if checkpoint is None else str(checkpoint)
    return cfg


def build(lavie_dir: Path, **unet_options) -> LaVieInterpolation:
    torch.manual_seed(0)
    return instantiate(interpolation_config(lavie_dir, lavie_dir / WEIGHTS, **unet_options)).eval()


@pytest.fixture(scope="module")
def model(lavie_dir) -> LaVieInterpolation:
    return build(lavie_dir)


@torch.no_grad()
def run(unet: torch.nn.Module, io: dict[str, torch.Tensor], frames: int, dtype: torch.dtype) -> torch.Tensor:
    """The fixture's call, unet(x, timesteps, encoder_hidden_states) with x = [x_t; copied key frames] on channels,
    as the project's UNet takes it: the noisy latent, then the key frames as `conditioning`."""
    unet = copy.deepcopy(unet)  # float16 weights -> float32 -> float64 are exact casts
    unet = unet.double() if dtype == torch.float64 else unet.float()
    x, context = io[f"x_f{frames}"].to(dtype), io[f"encoder_hidden_states_f{frames}"].to(dtype)
    noisy = unet.config.in_channels
    return unet(x[:, :noisy], io[f"timesteps_f{frames}"], context, conditioning=x[:, noisy:])


def test_official_weights_load_strictly_through_the_checkpoint_path(lavie_dir, model):
    weights = fixture_tensors(lavie_dir / WEIGHTS)
    state = model.unet.state_dict()
    assert state.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key
    assert not any("rotary_emb" in k or "time_rel_pos_bias" in k for k in state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_unet_matches_the_official_outputs(lavie_dir, model, dtype):
    io = fixture_tensors(lavie_dir / IO)
    for frames in cases(lavie_dir):
        expected = io[f"out_fp64_f{frames}" if dtype == torch.float64 else f"out_fp32_f{frames}"]
        out = run(model.unet, io, frames, dtype)
        assert out.dtype == dtype
        torch.testing.assert_close(out, expected, **(FP64 if dtype == torch.float64 else FP32),
                                   msg=lambda m, f=frames: f"F={f}: {m}")


def test_per_frame_group_norms_are_the_negative_control(lavie_dir):
    """Per-frame GroupNorm statistics reproduce the fixture's control, far from the official output."""
    io = fixture_tensors(lavie_dir / IO)
    per_frame = build(lavie_dir, group_norm_over_frames=False)
    for frames in cases(lavie_dir):
        control, official = io[f"out_per_frame_gn_fp64_f{frames}"], io[f"out_fp64_f{frames}"]
        assert (control - official).abs().max() > DISCRIMINATION * FP32["atol"]
        torch.testing.assert_close(run(per_frame.unet, io, frames, torch.float64), control, **FP64,
                                   msg=lambda m, f=frames: f"F={f}: {m}")


@pytest.mark.parametrize("wrong", [
    {"spatial_attention": "full"},                            # each frame attends to itself only
    {"temporal_attention_after": "cross_attention"},          # the base block's order
    {"temporal_rope": True},                                  # RoPE as in the base stage (a weight-free change)
], ids=["full-spatial-attention", "temporal-before-feed-forward", "rope"])
def test_wrong_block_designs_miss_the_official_outputs(lavie_dir, wrong):
    """Same weights, one design choice changed: far outside the parity tolerance on every case."""
    io = fixture_tensors(lavie_dir / IO)
    variant = instantiate(interpolation_config(lavie_dir, **wrong)).eval()
    missing, unexpected = variant.unet.load_state_dict(fixture_tensors(lavie_dir / WEIGHTS), strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing)  # RoPE's frequencies are not learned
    for frames in cases(lavie_dir):
        miss = (run(variant.unet, io, frames, torch.float64) - io[f"out_fp64_f{frames}"]).abs().max()
        assert miss > DISCRIMINATION * FP32["atol"], f"F={frames}: {wrong} misses by only {miss:.2e}"


def test_a_base_stage_checkpoint_is_refused_with_a_clear_error(lavie_dir, tmp_path):
    """lavie_base.pt where lavie_interpolation.pt belongs: the error says which file it is and what to do."""
    path = write_lavie_checkpoint(tmp_path / "lavie_base.pt", fixture_tensors(lavie_dir / BASE_WEIGHTS))
    model = instantiate(interpolation_config(lavie_dir))
    with pytest.raises(CheckpointKeyError) as excinfo:
        model.load_pretrained(checkpoint=path)
    text = str(excinfo.value)
    assert str(path) in text and "base-stage" in text and "lavie_interpolation.pt" in text
    assert "model.pretrained.init_from_base" in text


def test_training_starts_from_a_base_stage_unet(lavie_dir, tmp_path):
    """`pretrained.init_from_base`: every base weight (temporal projections too), no RoPE or bias table, and the
    conditioning inputs of conv_in at zero."""
    base = fixture_tensors(lavie_dir / BASE_WEIGHTS)
    path = write_lavie_checkpoint(tmp_path / "lavie_base.pt", base)
    cfg = interpolation_config(lavie_dir)
    cfg.pretrained.init_from_base = str(path)
    model = instantiate(cfg)
    state = model.unet.state_dict()
    noisy = model.unet.config.in_channels
    dropped = {k for k in base if "rotary_emb" in k or "time_rel_pos_bias" in k}
    assert dropped and set(state) == set(base) - dropped
    for key in set(state) - {"conv_in.weight"}:
        assert torch.equal(state[key], base[key].to(state[key].dtype)), key
    assert torch.equal(state["conv_in.weight"][:, :noisy], base["conv_in.weight"].float())
    assert not state["conv_in.weight"][:, noisy:].any()
