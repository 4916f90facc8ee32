"""VidRD, "Reuse and Diffuse" (Gu et al. 2023), as a VideoGenerator.

Stable Diffusion 2.1-base inflated to a short-clip video LDM (`VideoUNet` with `VIDRD_UNET_OPTIONS`: Temp-Conv after
every ResNet, Temp-Attn in every transformer block), SD 2.1's OpenCLIP ViT-H text encoder (diffusers `CLIPTextModel`
layout) and VidRD's temporal VAE (`TemporalKLAutoencoder`). Long videos come from the iterative sampler
(`modules/samplers/vidrd_iterative.py`: FNR, PNS, DSG), one N-frame clip in the UNet at a time.

Training is LaVie's (this class reuses `LaVie.diffusion_loss`): the diffusion loss on N-frame clips with the schedule's
prediction target (SD 2.1-base: epsilon), optionally joint with appended captioned images, which the UNet treats as
SD's image UNet exactly (they skip Temp-Conv, Temp-Attn and the frame embedding). What differs from LaVie: the weights
(SD 2.1 folder + the official `ModelT2V.pth`), and `generate`, which runs the iterative sampler and decodes each clip
as soon as it is denoised, so memory is one clip's whatever the length.

Frames: each clip contributes all N frames (the official count, `keep_prompt_frames: true`; the M prompt frames are
generated frames guided toward the previous clip's last M in reverse order); F frames take ceil(F / N) clips and the
video is cut to exactly F. With `keep_prompt_frames: false` a clip after the first adds N - M frames.
"""
from __future__ import annotations

import functools
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from modules.base import ProgressHook, check_num_frames
from modules.components.checkpoints import (
    find_weight_file,
    key_mismatch_error,
    load_state_dict_checked,
    read_state_dict,
)
from modules.components.text_encoder import ClipTextEncoder
from modules.components.video_unet import VideoUNet
from modules.lavie import LaVie, PretrainedConfigError
from modules.samplers.diffusion import make_scheduler
from modules.samplers.vidrd_iterative import IterativeSettings, iterate_clips, official_clip_noise

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")
# the sampler settings that are IterativeSettings fields; the rest (num_frames, height, width, method) are generate's
ITERATIVE_KEYS = tuple(f.name for f in fields(IterativeSettings))
SAMPLER_KEYS = (*ITERATIVE_KEYS, "method", "num_frames", "height", "width")
# the official checkpoint stores the UNet under this prefix (ReuseAndDiffuse: `state_dict` entries `unet.*`)
UNET_PREFIX = "unet."


def iterative_settings(sampler: Any) -> IterativeSettings:
    """The sampler section's IterativeSettings; a bad value raises a ValueError naming model.sampler."""
    try:
        return IterativeSettings(**{k: sampler[k] for k in ITERATIVE_KEYS if k in sampler})
    except ValueError as error:
        raise ValueError(f"model.sampler: {error}") from None


def official_unet_state(state: dict[str, Any], source: str | Path) -> dict[str, torch.Tensor]:
    """The UNet state dict of an official `ModelT2V.pth` ({"state_dict": {"unet.<key>": ...}}, or the bare mapping)
    or of one of our train.py checkpoints (its `unet.` part; the text encoder and autoencoder entries are ours).
    Official files must hold only `unet.` keys: any other is listed as unexpected."""
    ours = "state_dict" in state and "pytorch-lightning_version" in state
    state = state.get("state_dict", state)
    unet = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    others = [k for k in state if not k.startswith(UNET_PREFIX)]
    if others and not ours:
        raise key_mismatch_error(f"checkpoint {source} is not in the official ModelT2V.pth layout (UNet keys under "
                                 f"'{UNET_PREFIX}'):", [], others, [])
    return unet


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a UNet checkpoint, read without loading its tensors into memory where the format allows
    (safetensors headers; torch zip files memory-mapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            state = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        return official_unet_state(state, path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in official_unet_state(state, path).items()}


def check_unet_checkpoint(unet_config: Any, checkpoint: str | Path) -> None:
    """Compare `checkpoint`'s UNet keys and shapes with the UNet `unet_config` builds, built on the meta device
    (no memory): a mismatch raises CheckpointKeyError naming the file and every missing, unexpected or misshapen key,
    before any real weights exist."""
    config = OmegaConf.to_container(unet_config, resolve=True) if isinstance(unet_config, DictConfig) else unet_config
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in instantiate(config).state_dict().items()}
    found = checkpoint_shapes(checkpoint)
    wrong = [f"{k}: file {found[k]} vs model {expected[k]}" for k in found.keys() & expected.keys()
             if found[k] != expected[k]]
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected or wrong:
        raise key_mismatch_error(f"checkpoint {checkpoint} does not match VidRD's video UNet "
                                 f"(model.pretrained.checkpoint):", missing, unexpected, sorted(wrong))


class VidRD(LaVie):
    """VidRD's text-to-video model. Arguments as LaVie's (configs/model/vidrd.yaml); `sampler` holds the iterative
    sampler's settings (IterativeSettings fields) plus `method` (ddim), `num_frames`, `height`, `width`;
    `pretrained` holds `sd_path` (SD 2.1-base folder), `checkpoint` (the official ModelT2V.pth) and
    `vae_checkpoint` (the fine-tuned temporal VAE, official layout)."""

    def __init__(
        self,
        unet: VideoUNet,
        text_encoder: ClipTextEncoder,
        autoencoder: nn.Module,
        noise_schedule: dict[str, Any],
        sampler: dict[str, Any],
        optimizer: functools.partial,
        lr_scheduler: functools.partial | None = None,
        pretrained: dict[str, Any] | None = None,
        image_loss_weight: float = 1.0,
        caption_dropout: float = 0.1,
        train_text_encoder: bool = False,
        fps: int = 8,
    ):
        super().__init__(unet, text_encoder, autoencoder, noise_schedule, sampler, optimizer,
                         lr_scheduler=lr_scheduler, pretrained=None, image_loss_weight=image_loss_weight,
                         caption_dropout=caption_dropout, train_text_encoder=train_text_encoder, fps=fps)
        clip_frames = getattr(self.autoencoder, "clip_frames", None)
        if clip_frames is not None and clip_frames != self.sampler["clip_frames"]:
            raise ValueError(f"model.autoencoder.clip_frames ({clip_frames}) must equal model.sampler.clip_frames "
                             f"({self.sampler['clip_frames']}): the temporal decoder decodes one sampler clip")
        pretrained = dict(pretrained or {})
        self.check_pretrained(pretrained)
        if any(pretrained.get(k) for k in ("sd_path", "checkpoint", "vae_checkpoint")):
            self.load_pretrained(sd_path=pretrained.get("sd_path"), checkpoint=pretrained.get("checkpoint"),
                                 vae_checkpoint=pretrained.get("vae_checkpoint"))

    # ------------------------------------------------------------------ configuration and weights
    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Sampler values, weight files, and the official checkpoint's keys against a meta-device UNet, before the
        model is built."""
        cls.check_sampler(cfg.get("sampler") or {})
        pretrained = cfg.get("pretrained") or {}
        cls.check_pretrained(pretrained)
        if pretrained.get("checkpoint") and cfg.get("unet") is not None:
            check_unet_checkpoint(cfg.unet, pretrained["checkpoint"])

    @staticmethod
    def check_sampler(sampler: Any) -> None:
        unknown = set(sampler) - set(SAMPLER_KEYS)
        if unknown:
            raise ValueError(f"unknown model.sampler setting(s) {sorted(unknown)}; known: {sorted(SAMPLER_KEYS)}")
        if sampler.get("method", "ddim") != "ddim":
            raise ValueError(f"model.sampler.method must be ddim (VidRD's iterative sampler is DDIM, as officially), "
                             f"got {sampler.get('method')!r}")
        iterative_settings(sampler)
        if sampler.get("num_frames") is not None:
            try:
                check_num_frames(sampler["num_frames"])
            except ValueError as error:
                raise ValueError(f"model.sampler.num_frames: {error}") from None

    @staticmethod
    def check_pretrained(pretrained: Any) -> None:
        """Refuse missing files before anything is built: the SD 2.1-base folder with every subfolder's weights,
        the official checkpoint, the temporal VAE checkpoint."""
        sd_path, checkpoint = pretrained.get("sd_path"), pretrained.get("checkpoint")
        vae_checkpoint = pretrained.get("vae_checkpoint")
        if pretrained.get("init_from_sd") and not sd_path:
            raise PretrainedConfigError(
                "VidRD is built on Stable Diffusion 2.1-base: set model.pretrained.sd_path=DIR to a local diffusers "
                "folder with unet/, vae/, text_encoder/, tokenizer/ (stabilityai/stable-diffusion-2-1-base), and "
                "model.pretrained.checkpoint=ModelT2V.pth for the released VidRD weights. "
                "To train a CPU-sized model from scratch instead, use experiment=tiny_vidrd.")
        if sd_path:
            folder = Path(sd_path)
            if not folder.is_dir():
                raise PretrainedConfigError(f"Stable Diffusion 2.1 folder not found: {folder} (model.pretrained.sd_path)")
            missing = [name for name in SD_SUBFOLDERS if not (folder / name).is_dir()]
            if missing:
                raise PretrainedConfigError(f"{folder} is not a diffusers Stable Diffusion folder: missing "
                                            f"{', '.join(m + '/' for m in missing)} (model.pretrained.sd_path)")
            for name in ("unet", "vae", "text_encoder"):
                try:
                    find_weight_file(folder / name)
                except FileNotFoundError as error:
                    raise PretrainedConfigError(f"{error} (model.pretrained.sd_path)") from None
            if not (folder / "tokenizer" / "vocab.json").is_file():
                raise PretrainedConfigError(f"no CLIP tokenizer: {folder / 'tokenizer' / 'vocab.json'} not found "
                                            "(model.pretrained.sd_path)")
        if checkpoint and not Path(checkpoint).is_file():
            raise PretrainedConfigError(f"VidRD checkpoint not found: {checkpoint} (model.pretrained.checkpoint; the "
                                        "official ModelT2V.pth is published with anonymous0x233/ReuseAndDiffuse)")
        if vae_checkpoint and not Path(vae_checkpoint).is_file():
            raise PretrainedConfigError(f"temporal VAE checkpoint not found: {vae_checkpoint} "
                                        "(model.pretrained.vae_checkpoint)")

    def load_pretrained(self, sd_path: str | Path | None = None, checkpoint: str | Path | None = None,
                        vae_checkpoint: str | Path | None = None) -> None:
        """SD 2.1-base (diffusers folder) for the UNet's spatial layers, the text encoder and the VAE; then the
        official `ModelT2V.pth` for the whole UNet (strict: every key, `unet.`-prefixed) and optionally the
        fine-tuned temporal VAE (strict, official layout)."""
        self.check_pretrained({"sd_path": sd_path, "checkpoint": checkpoint, "vae_checkpoint": vae_checkpoint})
        if sd_path:
            self.unet.load_image_unet_weights(Path(sd_path) / "unet")
            self.text_encoder.load_from_sd_folder(sd_path)
            self.autoencoder.load_from_sd_folder(sd_path)
        if checkpoint:
            load_state_dict_checked(self.unet, official_unet_state(read_state_dict(checkpoint), checkpoint), checkpoint)
        if vae_checkpoint:
            if not hasattr(self.autoencoder, "load_checkpoint"):
                raise PretrainedConfigError(f"model.pretrained.vae_checkpoint needs the temporal VAE "
                                            f"(TemporalKLAutoencoder), not {type(self.autoencoder).__name__}")
            self.autoencoder.load_checkpoint(vae_checkpoint)

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
        """Videos [B, F, H, W, 3] uint8, F = `num_frames` exactly, made clip by clip by the iterative sampler. Each
        video's noise comes from its own seed (`official_clip_noise` with one generator per video: the official
        stream for one video), so a video does not depend on the rest of the batch."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("generate needs a non-empty list of prompts")
        settings = self.sampler_settings(**overrides)
        self.check_sampler(settings)
        iterative = iterative_settings(settings)
        num_frames = self.frames_to_generate(num_frames, settings["num_frames"])
        factor = self.autoencoder.downsample_factor
        height, width = settings["height"], settings["width"]
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        generators = [torch.Generator().manual_seed(s) for s in self.seeds_for(prompts, seed)]
        clip_shape = (len(prompts), self.autoencoder.latent_channels, iterative.clip_frames,
                      height // factor, width // factor)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([iterative.negative_prompt] * len(prompts))
        clips = iterate_clips(
            lambda x, t, c: self.unet(x, t, c),
            make_scheduler("ddim", self.noise_schedule),
            cond, uncond,
            official_clip_noise(clip_shape, iterative.alpha, generators, device=self.device, dtype=self.dtype),
            iterative.clips_for(num_frames), iterative, generator=generators, progress=progress,
        )
        frames = []
        for index, latents in enumerate(clips):  # decode each clip as it comes; only uint8 frames are kept
            video = self.autoencoder.decode(latents).float().clamp(-1, 1)  # (B, N, C, H, W)
            video = iterative.kept_frames(video, index, dim=1)
            frames.append(((video + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu())
            del latents, video
        return torch.cat(frames, dim=1)[:, :num_frames]
