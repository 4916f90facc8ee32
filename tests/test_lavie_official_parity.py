"""The base UNet computes what the official LaVie UNet computes: `<fixtures root>/lavie/unet_base_tiny_*`.

The fixtures (see their README) hold the official base `UNet3DConditionModel`'s constructor config, its random weights
and its outputs in float64 and float32 for independent inputs of F frames (tensors suffixed `_f{F}`), plus a negative
control that is not official: the float64 output with every GroupNorm per frame, what a frames-in-batch 2D UNet
computes. The weights go through the project's own checkpoint path (`model.pretrained.checkpoint`, i.e.
`LaVie.load_pretrained`). Every number compared comes from the files; only tolerances (from the README) and the
layout (file and tensor names) are written here, so the tests hold for any fixture set of that layout.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from modules.components.video_unet import config_from_lavie
from modules.lavie import LaVie
from tests.lavie_fixtures import DISCRIMINATION, FP32, FP64, fixture_tensors, frame_counts, lavie_fixture_dir
from tests.sd_layout import TINY_TEXT_ENCODER, TINY_VAE, tiny_lavie_base_config

pytestmark = pytest.mark.usefixtures("single_thread")

# Layout of the fixture set
CONFIG = "unet_base_tiny_config.json"
WEIGHTS = "unet_base_tiny_weights.safetensors"
IO = "unet_base_tiny_io.safetensors"


@pytest.fixture(scope="module")
def lavie_dir(fixtures_dir: Path) -> Path:
    return lavie_fixture_dir(fixtures_dir, (CONFIG, WEIGHTS, IO), "LaVie UNet")


def cases(lavie_dir: Path) -> list[int]:
    return frame_counts(lavie_dir / IO)


def build_lavie(lavie_dir: Path, **unet_options) -> LaVie:
    """configs/model/lavie_base.yaml with the fixture's UNet (its official config as VideoUNet arguments) and the
    fixture's weights as `pretrained.checkpoint`; tiny text encoder and VAE of matching widths (never run here)."""
    unet = config_from_lavie(json.loads((lavie_dir / CONFIG).read_text()))
    components = {
        "unet": {**unet, **unet_options},
        "text_encoder": {**TINY_TEXT_ENCODER, "hidden_size": unet["cross_attention_dim"]},
        "vae": {**TINY_VAE, "latent_channels": unet["in_channels"]},
    }
    cfg = tiny_lavie_base_config(components, checkpoint=lavie_dir / WEIGHTS, pretrained={"init_from_sd": False})
    torch.manual_seed(0)
    return instantiate(cfg).eval()


@pytest.fixture(scope="module")
def model(lavie_dir) -> LaVie:
    return build_lavie(lavie_dir)


@pytest.fixture(scope="module")
def per_frame_model(lavie_dir) -> LaVie:
    """The same weights with per-frame GroupNorms: what the project computed before, the negative control."""
    return build_lavie(lavie_dir, group_norm_over_frames=False)


@torch.no_grad()
def run(unet: torch.nn.Module, io: dict[str, torch.Tensor], frames: int, dtype: torch.dtype) -> torch.Tensor:
    """The fixture's call: unet(x, timesteps, encoder_hidden_states), no appended images, in `dtype`."""
    unet = copy.deepcopy(unet)  # float16 weights -> float32 -> float64 are exact casts
    unet = unet.double() if dtype == torch.float64 else unet.float()
    x, context = io[f"x_f{frames}"].to(dtype), io[f"encoder_hidden_states_f{frames}"].to(dtype)
    return unet(x, io[f"timesteps_f{frames}"], context)


def test_official_weights_load_strictly_through_the_checkpoint_path(lavie_dir, model):
    weights = fixture_tensors(lavie_dir / WEIGHTS)
    state = model.unet.state_dict()
    assert state.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_unet_matches_the_official_outputs(lavie_dir, model, dtype):
    io = fixture_tensors(lavie_dir / IO)
    for frames in cases(lavie_dir):
        expected = io[f"out_fp64_f{frames}" if dtype == torch.float64 else f"out_fp32_f{frames}"]
        out = run(model.unet, io, frames, dtype)
        assert out.dtype == dtype
        torch.testing.assert_close(out, expected, **(FP64 if dtype == torch.float64 else FP32),
                                   msg=lambda m, f=frames: f"F={f}: {m}")


def test_per_frame_group_norms_are_the_negative_control(lavie_dir, per_frame_model):
    """Per-frame GroupNorm statistics reproduce the control and miss the official output far outside the parity
    tolerances: the parity test above would fail if the ResNet norms were per frame."""
    io = fixture_tensors(lavie_dir / IO)
    for frames in cases(lavie_dir):
        control, official = io[f"out_per_frame_gn_fp64_f{frames}"], io[f"out_fp64_f{frames}"]
        assert (control - official).abs().max() > DISCRIMINATION * FP32["atol"]
        out = run(per_frame_model.unet, io, frames, torch.float64)
        torch.testing.assert_close(out, control, **FP64, msg=lambda m, f=frames: f"F={f}: {m}")
        assert not torch.allclose(run(per_frame_model.unet, io, frames, torch.float32), official.float(), **FP32)


@torch.no_grad()
def test_appended_images_change_neither_the_video_nor_each_other(lavie_dir, model):
    """Joint training appends images after the video's frames: the video's output stays the official one, and an
    image's output does not depend on the video beside it (each image is normalised on its own)."""
    io = fixture_tensors(lavie_dir / IO)
    frames = cases(lavie_dir)[0]
    unet = copy.deepcopy(model.unet).double()
    x, context = io[f"x_f{frames}"].double(), io[f"encoder_hidden_states_f{frames}"].double()
    images = x[:, :, :2].flip(0)  # two frames of the other sample, as stills
    prompts = torch.stack([context, context.flip(0), context.flip(0)], dim=1)  # (B, 1 + M, L, D)
    out = unet(torch.cat([x, images], dim=2), io[f"timesteps_f{frames}"], prompts, num_image_frames=2)
    torch.testing.assert_close(out[:, :, :frames], io[f"out_fp64_f{frames}"], **FP64)

    other_video = torch.cat([0.5 * x.flip(2) + 1.0, images], dim=2)
    out_other = unet(other_video, io[f"timesteps_f{frames}"], prompts, num_image_frames=2)
    assert (out_other[:, :, :frames] - out[:, :, :frames]).abs().max() > DISCRIMINATION * FP32["atol"]
    torch.testing.assert_close(out_other[:, :, frames:], out[:, :, frames:], **FP64)
