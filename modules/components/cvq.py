"""Clustering Vector Quantisation (CVQ-VAE, Zheng & Vedaldi 2023), the quantiser of Loong's video tokenizer.

Loong picks CVQ over plain VQ for its codebook usage (paper Sec. 3.1, 4.1; K = 8192 codes). Plain VQ lets codes
that no encoder feature picks drift away and die; CVQ tracks each code's usage with an EMA and, every training
step, pulls rarely used codes onto an "anchor" feature of the current batch, so all K codes stay in play.

This reproduces the official `VectorQuantiser` (lyndonzheng/CVQ-VAE `quantise.py`); the order of operations is
checked against `$FIXTURES_DIR/loong` (README there). Per forward, with features z (N, C) channels-last:

    d        = normalize(z) normalize(W)^T            (N, K) cosine similarity ("l2": -|z - w|^2)
    idx      = argmax_k d;  z_q = W[idx]               (codebook BEFORE this step's update)
    loss     = beta |sg(z_q) - z|^2 + |z_q - sg(z)|^2  (means); z_q returned straight-through
    training only:
      p      <- 0.99 p + 0.01 usage(batch)             (embed_prob, updated BEFORE the decay is computed)
      a_k    = anchor feature for code k                ("closest": the batch feature most similar to code k)
      g_k    = exp(-p_k K 10 / (1 - 0.99) - 1e-3)       (unused code: 0.999; code at its fair share 1/K: 0)
      W_k    <- (1 - g_k) W_k + g_k a_k                 (no gradient through it)
      [contrastive] loss += CE over codes of (mean top-N/K similarities, lowest N/2 similarities) / 0.07

Differences from upstream, all outside the fixture's numbers:
* no dense one-hot (N, K) matrix: codes are looked up with `F.embedding`, usage counted with `bincount`;
* distances are computed in the codebook's dtype with autocast off (bf16 cosine scores tie and flip indices);
* `anchor="random"` samples rows of the current batch with `torch.randint`, which is what upstream's
  `FeaturePool` does whenever the batch has more than K features (always the case for video latents); for smaller
  batches upstream mixes in features of earlier batches from an un-checkpointed pool, which we do not keep;
* the contrastive gradient is the clean one by default (see `upstream_grad_quirk`);
* under `torch.distributed` the usage and the anchors are synchronised so every rank keeps the same codebook
  (see `ClusteredVectorQuantizer.forward`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ANCHORS = ("closest", "random", "probrandom")
DISTANCES = ("cos", "l2")


class QuantizerOutput(NamedTuple):
    """What `ClusteredVectorQuantizer.forward` returns.

    z_q:        quantised features in the input layout, (B, C, *S); values are the codes of the codebook before
                this step's update, gradient straight through to the input.
    loss:       scalar: commitment + codebook loss (+ contrastive term when enabled, training only).
    indices:    (B, *S) int64 code per position.
    perplexity: scalar exp(entropy) of this batch's code histogram (this rank's batch only, as upstream).
    """

    z_q: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor
    perplexity: torch.Tensor


@dataclass
class QuantizerDetails:
    """Intermediates of the last forward, kept only when `record_details` is set (tests, debugging).

    cos_sim:          (N, K) similarity matrix `d` (pre-update codebook).
    anchor_idx:       (K,) batch row used as each code's anchor; None in eval, without re-anchoring, or when the
                      anchors came from several ranks.
    decay:            (K,) mixing coefficient g of the re-anchoring; None when no re-anchoring happened.
    contrastive_loss: scalar contrastive term added to the loss; None when not added.
    """

    cos_sim: torch.Tensor
    anchor_idx: torch.Tensor | None = None
    decay: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None


class ClusteredVectorQuantizer(nn.Module):
    """CVQ quantiser for channels-first features of any spatial rank: (B, C, H, W) or video (B, C, T, H, W).

    Args:
        num_codes: codebook size K.
        dim: code dimension C (the input's channel count).
        beta: commitment weight.
        decay: EMA factor of the usage `embed_prob`; also sets the re-anchoring temperature (1 - decay).
        distance: "cos" (cosine similarity, upstream default) or "l2" (negative squared distance).
        anchor: "closest" (per code, the batch feature most similar to it), "random" (uniform batch rows) or
            "probrandom" (per code, a batch row drawn with probability softmax over the rows of its similarities).
        contrastive: add upstream's contrastive term in training (upstream `main.py` default: off).
        first_batch: re-anchor on the first training step only (upstream's "offline" variant). Not checkpointed.
        reanchor: False gives the plain-VQ baseline: same lookup, loss and usage tracking, codebook left alone.
        sync_ddp: synchronise usage and anchors across ranks when torch.distributed runs with world size > 1.
        upstream_grad_quirk: reproduce upstream's contrastive codebook gradient, which is taken after the
            re-anchoring overwrote the weight (mixes old norms with new values); False gives the clean gradient of
            the loss as computed. No effect without the contrastive term.

    State dict: `embedding.weight` (K, C) and `embed_prob` (K,), as upstream.
    """

    contrastive_temperature = 0.07

    def __init__(
        self,
        *,
        num_codes: int = 8192,
        dim: int,
        beta: float = 0.25,
        decay: float = 0.99,
        distance: str = "cos",
        anchor: str = "closest",
        contrastive: bool = False,
        first_batch: bool = False,
        reanchor: bool = True,
        sync_ddp: bool = True,
        upstream_grad_quirk: bool = False,
    ):
        super().__init__()
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.num_codes = num_codes
        self.dim = dim
        self.beta = beta
        self.decay = decay
        self.distance = distance
        self.anchor = anchor
        self.contrastive = contrastive
        self.first_batch = first_batch
        self.reanchor = reanchor
        self.sync_ddp = sync_ddp
        self.upstream_grad_quirk = upstream_grad_quirk
        self.anchors_frozen = False  # set after the first re-anchoring when first_batch (upstream `self.init`)
        self.record_details = False
        self.details: QuantizerDetails | None = None

        self.embedding = nn.Embedding(num_codes, dim)
        self.embedding.weight.data.uniform_(-1.0 / num_codes, 1.0 / num_codes)
        self.register_buffer("embed_prob", torch.zeros(num_codes))

    # ------------------------------------------------------------------------------------------------ pieces
    def similarity(self, features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """(N, C) features (detached by the caller) x (K, C) codebook -> (N, K), larger = closer."""
        if self.distance == "cos":
            return F.normalize(features, dim=1) @ F.normalize(codebook, dim=1).T
        return -(features**2).sum(1, keepdim=True) - (codebook**2).sum(1) + 2 * features @ codebook.T

    def mixing_coefficient(self) -> torch.Tensor:
        """(K,) weight g of the anchor in W <- (1 - g) W + g anchor, from the (already updated) usage."""
        return torch.exp(-(self.embed_prob * self.num_codes * 10) / (1 - self.decay) - 1e-3)

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, *S) code indices -> (B, C, *S) code vectors: the decoder's way back from tokens.

        Same values as the forward's `z_q` for the codebook the indices were computed with (the straight-through
        `z + (code - z)` of the forward only adds a rounding of z's last bit).
        """
        return F.embedding(indices, self.embedding.weight).movedim(-1, 1).contiguous()

    def _distributed(self) -> bool:
        return self.sync_ddp and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _update_usage(self, avg_probs: torch.Tensor) -> None:
        if self._distributed():
            # Mean over ranks: the usage of the global batch; identical on every rank.
            avg_probs = avg_probs.clone()
            dist.all_reduce(avg_probs)
            avg_probs /= dist.get_world_size()
        self.embed_prob.mul_(self.decay).add_(avg_probs, alpha=1 - self.decay)

    def _anchor_features(self, features: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(K, C) anchor per code, and the (K,) batch rows they came from (None when drawn across ranks).

        Distributed (same result on every rank):
          closest:    the globally closest feature: each rank's best (similarity, feature) per code is all-gathered
                      and the highest similarity wins (ties: lowest rank);
          random:     rank 0's draw is broadcast (rank 0's batch is a uniform sample of the global one);
          probrandom: exact two-stage draw from the softmax over all ranks' rows: each rank draws within its batch
                      and all-gathers the draw with its log-normaliser; rank 0 draws the rank per code with
                      probability softmax(log-normalisers) and broadcasts the choice.
        """
        n, k = d.shape
        if self.anchor == "closest":
            best, rows = d.max(dim=0)  # (K,)
        elif self.anchor == "random":
            rows = torch.randint(0, n, (k,), device=d.device)
        else:  # probrandom
            rows = torch.multinomial(F.softmax(d.T, dim=1), num_samples=1).view(-1)
        anchors = features[rows]  # (K, C)
        if not self._distributed():
            return anchors, rows

        world = dist.get_world_size()
        if self.anchor == "random":
            dist.broadcast(anchors, src=0)
            return anchors, None
        gathered = [torch.empty_like(anchors) for _ in range(world)]
        dist.all_gather(gathered, anchors.contiguous())
        candidates = torch.stack(gathered)  # (world, K, C)
        score = best if self.anchor == "closest" else torch.logsumexp(d.T, dim=1)  # (K,)
        scores = [torch.empty_like(score) for _ in range(world)]
        dist.all_gather(scores, score.contiguous())
        scores = torch.stack(scores)  # (world, K)
        if self.anchor == "closest":
            winner = scores.argmax(dim=0)  # first maximum: lowest rank on ties
        else:
            winner = torch.multinomial(F.softmax(scores.T, dim=1), num_samples=1).view(-1)
            dist.broadcast(winner, src=0)
        return candidates[winner, torch.arange(k, device=d.device)], None

    def _contrastive_loss(self, d: torch.Tensor) -> torch.Tensor:
        """Upstream's term: per code, mean of its top max(1, N//K) similarities vs its lowest N//2, temperature 0.07."""
        n, k = d.shape
        positive = d.topk(max(1, n // k), dim=0).values.mean(dim=0, keepdim=True)  # (1, K)
        negative = d.topk(n // 2, dim=0, largest=False).values  # (N/2, K)
        logits = torch.cat([positive, negative]).T / self.contrastive_temperature  # (K, 1 + N/2)
        return F.cross_entropy(logits, torch.zeros(k, dtype=torch.long, device=d.device))

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, C, *S) -> QuantizerOutput. Training mode also updates `embed_prob` and re-anchors the codebook."""
        if z.dim() < 3 or z.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}, *spatial) features, got {tuple(z.shape)}")
        weight = self.embedding.weight
        with torch.autocast(device_type=z.device.type, enabled=False):
            dtype = torch.promote_types(z.dtype, weight.dtype)
            z_last = z.to(dtype).movedim(1, -1)  # (B, *S, C)
            zf = z_last.reshape(-1, self.dim)  # (N, C), row n = (b*H + h)*W + w
            contrastive = self.contrastive and self.training
            # The contrastive term differentiates d w.r.t. the codebook. The clean gradient needs d built on a copy
            # of the weight: the re-anchoring below overwrites the weight before backward runs.
            source = weight if (self.upstream_grad_quirk or not contrastive) else weight.clone()
            with torch.set_grad_enabled(contrastive and torch.is_grad_enabled()):
                d = self.similarity(zf.detach().to(weight.dtype), source)  # (N, K)
            indices = d.argmax(dim=1)  # (N,)

            code = F.embedding(indices, weight).to(dtype)  # (N, C)
            loss = self.beta * torch.mean((code.detach() - zf) ** 2) + torch.mean((code - zf.detach()) ** 2)
            z_q = zf + (code - zf).detach()  # straight-through
            z_q = z_q.view(z_last.shape).movedim(-1, 1).contiguous()  # (B, C, *S)

            counts = torch.bincount(indices, minlength=self.num_codes)
            avg_probs = counts.to(weight.dtype) / indices.numel()  # (K,)
            perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-10)))

            details = QuantizerDetails(cos_sim=d.detach()) if self.record_details else None
            if self.training:
                self._update_usage(avg_probs)
                if self.reanchor and not self.anchors_frozen:
                    with torch.no_grad():
                        anchors, rows = self._anchor_features(zf.detach().to(weight.dtype), d.detach())
                        g = self.mixing_coefficient()[:, None]  # (K, 1)
                        updated = weight * (1 - g) + anchors * g
                        if self.upstream_grad_quirk:
                            weight.data.copy_(updated)  # no version bump: backward silently sees the new values
                        else:
                            weight.copy_(updated)  # version bump: autograd would refuse a stale saved weight
                    if self.first_batch:
                        self.anchors_frozen = True
                    if details is not None:
                        details.anchor_idx, details.decay = rows, g[:, 0]
                if contrastive:
                    contra = self._contrastive_loss(d)
                    loss = loss + contra
                    if details is not None:
                        details.contrastive_loss = contra.detach()
        self.details = details
        return QuantizerOutput(z_q, loss, indices.view(z_last.shape[:-1]), perplexity)


class UsageStats(NamedTuple):
    """usage: fraction of the K codes seen in the window; perplexity: exp(entropy) of the window's histogram."""

    usage: torch.Tensor
    perplexity: torch.Tensor


class CodebookUsage:
    """Rolling-window codebook statistics for logging: the last `window` code indices in a ring buffer.

    A plain object, not a module: its ring is not a buffer, so DDP does not overwrite every rank's window with rank
    0's (`broadcast_buffers`) and checkpoints do not carry it. The ring follows the device of the indices fed in.
    Each rank keeps its own window; `compute(sync=True)` sums the histograms over ranks (every rank must call it).
    """

    def __init__(self, num_codes: int, window: int = 65536):
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        self.num_codes = num_codes
        self.window = window
        self.reset()

    def reset(self) -> None:
        self.ring = torch.zeros(self.window, dtype=torch.long)
        self.position = 0  # next slot to write
        self.filled = 0  # valid entries: ring[:filled] (the ring only wraps once full)

    def update(self, indices: torch.Tensor) -> None:
        self.ring = self.ring.to(indices.device)  # no-op after the first call
        flat = indices.detach().reshape(-1).long()[-self.window :]  # only the newest `window` can stay
        n = flat.numel()
        first = min(n, self.window - self.position)  # up to the end of the ring, the rest wraps to the start
        self.ring[self.position : self.position + first] = flat[:first]
        self.ring[: n - first] = flat[first:]
        self.position = (self.position + n) % self.window
        self.filled = min(self.window, self.filled + n)

    def histogram(self) -> torch.Tensor:
        """(K,) counts of each code in the window."""
        return torch.bincount(self.ring[: self.filled], minlength=self.num_codes)

    def compute(self, sync: bool = False) -> UsageStats:
        counts = self.histogram()
        if sync and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        total = counts.sum().clamp_min(1)
        p = counts.double() / total
        entropy = -torch.special.xlogy(p, p).sum()  # 0 log 0 = 0
        usage = (counts > 0).double().sum() / self.num_codes
        return UsageStats(usage.float(), entropy.exp().float())
