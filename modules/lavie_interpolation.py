"""LaVie's temporal interpolation stage (Wang et al. 2023, section 4.2) as a VideoGenerator: 16 frames to 61.

A diffusion UNet quadruples the frame rate of a low-frame-rate video. The key frames' latents are copied to the
positions of the frames around them (output frame j takes key frame (j + 1) // 4, LaVie's `copy_no_mask` layout) and
concatenated after the noisy latent; every output frame, key frames included, is synthesised anew, conditioned on
the text as well. The UNet is `VideoUNet` with LaVie's interpolation block design (sparse-causal spatial attention,
temporal attention without RoPE or bias after the feed-forward) and 4 conditioning channels on `conv_in`.

Training (`training_step`, the paper's recipe): clips of 4K - 3 frames, their key frames every 4th, epsilon loss on
every frame, captions dropped for classifier-free guidance; initialised from a base-stage UNet
(`pretrained.init_from_base`: its weights, conv_in's new inputs at zero) or trained from scratch.

Sampling: `interpolate(prompts, videos)` is the Python API (uint8 videos as a generator returns them; a cascade
calls it, or `interpolate_latents` on base latents). `generate(prompts)`, for sample.py and eval/, reads the input
videos named by `sampler.input_videos` (a sample.py run folder, a folder of videos named by their prompts, or one
file). Official settings: DDIM on 50 respaced steps, guidance 4 on the noise prediction (both halves of the guided
batch see the key frames; only the text differs), fps 24.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from datamodules.transforms import to_model_range, to_uint8
from datamodules.video_io import read_video
from modules.base import ProgressHook
from modules.components.checkpoints import CheckpointKeyError, load_state_dict_checked, read_state_dict
from modules.components.video_unet import with_conditioning_channels
from modules.lavie import LaVie, PretrainedConfigError
from modules.samplers.diffusion import (
    RESPACED_SAMPLER_METHODS,
    SAMPLER_METHODS,
    guided_denoise,
    make_scheduler,
    respaced_ddim_scheduler,
)

# LaVie's interpolation quadruples the frame rate: K key frames give 4K - 3 frames (16 -> 61)
FRAME_RATE_FACTOR = 4
VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mov", ".mkv", ".gif")
# keys of a base-stage UNet's temporal attention that the interpolation UNet does not have
BASE_ONLY_MARKERS = (".attn_temp.rotary_emb.", ".attn_temp.time_rel_pos_bias.")


def check_interpolated_frames(num_frames: int) -> int:
    """The number of key frames K of an output of `num_frames` = 4K - 3 frames."""
    if num_frames < 1 + FRAME_RATE_FACTOR or (num_frames - 1) % FRAME_RATE_FACTOR:
        raise ValueError(f"the interpolation stage makes 4K - 3 frames from K key frames (5, 9, ..., 61), "
                         f"got num_frames={num_frames}")
    return (num_frames - 1) // FRAME_RATE_FACTOR + 1


def copied_key_frames(key_frames: torch.Tensor) -> torch.Tensor:
    """[B, c, K, h, w] -> [B, c, 4K - 3, h, w]: output frame j holds key frame (j + 1) // 4, LaVie's conditioning
    (`interpolation/sample.py`: every key frame repeated 4 times, the first copy and the last two dropped)."""
    frames = FRAME_RATE_FACTOR * (key_frames.shape[2] - 1) + 1
    return key_frames.repeat_interleave(FRAME_RATE_FACTOR, dim=2)[:, :, 1 : 1 + frames]


def key_frames_of(video: torch.Tensor, num_frames: int, source: str = "input video") -> torch.Tensor:
    """The K key frames [K, ...] of an input video [T, ...] for an output of `num_frames` = 4K - 3 frames: the video
    itself when it has K frames (a base-stage output), else frames 0, 4, ..., num_frames - 1 of a clip of at least
    `num_frames` frames (a real video at the output frame rate, as in training)."""
    keys = check_interpolated_frames(num_frames)
    if video.shape[0] == keys:
        return video
    if video.shape[0] >= num_frames:
        return video[: num_frames : FRAME_RATE_FACTOR]
    raise ValueError(f"{source} has {video.shape[0]} frames: interpolating to {num_frames} frames needs its "
                     f"{keys} key frames, or a clip of at least {num_frames} frames")


def read_input_videos(source: str | os.PathLike, prompts: list[str], seeds: list[int]) -> list[torch.Tensor]:
    """One uint8 video [T, H, W, 3] per prompt from `source`:

    - a video file: the same video for every prompt;
    - a sample.py run folder (with samples.json): the video of the same prompt, and of the same seed when the prompt
      has several (sample.py gives prompt p, video i the seed `seed + p * num_seeds + i`, so the same prompts,
      seed and num_seeds pick each base video's own seed);
    - a folder of videos named by their prompts (`<prompt>.mp4`, as LaVie's interpolation/sample.py reads them).
    """
    source = Path(source)
    if source.is_file():
        return [read_video(source)] * len(prompts)
    if not source.is_dir():
        raise FileNotFoundError(f"input videos not found: {source} (model.sampler.input_videos: a sample.py run "
                                "folder, a folder of <prompt>.mp4 files, or one video file)")
    record = source / "samples.json"
    if record.is_file():
        entries = json.loads(record.read_text())["videos"]
        chosen = []
        for prompt, seed in zip(prompts, seeds):
            matches = [e for e in entries if e["prompt"] == prompt]
            if len(matches) > 1:
                matches = [e for e in matches if e["seed"] == seed]
            if len(matches) != 1:
                raise ValueError(f"{record}: {'no' if not matches else 'more than one'} video for prompt {prompt!r}"
                                 f" with seed {seed}; it holds prompts {sorted({e['prompt'] for e in entries})}")
            chosen.append(read_video(source / matches[0]["file"]))
        return chosen
    files = {p.stem: p for p in sorted(source.iterdir()) if p.suffix.lower() in VIDEO_SUFFIXES}
    missing = [p for p in prompts if p not in files]
    if missing:
        raise ValueError(f"{source} has no video named after prompt(s) {missing} (expected <prompt>.mp4; "
                         f"found {sorted(files)[:10]})")
    return [read_video(files[p]) for p in prompts]


class LaVieInterpolation(LaVie):
    """LaVie's temporal interpolation UNet with LaVie's text encoder, autoencoder and training loop.

    Constructor arguments are LaVie's (configs/model/lavie_interpolation.yaml); `pretrained` also takes
    `init_from_base` (a base-stage UNet to start training from). The UNet must have as many conditioning channels
    as the autoencoder has latent channels (the copied key-frame latents)."""

    fps = 24

    def __init__(self, *args: Any, fps: int = 24, **kwargs: Any):
        super().__init__(*args, fps=fps, **kwargs)
        latent = self.autoencoder.latent_channels
        if self.unet.conditioning_channels != latent:
            raise ValueError(f"model.unet.conditioning_channels is {self.unet.conditioning_channels} but the copied "
                             f"key frames have the autoencoder's {latent} latent channels: set "
                             f"model.unet.conditioning_channels={latent}")
        base = (kwargs.get("pretrained") or {}).get("init_from_base")
        if base:
            self.load_pretrained(init_from_base=base)

    # ------------------------------------------------------------------ configuration and weights
    @staticmethod
    def check_sampler(sampler: Any) -> None:
        methods = SAMPLER_METHODS + RESPACED_SAMPLER_METHODS
        if sampler.get("method") not in methods:
            raise ValueError(f"model.sampler.method must be one of {', '.join(methods)}, got {sampler.get('method')!r}")
        check_interpolated_frames(sampler.get("num_frames"))

    @staticmethod
    def check_pretrained(pretrained: Any) -> None:
        sd_path, checkpoint, base = (pretrained.get(k) for k in ("sd_path", "checkpoint", "init_from_base"))
        if checkpoint and base:
            raise PretrainedConfigError(
                "give model.pretrained.checkpoint (a trained interpolation UNet, lavie_interpolation.pt) or "
                "model.pretrained.init_from_base (a base UNet to start training from), not both")
        if pretrained.get("init_from_sd") and not sd_path:
            raise PretrainedConfigError(
                "the interpolation stage uses Stable Diffusion 1.4's text encoder and VAE: set "
                "model.pretrained.sd_path=DIR to a local diffusers-layout folder (CompVis/stable-diffusion-v1-4). "
                "To train a CPU-sized model from scratch instead, use experiment=tiny_lavie_interpolation.")
        if sd_path and not Path(sd_path).is_dir():
            raise PretrainedConfigError(f"Stable Diffusion folder not found: {sd_path} (model.pretrained.sd_path)")
        for path, key, official in ((checkpoint, "checkpoint", "lavie_interpolation.pt"),
                                    (base, "init_from_base", "lavie_base.pt")):
            if path and not Path(path).is_file():
                raise PretrainedConfigError(f"{official} not found: {path} (model.pretrained.{key}; the official "
                                            "file is published with Vchitect/LaVie)")

    def load_pretrained(self, sd_path: str | Path | None = None, checkpoint: str | Path | None = None,
                        init_from_base: str | Path | None = None) -> None:
        """Stable Diffusion 1.4 (diffusers layout) for every component, conv_in's conditioning inputs at zero; then
        either the official interpolation UNet (`lavie_interpolation.pt`, strictly) or a base-stage UNet to train
        from (`lavie_base.pt` or a train.py checkpoint of a LaVie base model)."""
        self.check_pretrained({"sd_path": sd_path, "checkpoint": checkpoint, "init_from_base": init_from_base})
        if sd_path:
            super().load_pretrained(sd_path=sd_path)
        if checkpoint:
            state = unet_state_dict(checkpoint)
            if self.is_base_stage(state):
                raise CheckpointKeyError(
                    f"{checkpoint} holds a LaVie base-stage UNet (temporal attention with RoPE and a relative-position "
                    f"table, conv_in for {self.unet.config.in_channels} channels), not the interpolation UNet: "
                    "model.pretrained.checkpoint takes lavie_interpolation.pt. To start training the interpolation "
                    "stage from base weights, pass the file as model.pretrained.init_from_base.")
            load_state_dict_checked(self.unet, state, checkpoint)
        if init_from_base:
            self.init_from_base(init_from_base)

    def is_base_stage(self, state: dict[str, torch.Tensor]) -> bool:
        """A base-stage UNet: RoPE or bias-table keys, or a conv_in without the conditioning inputs."""
        conv_in = state.get("conv_in.weight")
        narrow = conv_in is not None and conv_in.shape[1] < self.unet.conv_in.in_channels
        return narrow or any(m in f".{k}" for k in state for m in BASE_ONLY_MARKERS)

    def init_from_base(self, path: str | Path) -> None:
        """The paper's initialisation: every weight of a base-stage UNet, its temporal projections included; the
        rotary frequencies and relative-position tables (which this UNet has not) are left out and conv_in's
        conditioning inputs start at zero. Anything else that does not match is a CheckpointKeyError."""
        state = {k: v for k, v in unet_state_dict(path).items() if not any(m in f".{k}" for m in BASE_ONLY_MARKERS)}
        load_state_dict_checked(self.unet, with_conditioning_channels(state, self.unet.conv_in.in_channels), path)

    # ------------------------------------------------------------------ training
    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
                       ) -> dict[str, torch.Tensor]:
        """Noise the whole clip; condition on its key frames (every 4th) copied to the frames around them."""
        video = batch["video"]  # (B, T, C, H, W), T = 4K - 3
        if batch.get("image_captions") and len(batch["image_captions"][0]):
            raise ValueError("the interpolation stage trains on videos alone: set data.images_per_video=0")
        check_interpolated_frames(video.shape[1])
        context = self.encode_prompts(self._drop_captions(list(batch["caption"])))
        latents = self.autoencoder.encode(video)  # (B, c, T, h, w)
        conditioning = copied_key_frames(latents[:, :, ::FRAME_RATE_FACTOR])
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(
            0, self.train_scheduler.config.num_train_timesteps, (video.shape[0],), generator=generator,
            device=latents.device,
        )
        noisy = self.train_scheduler.add_noise(latents, noise, timesteps)
        pred = self.unet(noisy, timesteps, context, conditioning=conditioning)
        return {"loss": F.mse_loss(pred, self.prediction_target(latents, noise, timesteps))}

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
        """The contract's entry: interpolates the videos `sampler.input_videos` names (one per prompt and seed,
        `read_input_videos`; a list of uint8 [T, H, W, 3] tensors works too) to `num_frames` frames."""
        self._check_prompts(prompts)
        settings = self.sampler_settings(**overrides)
        num_frames = self.frames_to_generate(num_frames, settings["num_frames"])
        check_interpolated_frames(num_frames)
        seeds = self.seeds_for(prompts, seed)
        source = settings["input_videos"]
        if source is None:
            raise ValueError("the interpolation stage interpolates videos: set model.sampler.input_videos to a "
                             "sample.py run folder of the base stage, a folder of <prompt>.mp4 files or a video "
                             "file (or call interpolate(prompts, videos))")
        videos = read_input_videos(source, prompts, seeds) if isinstance(source, (str, os.PathLike)) else list(source)
        keys = [self._resize(key_frames_of(v, num_frames), settings) for v in videos]
        return self.interpolate(prompts, torch.stack(keys), seed=seeds, progress=progress,
                                **{k: v for k, v in overrides.items() if k != "input_videos"})

    @torch.no_grad()
    def interpolate(self, prompts: list[str], videos: torch.Tensor, seed: int | list[int] = 0,
                    progress: ProgressHook | None = None, **overrides: Any) -> torch.Tensor:
        """uint8 videos [B, K, H, W, 3] (e.g. the base stage's `generate`) -> uint8 [B, 4K - 3, H, W, 3]."""
        self._check_prompts(prompts)
        if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[0] != len(prompts):
            raise ValueError(f"videos must be uint8 [B, K, H, W, 3] with one video per prompt, got "
                             f"{videos.dtype} {tuple(videos.shape)} for {len(prompts)} prompts")
        seeds = self.seeds_for(prompts, seed)
        frames = to_model_range(videos).to(self.device, self.dtype)  # (B, K, C, H, W)
        factor = self.autoencoder.downsample_factor
        if frames.shape[-2] % factor or frames.shape[-1] % factor:
            raise ValueError(f"frame size {tuple(frames.shape[-2:])} is not a multiple of {factor}")
        # The VAE samples its posterior (as LaVie's sampler encodes the key frames): seeded per video, so a seed
        # gives the same video in any batch.
        keys = []
        for video, s in zip(frames, seeds):
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(s)
                keys.append(self.autoencoder.encode(video[None]))
        latents = self.interpolate_latents(prompts, torch.cat(keys), seed=seeds, progress=progress, **overrides)
        return to_uint8(self.autoencoder.decode(latents).float().clamp(-1, 1))

    @torch.no_grad()
    def interpolate_latents(self, prompts: list[str], key_latents: torch.Tensor, seed: int | list[int] = 0,
                            progress: ProgressHook | None = None, **overrides: Any) -> torch.Tensor:
        """Key-frame latents [B, c, K, h, w] -> latents [B, c, 4K - 3, h, w] (what a cascade passes on)."""
        settings = self.sampler_settings(**overrides)
        seeds = self.seeds_for(prompts, seed)
        conditioning = copied_key_frames(key_latents.to(self.device, self.dtype))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(conditioning.shape[1:], generator=g) for g in generators])
        cond = self.encode_prompts([p + settings["prompt_suffix"] for p in prompts])
        uncond = self.encode_prompts([settings["negative_prompt"]] * len(prompts))
        scheduler, model_timestep = self._scheduler(settings)

        def denoiser(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            # the guided batch doubles x ([uncond; cond]); both halves are conditioned on the same key frames
            copies = conditioning.repeat(x.shape[0] // conditioning.shape[0], 1, 1, 1, 1)
            return self.unet(x, model_timestep(t), context, conditioning=copies)

        return guided_denoise(
            denoiser, scheduler, noise.to(self.device, self.dtype), cond, uncond,
            num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
            eta=settings["eta"], generator=generators, progress=progress,
        )

    def _scheduler(self, settings: dict[str, Any]):
        """(scheduler, scheduler timestep -> the model's timestep) of `settings["method"]`."""
        if settings["method"] in RESPACED_SAMPLER_METHODS:
            scheduler, timestep_map = respaced_ddim_scheduler(self.noise_schedule, settings["num_inference_steps"])
            return scheduler, lambda t: timestep_map.to(t.device)[t]
        return make_scheduler(settings["method"], self.noise_schedule), lambda t: t

    @staticmethod
    def _check_prompts(prompts: list[str]) -> None:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("generate needs a non-empty list of prompts")

    @staticmethod
    def _resize(video: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        """uint8 [K, H, W, 3] at the sampler's height x width (LaVie's sampler resizes its input to 320 x 512)."""
        size = (settings["height"], settings["width"])
        if tuple(video.shape[1:3]) == size:
            return video
        frames = F.interpolate(video.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", antialias=True,
                               align_corners=False)
        return frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def unet_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The UNet state dict of an official LaVie file ({"ema": ...}) or of a train.py checkpoint (the `unet.` keys of
    its state_dict)."""
    state = read_state_dict(path)
    if "ema" in state:
        return state["ema"]
    if "state_dict" in state:
        return {k[len("unet."):]: v for k, v in state["state_dict"].items() if k.startswith("unet.")}
    return state
