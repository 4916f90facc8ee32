"""VidRD's iterative long-video sampler ("Reuse and Diffuse", Gu et al. 2023, section 3.3, Algorithm 1).

One short-clip denoiser makes a video of any length clip by clip. Clip 0 is denoised from fresh noise; every later
clip c starts from clip c-1's initial noise z_T in reversed frame order, with M prompt frames and N frames per clip:

    FNR  frame-level noise reversion: prompt frame j < M starts from frame N-1-j of the previous clip's z_T, as is;
    PNS  past-dependent noise sampling: frame j >= M starts from alpha / sqrt(1 + alpha^2) * (that reversed z_T)
         + noise of std 1 / sqrt(1 + alpha^2) (paper Eq. 7; alpha = 0 is fresh noise);
    DSG  denoising with staged guidance: at denoising step i (0 = the noisiest of S), prompt frame j enters the
         denoiser as frame N-1-j of the previous clip's input at step i while i < (M - j) * (S / M) * beta, i.e.
         for the first K_j steps (`dsg_steps`; S=50, M=4, beta=0.4: 20, 15, 10, 5).

This is what the official code computes (ReuseAndDiffuse `SDVideoPipeline.__call__`, checked against its recorded
trajectory in `$FIXTURES_DIR/vidrd`): DSG replaces the *input* of step i, where the paper writes the condition on
the output z_{t-1} (the same schedule shifted by one step). Each clip is denoised by the shared guided loop
(`guided_denoise`, diffusers' `set_timesteps`/`step`), DSG entering through its `latents_hook`.

Counting frames: as in the official pipeline, every clip contributes all N of its frames, the M prompt frames
included (they are generated frames, guided toward the previous clip's last M frames in reverse order, not copies
of them); F frames take ceil(F / N) clips and the last one is cut. `keep_prompt_frames=False` drops the M prompt
frames of every clip after the first instead: F frames then take 1 + ceil((F - N) / (N - M)) clips.

Memory is that of one clip whatever the length: between clips only the reversed z_T and the prompt frames' inputs
of the K_0 guided steps are carried; `iterate_clips` yields each clip's latents so a caller can decode and drop it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from modules.samplers.diffusion import Denoiser, Generators, Progress, Scheduler, guided_denoise

# clip_noise(c) -> the noise drawn for clip c, (B, C, N, h, w): clip 0's z_T (std 1), or a later clip's PNS noise
# (std 1 / sqrt(1 + alpha^2), already scaled, as the official code draws it)
ClipNoise = Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class IterativeSettings:
    """The sampler's settings; the defaults are the official inference configuration (`configs/example.yaml`:
    M=4, alpha=4, beta=0.4, DDIM 50 steps, guidance 10, negative prompt "watermark"; pipeline default N=8)."""

    clip_frames: int = 8  # N, frames the denoiser makes at once
    prompt_frames: int = 4  # M, frames of a clip guided by the previous clip (FNR + DSG)
    alpha: float = 4.0  # PNS: weight of the previous clip's noise against fresh noise
    beta: float = 0.4  # DSG: share of the denoising steps over which prompt frames are guided
    num_inference_steps: int = 50  # S, DDIM steps per clip
    guidance_scale: float = 10.0
    eta: float = 0.0
    negative_prompt: str = "watermark"  # the unconditional text of classifier-free guidance
    keep_prompt_frames: bool = True  # official: every clip's N frames are kept

    def __post_init__(self) -> None:
        if not (isinstance(self.clip_frames, int) and self.clip_frames >= 1):
            raise ValueError(f"clip_frames (N) must be a positive integer, got {self.clip_frames!r}")
        if not (isinstance(self.prompt_frames, int) and 0 <= self.prompt_frames < self.clip_frames):
            raise ValueError(
                f"prompt_frames (M) must be an integer in [0, clip_frames) = [0, {self.clip_frames}), got "
                f"{self.prompt_frames!r}: M >= N leaves a clip no frame of its own")
        if not self.alpha >= 0:
            raise ValueError(f"alpha (PNS) must be >= 0, got {self.alpha!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta (DSG) must be in [0, 1], got {self.beta!r}")
        if not (isinstance(self.num_inference_steps, int) and self.num_inference_steps >= 1):
            raise ValueError(f"num_inference_steps must be a positive integer, got {self.num_inference_steps!r}")

    @property
    def new_frames_per_clip(self) -> int:
        """Frames each clip after the first adds to the video."""
        return self.clip_frames if self.keep_prompt_frames else self.clip_frames - self.prompt_frames

    def kept_frames(self, clip: torch.Tensor, clip_index: int, dim: int = 2) -> torch.Tensor:
        """The frames of clip `clip_index` that go into the video: all of them, or without the M prompt frames of
        a clip after the first when `keep_prompt_frames` is False. `dim` is the frame axis (2 for latents
        (B, C, N, h, w), 1 for decoded videos (B, N, C, H, W)): decode a whole clip, then keep its frames."""
        if clip_index == 0 or self.keep_prompt_frames:
            return clip
        return clip.narrow(dim, self.prompt_frames, clip.shape[dim] - self.prompt_frames)

    def clips_for(self, num_frames: int) -> int:
        """How many clips a video of `num_frames` frames takes."""
        if not (isinstance(num_frames, int) and num_frames >= 1):
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        extra = max(num_frames - self.clip_frames, 0)
        return 1 + math.ceil(extra / self.new_frames_per_clip)


def dsg_steps(num_steps: int, prompt_frames: int, beta: float) -> list[int]:
    """K_j for each prompt frame j < M: the number of leading steps i (of `num_steps`) at which frame j is replaced by
    the previous clip's frame N-1-j, i.e. #{i : i < (M - j) * (S / M) * beta}, evaluated in float64 left to right as
    the official code does (S=50, M=4, beta=0.4: [20, 15, 10, 5]; M=0: no prompt frames, [])."""
    return [sum(1 for i in range(num_steps) if i < (prompt_frames - j) * (num_steps / prompt_frames) * beta)
            for j in range(prompt_frames)]


def official_clip_noise(shape: Sequence[int], alpha: float, generator: Generators = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ClipNoise:
    """The official draws for latents of `shape` (B, C, N, h, w), on the CPU then moved: clip 0 draws its N frames
    one by one, (B, C, 1, h, w) each; every later clip draws one (B, C, N, h, w) tensor times 1/sqrt(1 + alpha^2).
    With a list of generators (one per video) each video's noise is drawn from its own, so it does not depend on
    the rest of the batch; with one generator and B = 1 the stream is the official one."""
    batch, channels, frames, height, width = shape
    std = 1.0 / math.sqrt(1.0 + alpha**2)

    def draw(videos: int, first_clip: bool, gen: torch.Generator | None) -> torch.Tensor:
        if first_clip:  # frame by frame
            return torch.cat([torch.randn((videos, channels, 1, height, width), generator=gen)
                              for _ in range(frames)], dim=2)
        return torch.randn((videos, channels, frames, height, width), generator=gen) * std

    def clip_noise(clip: int) -> torch.Tensor:
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for a batch of {batch}")
            noise = torch.cat([draw(1, clip == 0, g) for g in generator])
        else:
            noise = draw(batch, clip == 0, generator)
        return noise.to(device=device, dtype=dtype)

    return clip_noise


def reuse_noise(previous_start_reversed: torch.Tensor, pns_noise: torch.Tensor, prompt_frames: int,
                alpha: float) -> torch.Tensor:
    """A later clip's z_T from the previous clip's z_T in reversed frame order (frame j = previous frame N-1-j):
    FNR on the prompt frames j < M, PNS on the others."""
    start = previous_start_reversed.clone()
    coefficient = alpha / math.sqrt(1.0 + alpha**2)
    start[:, :, prompt_frames:] = coefficient * previous_start_reversed[:, :, prompt_frames:] + \
        pns_noise[:, :, prompt_frames:]
    return start


@dataclass
class _ClipMemory:
    """What a clip leaves for the next one: its step-0 input (z_T) reversed, and its step-i input of the frames
    N-1, ..., N-M (reversed: the next clip's prompt frames 0..M-1) for the guided steps i < K_0."""

    start_reversed: torch.Tensor | None = None
    prompt_inputs: list[torch.Tensor] | None = None


def iterate_clips(
    denoiser: Denoiser,
    scheduler: Scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    clip_noise: ClipNoise,
    num_clips: int,
    settings: IterativeSettings = IterativeSettings(),
    generator: Generators = None,
    progress: Progress | None = None,
) -> Iterator[torch.Tensor]:
    """Denoise `num_clips` clips one after the other and yield each one's latents (B, C, N, h, w), all N frames,
    as it is done; `settings.kept_frames(clip, index)` gives the frames that go into the video (decode the whole
    clip first: a temporal decoder sees the clip's N frames).

    `denoiser(x, t, context)` takes the N-frame latents (B, C, N, h, w) as in `guided_denoise`; `cond`/`uncond` are
    the text states (uncond from `settings.negative_prompt`). `progress(done, total)` counts steps over all clips.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    steps, prompt = settings.num_inference_steps, settings.prompt_frames
    guided_steps = dsg_steps(steps, prompt, settings.beta)
    carried_steps = guided_steps[0] if guided_steps else 0
    previous = _ClipMemory()
    for clip in range(num_clips):
        drawn = clip_noise(clip)
        if drawn.shape[2] != settings.clip_frames:
            raise ValueError(f"clip noise has {drawn.shape[2]} frames, the sampler makes {settings.clip_frames}")
        start = drawn if clip == 0 else reuse_noise(previous.start_reversed, drawn, prompt, settings.alpha)
        current = _ClipMemory(prompt_inputs=[])

        def staged_guidance(i: int, x: torch.Tensor, previous: _ClipMemory = previous,
                            current: _ClipMemory = current) -> torch.Tensor:
            if previous.prompt_inputs is not None:  # DSG: prompt frame j follows the previous clip for K_j steps
                guided = [j for j, k in enumerate(guided_steps) if i < k]
                if guided:
                    x = x.clone()
                    x[:, :, guided] = previous.prompt_inputs[i][:, :, guided]
            if i == 0:
                current.start_reversed = x.flip(2)
            if i < carried_steps:
                current.prompt_inputs.append(x[:, :, x.shape[2] - prompt:].flip(2))
            return x

        def clip_progress(done: int, total: int, offset: int = clip * steps) -> None:
            progress(offset + done, num_clips * total)

        latents = guided_denoise(
            denoiser, scheduler, start, cond, uncond,
            num_inference_steps=steps, guidance_scale=settings.guidance_scale, eta=settings.eta,
            generator=generator, progress=clip_progress if progress is not None else None,
            latents_hook=staged_guidance,
        )
        previous = current
        yield latents


def sample_long_video(
    denoiser: Denoiser,
    scheduler: Scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    num_frames: int,
    latent_shape: Sequence[int],
    settings: IterativeSettings = IterativeSettings(),
    generator: Generators = None,
    clip_noise: ClipNoise | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Latents (B, C, num_frames, h, w) of a video of exactly `num_frames` frames, made clip by clip.

    `latent_shape` is (C, h, w) of one frame; the batch is `cond`'s. `clip_noise` defaults to the official draws
    from `generator` (`official_clip_noise`). Only the returned frames are kept; to decode clip by clip instead, use
    `iterate_clips`.
    """
    num_clips = settings.clips_for(num_frames)
    channels, height, width = latent_shape
    if clip_noise is None:
        clip_noise = official_clip_noise((cond.shape[0], channels, settings.clip_frames, height, width),
                                         settings.alpha, generator, device=cond.device, dtype=cond.dtype)
    clips = iterate_clips(denoiser, scheduler, cond, uncond, clip_noise, num_clips, settings, generator, progress)
    return torch.cat([settings.kept_frames(clip, index) for index, clip in enumerate(clips)], dim=2)[:, :, :num_frames]
