"""Temporal attention parity with the official LaVie code, through the fixtures in `<fixtures root>/lavie`.

The fixtures (see their README) hold random weights, inputs and the official module's outputs for two widths
(`temporal_c{C}_*.safetensors`) and two frame counts (tensors suffixed `_f{F}`). Every number the checks compare
comes from the files; only tolerances (from the README) and the layout (file and tensor names) are written here,
so the tests hold for any fixture set of that layout. Sizes (heads, batch, spatial tokens) come from the files'
metadata and are cross-checked against the tensor shapes.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from modules.components.temporal_attention import RelativePositionBias, TemporalAttention
from modules.components.video_unet import SpatioTemporalBlock, VideoUNet

REPO = Path(__file__).resolve().parents[1]

# Layout of the fixture set: widths in the file names, frame counts in the tensor names.
CHANNELS = (320, 640)
FRAMES = (16, 8)
PROBS_CHANNELS = 320  # the only width whose files carry the attention probabilities (README)
TEMPORAL_PREFIXES = ("attn_temp.", "norm_temp.")

# Tolerances suggested by the fixtures README: the official float32 run is within ~4e-6 of the float64 one.
FP32 = dict(atol=1e-4, rtol=1e-4)
FP32_PROBS = dict(atol=1e-5, rtol=0.0)
FP64 = dict(atol=1e-10, rtol=0.0)
TOL = {torch.float32: FP32, torch.float64: FP64}
# A negative control must miss the fixture by this many times the float32 tolerance (the loosest one used).
DISCRIMINATION = 100

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
WIDTHS = pytest.mark.parametrize("channels", CHANNELS, ids=[f"c{c}" for c in CHANNELS])
LENGTHS = pytest.mark.parametrize("frames", FRAMES, ids=[f"f{f}" for f in FRAMES])


# ------------------------------------------------------------------------------------------------ fixture access
@pytest.fixture(scope="module")
def lavie_dir(fixtures_dir: Path) -> Path:
    path = fixtures_dir / "lavie"
    if not path.is_dir():
        pytest.fail(f"LaVie fixtures not found at {path}")
    return path


@lru_cache(maxsize=None)
def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one file, read once per session."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata


class LavieFixture:
    """The three files of one width: weights, float32 inputs/outputs, float64 outputs."""

    def __init__(self, root: Path, channels: int):
        self.channels = channels
        self.weights, self.meta = _load(root / f"temporal_c{channels}_weights.safetensors")
        self.io, self.io_meta = _load(root / f"temporal_c{channels}_io_fp32.safetensors")
        self.out64, _ = _load(root / f"temporal_c{channels}_out_fp64.safetensors")
        self.heads = int(self.meta["heads"])
        assert int(self.meta["query_dim"]) == channels
        assert self.heads * int(self.meta["dim_head"]) == channels

    def outputs(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return self.io if dtype == torch.float32 else self.out64

    def hidden(self, frames: int, dtype: torch.dtype) -> torch.Tensor:
        """`h_f{F}`: ((b F), d, C) block input; the float64 run was fed the same values cast to float64."""
        assert int(self.io_meta[f"video_length_f{frames}"]) == frames
        h = self.io[f"h_f{frames}"]
        assert h.shape == (int(self.io_meta["batch_b"]) * frames, int(self.io_meta["spatial_tokens_d"]), self.channels)
        return h.to(dtype)

    def temporal(self, dtype: torch.dtype) -> nn.ModuleDict:
        """norm_temp + attn_temp named as in a LaVie block, loaded strictly from the fixture weights."""
        modules = nn.ModuleDict({
            "norm_temp": nn.LayerNorm(self.channels),
            "attn_temp": TemporalAttention(self.channels, self.heads),
        }).to(dtype)
        # The learned tensors are stored as float16 (their exact values); cast before loading (README).
        modules.load_state_dict({k: v.to(dtype) for k, v in self.weights.items()}, strict=True)
        return modules.eval()


@pytest.fixture(scope="module")
def lavie(lavie_dir: Path):
    cache: dict[int, LavieFixture] = {}

    def get(channels: int) -> LavieFixture:
        if channels not in cache:
            cache[channels] = LavieFixture(lavie_dir, channels)
        return cache[channels]

    return get


def temporal_subblock(modules: nn.ModuleDict, h: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The README's eval branch: ((b F), d, C) -> (attn_out ((b d), F, C), block_out ((b F), d, C))."""
    x = rearrange(h, "(b f) d c -> (b d) f c", f=frames)
    attn_out = modules["attn_temp"](modules["norm_temp"](x))
    return attn_out, rearrange(x + attn_out, "(b d) f c -> (b f) d c", d=h.shape[1])


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


# ------------------------------------------------------------------------------------------------ layout and keys
def test_fixture_set_matches_the_parametrisation(lavie_dir: Path):
    """The widths and frame counts the tests are parametrised over are exactly those the fixture set holds, so a
    fixture set with more (or fewer) configurations fails here instead of being silently half-tested."""
    widths = {
        int(re.fullmatch(r"temporal_c(\d+)_weights\.safetensors", p.name).group(1))
        for p in lavie_dir.glob("temporal_c*_weights.safetensors")
    }
    assert widths == set(CHANNELS)
    for channels in widths:
        tensors, meta = _load(lavie_dir / f"temporal_c{channels}_io_fp32.safetensors")
        frames = {int(m.group(1)) for k in tensors if (m := re.fullmatch(r"h_f(\d+)", k))}
        assert frames == set(FRAMES)
        assert {int(meta[f"video_length_f{f}"]) for f in frames} == frames
        out64, _ = _load(lavie_dir / f"temporal_c{channels}_out_fp64.safetensors")
        has_probs = channels == PROBS_CHANNELS
        expected64 = {f"{name}_f{f}" for f in frames for name in ("attn_out", "block_out") + ("attn_probs",) * has_probs}
        assert set(out64) == expected64
        assert all(t.dtype == torch.float64 for t in out64.values())


@WIDTHS
def test_weight_keys_are_one_spatiotemporal_block(lavie, channels):
    """The fixture keys are exactly the temporal keys of a SpatioTemporalBlock of that width, with equal shapes."""
    fx = lavie(channels)
    spatial = BasicTransformerBlock(channels, fx.heads, channels // fx.heads, cross_attention_dim=16)
    block = SpatioTemporalBlock(spatial)
    temporal = {k: v for k, v in block.state_dict().items() if k.startswith(TEMPORAL_PREFIXES)}
    assert set(temporal) == set(fx.weights)
    assert {k: tuple(v.shape) for k, v in temporal.items()} == {k: tuple(v.shape) for k, v in fx.weights.items()}
    # and the stand-alone modules used below take them strictly (raises otherwise)
    fx.temporal(torch.float32)


def test_video_unet_blocks_have_the_fixture_temporal_keys(lavie):
    """Every transformer block of a (tiny) VideoUNet carries the temporal keys of the official block, by name."""
    unet = VideoUNet(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), attention_head_dim=2,
    )
    suffixes: dict[str, set[str]] = {}
    for key in unet.state_dict():
        if VideoUNet.is_temporal_key(key):
            match = re.fullmatch(r"(.*\.)((?:attn_temp|norm_temp)\..*)", key)
            suffixes.setdefault(match.group(1), set()).add(match.group(2))
    assert len(suffixes) == sum(1 for _ in unet.temporal_blocks()) > 0
    for channels in CHANNELS:
        expected = set(lavie(channels).weights)
        assert all(keys == expected for keys in suffixes.values()), suffixes


# ------------------------------------------------------------------------------------------------ outputs
@WIDTHS
@LENGTHS
@DTYPES
def test_attention_and_block_output_match_official(lavie, channels, frames, dtype):
    fx = lavie(channels)
    with torch.no_grad():
        attn_out, block_out = temporal_subblock(fx.temporal(dtype), fx.hidden(frames, dtype), frames)
    reference = fx.outputs(dtype)
    torch.testing.assert_close(attn_out, reference[f"attn_out_f{frames}"].to(dtype), **TOL[dtype])
    torch.testing.assert_close(block_out, reference[f"block_out_f{frames}"].to(dtype), **TOL[dtype])


@pytest.fixture(scope="module")
def zeroed_block(lavie):
    """`SpatioTemporalBlock` of a width and dtype with the fixture's temporal weights. As for the fixtures, the
    outputs of spatial attention, cross-attention and feed-forward are zeroed (they then add exact zeros), so the
    block output is the temporal residual sub-block's. Built once per (width, dtype): construction dominates."""
    cache: dict[tuple[int, torch.dtype], SpatioTemporalBlock] = {}

    def get(channels: int, dtype: torch.dtype) -> SpatioTemporalBlock:
        if (channels, dtype) not in cache:
            fx = lavie(channels)
            torch.manual_seed(0)
            spatial = BasicTransformerBlock(channels, fx.heads, channels // fx.heads, cross_attention_dim=16)
            block = SpatioTemporalBlock(spatial).to(dtype).eval()
            for linear in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[-1]):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
            missing, unexpected = block.load_state_dict({k: v.to(dtype) for k, v in fx.weights.items()}, strict=False)
            assert not unexpected and not any(k.startswith(TEMPORAL_PREFIXES) for k in missing)
            cache[channels, dtype] = block
        return cache[channels, dtype]

    return get


@WIDTHS
@LENGTHS
@pytest.mark.parametrize(  # the two dtypes are each checked in full above; here each takes one layout
    ("dtype", "image_frames"), [(torch.float32, 0), (torch.float64, 2)], ids=["fp32-video", "fp64-video+2images"]
)
def test_spatiotemporal_block_matches_official(lavie, zeroed_block, channels, frames, dtype, image_frames):
    """The temporal sub-block through `SpatioTemporalBlock.forward` (spatial parts zeroed, see `zeroed_block`).
    Image frames appended after the video (joint image-video training) must pass through unchanged."""
    fx = lavie(channels)
    block = zeroed_block(channels, dtype)
    torch.manual_seed(1)
    h = fx.hidden(frames, dtype)
    batch, tokens = h.shape[0] // frames, h.shape[1]
    video = rearrange(h, "(b f) d c -> b f d c", f=frames)
    images = torch.randn(batch, image_frames, tokens, channels, dtype=dtype)
    total = frames + image_frames
    hidden = rearrange(torch.cat([video, images], dim=1), "b f d c -> (b f) d c")
    context = torch.randn(batch * total, 3, 16, dtype=dtype)
    with torch.no_grad():
        out = block(hidden, encoder_hidden_states=context,
                    cross_attention_kwargs={"video_frames": frames, "total_frames": total})
    out = rearrange(out, "(b f) d c -> b f d c", f=total)
    expected = rearrange(fx.outputs(dtype)[f"block_out_f{frames}"].to(dtype), "(b f) d c -> b f d c", f=frames)
    torch.testing.assert_close(out[:, :frames], expected, **TOL[dtype])
    torch.testing.assert_close(out[:, frames:], images, atol=0, rtol=0)


@LENGTHS
@DTYPES
def test_attention_probabilities_match_official(lavie, frames, dtype):
    fx = lavie(PROBS_CHANNELS)
    modules = fx.temporal(dtype)
    x = rearrange(fx.hidden(frames, dtype), "(b f) d c -> (b d) f c", f=frames)
    with torch.no_grad():
        out, probs = modules["attn_temp"].explicit_forward(modules["norm_temp"](x))
    torch.testing.assert_close(probs, fx.outputs(dtype)[f"attn_probs_f{frames}"].to(dtype),
                               **(FP32_PROBS if dtype == torch.float32 else FP64))
    torch.testing.assert_close(out, fx.outputs(dtype)[f"attn_out_f{frames}"].to(dtype), **TOL[dtype])


@WIDTHS
@LENGTHS
def test_sdpa_forward_equals_explicit_forward(lavie, channels, frames):
    """The model's SDPA path and the explicit softmax formula agree to float64 round-off."""
    fx = lavie(channels)
    modules = fx.temporal(torch.float64)
    x = modules["norm_temp"](rearrange(fx.hidden(frames, torch.float64), "(b f) d c -> (b d) f c", f=frames))
    with torch.no_grad():
        torch.testing.assert_close(modules["attn_temp"](x), modules["attn_temp"].explicit_forward(x)[0],
                                   atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------ position encodings
def test_bucket_function_matches_official_table(lavie):
    io = lavie(PROBS_CHANNELS).io  # the README places the bucket table in this file
    # num_buckets / max_distance as the model builds them: this also checks the defaults are LaVie's
    bias = TemporalAttention(PROBS_CHANNELS, lavie(PROBS_CHANNELS).heads).time_rel_pos_bias
    buckets = RelativePositionBias.bucket(io["bucket_table_rel"], bias.num_buckets, bias.max_distance)
    assert torch.equal(buckets, io["bucket_table_bucket"])


@WIDTHS
@LENGTHS
def test_relative_position_buckets_and_bias_match_official(lavie, channels, frames):
    fx = lavie(channels)
    bias = fx.temporal(torch.float32)["attn_temp"].time_rel_pos_bias
    pos = torch.arange(frames)
    buckets = RelativePositionBias.bucket(pos[None, :] - pos[:, None], bias.num_buckets, bias.max_distance)
    assert torch.equal(buckets, fx.io[f"rel_pos_bucket_f{frames}"])
    with torch.no_grad():
        # an embedding lookup of float16 values: exact
        assert torch.equal(bias(frames), fx.io[f"rel_pos_bias_f{frames}"])


@WIDTHS
@LENGTHS
def test_rotary_angles_match_official(lavie, channels, frames):
    rotary = lavie(channels).temporal(torch.float32)["attn_temp"].rotary_emb
    # one float32 multiply per element (position x frequency), as upstream: exact
    assert torch.equal(rotary.angles(frames), lavie(channels).io[f"rope_angles_f{frames}"])


# ------------------------------------------------------------------------------------------------ negative controls
def _half_split_rotary(rotary: nn.Module):
    """RoPE pairing channel i with i + dim/2 (GPT-NeoX style) instead of LaVie's adjacent pairs."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        theta = torch.arange(x.shape[-2], dtype=rotary.freqs.dtype)[:, None] * rotary.freqs  # (F, dim/2)
        cos, sin = theta.cos().to(x.dtype), theta.sin().to(x.dtype)
        half = rotary.dim // 2
        x1, x2, rest = x[..., :half], x[..., half : rotary.dim], x[..., rotary.dim :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)

    return forward


def _transposed_bias(bias_module: nn.Module):
    original = bias_module.forward
    return lambda frames: original(frames).transpose(-1, -2)


CONTROLS = {
    "half_split_rope": lambda attn: setattr(attn.rotary_emb, "forward", _half_split_rotary(attn.rotary_emb)),
    "transposed_bias": lambda attn: setattr(attn.time_rel_pos_bias, "forward", _transposed_bias(attn.time_rel_pos_bias)),
    "no_rope": lambda attn: setattr(attn.rotary_emb, "forward", lambda x: x),
}


@WIDTHS
@LENGTHS
@pytest.mark.parametrize("control", list(CONTROLS))
def test_parity_check_rejects_plausible_mistakes(lavie, channels, frames, control):
    """Plausible re-implementation mistakes miss the fixture by far more than the tolerance, so the parity tests
    above do discriminate (the unmodified module passes them)."""
    fx = lavie(channels)
    modules = fx.temporal(torch.float32)
    CONTROLS[control](modules["attn_temp"])  # instance attribute: shadows the method for this module only
    with torch.no_grad():
        attn_out, _ = temporal_subblock(modules, fx.hidden(frames, torch.float32), frames)
    assert max_error(attn_out, fx.io[f"attn_out_f{frames}"]) > DISCRIMINATION * FP32["atol"]


# ------------------------------------------------------------------------------------------------ benchmark smoke test
@pytest.fixture(scope="module")
def benchmark():
    """benchmarks/temporal_attention.py, imported by path (benchmarks/ is not a package)."""
    name = "benchmarks_temporal_attention"
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "temporal_attention.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("kind", ["core", "module"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_benchmark_measures_agreeing_paths(benchmark, kind, mode):
    """The benchmark's measurement runs on a tiny case, its paths agree, and its rows carry the reported fields."""
    case = benchmark.Case("tiny", "real-level", n=4, channels=64, frames=8)
    row = benchmark.run_case(case, kind, mode, repeats=1, isolate=False)
    assert row["max_abs_diff"] < 1e-5
    paths = benchmark.paths_for(kind)
    assert set(paths) >= {"sdpa", "einsum"} and all(p in row for p in paths)
    for path in paths:
        assert {"median_ms", "min_ms", "times_ms", "peak_mem_mib", "mem_method"} <= set(row[path])
        assert row[path]["median_ms"] > 0 and len(row[path]["times_ms"]) == 1
    assert row["time_ratio"] == pytest.approx(row["sdpa"]["median_ms"] / row["einsum"]["median_ms"])
    assert {"mem_ratio", "backend", "name", "n", "channels", "frames", "heads", "dim_head", "kind", "mode"} <= set(row)
    assert ("time_ratio_sdpa_4d" in row) == (kind == "core")


def test_benchmark_cli_writes_its_report(benchmark, monkeypatch, tmp_path):
    """The command line end to end (plan, rows, JSON and markdown files) on one tiny case, measured in-process."""
    monkeypatch.setattr(benchmark, "lavie_cases", lambda quick: [benchmark.Case("tiny", "real-level", n=2, channels=64, frames=4)])
    report = benchmark.main(["--device", "cpu", "--no-isolate", "--repeats", "1", "--module", "all", "--backward", "all",
                             "--out-dir", str(tmp_path)])
    assert [(r["kind"], r["mode"]) for r in report["results"]] == [
        (kind, mode) for kind in benchmark.KINDS for mode in benchmark.MODES
    ]
    assert json.loads((tmp_path / "temporal_attention_cpu.json").read_text())["meta"]["torch"] == torch.__version__
    assert (tmp_path / "temporal_attention_cpu.md").read_text().count("| tiny |") == len(report["results"])
