"""What the tests of VidRD's iterative sampler need beyond `tests/vidrd_fixtures.py`: the sampler's tolerances,
the README's seed and the stub denoiser the official sampler run used (fixtures/vidrd/README.md, "Iterative
sampler"), and a DDIM scheduler that records every step."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler

# The sampler's latents against the official float32 run (the README's suggestion), and the PNS/FNR frames of a
# clip's first input to 1e-6 (FNR frames are checked bit for bit against the sampler's own previous clip).
SAMPLER = dict(atol=1e-5, rtol=0.0)
START_FRAMES = dict(atol=1e-6, rtol=0.0)

# SD 2.1-base's scheduler (its `scheduler/scheduler_config.json`), which the official run used with DDIM
SD21_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon")
# Stable Diffusion's latent scaling, which the official pipeline divides by before decoding
SD_SCALING_FACTOR = 0.18215


def dsg_table(path: Path) -> list[dict[str, Any]]:
    rows = json.loads(path.read_text())["rows"]
    assert rows, f"no rows in {path}"
    return rows


def fixture_seed(readme: Path) -> int:
    """The seed the fixture set's noise was drawn with, from its README's title `(public set, seed S)`."""
    match = re.search(r"seed (\d+)\)", readme.read_text().splitlines()[0])
    if match is None:
        pytest.fail(f"no '(..., seed S)' in the first line of {readme}")
    return int(match.group(1))


def sd21_ddim() -> DDIMScheduler:
    return DDIMScheduler(**SD21_SCHEDULE)


def stub_denoiser(calls: list[torch.Tensor] | None = None):
    """The README's stub of the UNet: eps(x, t, c) = 0.8 x + 0.1 roll(x, +1 over frames) + 0.05 t/1000
    + 0.1 mean(c over tokens and channels), per video. `calls` collects the latents of every call (with guidance,
    the doubled batch: unconditional copies first)."""

    def denoiser(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(x.clone())
        text = context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return 0.8 * x + 0.1 * torch.roll(x, shifts=1, dims=2) + 0.05 * (t / 1000) + 0.1 * text

    return denoiser


class RecordingDDIM(DDIMScheduler):
    """SD 2.1's DDIM scheduler that keeps the latents after every step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.after_step: list[torch.Tensor] = []

    def step(self, *args: Any, **kwargs: Any):
        output = super().step(*args, **kwargs)
        self.after_step.append(output.prev_sample.clone())
        return output
