"""Loong (Wang et al. 2024) as a VideoGenerator: an autoregressive LLaMA decoder over text and video tokens.

    caption --TextTokenizer--> text ids --build_prefix--> <pad>* <sot> text <eot> <soi>
    video   --LoongTokenizer (frozen)--> codes [T', h, w] -> video ids       (modules/components/loong_sequence.py)
    LlamaDecoder: next-token loss on the video tokens only (Eq. 1), early frames re-weighted in stage 3 (Eq. 2)

Training (section 3.2): one step encodes the batch's frames with the frozen tokenizer, drops `text_drop` of the
captions (the empty caption: what classifier-free guidance samples from), and scores the video tokens. Joint
image-video batches (stages 2-3) score each appended image as its own one-frame sequence with its own caption:
L = L_video + image_loss_weight * L_image, each a per-token mean, as LaVie combines them (modules/lavie.py). A
per-token mean over all tokens together would weigh an image 1/17 of a 65-frame clip (16x16 vs 17x16x16 tokens),
so the images, which keep the per-frame appearance of stage 1 (section 3.2), would hardly count.

Sampling (section 3.3): top-k (50) with guidance 7.5 (modules/samplers/autoregressive.py), one window of
`clip_frames` frames at a time. Longer videos continue clip by clip: decode the clip, re-encode its last
`extension_overlap` (5) frames, and sample the next clip from [text prefix; re-encoded tokens] (Figure 4);
`extend_from: tokens` continues from the previous clip's raw last latent frames instead (the Figure 6 ablation).
One KV cache, allocated for one window, serves every clip, so memory stays flat however long the video.

The text tokenizer's SentencePiece model travels inside the state dict (`text_tokenizer._extra_state`, a uint8
tensor), not in a separate checkpoint entry: sample.py and eval/ load only `state_dict`
(utils/generators.load_training_checkpoint), and a model must never depend on a cache directory to read its
captions the way it was trained.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from modules.base import ProgressHook, VideoGenerator, merge_sampler_settings
from modules.components.checkpoints import load_state_dict_checked, read_state_dict
from modules.components.llama import LlamaConfig, LlamaDecoder, load_hf_llama_state_dict
from modules.components.loong_sequence import (
    LoongVocab,
    build_prefix,
    build_sequences,
    drop_text_mask,
    frame_weights,
    latent_frames,
    loss_by_frame_range,
    masked_mean,
    next_token_losses,
)
from modules.components.text_tokenizer import TextTokenizer, train_text_tokenizer
from modules.loong_tokenizer import LoongTokenizer
from modules.samplers.autoregressive import sample_video_tokens

EXTEND_FROM = ("reencode", "tokens")
TINY_RECIPE = (
    "To train a CPU-sized Loong instead: python train.py experiment=tiny_loong_tokenizer (then "
    "experiment=tiny_loong_tokenizer_17 and _65: the video tokenizer), then python train.py experiment=tiny_loong "
    "(then experiment=tiny_loong_17 and _65)."
)


class MissingWeightsError(FileNotFoundError):
    """Files the model config names (tokenizers, checkpoints) that are not there; the message lists every one."""


def synthetic_captions(size: int, seed: int = 0) -> list[str]:
    """The training captions of the synthetic dataset's first `size` items, of videos and of images (image mode):
    the corpus of the tiny recipes' text tokenizer. 10,000 items show every caption word and almost every one of
    the 936 video captions."""
    from datamodules.synthetic import attributes_for, caption_for

    videos = [caption_for(*attributes_for(i, seed, "train")) for i in range(size)]
    images = [attributes_for(i, seed, "train", image_mode=True) for i in range(size)]
    return videos + [caption_for(a.shape, a.colour, None, a.background) for a in images]


class TextTokenizerSlot(nn.Module):
    """The text tokenizer as a weightless module whose state is its SentencePiece model.

    Built on first use: from `model_file`, or (tiny recipes, `model_file` null) trained from `train_captions()` with
    `train_text_tokenizer` (cached in `cache_dir`). `get_extra_state` puts the model's bytes into the state dict, and
    `set_extra_state` reads them back, so a checkpoint restores the exact tokenizer it was trained with. Loading
    through Lightning (resume, `load_state_dict`) and `Loong.load_stage` never builds one; a key-checked load
    (`load_state_dict_checked`, as sample.py does) reads the module's state dict first and so builds it once (from
    the cache, or retrained in a second) before the checkpoint's bytes replace it.
    """

    def __init__(self, model_file: str | None, vocab_size: int, train_captions: Callable[[], list[str]] | None = None,
                 cache_dir: str | None = None):
        super().__init__()
        self.model_file, self.vocab_size = model_file, int(vocab_size)
        self.train_captions, self.cache_dir = train_captions, cache_dir
        self._tokenizer: TextTokenizer | None = None

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            if self.model_file:
                self._tokenizer = TextTokenizer(self.model_file, self.vocab_size)
            elif self.train_captions is not None:
                kwargs = {"cache_dir": self.cache_dir} if self.cache_dir else {}
                self._tokenizer = train_text_tokenizer(self.train_captions(), self.vocab_size, **kwargs)
            else:
                raise MissingWeightsError("model.text_tokenizer.model_file is null and no train_captions are set")
        return self._tokenizer

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(texts)

    def get_extra_state(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.tokenizer.model_bytes), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        data = state.detach().cpu().numpy().tobytes()
        self._tokenizer = TextTokenizer.from_bytes(data, self.vocab_size, source="the checkpoint's text tokenizer")


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total` (section 4.1)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Loong(VideoGenerator):
    # a train.py checkpoint holds the frozen video tokenizer's weights too: sampling it needs no tokenizer file
    checkpoint_supersedes = ("tokenizer_checkpoint",)

    def __init__(
        self,
        decoder: LlamaConfig,
        tokenizer: LoongTokenizer,
        text_tokenizer: dict[str, Any],
        sampler: dict[str, Any],
        optimizer: functools.partial,
        lr_schedule: dict[str, Any] | None = None,
        tokenizer_checkpoint: str | None = None,
        pretrained: dict[str, Any] | None = None,
        init_from: str | None = None,
        text_budget: int = 252,
        text_drop: float = 0.1,
        image_loss_weight: float = 1.0,
        early_frame_lambda: float = 0.0,
        early_frames: int = 17,
        fps: float = 8,
    ):
        super().__init__()
        # the frozen video tokenizer: registered, so checkpoints hold it, but never trained (train() keeps it in eval)
        self.tokenizer = tokenizer
        if tokenizer_checkpoint:
            self.load_tokenizer(tokenizer_checkpoint)
        self.tokenizer.requires_grad_(False).eval()
        self.text_tokenizer = TextTokenizerSlot(**text_tokenizer)
        self.vocab = LoongVocab(text_size=self.text_tokenizer.vocab_size, video_size=tokenizer.quantizer.num_codes)
        if decoder.vocab_size != self.vocab.size:
            raise ValueError(f"model.decoder.vocab_size is {decoder.vocab_size}, but the vocabulary is "
                             f"{self.vocab.describe()}: set model.decoder.vocab_size={self.vocab.size}")
        self.decoder = LlamaDecoder(decoder)

        self.sampler = self.check_sampler(dict(sampler))
        self.optimizer_factory = optimizer
        self.lr_schedule = {"warmup_steps": 0, "total_steps": None, "min_ratio": 0.0, **(lr_schedule or {})}
        self.text_budget, self.text_drop = text_budget, text_drop
        self.image_loss_weight = image_loss_weight
        self.early_frame_lambda, self.early_frames = early_frame_lambda, early_frames
        self.fps = fps
        if not 0 <= text_drop <= 1 or early_frame_lambda < 0:
            raise ValueError(f"model.text_drop must lie in [0, 1] and model.early_frame_lambda be >= 0, got "
                             f"{text_drop} and {early_frame_lambda}")

        if (pretrained or {}).get("checkpoint"):
            self.load_pretrained(pretrained["checkpoint"])
        # the previous stage's weights are read when training starts (`setup`), not here: sampling a stage's
        # checkpoint (sample.py, eval/) builds the same config and must not need the previous stage's files
        self.init_from = init_from

    # ------------------------------------------------------------------ configuration and weights
    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Every missing file in one message (a paper-size model lacks several), then the sampler's values."""
        missing = []
        checkpoint = cfg.get("tokenizer_checkpoint")  # null: its weights come with a train.py checkpoint
        if checkpoint and not Path(checkpoint).is_file():
            missing.append(f"video tokenizer checkpoint {checkpoint} (model.tokenizer_checkpoint: the "
                           "last.ckpt of python train.py experiment=loong_tokenizer_65, after _images and _17)")
        text = cfg.get("text_tokenizer") or {}
        if text.get("model_file") and not Path(text.model_file).is_file():
            missing.append(f"text tokenizer {text.model_file} (model.text_tokenizer.model_file)")
        elif not text.get("model_file") and not text.get("train_captions"):
            missing.append("text tokenizer (model.text_tokenizer.model_file is null: set it to LLaMA's "
                           "SentencePiece tokenizer.model, 32,000 pieces)")
        lm = (cfg.get("pretrained") or {}).get("checkpoint")
        if lm and not Path(lm).is_file():
            missing.append(f"language-model checkpoint {lm} (model.pretrained.checkpoint)")
        if missing:
            raise MissingWeightsError("Loong needs files that are not there:\n  - " + "\n  - ".join(missing)
                                      + f"\n{TINY_RECIPE}")
        cls.check_sampler(dict(cfg.sampler))

    @staticmethod
    def check_sampler(settings: dict[str, Any]) -> dict[str, Any]:
        """Sampler values that would fail (or silently mislead) deep inside a generate call: ValueError now."""
        problems = []
        if settings.get("top_k", 1) < 1:
            problems.append(f"top_k must be >= 1 (1 is greedy), got {settings['top_k']}")
        if settings.get("temperature", 1.0) <= 0:
            problems.append(f"temperature must be > 0, got {settings['temperature']}")
        if settings.get("guidance_scale", 1.0) < 0:
            problems.append(f"guidance_scale must be >= 0 (1: no guidance), got {settings['guidance_scale']}")
        if settings.get("extend_from", "reencode") not in EXTEND_FROM:
            problems.append(f"extend_from must be one of {EXTEND_FROM}, got {settings['extend_from']!r}")
        clip, overlap = settings.get("clip_frames", 1), settings.get("extension_overlap", 1)
        for name, frames in (("clip_frames", clip), ("extension_overlap", overlap)):
            if not isinstance(frames, int) or frames < 1 or (frames - 1) % 4:
                problems.append(f"{name} must be 1 + 4k frames (the causal tokenizer's clip lengths), got {frames}")
        if isinstance(clip, int) and isinstance(overlap, int) and overlap >= clip:
            problems.append(f"extension_overlap ({overlap}) must be shorter than clip_frames ({clip})")
        if problems:
            raise ValueError("bad model.sampler settings: " + "; ".join(problems))
        return settings

    def load_tokenizer(self, checkpoint: str | Path) -> None:
        """The video tokenizer's weights (`LoongTokenizer.load_pretrained`), after checking its codebook is the one
        the vocabulary was sized for (a key-shape error would not say that)."""
        path = Path(checkpoint)
        if not path.is_file():
            raise MissingWeightsError(f"video tokenizer checkpoint not found: {path} (model.tokenizer_checkpoint)")
        # memory-mapped: only the codebook's shape is read here (a Lightning checkpoint also holds optimizer states)
        state = read_state_dict(path) if path.suffix == ".safetensors" else torch.load(
            path, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("state_dict", state)
        codebook = state.get("quantizer.embedding.weight")
        expected = self.tokenizer.quantizer.num_codes
        if codebook is not None and codebook.shape[0] != expected:
            raise ValueError(f"video tokenizer checkpoint {checkpoint} has {codebook.shape[0]} codes, but the model's "
                             f"video vocabulary is {expected} (model.tokenizer.quantizer.num_codes): use the tokenizer "
                             f"this config was made for, or set num_codes={codebook.shape[0]} and retrain the model")
        self.tokenizer.load_pretrained(checkpoint)

    def load_pretrained(self, checkpoint: str | Path) -> None:
        """Language-model weights from a local file: a LlamaDecoder state dict (our keys), one of our Lightning
        checkpoints (its `decoder.*`), or a transformers LlamaForCausalLM state dict. Strict: missing or unexpected
        keys raise CheckpointKeyError naming the file and the keys."""
        state = read_state_dict(checkpoint)
        if "state_dict" in state:
            state = {k[len("decoder."):]: v for k, v in state["state_dict"].items() if k.startswith("decoder.")}
        if any(k.startswith("model.") for k in state):  # transformers' names
            load_hf_llama_state_dict(self.decoder, state, source=str(checkpoint))
        else:
            load_state_dict_checked(self.decoder, state, checkpoint)

    def load_stage(self, checkpoint: str | Path) -> None:
        """All weights of a previous stage's Lightning checkpoint (progressive training, section 3.2), the text
        tokenizer first: the key check below reads the module's state dict, which must not train a new one."""
        state = dict(read_state_dict(checkpoint).get("state_dict", {}))
        key = "text_tokenizer._extra_state"
        if key in state:
            self.text_tokenizer.set_extra_state(state[key])
        load_state_dict_checked(self, state, checkpoint)

    def setup(self, stage: str) -> None:
        """Progressive training (section 3.2): a stage starts from the previous stage's weights. Lightning calls
        this before it restores a checkpoint to resume from, so a resumed stage keeps its own, later weights."""
        if stage != "fit" or not self.init_from:
            return
        if not Path(self.init_from).is_file():
            raise MissingWeightsError(f"previous stage's checkpoint not found: {self.init_from} (model.init_from: "
                                      "train that stage first, or set model.init_from=null to start from scratch)")
        self.load_stage(self.init_from)

    def train(self, mode: bool = True) -> Loong:
        super().train(mode)
        self.tokenizer.eval()  # frozen: nothing in it trains, and its encode/decode are inference
        return self

    def configure_model(self) -> None:
        """Sharded training (`trainer=fsdp`): Lightning calls this under its ModelParallelStrategy, after `setup`
        (so `init_from` weights are in), with the strategy's device mesh. Each decoder layer becomes its own FSDP2
        group, with its activations recomputed in backward unless `trainer.strategy.activation_checkpointing` is
        false, and the decoder the root group (modules/components/sharding.py); the frozen video tokenizer stays
        whole on every rank. Without a device mesh (one device, DDP) nothing changes."""
        if self.device_mesh is None:
            return
        from modules.components.sharding import activation_checkpointing_of, shard_decoder  # FSDP2 only when used

        strategy = self._trainer.strategy if self._trainer is not None else None
        shard_decoder(self, self.decoder, self.device_mesh, activation_checkpointing_of(strategy))

    # ------------------------------------------------------------------ training
    def sequence_loss(self, frames: torch.Tensor | None, captions: list[str], early_weights: bool,
                      codes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Next-token loss of the video tokens of `frames` [N, T, C, H, W] under `captions` (N), and its per-frame-range
        means (Figure 3); `codes` [N, T', h, w] are those tokens already (pre-tokenised data: `frames` is None).
        Captions are dropped at rate `text_drop` in training only."""
        if codes is None:
            with torch.no_grad():
                codes = self.tokenizer.encode(frames)  # (N, T', h, w)
        drop = drop_text_mask(len(captions), self.text_drop) if self.training and self.text_drop > 0 else None
        seq = build_sequences(self.text_tokenizer.encode_batch(captions), codes, self.vocab, self.text_budget, drop)
        token_losses = next_token_losses(self.decoder(seq.tokens), seq.tokens, seq.loss_mask)  # (N, L)
        per_frame = codes.shape[2] * codes.shape[3]
        weights = None
        if early_weights and self.early_frame_lambda > 0:  # Eq. 2
            video_weights = frame_weights(codes.shape[1], per_frame, latent_frames(self.early_frames),
                                          self.early_frame_lambda)
            weights = seq.target_weights(video_weights)
        losses = {"loss": masked_mean(token_losses, seq.loss_mask, weights)}
        ranges = loss_by_frame_range(token_losses[:, seq.video].detach(), per_frame)
        losses.update({f"loss_{name}": value for name, value in ranges.items()})
        return losses

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image_captions = batch.get("image_captions") or [[] for _ in batch["caption"]]
        num_images = len(image_captions[0])
        if "video_codes" in batch:  # pre-tokenised (data=video_tokens, scripts/pretokenize.py): codes, no pixels
            image_codes = batch["image_codes"].flatten(0, 1) if num_images else None  # (B*M, 1, h, w)
            video = {"frames": None, "codes": batch["video_codes"]}  # (B, T', h, w)
            images = {"frames": None, "codes": image_codes}
        else:
            pixels = batch["video"]  # (B, T+M, C, H, W): M images appended in joint training
            frames = pixels.shape[1] - num_images
            video = {"frames": pixels[:, :frames]}
            images = {"frames": pixels[:, frames:].reshape(-1, 1, *pixels.shape[2:])}  # (B*M, 1, C, H, W)
        losses = self.sequence_loss(**video, captions=list(batch["caption"]), early_weights=True)
        if num_images:  # each image is one sequence with its own caption
            texts = [c for row in image_captions for c in row]
            image = self.sequence_loss(**images, captions=texts, early_weights=False)
            losses = {"loss": losses["loss"] + self.image_loss_weight * image["loss"], "loss_video": losses["loss"],
                      "loss_image": image["loss"], **{k: v for k, v in losses.items() if k != "loss"}}
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        batch_size = len(batch["caption"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}, batch_size=batch_size)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.losses(batch)  # eval mode: no caption is dropped
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=len(batch["caption"]))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        schedule = self.lr_schedule
        total = schedule["total_steps"] or self.trainer.max_steps
        if total is None or total < 0:
            total = self.trainer.estimated_stepping_batches
        lr_lambda = functools.partial(warmup_cosine, warmup=schedule["warmup_steps"], total=int(total),
                                      min_ratio=schedule["min_ratio"])
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": LambdaLR(optimizer, lr_lambda), "interval": "step"}}

    # ------------------------------------------------------------------ sampling
    def sampler_settings(self, **overrides: Any) -> dict[str, Any]:
        return self.check_sampler(merge_sampler_settings(self.sampler, overrides))

    @staticmethod
    def clip_plan(num_frames: int, clip_frames: int, overlap: int) -> list[int]:
        """Latent frames to sample per window: the first clip (up to `clip_frames` frames, rounded up to 1 + 4k),
        then extension windows, each re-using the previous clip's last `overlap` frames and adding 4 frames per
        new latent frame, up to a full window."""
        first = min(num_frames, clip_frames)
        plan = [latent_frames(first + (-(first - 1)) % 4)]
        made = 1 + 4 * (plan[0] - 1)
        room = latent_frames(clip_frames) - latent_frames(overlap)  # new latent frames per extension window
        while made < num_frames:
            plan.append(min(room, math.ceil((num_frames - made) / 4)))
            made += 4 * plan[-1]
        return plan

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        num_frames: int | None = None,
        seed: int | list[int] = 0,
        progress: ProgressHook | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("generate needs a non-empty list of prompts")
        s = self.sampler_settings(**overrides)
        num_frames = self.frames_to_generate(num_frames, s["num_frames"])
        # one CPU generator per prompt: a video depends on its seed alone, whatever else is in the batch
        generators = [torch.Generator().manual_seed(x) for x in self.seeds_for(prompts, seed)]
        _, h, w = self.tokenizer.encoder.latent_shape(1, s["height"], s["width"])
        per_frame, overlap_latents = h * w, latent_frames(s["extension_overlap"])
        plan = self.clip_plan(num_frames, s["clip_frames"], s["extension_overlap"])

        batch, vocab = len(prompts), self.vocab
        cond_text = build_prefix(self.text_tokenizer.encode_batch(prompts), vocab, self.text_budget,
                                 device=self.device)  # (B, P)
        guided = s["guidance_scale"] != 1.0  # guidance 1 is conditional sampling: no unconditional half
        uncond_text = build_prefix([[]] * batch, vocab, self.text_budget, device=self.device) if guided else None
        # one cache for the longest window (prefix + context + new tokens; the last token is drawn, not fed)
        windows = [cond_text.shape[1] + (overlap_latents if i else 0) * per_frame + n * per_frame - 1
                   for i, n in enumerate(plan)]
        cache = self.decoder.allocate_cache(2 * batch if guided else batch, max(windows))

        total, done = sum(plan) * per_frame, 0
        pieces, context = [], None  # context: codes (B, overlap latents, h, w) the next window continues from
        for index, new_latents in enumerate(plan):
            cond, uncond = cond_text, uncond_text
            if context is not None:
                ids = vocab.video_ids(context.flatten(1))  # (B, overlap * h * w)
                cond = torch.cat([cond_text, ids], 1)
                uncond = torch.cat([uncond_text, ids], 1) if guided else None
            hook = None if progress is None else functools.partial(_offset_progress, progress, done, total)
            ids = sample_video_tokens(self.decoder, cond, uncond, new_latents * per_frame, vocab, top_k=s["top_k"],
                                      temperature=s["temperature"], guidance_scale=s["guidance_scale"],
                                      generators=generators, cache=cache, progress=hook)
            done += new_latents * per_frame
            codes = vocab.video_codes(ids).view(batch, new_latents, h, w)
            window = codes if context is None else torch.cat([context, codes], 1)
            clip = self._per_video(self.tokenizer.decode, window)  # (B, frames, C, H, W) in [-1, 1]
            pieces.append(clip if context is None else clip[:, s["extension_overlap"]:])  # overlap shown once
            if index + 1 < len(plan):
                if s["extend_from"] == "reencode":  # Figure 4: tokens of the decoded frames, without the clip's past
                    context = self._per_video(self.tokenizer.encode, clip[:, -s["extension_overlap"]:])
                else:  # Figure 6's ablation: the raw tokens, derived with the context of the whole previous clip
                    context = window[:, -overlap_latents:]
        video = torch.cat(pieces, 1)[:, :num_frames].float()  # (B, T, C, H, W)
        return ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).cpu()


    @staticmethod
    def _per_video(fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        """`fn` one video at a time: a convolution's float rounding depends on the batch size, and a one-ulp change
        in a decoded frame can change its re-encoded tokens, hence every later clip; per video, the same seed gives
        the same video whatever else is in the batch. The tokenizer is small beside the decoder's token steps."""
        return torch.cat([fn(batch[i : i + 1]) for i in range(batch.shape[0])])


def _offset_progress(progress: ProgressHook, offset: int, total: int, done: int, _clip_total: int) -> None:
    """The sampler's per-clip token count as a count over the whole generate call."""
    progress(offset + done, total)
