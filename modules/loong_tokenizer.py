"""Loong's video tokenizer (Wang et al. 2024, sections 3.1 and 4.1) as its own trainable LightningModule.

A MAGVIT-v2-style causal 3D CNN (`CausalVideoEncoder` / `CausalVideoDecoder`: 8x spatial, 4x temporal, clip
lengths 1+4k, latent 0 from frame 0 alone) around a clustered codebook (`ClusteredVectorQuantizer`, CVQ). The
language model (`modules/loong.py`) only uses `encode` and `decode` and loads this module's checkpoints with
`load_pretrained`.

Training follows VQGAN / MAGVIT-v2: L1 reconstruction + codebook/commitment loss + (optional) LPIPS + a hinge
adversarial loss from a 3D PatchGAN that starts at `adversarial.start_step`. Two optimizers, so optimisation is
manual: the generator step goes through Lightning (it counts `global_step`, which `max_steps`, checkpoints and the
EMA callback follow); the discriminator step calls its torch optimizer directly so one batch is one global step.
The progressive short-to-long schedule (images -> 17 -> 65 frames) is a sequence of experiment configs, each stage
initialised from the previous stage's weights with `init_from`.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn

from modules.components.checkpoints import load_state_dict_checked, read_state_dict
from modules.components.cvq import CodebookUsage

#: submodules whose weights make the tokenizer (what `load_pretrained` reads and the language model needs)
TOKENIZER_PARTS = ("encoder", "quantizer", "decoder")


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB over videos, for frames in [-1, 1] measured on the [0, 1] scale (peak 1)."""
    error = ((prediction.clamp(-1, 1) - target) / 2).pow(2).flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(1.0 / error.clamp_min(1e-10))).mean()


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class LoongTokenizer(LightningModule):
    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        quantizer: nn.Module,
        optimizer: functools.partial,
        discriminator: nn.Module | None = None,
        discriminator_optimizer: functools.partial | None = None,
        lr_scheduler: functools.partial | None = None,
        reconstruction_weight: float = 1.0,
        codebook_weight: float = 1.0,
        adversarial: dict[str, Any] | None = None,
        perceptual_weight: float = 0.0,
        perceptual_weights_path: str | None = None,
        usage_window: int = 65536,
        gradient_clip_val: float | None = 1.0,
        exact_prefixes: bool = True,
        init_from: str | None = None,
        fps: int = 8,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.encoder, self.decoder, self.quantizer = encoder, decoder, quantizer
        self.discriminator = discriminator
        self.optimizer_factory = optimizer
        self.discriminator_optimizer_factory = discriminator_optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.reconstruction_weight = reconstruction_weight
        self.codebook_weight = codebook_weight
        self.adversarial = {"weight": 0.1, "start_step": 0, **(adversarial or {})}
        self.fps = fps
        # manual optimisation: Lightning's Trainer(gradient_clip_val) is refused, the module clips itself
        self.gradient_clip_val = gradient_clip_val
        self.exact_prefixes = exact_prefixes
        if discriminator is not None and discriminator_optimizer is None:
            raise ValueError("a discriminator needs model.discriminator_optimizer")
        if self.adversarial["weight"] < 0 or self.adversarial["start_step"] < 0:
            raise ValueError(f"model.adversarial weight and start_step must be >= 0, got {self.adversarial}")

        self.perceptual_weight = perceptual_weight
        self.perceptual: nn.Module | None = None
        if perceptual_weight > 0:
            from modules.components.perceptual import LPIPSLoss

            if not perceptual_weights_path:
                raise ValueError(
                    "model.perceptual_weight > 0 needs model.perceptual_weights_path: a local torchvision VGG16 file "
                    "(vgg16-397923af.pth)"
                )
            self.perceptual = LPIPSLoss(perceptual_weights_path)

        # rolling window of the indices of recent batches: the fraction of codes in use and its perplexity
        self.usage = CodebookUsage(self.quantizer.num_codes, window=usage_window)
        if init_from:
            self.load_pretrained(init_from)

    # ------------------------------------------------------------------ weights
    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        init_from = cfg.get("init_from")
        if init_from and not Path(init_from).is_file():
            raise FileNotFoundError(
                f"model.init_from: checkpoint not found: {init_from}. A progressive stage starts from the previous "
                "stage's last.ckpt: train that stage first, or set model.init_from=null to start from scratch"
            )
        path = cfg.get("perceptual_weights_path")
        if (cfg.get("perceptual_weight") or 0) > 0 and path and not Path(path).is_file():
            raise FileNotFoundError(f"model.perceptual_weights_path: VGG16 weights not found: {path} (torchvision's "
                                    "vgg16-397923af.pth; model.perceptual_weight=0 trains without LPIPS)")

    def load_pretrained(self, checkpoint: str | Path) -> None:
        """Encoder, quantizer and decoder weights from one of our checkpoints (Lightning `.ckpt`, whose
        `state_dict` holds the EMA weights when training kept an EMA) or a file holding that state dict.
        The discriminator, the perceptual net and the optimizer state are not read. Strict: any missing,
        unexpected or wrong-shape tokenizer key is an error naming the file."""
        state = read_state_dict(checkpoint)
        state = state.get("state_dict", state)
        prefixes = tuple(part + "." for part in TOKENIZER_PARTS)
        state = {k: v for k, v in state.items() if k.startswith(prefixes)}  # the discriminator etc. are not needed
        if not state:
            raise KeyError(f"{checkpoint} holds no encoder./quantizer./decoder. weights: not a Loong tokenizer checkpoint")
        # one strict load over the three parts, so one error lists every missing, unexpected or wrong-shape key
        parts = nn.ModuleDict({part: getattr(self, part) for part in TOKENIZER_PARTS})
        load_state_dict_checked(parts, state, checkpoint)

    # ------------------------------------------------------------------ the tokenizer API
    @staticmethod
    def _channels_first(video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 5:
            raise ValueError(f"expected a video batch [B, T, C, H, W], got shape {tuple(video.shape)}")
        return video.transpose(1, 2)  # (B, C, T, H, W)

    @contextlib.contextmanager
    def _tokenizing(self) -> Iterator[None]:
        """How `encode` and `decode` run, whatever mode the module is in:
        - the quantiser in eval mode: tokenizing never moves the codebook or its usage statistics;
        - with `exact_prefixes`, convolutions frame by frame (see `CausalVideoEncoder.set_frame_by_frame`): the
          tokens of an image, or of the first 1+4t frames, are then bit-identical to the first tokens of the whole
          clip, which the language model relies on (image tokens = first-frame tokens; re-encoding the last frames
          when extending a video). Training keeps the faster one-conv-per-clip path, equal up to float rounding."""
        quantizer_training = self.quantizer.training
        self.quantizer.eval()
        self.encoder.set_frame_by_frame(self.exact_prefixes)
        self.decoder.set_frame_by_frame(self.exact_prefixes)
        try:
            yield
        finally:
            self.quantizer.train(quantizer_training)
            self.encoder.set_frame_by_frame(False)
            self.decoder.set_frame_by_frame(False)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Float video [B, T, C, H, W] in [-1, 1] (T = 1 + 4k) -> token ids LongTensor [B, T', H', W']."""
        with self._tokenizing():
            return self.quantizer(self.encoder(self._channels_first(video))).indices

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T', H', W'] -> float video [B, 1 + 4(T'-1), C, 8H', 8W'] in [-1, 1]."""
        if tokens.ndim != 4 or tokens.dtype != torch.long:
            raise ValueError(f"expected LongTensor token ids [B, T', H', W'], got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.min() < 0 or tokens.max() >= self.quantizer.num_codes:
            raise ValueError(f"token ids must lie in [0, {self.quantizer.num_codes}), got {tokens.min()}..{tokens.max()}")
        with self._tokenizing():
            return self.decoder(self.quantizer.codes(tokens)).clamp(-1, 1).transpose(1, 2)

    def reconstruct(self, video: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Float video [B, T, C, H, W] -> (reconstruction [B, T, C, H, W], quantizer output)."""
        quantized = self.quantizer(self.encoder(self._channels_first(video)))
        return self.decoder(quantized.z_q).transpose(1, 2), quantized

    # ------------------------------------------------------------------ training
    def _adversarial_on(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.adversarial["start_step"]

    def generator_losses(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        reconstruction, quantized = self.reconstruct(video)
        target, prediction = self._channels_first(video), reconstruction.transpose(1, 2)
        losses = {
            "l1": (prediction - target).abs().mean(),
            "codebook": quantized.loss,
            "perplexity": quantized.perplexity.detach(),
            "psnr": psnr(prediction.detach(), target),
        }
        total = self.reconstruction_weight * losses["l1"] + self.codebook_weight * losses["codebook"]
        if self.perceptual is not None:
            losses["perceptual"] = self.perceptual(prediction, target)
            total = total + self.perceptual_weight * losses["perceptual"]
        if self._adversarial_on() and self.adversarial["weight"] > 0:
            losses["generator_adversarial"] = -self.discriminator(prediction).mean()
            total = total + self.adversarial["weight"] * losses["generator_adversarial"]
        losses["loss"] = total
        losses["_prediction"], losses["_indices"] = prediction, quantized.indices
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        optimizers = self.optimizers()
        opt_g = optimizers[0] if isinstance(optimizers, list) else optimizers
        video = batch["video"]

        losses = self.generator_losses(video)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        if self.gradient_clip_val:
            self.clip_gradients(opt_g, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        opt_g.step()
        self.usage.update(losses["_indices"])

        if self._adversarial_on():
            # the discriminator's optimizer is stepped directly: Lightning's manual-optimisation wrapper would count
            # a second global step per batch (see the module docstring)
            opt_d = optimizers[1]
            real = self._channels_first(video)
            fake = losses["_prediction"].detach()
            logits_real, logits_fake = self.discriminator(real), self.discriminator(fake)
            losses["discriminator"] = hinge_discriminator_loss(logits_real, logits_fake)
            losses["logits_real"], losses["logits_fake"] = logits_real.mean().detach(), logits_fake.mean().detach()
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(losses["discriminator"])
            if self.gradient_clip_val:
                self.clip_gradients(opt_d, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
            opt_d.optimizer.step()

        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()

        usage, perplexity = self.usage.compute()
        shown = ("loss", "psnr")  # on the progress bar too
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items() if not k.startswith("_") and k not in shown},
                      batch_size=video.shape[0])
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, batch_size=video.shape[0])
        self.log("train/psnr", losses["psnr"], prog_bar=True, batch_size=video.shape[0])
        self.log("train/codebook_usage", usage, prog_bar=True)
        self.log("train/codebook_perplexity", perplexity)
        return losses["loss"].detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        video = batch["video"]
        reconstruction, quantized = self.reconstruct(video)
        self.log_dict(
            {"val/l1": (reconstruction - video).abs().mean(), "val/psnr": psnr(reconstruction, video),
             "val/codebook": quantized.loss},
            batch_size=video.shape[0], sync_dist=True,
        )

    def configure_optimizers(self) -> Any:
        generator = [p for part in TOKENIZER_PARTS for p in getattr(self, part).parameters() if p.requires_grad]
        optimizers = [self.optimizer_factory(generator)]
        if self.discriminator is not None:
            optimizers.append(self.discriminator_optimizer_factory(self.discriminator.parameters()))
        if self.lr_scheduler_factory is None:
            return optimizers
        return optimizers, [self.lr_scheduler_factory(opt) for opt in optimizers]
