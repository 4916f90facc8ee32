"""The shared diffusion sampling loop (named samplers `ddim` and `ddpm`) with an oracle denoiser: guidance must push
towards the condition, also when clipping; DDPM is LaVie's official ancestral sampler.

The oracle knows the clean sample each context asks for and returns the exact model output for it (noise or
velocity), so a correct sampler must land on the guided clean sample; what is asserted is the direction.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from modules.samplers.diffusion import SAMPLER_METHODS, guided_denoise, make_scheduler

pytestmark = pytest.mark.usefixtures("single_thread")
# the clean value each context asks for: the conditional one a dark image, the unconditional one mid-grey
DARK, GREY = -0.8, 0.0
# LaVie's noise schedule (configs/model/lavie_base.yaml) and the CPU recipe's (configs/model/lavie_tiny.yaml)
LAVIE_SCHEDULE = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
COSINE_SCHEDULE = dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=False, steps_offset=1)


def oracle(scheduler):
    alphas = scheduler.alphas_cumprod

    def denoiser(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x0 = context[:, 0, 0].view(-1, 1, 1, 1, 1).expand_as(x)
        a = alphas[int(t)]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if scheduler.config.prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        return eps

    return denoiser


# DDIM's last step (t = 1) keeps sqrt(1 - alpha_1) of noise; DDPM's last step (t = 0) returns the clean estimate
FINAL_STEP_TOLERANCE = {"ddim": 0.06, "ddpm": 1e-5}


@pytest.mark.parametrize("method", SAMPLER_METHODS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0, 7.5])
def test_guidance_with_clipping_moves_towards_the_condition(method, prediction_type, guidance_scale):
    """With clip_sample, a guided clean estimate overshoots [-1, 1] (here -0.8 * 4 = -3.2) and is clipped to -1.
    Stepping DDIM with the unclipped noise estimate then pushes the sample the wrong way (a dark prompt came out light
    in the tiny LaVie); the loop must step with the noise implied by the clipped estimate."""
    scheduler = make_scheduler(method, {**COSINE_SCHEDULE, "prediction_type": prediction_type, "clip_sample": True})
    noise = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.full((2, 4, 8), DARK), torch.full((2, 4, 8), GREY)
    out = guided_denoise(oracle(scheduler), scheduler, noise, cond, uncond, num_inference_steps=20,
                         guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(1))
    expected = max(GREY + guidance_scale * (DARK - GREY), -1.0)  # the guided clean value, clipped
    torch.testing.assert_close(out, torch.full_like(out, expected), atol=FINAL_STEP_TOLERANCE[method], rtol=0)


@pytest.mark.parametrize("method", SAMPLER_METHODS)
def test_without_clipping_guidance_extrapolates_exactly(method):
    scheduler = make_scheduler(method, {**COSINE_SCHEDULE, "prediction_type": "v_prediction", "clip_sample": False})
    noise = torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    cond, uncond = torch.full((1, 4, 8), DARK), torch.full((1, 4, 8), GREY)
    out = guided_denoise(oracle(scheduler), scheduler, noise, cond, uncond, num_inference_steps=20, guidance_scale=3.0,
                         generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, torch.full_like(out, 3.0 * DARK), atol=FINAL_STEP_TOLERANCE[method], rtol=0)


# ------------------------------------------------------------------------------------------ the named samplers
def test_ddpm_is_diffusers_ancestral_sampler_on_lavies_timesteps():
    """LaVie samples with diffusers 0.16's DDPMScheduler, which has no steps_offset: 50 steps at t = 980, ..., 0
    (DDIM with SD's steps_offset=1: 981, ..., 1), each step a draw from the DDPM posterior."""
    ddpm, ddim = make_scheduler("ddpm", LAVIE_SCHEDULE), make_scheduler("ddim", LAVIE_SCHEDULE)
    assert type(ddpm) is DDPMScheduler and type(ddim) is DDIMScheduler
    ddpm.set_timesteps(50)
    ddim.set_timesteps(50)
    assert ddpm.timesteps.tolist() == list(range(980, -1, -20))
    assert ddim.timesteps.tolist() == list(range(981, 0, -20))
    assert ddpm.config.variance_type == "fixed_small" and ddpm.config.clip_sample is False
    torch.testing.assert_close(ddpm.betas, ddim.betas)


def fixed_point_denoiser(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A denoiser whose output depends on the sample, so the step noise shows in the result."""
    return 0.5 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


def test_ddpm_step_noise_comes_from_each_samples_generator():
    """One generator per sample: a sample's video does not depend on the batch it is drawn in; the steps draw fresh
    noise (another generator, another result from the same initial noise). DDIM with eta 0 draws none."""
    noise = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))

    def run(method, x, context, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return guided_denoise(fixed_point_denoiser, make_scheduler(method, LAVIE_SCHEDULE), x, context, None,
                              num_inference_steps=5, guidance_scale=1.0, generator=generators)

    batch = run("ddpm", noise, cond, [10, 11])
    torch.testing.assert_close(run("ddpm", noise[1:], cond[1:], [11])[0], batch[1], atol=1e-6, rtol=0)
    assert (run("ddpm", noise[1:], cond[1:], [12])[0] - batch[1]).abs().max() > 1e-2
    assert torch.equal(run("ddim", noise, cond, [10, 11]), run("ddim", noise, cond, [12, 13]))


def test_unknown_sampler_and_eta_for_ddpm_are_refused():
    with pytest.raises(ValueError, match="unknown sampler method 'euler': one of ddpm, ddim"):
        make_scheduler("euler", LAVIE_SCHEDULE)
    with pytest.raises(ValueError, match="eta=0.5 is a DDIM setting"):
        guided_denoise(fixed_point_denoiser, make_scheduler("ddpm", LAVIE_SCHEDULE), torch.zeros(1, 3, 1, 2, 2),
                       torch.zeros(1, 4, 8), None, num_inference_steps=2, eta=0.5)
