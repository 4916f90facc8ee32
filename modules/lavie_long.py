"""LaVie's recursive long-video generation (Wang et al. 2023, section 5.6 "Long video generation") as a VideoGenerator.

"Similar to temporal interpolation network, we incorporate the first frame of a video into the input layer of a UNet.
By fine-tuning the base model accordingly, we enable the utilization of the last frame of the generated video as a
conditioning input during inference."

The UNet is the base model's (`VideoUNet`, base block design) with `conditioning_channels` = the latent channels on
`conv_in`; those inputs start at zero, so before fine-tuning the model computes exactly what the base model computes.
Layout of the conditioning, as the interpolation stage copies its key frames: the clip's first-frame latent is copied
to every frame position (`first_frame_conditioning`). Every frame then sees the frame it continues through conv_in
itself, not only through temporal attention, which is what the interpolation network's copied layout gives its frames.

Training (`diffusion_loss`): the whole clip is noised, frame 0 included; with probability `first_frame_dropout` a
video's conditioning is zero, so the fine-tuned model still makes a first clip from text alone. Appended images (joint
training) get zero conditioning: a still image continues nothing. Initialised from a base-stage model: `init_from` (a
train.py checkpoint of a LaVie base run: every weight, text encoder included, read when training starts) or
`pretrained.checkpoint` (the UNet of lavie_base.pt or of a train.py checkpoint, base or long stage); conv_in's new
inputs start at zero.

Sampling (`generate(num_frames=F)`, any F >= 1): clips of `sampler.clip_frames` frames. The first clip is plain
text-to-video (zero conditioning); every next clip is conditioned on the last frame's latent of the clip before.
A continuation clip's frame 0 re-synthesises that conditioning frame, so it is dropped: the first clip gives
`clip_frames` frames and each next one `clip_frames - 1` new frames, and the video is cut to exactly F frames
(`clips_for`). Only one clip's latents are ever in the UNet; each finished clip is decoded to uint8 on the CPU
(`generate_clips` yields them one by one, for a caller that streams them to a file).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from modules.base import ProgressHook, check_num_frames
from modules.components.checkpoints import load_state_dict_checked, read_state_dict
from modules.components.video_unet import with_conditioning_channels
from modules.lavie import LaVie, PretrainedConfigError
from modules.samplers.diffusion import guided_denoise, make_scheduler


def clips_for(num_frames: int, clip_frames: int) -> int:
    """How many clips of `clip_frames` frames make `num_frames` frames when each clip after the first adds
    `clip_frames - 1` new frames (its frame 0 re-synthesises the frame it is conditioned on)."""
    check_num_frames(num_frames)
    if num_frames <= clip_frames:
        return 1
    return 1 + math.ceil((num_frames - clip_frames) / (clip_frames - 1))


def first_frame_conditioning(latents: torch.Tensor) -> torch.Tensor:
    """[B, c, T, h, w] -> [B, c, T, h, w]: frame 0's latent copied to every frame position."""
    return latents[:, :, :1].expand_as(latents)


class LaVieLong(LaVie):
    """LaVie base with the first frame's latent on conv_in, generating videos of any length clip by clip.

    Constructor arguments are LaVie's (configs/model/lavie_long.yaml) plus `first_frame_dropout` and `init_from`;
    `sampler.clip_frames` is the clip length (the length the model was fine-tuned on) and `sampler.num_frames` the
    default video length. The UNet must have as many conditioning channels as the autoencoder has latent channels."""

    def __init__(self, *args: Any, first_frame_dropout: float = 0.1, init_from: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        latent = self.autoencoder.latent_channels
        if self.unet.conditioning_channels != latent:
            raise ValueError(f"model.unet.conditioning_channels is {self.unet.conditioning_channels} but the first "
                             f"frame's latent has the autoencoder's {latent} channels: set "
                             f"model.unet.conditioning_channels={latent}")
        if not 0.0 <= first_frame_dropout <= 1.0:
            raise ValueError(f"model.first_frame_dropout must be in [0, 1], got {first_frame_dropout}")
        self.first_frame_dropout = first_frame_dropout
        # read when training starts (`setup`), not here: sampling this stage's own checkpoint must not need the base
        # run's files
        self.init_from = init_from

    # ------------------------------------------------------------------ configuration and weights
    @staticmethod
    def check_sampler(sampler: Any) -> None:
        LaVie.check_sampler(sampler)
        clip = sampler.get("clip_frames")
        if isinstance(clip, bool) or not isinstance(clip, int) or clip < 2:
            raise ValueError(f"model.sampler.clip_frames must be an int >= 2 (each clip after the first adds "
                             f"clip_frames - 1 frames), got {clip!r}")
        check_num_frames(sampler.get("num_frames"))

    def load_pretrained(self, sd_path: str | Path | None = None, checkpoint: str | Path | None = None) -> None:
        """Stable Diffusion 1.4 for every component (conv_in's conditioning inputs at zero), then optionally a UNet:
        lavie_base.pt ({"ema": ...}) or the `unet.` part of a train.py checkpoint, of the base stage (conv_in widened
        by zeros) or of this stage; anything else that does not match is a CheckpointKeyError naming the file."""
        self.check_pretrained({"sd_path": sd_path, "checkpoint": checkpoint})
        if sd_path:
            super().load_pretrained(sd_path=sd_path)
        if checkpoint:
            state = read_state_dict(checkpoint)
            if "ema" in state:
                state = state["ema"]
            elif "state_dict" in state:
                state = {k[len("unet."):]: v for k, v in state["state_dict"].items() if k.startswith("unet.")}
            load_state_dict_checked(self.unet, with_conditioning_channels(state, self.unet.conv_in.in_channels),
                                    checkpoint)

    def setup(self, stage: str) -> None:
        """Fine-tuning starts from the base run's weights (`init_from`). Lightning calls this before it restores a
        checkpoint to resume from, so a resumed run keeps its own, later weights."""
        if stage != "fit" or not self.init_from:
            return
        self.init_from_base(self.init_from)

    def init_from_base(self, path: str | Path) -> None:
        """Every weight of a train.py checkpoint of a LaVie base model (UNet, text encoder, autoencoder: a tiny run
        trains its text encoder), strictly, conv_in's conditioning inputs at zero. The checkpoint's state_dict holds
        the EMA weights when the run used the EMA callback."""
        if not Path(path).is_file():
            raise PretrainedConfigError(f"base-stage checkpoint not found: {path} (model.init_from: a train.py "
                                        "checkpoint of a LaVie base run, e.g. logs/demo/train/checkpoints/last.ckpt)")
        state = read_state_dict(path)
        state = state.get("state_dict", state)
        unet = with_conditioning_channels({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")},
                                          self.unet.conv_in.in_channels)
        load_state_dict_checked(self, {**state, **{f"unet.{k}": v for k, v in unet.items()}}, path)

    # ------------------------------------------------------------------ training
    def training_conditioning(self, latents: torch.Tensor, num_images: int,
                              generator: torch.Generator | None = None) -> torch.Tensor:
        """The clip's first-frame latent copied to every video frame (LaVie.diffusion_loss noises the whole clip,
        frame 0 included); zero for a `first_frame_dropout` share of the videos and for appended images."""
        video_frames = latents.shape[2] - num_images
        conditioning = torch.zeros_like(latents)
        conditioning[:, :, :video_frames] = first_frame_conditioning(latents[:, :, :video_frames])
        if self.training and self.first_frame_dropout > 0:
            keep = torch.rand(latents.shape[0], generator=generator, device=latents.device) >= self.first_frame_dropout
            conditioning = conditioning * keep.to(latents.dtype).view(-1, 1, 1, 1, 1)
        return conditioning

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        num_frames: int | None = None,
        seed: int | list[int] = 0,
        progress: ProgressHook | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        """uint8 [B, F, H, W, 3]: exactly F frames (default `sampler.num_frames`), made clip by clip."""
        return torch.cat(list(self.generate_clips(prompts, num_frames, seed, progress, **overrides)), dim=1)

    @torch.no_grad()
    def generate_clips(
        self,
        prompts: list[str],
        num_frames: int | None = None,
        seed: int | list[int] = 0,
        progress: ProgressHook | None = None,
        **overrides: Any,
    ) -> Iterator[torch.Tensor]:
        """The video of `generate` in pieces, uint8 [B, n, H, W, 3] per clip (the first clip's `clip_frames`
        frames, then each next clip's new frames, the last piece cut so that the pieces hold F frames in all).
        Between clips only the last frame's latent is kept."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("generate needs a non-empty list of prompts")
        settings = self.sampler_settings(**overrides)
        self.check_sampler(settings)
        num_frames = self.frames_to_generate(num_frames, settings["num_frames"])
        clip_frames = settings["clip_frames"]
        clips = clips_for(num_frames, clip_frames)
        seeds = self.seeds_for(prompts, seed)
        factor = self.autoencoder.downsample_factor
        height, width = settings["height"], settings["width"]
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        shape = (self.autoencoder.latent_channels, clip_frames, height // factor, width // factor)

        # One CPU generator per video draws every clip's initial noise and step noise in turn: the same seed gives
        # the same video on any device and in any batch.
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([settings["negative_prompt"]] * len(prompts))
        steps = settings["num_inference_steps"]
        last = None  # (B, c, 1, h, w): the last frame's latent of the previous clip
        remaining = num_frames
        for index in range(clips):
            noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
            conditioning = torch.zeros_like(noise) if last is None else last.expand_as(noise)

            def denoiser(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                         conditioning: torch.Tensor = conditioning) -> torch.Tensor:
                # the guided batch doubles x ([uncond; cond]); both halves continue the same frame
                copies = conditioning.repeat(x.shape[0] // conditioning.shape[0], 1, 1, 1, 1)
                return self.unet(x, t, context, conditioning=copies)

            clip_progress = None if progress is None else (
                lambda done, total, index=index: progress(index * total + done, clips * total))
            latents = guided_denoise(
                denoiser, make_scheduler(settings["method"], self.noise_schedule), noise, cond, uncond,
                num_inference_steps=steps, guidance_scale=settings["guidance_scale"], eta=settings["eta"],
                generator=generators, progress=clip_progress,
            )
            last = latents[:, :, -1:].clone()
            new = latents if index == 0 else latents[:, :, 1:]  # a continuation's frame 0 is the frame it continues
            new = new[:, :, :remaining]
            remaining -= new.shape[2]
            del latents, noise, conditioning
            video = self.autoencoder.decode(new).float().clamp(-1, 1)  # (B, n, C, H, W)
            yield ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu()  # (B, n, H, W, 3)
