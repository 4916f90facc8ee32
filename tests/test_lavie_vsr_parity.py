"""The VSR UNet computes what the official LaVie `UNet3DVSRModel` computes: `<fixtures root>/lavie/unet_vsr_tiny_*`,
and the paper-size config has exactly the official key layout (`keys_vsr.json`).

The fixtures (see their README) hold the official VSR UNet's constructor config, its random weights and its outputs
in float64 and float32 for independent inputs of F frames (`_f{F}`), plus a negative control that is not official:
the float64 output with every GroupNorm per frame. The weights go through the project's checkpoint path
(`model.pretrained.checkpoint`, i.e. `LaVieVSR.load_pretrained`). Every number compared comes from the files; only
tolerances (from the README) and the layout (file and tensor names) are written here, so the tests hold for any
fixture set of that layout.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from modules.components.vsr_unet import config_from_lavie_vsr
from modules.lavie_vsr import LaVieVSR
from tests.lavie_fixtures import DISCRIMINATION, FP32, FP64, fixture_tensors, frame_counts, lavie_fixture_dir
from tests.sd_layout import CONFIGS, TINY_TEXT_ENCODER, TINY_VAE

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = "unet_vsr_tiny_config.json"
WEIGHTS = "unet_vsr_tiny_weights.safetensors"
IO = "unet_vsr_tiny_io.safetensors"
KEYS = "keys_vsr.json"


@pytest.fixture(scope="module")
def lavie_dir(fixtures_dir: Path) -> Path:
    return lavie_fixture_dir(fixtures_dir, (CONFIG, WEIGHTS, IO, KEYS), "LaVie VSR")


def cases(lavie_dir: Path) -> list[int]:
    return frame_counts(lavie_dir / IO)


def build_vsr(lavie_dir: Path, **unet_options) -> LaVieVSR:
    """configs/model/lavie_vsr.yaml with the fixture's UNet (its official config as VSRUNet arguments) and the
    fixture's weights as `pretrained.checkpoint`; tiny text encoder and x4 VAE of matching widths (never run here)."""
    unet = config_from_lavie_vsr(json.loads((lavie_dir / CONFIG).read_text()))
    cfg = OmegaConf.load(CONFIGS / "model" / "lavie_vsr.yaml")
    cfg.unet = OmegaConf.create({"_target_": cfg.unet._target_, "_convert_": "all", **unet, **unet_options})
    cfg.text_encoder.config = OmegaConf.create({**TINY_TEXT_ENCODER, "hidden_size": unet["cross_attention_dim"]})
    cfg.autoencoder.config = OmegaConf.create({**TINY_VAE, "latent_channels": unet["out_channels"]})
    cfg.pretrained = OmegaConf.create({"sd_path": None, "checkpoint": str(lavie_dir / WEIGHTS), "init_from_sd": False})
    torch.manual_seed(0)
    return instantiate(cfg).eval()


@pytest.fixture(scope="module")
def model(lavie_dir) -> LaVieVSR:
    return build_vsr(lavie_dir)


@torch.no_grad()
def run(unet: torch.nn.Module, io: dict[str, torch.Tensor], frames: int, dtype: torch.dtype) -> torch.Tensor:
    """The fixture's call: unet(x, timesteps, low_res, encoder_hidden_states, class_labels=noise_level)."""
    unet = copy.deepcopy(unet)  # float16 weights -> float32 -> float64 are exact casts
    unet = unet.double() if dtype == torch.float64 else unet.float()
    x, low_res = io[f"x_f{frames}"].to(dtype), io[f"low_res_f{frames}"].to(dtype)
    context = io[f"encoder_hidden_states_f{frames}"].to(dtype)
    return unet(x, io[f"timesteps_f{frames}"], low_res, context, io[f"class_labels_f{frames}"])


def test_official_weights_load_strictly_through_the_checkpoint_path(lavie_dir, model):
    weights = fixture_tensors(lavie_dir / WEIGHTS)
    state = model.unet.state_dict()
    assert state.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_vsr_unet_matches_the_official_outputs(lavie_dir, model, dtype):
    io = fixture_tensors(lavie_dir / IO)
    for frames in cases(lavie_dir):
        expected = io[f"out_fp64_f{frames}" if dtype == torch.float64 else f"out_fp32_f{frames}"]
        out = run(model.unet, io, frames, dtype)
        assert out.dtype == dtype
        torch.testing.assert_close(out, expected, **(FP64 if dtype == torch.float64 else FP32),
                                   msg=lambda m, f=frames: f"F={f}: {m}")


def test_per_frame_group_norms_are_the_negative_control(lavie_dir):
    """Per-frame GroupNorm statistics everywhere (ResNets, output norm and the temporal blocks) reproduce the
    control and miss the official output far outside the parity tolerances."""
    per_frame = build_vsr(lavie_dir, group_norm_over_frames=False)
    io = fixture_tensors(lavie_dir / IO)
    for frames in cases(lavie_dir):
        control, official = io[f"out_per_frame_gn_fp64_f{frames}"], io[f"out_fp64_f{frames}"]
        assert (control - official).abs().max() > DISCRIMINATION * FP32["atol"]
        torch.testing.assert_close(run(per_frame.unet, io, frames, torch.float64), control, **FP64,
                                   msg=lambda m, f=frames: f"F={f}: {m}")
        assert not torch.allclose(run(per_frame.unet, io, frames, torch.float32), official.float(), **FP32)


def test_the_temporal_layers_matter(lavie_dir, model):
    """Without its temporal modules (the levels' TemporalModule3D) the UNet misses the official output: the parity
    test sees them."""
    unet = copy.deepcopy(model.unet)
    for module in [*unet.down_temporal_blocks, unet.mid_temporal_block, *unet.up_temporal_blocks]:
        torch.nn.init.zeros_(module.shift_conv.weight)
        torch.nn.init.zeros_(module.shift_conv.bias)
    io = fixture_tensors(lavie_dir / IO)
    for frames in cases(lavie_dir):
        out = run(unet, io, frames, torch.float64)
        assert (out - io[f"out_fp64_f{frames}"]).abs().max() > DISCRIMINATION * FP32["atol"]


def test_paper_size_config_has_the_official_key_layout(lavie_dir):
    """configs/model/lavie_vsr.yaml's UNet, built on the meta device: exactly the keys and shapes of the official
    `UNet3DVSRModel` that `lavie_vsr.pt` holds."""
    expected = {k: tuple(v) for k, v in json.loads((lavie_dir / KEYS).read_text()).items()}
    cfg = OmegaConf.load(CONFIGS / "model" / "lavie_vsr.yaml")
    with torch.device("meta"):
        unet = instantiate(cfg.unet)
    got = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert sorted(set(expected) - set(got)) == [], "missing official keys"
    assert sorted(set(got) - set(expected)) == [], "keys the official model does not have"
    assert {k for k in got if got[k] != expected[k]} == set()


def test_official_config_maps_to_the_paper_size_config(lavie_dir):
    """The fixture's official config, mapped, keeps every argument the paper-size yaml sets for the same key
    (apart from the sizes the fixture shrinks), so the yaml is the official UNet's config."""
    official = config_from_lavie_vsr(json.loads((lavie_dir / CONFIG).read_text()))
    paper = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "lavie_vsr.yaml").unet)
    shrunk = {"block_out_channels", "attention_head_dim", "layers_per_block", "cross_attention_dim", "norm_num_groups",
              "sample_size"}
    for key, value in paper.items():
        if key in official and key not in shrunk:
            assert official[key] == value, key
