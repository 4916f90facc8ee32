"""LaVie's temporal self-attention: attention across the frames of each spatial location.

Matches the official module (Vchitect/LaVie `base/models/attention.py`, `TemporalAttention`) in key names and
maths, so `lavie_base.pt` loads strictly and the fixtures in `$FIXTURES_DIR/lavie` are reproduced:

    q, k, v = x Wq, x Wk, x Wv               (no bias)
    q       = q * dim_head**-0.5             (scaled BEFORE the rotary encoding, queries only)
    q, k    = rope(q), rope(k)               (first 32 channels of each head, interleaved pairs)
    out     = softmax(q k^T + bias) v Wo + bo  (T5-style bucketed relative-position bias per head)

The softmax runs inside `scaled_dot_product_attention` with the bias as an additive float mask.

LaVie's interpolation UNet (`interpolation/models/attention.py`) uses a plain attention over frames instead: the same
projections and scaling without the rotary encoding or the bias table (`rotary_dim=0, relative_position_bias=False`;
its state dict then has no `rotary_emb.*` or `time_rel_pos_bias.*` keys, as the official one).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotary position encoding over the frame axis, with adjacent channel pairs (2i, 2i+1) sharing a frequency.

    `freqs` is kept in the state dict under the official name (`rotary_emb.freqs`) although it is not learned.
    """

    def __init__(self, dim: int = 32, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim = dim
        self.register_buffer("freqs", 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim))

    def angles(self, num_frames: int) -> torch.Tensor:
        """(F, dim) angles [p*t0, p*t0, p*t1, p*t1, ...] for positions p = 0..F-1."""
        # Low-precision freqs (a module cast to bf16) would give coarse angles: compute in at least float32.
        dtype = torch.promote_types(self.freqs.dtype, torch.float32)
        positions = torch.arange(num_frames, device=self.freqs.device, dtype=dtype)
        angles = positions[:, None] * self.freqs.to(dtype)  # (F, dim/2)
        return angles.repeat_interleave(2, dim=-1)  # (F, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate the first `dim` channels of x (..., F, d); the remaining channels pass through."""
        if x.shape[-1] < self.dim:
            raise ValueError(f"rotary dim {self.dim} exceeds the head dim {x.shape[-1]}")
        angles = self.angles(x.shape[-2])
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        pairs = rearrange(rot, "... (d r) -> ... d r", r=2)
        # (x0, x1) -> (-x1, x0): the 90-degree turn of each pair
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return torch.cat((rot * cos + turned * sin, rest), dim=-1)


class RelativePositionBias(nn.Module):
    """T5-style bidirectional bucketed relative-position bias, one scalar per (bucket, head)."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    @staticmethod
    def bucket(relative_position: torch.Tensor, num_buckets: int = 32, max_distance: int = 32) -> torch.Tensor:
        """Bucket of rel = key_pos - query_pos: exact below num_buckets/4, log-spaced up to max_distance;
        keys after the query use the upper half of the buckets."""
        half = num_buckets // 2
        n = -relative_position
        bucket = (n < 0).long() * half
        n = n.abs()
        max_exact = half // 2
        # log(0) is -inf for n == 0, but those positions take the exact branch of the `where` below.
        log_ratio = torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
        large = max_exact + (log_ratio * (half - max_exact)).long()
        large = large.clamp(max=half - 1)
        return bucket + torch.where(n < max_exact, n, large)

    def forward(self, num_frames: int) -> torch.Tensor:
        device = self.relative_attention_bias.weight.device
        pos = torch.arange(num_frames, device=device)
        rel = pos[None, :] - pos[:, None]  # (i, j) = key j minus query i
        buckets = self.bucket(rel, self.num_buckets, self.max_distance)
        return rearrange(self.relative_attention_bias(buckets), "i j h -> h i j")  # (heads, F, F)


class TemporalAttention(nn.Module):
    """Self-attention over frames. Input and output: (N, F, C), N = batch x spatial positions.

    `rotary_dim=0` leaves out the rotary encoding and `relative_position_bias=False` the bias table (LaVie's
    interpolation stage has neither; its order of frames then reaches the block only through its inputs)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        rotary_dim: int = 32,
        num_buckets: int = 32,
        max_distance: int = 32,
        relative_position_bias: bool = True,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"channels {dim} do not split into {heads} heads")
        self.heads = heads
        self.dim_head = dim // heads
        self.scale = self.dim_head**-0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])  # official layout: to_out.0
        self.rotary_emb = RotaryEmbedding(rotary_dim) if rotary_dim else None
        self.time_rel_pos_bias = (RelativePositionBias(heads, num_buckets, max_distance) if relative_position_bias
                                  else None)

    def _queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, h, F, d) each; queries scaled, then queries and keys rotated (when there is a rotary encoding)."""
        q, k, v = (rearrange(proj(x), "n f (h d) -> n h f d", h=self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        q = q * self.scale
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(q), self.rotary_emb(k)
        return q, k, v

    def _bias(self, num_frames: int, dtype: torch.dtype) -> torch.Tensor | None:
        """(1, h, F, F) relative-position bias, or None without the table."""
        if self.time_rel_pos_bias is None:
            return None
        return self.time_rel_pos_bias(num_frames).to(dtype)[None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._queries_keys_values(x)
        # (1, h, F, F): a 4-D mask lets CPU SDPA use its fused kernel; a 3-D one falls back to the slow MATH path
        # (benchmarks/results/temporal_attention_cpu.md)
        bias = self._bias(x.shape[1], q.dtype)
        # scale=1: the queries are already scaled, before the rotation as in the official code
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (n, h, F, d)
        out = rearrange(out, "n h f d -> n f (h d)")
        return self.to_out[1](self.to_out[0](out))

    def explicit_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same maths with an explicit softmax; returns (output, attention probabilities (n, h, F, F)).

        Kept for parity tests and the SDPA-vs-einsum benchmark, not used by the model.
        """
        q, k, v = self._queries_keys_values(x)
        logits = torch.einsum("n h i d, n h j d -> n h i j", q, k)
        bias = self._bias(x.shape[1], q.dtype)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1)
        out = rearrange(torch.einsum("n h i j, n h j d -> n h i d", probs, v), "n h f d -> n f (h d)")
        return self.to_out[1](self.to_out[0](out)), probs
