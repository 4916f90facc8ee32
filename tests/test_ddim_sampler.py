"""The shared DDIM loop with an oracle denoiser: guidance must push towards the condition, also when clipping.

The oracle knows the clean sample each context asks for and returns the exact model output for it (noise or
velocity), so a correct sampler must land on the guided clean sample; what is asserted is the direction.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from modules.samplers.ddim import ddim_sample

# the clean value each context asks for: the conditional one a dark image, the unconditional one mid-grey
DARK, GREY = -0.8, 0.0


def oracle(scheduler: DDIMScheduler):
    alphas = scheduler.alphas_cumprod

    def denoiser(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x0 = context[:, 0, 0].view(-1, 1, 1, 1, 1).expand_as(x)
        a = alphas[int(t)]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if scheduler.config.prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        return eps

    return denoiser


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0, 7.5])
def test_guidance_with_clipping_moves_towards_the_condition(prediction_type, guidance_scale):
    """With clip_sample, a guided clean estimate overshoots [-1, 1] (here -0.8 * 4 = -3.2) and is clipped to -1.
    Stepping with the unclipped noise estimate then pushes the sample the wrong way (a dark prompt came out light
    in the tiny LaVie); the loop must step with the noise implied by the clipped estimate."""
    scheduler = DDIMScheduler(
        beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, clip_sample=True,
        set_alpha_to_one=False, steps_offset=1,
    )
    noise = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.full((2, 4, 8), DARK), torch.full((2, 4, 8), GREY)
    out = ddim_sample(oracle(scheduler), scheduler, noise, cond, uncond, num_inference_steps=20,
                      guidance_scale=guidance_scale)
    expected = max(GREY + guidance_scale * (DARK - GREY), -1.0)  # the guided clean value, clipped
    torch.testing.assert_close(out, torch.full_like(out, expected), atol=0.06, rtol=0)  # the last step keeps sqrt(1 - alpha_0) of noise


def test_without_clipping_guidance_extrapolates_exactly():
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    noise = torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    cond, uncond = torch.full((1, 4, 8), DARK), torch.full((1, 4, 8), GREY)
    out = ddim_sample(oracle(scheduler), scheduler, noise, cond, uncond, num_inference_steps=20, guidance_scale=3.0)
    torch.testing.assert_close(out, torch.full_like(out, 3.0 * DARK), atol=0.06, rtol=0)  # the last step keeps sqrt(1 - alpha_0) of noise
