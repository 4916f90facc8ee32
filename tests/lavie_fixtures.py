"""Reading `$FIXTURES_DIR/lavie` for the parity tests of LaVie's three stages (base, interpolation, VSR): the
README's tolerances, the tensor files, and the frame counts a fixture set holds."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Tolerances suggested by fixtures/lavie/README.md: float64 (with diffusers' float32 timestep sinusoid and the stored
# RoPE freqs) against the official float64 run; float32 against the official float32 run (the largest
# float32-vs-float64 gap it measured is ~2e-6).
FP64 = dict(atol=1e-9, rtol=0.0)
FP32 = dict(atol=1e-4, rtol=1e-4)
# A negative control (a wrong variant) must miss the official output by this many times the float32 tolerance (the
# loosest used), so that it could not pass the parity checks.
DISCRIMINATION = 100


def lavie_fixture_dir(fixtures_dir: Path, names: tuple[str, ...], what: str) -> Path:
    """`fixtures_dir/lavie`, failing (not skipping) when one of `names` is missing."""
    path = fixtures_dir / "lavie"
    for name in names:
        if not (path / name).is_file():
            pytest.fail(f"{what} fixture not found: {path / name}")
    return path


@lru_cache(maxsize=None)
def fixture_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def frame_counts(io_path: Path) -> list[int]:
    """The frame counts F of a fixture set, from its tensor names (`x_f{F}`)."""
    frames = sorted(int(m.group(1)) for name in fixture_tensors(io_path) if (m := re.fullmatch(r"x_f(\d+)", name)))
    assert frames, f"no x_f{{F}} tensors in {io_path}"
    return frames
