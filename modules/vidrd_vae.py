"""VidRD's temporal-aware decoder fine-tuning (paper section 4.4, Eq. 9) as its own trainable stage, `model=vidrd_vae`.

The autoencoder is `TemporalKLAutoencoder` (SD 2.1's AutoencoderKL with a Temp-Conv after every ResNet of every decoder
up block, the official layout). The paper: "The encoder remains unchanged and the weights are frozen during
fine-tuning ... only the newly added Temp-Conv layers are trainable" (also section 5.1, "only the newly added temporal
layers in the decoder of VAE are trainable"); the spatial decoder is NOT trained. `trainable: temporal` is that.
`trainable: all` trains the whole 2D VAE on images instead: the tiny recipe's first stage, which makes the 2D VAE a
CPU-sized run starts from (no pretrained tiny VAE exists: LaVie's tiny recipe is in pixel space).

Loss (Eq. 9), following Stable Diffusion's `LPIPSWithDiscriminator` as the paper says ("follows the adversarial manner
following Stable Diffusion"), with the paper's weights alpha_rec = 1, alpha_reg = 1e-5, alpha_disc = 0.5:
    L = alpha_rec * L_rec + alpha_reg * KL + alpha_disc * lambda * L_G (+ perceptual_weight * LPIPS, SD's)
- L_rec: |x - D(E(x))| (SD's L1; `reconstruction_loss: l2` squares it), summed over each frame's pixels and averaged
  over frames, SD's reduction, so the paper's KL weight means what it meant there;
- KL of the posterior, summed per frame, averaged. With the encoder frozen it is a constant (no trainable parameter
  reaches it): logged, and part of the loss only in `trainable: all`;
- L_G = -D(x_hat) from the project's 3D PatchGAN (`PatchGAN3D`, hinge loss, a discriminator that sees whole clips),
  lambda SD's adaptive weight ||grad L_rec|| / ||grad L_G|| at the last trainable layer (SD: `decoder.conv_out`; here
  the last trainable one: the last Temp-Conv's last Conv3d when only temporal layers train).
Two optimizers, so optimisation is manual, as in `modules/loong_tokenizer.py`: the generator step goes through
Lightning (it counts `global_step`); the discriminator's torch optimizer is stepped directly.

Decoding in training and validation runs each clip's frames through the Temp-Convs together (`decode_frames` with the
clip's frame count); validation also decodes frame by frame (the official pipeline, equal to the 2D decoder) and logs
both: PSNR and the frame-difference error (how far the reconstruction's frame-to-frame change is from the real
clip's, a flicker measure).

The checkpoint's `autoencoder.vae.*` weights are the official VAE layout: `TemporalKLAutoencoder.load_checkpoint`
reads a `last.ckpt` of this stage directly (VidRD's generator uses it so).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from lightning import LightningModule
from torch import nn

from modules.components.temporal_vae import TemporalKLAutoencoder, decode_frames, is_temporal_key
from modules.loong_tokenizer import hinge_discriminator_loss, psnr

TRAINABLE = ("temporal", "decoder", "all")
RECONSTRUCTION_LOSSES = ("l1", "l2")


def frame_difference_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |(x_hat[t+1] - x_hat[t]) - (x[t+1] - x[t])| over videos [B, T, C, H, W] (T >= 2), on the [-1, 1] scale:
    0 when the reconstruction changes from frame to frame exactly as the real clip does; flicker raises it."""
    if prediction.shape[1] < 2:
        raise ValueError(f"a frame-difference error needs at least 2 frames, got {prediction.shape[1]}")
    return (prediction.clamp(-1, 1).diff(dim=1) - target.diff(dim=1)).abs().mean()


class VidRDTemporalVAE(LightningModule):
    """`model=vidrd_vae`: trains VidRD's temporal VAE decoder on video batches [B, T, C, H, W] in [-1, 1]."""

    def __init__(
        self,
        autoencoder: TemporalKLAutoencoder,
        optimizer: functools.partial,
        discriminator: nn.Module | None = None,
        discriminator_optimizer: functools.partial | None = None,
        trainable: str = "temporal",
        reconstruction_loss: str = "l1",
        reconstruction_weight: float = 1.0,
        kl_weight: float = 1e-5,
        adversarial: dict[str, Any] | None = None,
        perceptual_weight: float = 0.0,
        perceptual_weights_path: str | None = None,
        pretrained: dict[str, Any] | None = None,
        init_from: str | None = None,
        gradient_clip_val: float | None = 1.0,
        fps: int = 8,
    ):
        super().__init__()
        if trainable not in TRAINABLE:
            raise ValueError(f"model.trainable must be one of {TRAINABLE}, got {trainable!r}")
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"model.reconstruction_loss must be one of {RECONSTRUCTION_LOSSES}, got {reconstruction_loss!r}")
        if min(reconstruction_weight, kl_weight, perceptual_weight) < 0:
            raise ValueError("model.reconstruction_weight, kl_weight and perceptual_weight must be >= 0")
        self.adversarial = {"weight": 0.5, "start_step": 0, "adaptive": True, **(adversarial or {})}
        if self.adversarial["weight"] < 0 or self.adversarial["start_step"] < 0:
            raise ValueError(f"model.adversarial weight and start_step must be >= 0, got {self.adversarial}")
        if discriminator is not None and discriminator_optimizer is None:
            raise ValueError("a discriminator needs model.discriminator_optimizer")
        self.automatic_optimization = False
        self.autoencoder, self.discriminator = autoencoder, discriminator
        self.optimizer_factory, self.discriminator_optimizer_factory = optimizer, discriminator_optimizer
        self.trainable, self.reconstruction_loss = trainable, reconstruction_loss
        self.reconstruction_weight, self.kl_weight = reconstruction_weight, kl_weight
        self.gradient_clip_val, self.fps = gradient_clip_val, fps
        self.perceptual_weight = perceptual_weight
        self.perceptual: nn.Module | None = None
        if perceptual_weight > 0:
            from modules.components.perceptual import LPIPSLoss

            if not perceptual_weights_path:
                raise ValueError("model.perceptual_weight > 0 needs model.perceptual_weights_path: a local torchvision "
                                 "VGG16 file (vgg16-397923af.pth)")
            self.perceptual = LPIPSLoss(perceptual_weights_path)

        pretrained = pretrained or {}
        if pretrained.get("checkpoint"):  # a temporal VAE already (official layout, or one of this stage's ckpts)
            self.autoencoder.load_checkpoint(pretrained["checkpoint"])
        elif pretrained.get("sd_path"):  # SD 2.1's 2D VAE; the Temp-Convs start as identities
            self.autoencoder.load_from_sd_folder(pretrained["sd_path"])
        if init_from:  # a previous stage's last.ckpt (the tiny recipe's 2D-VAE stage)
            self.autoencoder.load_checkpoint(init_from)
        self._freeze()

    # ------------------------------------------------------------------ weights
    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Before anything is built: the named weight files and folders exist."""
        pretrained = cfg.get("pretrained") or {}
        sd_path, checkpoint = pretrained.get("sd_path"), pretrained.get("checkpoint")
        if pretrained.get("required") and not (sd_path or checkpoint):
            raise ValueError("model=vidrd_vae fine-tunes Stable Diffusion 2.1's VAE: set model.pretrained.sd_path=DIR "
                             "(an SD 2.1-base folder with vae/) or model.pretrained.checkpoint=FILE (a temporal VAE)")
        if checkpoint and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"model.pretrained.checkpoint: temporal VAE file not found: {checkpoint}")
        if sd_path and not checkpoint and not (Path(sd_path) / "vae").is_dir():
            raise FileNotFoundError(f"model.pretrained.sd_path: no SD VAE folder {Path(sd_path) / 'vae'} (expected an "
                                    "SD 2.1-base folder in diffusers layout, with vae/config.json and its weights)")
        init_from = cfg.get("init_from")
        if init_from and not Path(init_from).is_file():
            raise FileNotFoundError(f"model.init_from: checkpoint not found: {init_from}. The tiny recipe's temporal "
                                    "stage starts from its 2D stage's last.ckpt: train that first (stage=image)")
        path = cfg.get("perceptual_weights_path")
        if (cfg.get("perceptual_weight") or 0) > 0 and path and not Path(path).is_file():
            raise FileNotFoundError(f"model.perceptual_weights_path: VGG16 weights not found: {path} (torchvision's "
                                    "vgg16-397923af.pth; model.perceptual_weight=0 trains without LPIPS)")

    def _freeze(self) -> None:
        """requires_grad only on what `trainable` names (the Temp-Convs, the decoder, or the whole VAE)."""
        for name, parameter in self.autoencoder.vae.named_parameters():
            parameter.requires_grad_(self.trainable == "all" or is_temporal_key(name)
                                     or (self.trainable == "decoder" and name.startswith(("decoder.", "post_quant_conv."))))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.autoencoder.parameters() if p.requires_grad]

    def _last_layer(self) -> nn.Parameter:
        """Where SD's adaptive adversarial weight compares gradients: the decoder's last trainable layer."""
        if self.trainable == "temporal":
            return self.autoencoder.vae.decoder.up_blocks[-1].temp_convs[-1].convs[-1].weight
        return self.autoencoder.vae.decoder.conv_out.weight

    # ------------------------------------------------------------------ the autoencoder
    def _posterior(self, frames: torch.Tensor):
        """The encoder's posterior of frames (N, C, H, W); without a graph when the encoder is frozen."""
        vae = self.autoencoder.vae
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable == "all"):
            return vae.encode(frames).latent_dist

    def reconstruct(self, video: torch.Tensor, temporal: bool = True, sample: bool = False) -> tuple[torch.Tensor, Any]:
        """Video [B, T, C, H, W] -> (reconstruction [B, T, C, H, W], posterior). `temporal`: the Temp-Convs mix the
        clip's T frames (False: each frame alone, the official pipeline); `sample`: a posterior sample (training)
        rather than its mean."""
        frames = rearrange(video, "b t c h w -> (b t) c h w")
        posterior = self._posterior(frames)
        latents = posterior.sample() if sample else posterior.mode()
        decoded = decode_frames(self.autoencoder.vae, latents, num_frames=video.shape[1] if temporal else 1)
        return rearrange(decoded, "(b t) c h w -> b t c h w", b=video.shape[0]), posterior

    # ------------------------------------------------------------------ training
    def _adversarial_on(self) -> bool:
        return (self.discriminator is not None and self.adversarial["weight"] > 0
                and self.global_step >= self.adversarial["start_step"])

    def generator_losses(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        reconstruction, posterior = self.reconstruct(video, sample=True)
        error = reconstruction - video
        error = error.abs() if self.reconstruction_loss == "l1" else error.pow(2)
        frames = video.shape[0] * video.shape[1]
        losses = {"reconstruction": error.sum() / frames,  # SD: summed over a frame's pixels, averaged over frames
                  "kl": posterior.kl().sum() / frames,
                  "psnr": psnr(reconstruction.detach(), video)}
        total = self.reconstruction_weight * losses["reconstruction"] + self.kl_weight * losses["kl"]
        if self.perceptual is not None:
            losses["perceptual"] = self.perceptual(reconstruction.transpose(1, 2), video.transpose(1, 2))
            total = total + self.perceptual_weight * losses["perceptual"] * video[0, 0].numel()
        if self._adversarial_on():
            losses["generator_adversarial"] = -self.discriminator(reconstruction.transpose(1, 2)).mean()
            weight = torch.tensor(1.0, device=video.device)
            if self.adversarial["adaptive"]:
                layer = self._last_layer()
                rec_grad, = torch.autograd.grad(total, layer, retain_graph=True)
                adv_grad, = torch.autograd.grad(losses["generator_adversarial"], layer, retain_graph=True)
                weight = (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
            losses["adversarial_weight"] = weight
            total = total + self.adversarial["weight"] * weight * losses["generator_adversarial"]
        losses["loss"] = total
        losses["_reconstruction"] = reconstruction
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

        if self._adversarial_on():
            # stepped directly: Lightning's wrapper would count a second global step per batch (loong_tokenizer.py)
            opt_d = optimizers[1]
            real, fake = video.transpose(1, 2), losses["_reconstruction"].detach().transpose(1, 2)
            logits_real, logits_fake = self.discriminator(real), self.discriminator(fake)
            losses["discriminator"] = hinge_discriminator_loss(logits_real, logits_fake)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(losses["discriminator"])
            if self.gradient_clip_val:
                self.clip_gradients(opt_d, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
            opt_d.optimizer.step()

        size = video.shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()
                       if not k.startswith("_") and k not in ("loss", "psnr")}, batch_size=size)
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, batch_size=size)
        self.log("train/psnr", losses["psnr"], prog_bar=True, batch_size=size)
        return losses["loss"].detach()

    @torch.no_grad()
    def measure(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """PSNR and frame-difference error of the temporal decoder and of frame-by-frame decoding (posterior mean)."""
        temporal, _ = self.reconstruct(video, temporal=True)
        per_frame, _ = self.reconstruct(video, temporal=False)
        metrics = {"psnr": psnr(temporal, video), "psnr_per_frame": psnr(per_frame, video)}
        if video.shape[1] > 1:
            metrics["frame_difference_error"] = frame_difference_error(temporal, video)
            metrics["frame_difference_error_per_frame"] = frame_difference_error(per_frame, video)
        return metrics

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.measure(batch["video"]).items()},
                      batch_size=batch["video"].shape[0], sync_dist=True)

    def configure_optimizers(self) -> Any:
        optimizers = [self.optimizer_factory(self.trainable_parameters())]
        if self.discriminator is not None:
            optimizers.append(self.discriminator_optimizer_factory(self.discriminator.parameters()))
        return optimizers

