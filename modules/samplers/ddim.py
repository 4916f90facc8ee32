"""The denoising loop shared by the diffusion backbones: diffusers' DDIM steps with classifier-free guidance."""
from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

# denoiser(x_t, t, context) -> predicted noise, same shape as x_t
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# progress(done, total): called after each of the `total` denoising steps (modules.base.ProgressHook)
Progress = Callable[[int, int], None]


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    scheduler: DDIMScheduler,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Denoise `noise` into a clean sample, guided by `cond` and, when guidance_scale != 1, `uncond`.

    With eta = 0 the loop is deterministic given the noise. eps = eps_u + s * (eps_c - eps_u).
    `progress(done, total)`, when given, is called after every step (the callers' progress bars count steps).
    """
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
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
        # With clip_sample, recompute the noise from the clipped clean estimate: otherwise a guided estimate that
        # overshoots [-1, 1] is clipped while its noise estimate keeps the overshoot, and the update pushes the
        # sample the opposite way (a dark background asked for comes out light).
        x = scheduler.step(
            eps, t, x, eta=eta, generator=generator, use_clipped_model_output=bool(scheduler.config.clip_sample)
        ).prev_sample
        if progress is not None:
            progress(i + 1, len(steps))
    return x
