"""Reading `$FIXTURES_DIR/vidrd` for the parity tests of VidRD's video UNet: the README's tolerances, the tensor
files (weights stored as float16, cast to the dtype under test), and the sizes a fixture set holds."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.lavie_fixtures import fixture_tensors

# Tolerances suggested by fixtures/vidrd/README.md: float32 layer outputs against the official float32 run (the
# largest float32-vs-float64 gap it measured is ~4e-6), attention probabilities, float64 against the float64 run.
FP32 = dict(atol=1e-4, rtol=1e-4)
FP32_PROBS = dict(atol=1e-5, rtol=0.0)
FP64 = dict(atol=1e-10, rtol=0.0)
TOLERANCE = {torch.float32: FP32, torch.float64: FP64}
# A negative control (a wrong variant) must miss the official output by this many times the float32 tolerance.
DISCRIMINATION = 100
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])


def vidrd_fixture_dir(fixtures_dir: Path, names: tuple[str, ...], what: str) -> Path:
    """`fixtures_dir/vidrd`, failing (not skipping) when one of `names` is missing."""
    path = fixtures_dir / "vidrd"
    for name in names:
        if not (path / name).is_file():
            pytest.fail(f"{what} fixture not found: {path / name}")
    return path


def fixture_set(root: Path, stem: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, float32 inputs/outputs, float64 outputs) of `<stem>_{weights,io_fp32,out_fp64}.safetensors`."""
    files = [root / f"{stem}_{part}.safetensors" for part in ("weights", "io_fp32", "out_fp64")]
    for file in files:
        if not file.is_file():
            pytest.fail(f"VidRD fixture not found: {file}")
    return tuple(fixture_tensors(file) for file in files)  # type: ignore[return-value]


def weights_as(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored float16 weights (the exact values used officially) cast to `dtype`."""
    return {k: v.to(dtype) for k, v in weights.items()}


def expected(io: dict[str, torch.Tensor], out64: dict[str, torch.Tensor], name: str, dtype: torch.dtype
             ) -> torch.Tensor:
    """The official output `name` of the run in `dtype` (float32: the io file; float64: the out_fp64 file)."""
    return io[name] if dtype == torch.float32 else out64[name]


def suffixes(tensors: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """The frame counts F of tensors named `<prefix>_f{F}`, sorted."""
    found = sorted(int(m.group(1)) for name in tensors if (m := re.fullmatch(rf"{prefix}_f(\d+)", name)))
    assert found, f"no {prefix}_f{{F}} tensors in the fixture"
    return found


def attention_widths(root: Path) -> list[int]:
    """Channel counts C of the Temp-Attn fixture sets (`temporal_attn_c{C}_weights.safetensors`)."""
    widths = sorted(int(m.group(1)) for p in root.glob("temporal_attn_c*_weights.safetensors")
                    if (m := re.fullmatch(r"temporal_attn_c(\d+)_weights\.safetensors", p.name)))
    if not widths:
        pytest.fail(f"no temporal_attn_c*_weights.safetensors in {root}")
    return widths
