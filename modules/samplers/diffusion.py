"""The denoising loop shared by the diffusion backbones, with classifier-free guidance, and its named samplers.

A sampler is a diffusers scheduler (`set_timesteps`/`step`) built from the model's noise schedule, chosen by name:

    ddpm  ancestral sampling (Ho et al. 2020): `DDPMScheduler`, fresh noise at every step but the last.
          The official LaVie sampler (`base/configs/sample.yaml`: `sample_method: 'ddpm'`, 50 steps).
    ddim  DDIM (Song et al. 2021): `DDIMScheduler`; deterministic given the initial noise when eta = 0.

A respaced sampler (`respaced_ddim_scheduler`) runs DDIM on a shorter diffusion made of a subset of the training
timesteps (Nichol & Dhariwal 2021's `space_timesteps`, which DiT's `create_diffusion(str(steps))` builds): LaVie's
interpolation stage samples that way (`interpolation/sample.py`: 50 respaced steps, DDIM, eta 0).
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
# latents_hook(step index, latents) -> the latents the denoiser gets at that step (and the step then updates); lets a
# sampler edit the running latents inside the shared loop (VidRD's staged guidance, modules/samplers/vidrd_iterative.py)
LatentsHook = Callable[[int, torch.Tensor], torch.Tensor]
Scheduler = DDPMScheduler | DDIMScheduler
# one generator for the whole batch, or one per sample (its noise then does not depend on the rest of the batch)
Generators = torch.Generator | list[torch.Generator] | None

SAMPLER_METHODS = ("ddpm", "ddim")
# samplers whose scheduler counts the steps of a respaced diffusion; the model is called with `timestep_map[step]`
RESPACED_SAMPLER_METHODS = ("respaced_ddim",)


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
    latents_hook: LatentsHook | None = None,
) -> torch.Tensor:
    """Denoise `noise` into a clean sample, guided by `cond` and, when guidance_scale != 1, `uncond`.

    eps = eps_u + s * (eps_c - eps_u), the two predictions from one doubled batch. `generator` draws the step noise
    of ancestral sampling (DDPM, or DDIM with eta > 0). `progress(done, total)`, when given, is called after every
    step (the callers' progress bars count steps). `latents_hook(i, x)`, when given, is called before the denoiser at
    step i with the running latents and returns those to use instead (None: the loop is unchanged).
    """
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    options = step_options(scheduler, eta)
    guided = uncond is not None and guidance_scale != 1.0
    context = torch.cat([uncond, cond]) if guided else cond
    x = noise * scheduler.init_noise_sigma
    steps = scheduler.timesteps
    for i, t in enumerate(steps):
        if latents_hook is not None:
            x = latents_hook(i, x)
        model_in = torch.cat([x, x]) if guided else x
        eps = denoiser(scheduler.scale_model_input(model_in, t), t, context)
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, generator=generator, **options).prev_sample
        if progress is not None:
            progress(i + 1, len(steps))
    return x


def respaced_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """The training timesteps a diffusion respaced to `num_steps` keeps, ascending: `space_timesteps(T, str(n))` of
    Nichol & Dhariwal's improved-diffusion (one section), as DiT and LaVie's interpolation stage call it. They are
    spread evenly over 0..T-1 by a fractional stride, accumulated and rounded (50 of 1000: 0, 20, 41, 61, ..., 999),
    unlike DDIMScheduler's integer strides (`leading`: 0, 20, ..., 980)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"cannot respace {num_train_timesteps} timesteps into {num_steps} steps")
    stride = (num_train_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1
    kept, position = [], 0.0
    for _ in range(num_steps):  # accumulated as improved-diffusion does, so the rounding matches it exactly
        kept.append(round(position))
        position += stride
    return sorted(set(kept))


def respaced_ddim_scheduler(noise_schedule: Mapping[str, Any], num_steps: int) -> tuple[DDIMScheduler, torch.Tensor]:
    """DDIM on the diffusion respaced to `num_steps` of the training timesteps, and the map from its steps to them.

    Respacing keeps the training schedule's alphas_cumprod at the kept timesteps t_0 < ... < t_{n-1} and makes them a
    diffusion of its own, with betas 1 - abar(t_i) / abar(t_{i-1}) (improved-diffusion's `SpacedDiffusion`). Its
    `DDIMScheduler` (steps n-1, ..., 0; the last step goes to abar = 1, the clean sample) is diffusers' unchanged;
    the model was trained on the original timesteps, so it is called with `timestep_map[step]`. Returns
    (scheduler, timestep_map as int64 [n]); `set_timesteps(n)` on the scheduler then takes every step once."""
    base = DDPMScheduler.from_config(dict(noise_schedule))
    timestep_map = torch.tensor(respaced_timesteps(base.config.num_train_timesteps, num_steps))
    alphas_cumprod = base.alphas_cumprod.double()[timestep_map]
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    betas = (1 - alphas_cumprod / previous).tolist()
    scheduler = DDIMScheduler.from_config({
        **noise_schedule, "num_train_timesteps": len(betas), "trained_betas": betas,
        "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "leading",
    })
    return scheduler, timestep_map
