"""The denoising loop shared by the diffusion backbones, with classifier-free guidance, and its named samplers.

A sampler is a diffusers scheduler (`set_timesteps`/`step`) built from the model's noise schedule, chosen by name:

    ddpm  ancestral sampling (Ho et al. 2020): `DDPMScheduler`, fresh noise at every step but the last.
          The official LaVie sampler (`base/configs/sample.yaml`: `sample_method: 'ddpm'`, 50 steps).
    ddim  DDIM (Song et al. 2021): `DDIMScheduler`; deterministic given the initial noise when eta = 0.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler

# denoiser(x_t, t, context) -> the model output the schedule's prediction_type names, same shape as x_t
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# progress(done, total): called after each of the `total` denoising steps (modules.base.ProgressHook)
Progress = Callable[[int, int], None]
Scheduler = DDPMScheduler | DDIMScheduler
# one generator for the whole batch, or one per sample (its noise then does not depend on the rest of the batch)
Generators = torch.Generator | list[torch.Generator] | None

SAMPLER_METHODS = ("ddpm", "ddim")


def make_scheduler(method: str, noise_schedule: Mapping[str, Any]) -> Scheduler:
    """The scheduler of sampler `method` for a model trained with `noise_schedule` (a diffusers scheduler config)."""
    if method == "ddpm":
        # LaVie's pinned diffusers (0.16) had no steps_offset for DDPM: 50 steps are t = 980, 960, ..., 0, and the
        # last step adds no noise. The schedule's steps_offset (SD's, for DDIM: 981, ..., 1) does not apply here.
        return DDPMScheduler.from_config({**noise_schedule, "steps_offset": 0})
    if method == "ddim":
        return DDIMScheduler.from_config(dict(noise_schedule))
    raise ValueError(f"unknown sampler method {method!r}: one of {', '.join(SAMPLER_METHODS)}")


def step_options(scheduler: Scheduler, eta: float = 0.0) -> dict[str, Any]:
    """Keyword arguments of `scheduler.step` beyond the sample: DDIM's eta (0 = deterministic) and, with
    clip_sample, the noise recomputed from the clipped clean estimate. Otherwise a guided estimate that overshoots
    [-1, 1] is clipped while its noise estimate keeps the overshoot, and the update pushes the sample the opposite
    way (a dark background asked for comes out light). DDPM's step needs neither: it steps from the clean estimate."""
    if isinstance(scheduler, DDIMScheduler):
        return {"eta": eta, "use_clipped_model_output": bool(scheduler.config.clip_sample)}
    if eta:
        raise ValueError(f"eta={eta} is a DDIM setting; the {type(scheduler).__name__} sampler takes none")
    return {}


@torch.no_grad()
def guided_denoise(
    denoiser: Denoiser,
    scheduler: Scheduler,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    generator: Generators = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Denoise `noise` into a clean sample, guided by `cond` and, when guidance_scale != 1, `uncond`.

    eps = eps_u + s * (eps_c - eps_u), the two predictions from one doubled batch. `generator` draws the step noise
    of ancestral sampling (DDPM, or DDIM with eta > 0). `progress(done, total)`, when given, is called after every
    step (the callers' progress bars count steps).
    """
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    options = step_options(scheduler, eta)
    guided = uncond is not None and guidance_scale != 1.0
    context = torch.cat([uncond, cond]) if guided else cond
    x = noise * scheduler.init_noise_sigma
    steps = scheduler.timesteps
    for i, t in enumerate(steps):
        model_in = torch.cat([x, x]) if guided else x
        eps = denoiser(scheduler.scale_model_input(model_in, t), t, context)
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, generator=generator, **options).prev_sample
        if progress is not None:
            progress(i + 1, len(steps))
    return x
