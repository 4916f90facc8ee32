"""The one contract every text-to-video backbone fulfils.

`sample.py`, the callbacks and `eval/` talk to a generator only through this class, so a new backbone is a
module file, its components and a config. See docs/design.md ("The generator contract").
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import get_class
from lightning import LightningModule

# progress(done, total): called by `generate` after each of the `total` denoising (or token) steps of one call, so
# sample.py and eval/ can show progress within a batch of videos (which may take minutes)
ProgressHook = Callable[[int, int], None]


class VideoGenerator(LightningModule):
    """A LightningModule that trains on the shared batch format and generates uint8 videos from text.

    Batch format (a dict): `video` float [B, T, C, H, W] in [-1, 1]; `caption` list[str]; optional `label`
    (int), `fps`, `is_image` (bool [B]) and, for joint image-video training, `image_captions`
    (list of B lists of M captions, one per extra image frame appended after the T video frames).
    """

    #: frames per second the generator's videos are meant to be played at (written into mp4 files)
    fps: int = 8
    #: model-config keys naming weight files whose weights a train.py checkpoint of this model holds as well (e.g.
    #: Loong's frozen video tokenizer): given a checkpoint, sample.py and eval/ set them to null rather than
    #: require the files (utils/generators.py)
    checkpoint_supersedes: tuple[str, ...] = ()

    @abstractmethod
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor: ...

    @abstractmethod
    def generate(
        self,
        prompts: list[str],
        num_frames: int | None = None,
        seed: int | list[int] = 0,
        progress: ProgressHook | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        """Videos for `prompts` as uint8 [B, T, H, W, 3]; the same seed gives the same video.

        `seed` is one int for the whole batch (video i uses seed + i) or one int per prompt. Sampler settings
        come from the model config's `sampler` section; `overrides` replace them for this call only.
        `progress(done, total)`, when given, is called after each denoising (or token) step; it never changes
        the videos.
        """

    @abstractmethod
    def load_pretrained(self, *args: Any, **kwargs: Any) -> None:
        """Load official weights from local paths; raise a clear error naming the file and any key mismatch."""

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Check a model config before anything is built (a paper-size model takes a while to build) and raise
        a clear error for missing weights or bad values. Entry scripts call it first."""

    def sampler_settings(self, **overrides: Any) -> dict[str, Any]:
        """The sampler settings a `generate` call with these overrides would use (recorded by sample.py)."""
        return {}

    @staticmethod
    def frames_to_generate(num_frames: Any, default: int) -> int:
        """`num_frames`, or `default` (the sampler's) when it is None; anything but a positive int is an error."""
        return default if num_frames is None else check_num_frames(num_frames)

    @staticmethod
    def seeds_for(prompts: list[str], seed: int | list[int]) -> list[int]:
        """One seed per prompt: an int expands to seed, seed+1, ...; a list must match the prompts."""
        if isinstance(seed, int):
            return [seed + i for i in range(len(prompts))]
        seeds = [int(s) for s in seed]
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one int or one seed per prompt")
        return seeds


def merge_sampler_settings(sampler: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The model's `sampler` settings with `overrides` for one call; an override the sampler does not have is an
    error that lists the known ones (a typo would otherwise be ignored silently)."""
    unknown = set(overrides) - set(sampler)
    if unknown:
        raise ValueError(f"unknown sampler setting(s) {sorted(unknown)}; known: {sorted(sampler)}")
    return {**sampler, **overrides}


def check_num_frames(num_frames: Any) -> int:
    """A frame count asked of a generator: a positive int, or a ValueError that says so (None means "the sampler's
    own" to `generate` and sample.py, and is handled by them)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive number of frames (or null/None for the model's "
                         f"sampler.num_frames), got {num_frames!r}")
    return num_frames


def validate_model_config(cfg: Any, require_generator: bool = False) -> None:
    """Run the configured class's `validate_config` on `cfg` (a model config with a _target_), if it has one.

    `train.py` trains any LightningModule backbone (a tokenizer or autoencoder stage too); `sample.py` and `eval/`
    need a `VideoGenerator` (`require_generator=True`).
    """
    target = get_class(cfg._target_)
    wanted = VideoGenerator if require_generator else LightningModule
    if not (isinstance(target, type) and issubclass(target, wanted)):
        what = "a VideoGenerator (a text-to-video model)" if require_generator else "a LightningModule"
        raise ValueError(f"model._target_ {cfg._target_} is not {what}")
    validate = getattr(target, "validate_config", None)
    if validate is not None:
        validate(cfg)
