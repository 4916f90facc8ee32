"""A LLaMA decoder (Touvron et al. 2023): the autoregressive language model of Loong (paper section 4.1).

    x = embed(tokens)
    for each layer:  x = x + attn(rms_norm(x))     causal self-attention, rotary positions, no biases
                     x = x + mlp(rms_norm(x))      SwiGLU: down(silu(gate(x)) * up(x))
    logits = lm_head(rms_norm(x))

The maths and the rotary layout are those of transformers' `LlamaForCausalLM`, so its weights load through
`load_hf_llama_state_dict` and the logits agree (tests/test_llama_decoder.py). Decoding uses a `KVCache` allocated
once (`LlamaDecoder.allocate_cache`): each forward writes its keys and values at their positions and attends to
positions 0..pos, so memory stays flat however many tokens are generated.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modules.components.checkpoints import CheckpointKeyError, key_mismatch_error


@dataclass
class LlamaConfig:
    """The decoder's shape. `num_kv_heads` < `num_heads` is grouped-query attention (None: one per head).

    rms_norm_eps is 1e-6: Loong follows LLaMA (its reference [18], the first LLaMA), whose released configs use
    1e-6 (LLaMA 2 moved to 1e-5); it is also transformers' LlamaConfig default.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_seq_len: int = 4096  # the longest window a forward (or a cache) covers: positions 0..max_seq_len-1
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares in at least float32 (bf16 is too coarse), then back to x's dtype before the gain:
        # transformers' order. Unlike transformers, float64 input stays float64.
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin (L, head_dim) of the rotary angles p * theta**(-2i/head_dim) at `positions` (L,).

    Half-split layout: channel i and channel i + head_dim/2 form a rotated pair (`rotate_half`), not the adjacent
    pairs (2i, 2i+1) of Meta's original code. It is transformers' layout, so HF LLaMA weights load unpermuted and
    the parity test holds. The angles are computed in at least float32 (rounding below 1e-3 rad up to position
    8,000), as transformers does; unlike transformers, float64 stays float64.
    """
    compute = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=compute, device=positions.device) / head_dim)
    angles = positions.to(compute)[:, None] * inv_freq  # (L, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (L, head_dim): both halves of a pair share a frequency
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim: the 90-degree turn of each (i, i + d/2) pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # x (B, nh, L, hd), cos/sin (L, hd) broadcast


class KVCache:
    """Keys and values of every layer, `[layers, batch, kv_heads, max_len, head_dim]`, allocated once.

    `length` counts the valid positions 0..length-1. A forward at `start_pos` writes positions
    start_pos..start_pos+L-1 in place (start_pos <= length: no holes) and sets length to its end, so a caller may
    also rewind. `reset()` empties it for a new window (minute-long extension refills it with a new prefix); the old
    entries are never read again, so it does not clear the memory.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (B, kv_heads, max_len, head_dim) of one layer's keys and values."""
        return self.keys[index], self.values[index]

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, L, hd)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, L, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        mask, causal = None, True  # no cache: L queries over the same L keys
        if kv is not None:
            end = start_pos + L
            cache_k, cache_v = kv  # (B, nkv, max_len, hd)
            cache_k[:, :, start_pos:end] = k  # in place: the cache's storage never changes
            cache_v[:, :, start_pos:end] = v
            k, v = cache_k[:, :, :end].to(q.dtype), cache_v[:, :, :end].to(q.dtype)  # (B, nkv, end, hd), views
            if L == 1:
                causal = False  # one new token sees every cached position
            elif start_pos > 0:
                # query i sits at start_pos + i and sees keys 0..start_pos+i (SDPA's is_causal aligns top-left)
                mask = torch.ones(L, end, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
                causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.num_kv_heads != self.num_heads)  # (B, nh, L, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020), LLaMA's feed-forward."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One pre-norm block; its own module so FSDP and activation checkpointing can wrap one layer at a time."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, start_pos, kv)
        return x + self.mlp(self.mlp_norm(x))


class LlamaDecoder(nn.Module):
    """Token ids -> next-token logits over text, video and special tokens alike (Loong models them as one sequence
    under causal attention, paper section 3.1)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # LLaMA's (and transformers') initialisation: N(0, 0.02) for every matrix; RMSNorm gains start at 1.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def allocate_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_len` (default config.max_seq_len) tokens; dtype and
        device default to the embedding's."""
        cfg, weight = self.config, self.embed_tokens.weight
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len {cfg.max_seq_len}")
        return KVCache(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim,
                       dtype or weight.dtype, device or weight.device)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None, *,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, L, V) of `tokens` (B, L) sitting at positions start_pos..start_pos+L-1.

        Without a cache the L tokens attend causally among themselves. With one they are written into it at their
        positions and attend to cached positions 0..their own; the cache must already hold 0..start_pos-1.

        last_only: logits (B, 1, V) of the last position only, the next-token logits sampling needs. Every layer
        still runs on all L positions (their keys and values fill the cache), but the final norm and lm_head run on
        one: a prefill of L tokens then never holds the (B, L, V) logits (at Loong's 40,202 ids, 4,600 positions
        and a doubled batch, 1.5 GB in float32). The row equals the last row of the full logits up to the matmul's
        rounding for a different row count.
        """
        B, L = tokens.shape
        end = start_pos + L
        if end > self.config.max_seq_len:
            raise ValueError(f"positions up to {end - 1} exceed max_seq_len {self.config.max_seq_len}")
        if cache is not None:
            if torch.is_grad_enabled():
                raise RuntimeError("decoding with a KV cache is inference only: run it under torch.no_grad() "
                                   "or torch.inference_mode()")
            if cache.batch_size != B:
                raise ValueError(f"cache holds {cache.batch_size} sequences, tokens have {B}")
            if start_pos > cache.length:
                raise ValueError(f"start_pos {start_pos} would leave cache positions {cache.length}.."
                                 f"{start_pos - 1} unfilled")
            if end > cache.max_len:
                raise ValueError(f"positions up to {end - 1} do not fit a cache of {cache.max_len}")

        x = self.embed_tokens(tokens)  # (B, L, D)
        positions = torch.arange(start_pos, end, device=tokens.device)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, start_pos, None if cache is None else cache.layer(i))
        if cache is not None:
            cache.length = end
        if last_only:
            x = x[:, -1:]  # (B, 1, D): norm and lm_head act per position, so the other rows are never needed
        return self.lm_head(self.norm(x))  # (B, L, V), or (B, 1, V) with last_only


# transformers' LlamaForCausalLM names -> ours. Outside the layers the names match once "model." is dropped; inside a
# layer only these differ (the q/k/v/o_proj and gate/up/down_proj names are shared).
HF_LAYER_NAMES = {"self_attn": "attn", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
OUR_LAYER_NAMES = {ours: hf for hf, ours in HF_LAYER_NAMES.items()}


def hf_key_to_ours(key: str) -> str:
    """e.g. model.layers.3.self_attn.q_proj.weight -> layers.3.attn.q_proj.weight; lm_head.weight unchanged."""
    parts = key.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    if parts[0] == "layers" and len(parts) > 2:
        parts[2] = HF_LAYER_NAMES.get(parts[2], parts[2])
    return ".".join(parts)


def our_key_to_hf(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "layers" and len(parts) > 2:
        parts[2] = OUR_LAYER_NAMES.get(parts[2], parts[2])
    return ".".join(parts if parts[0] == "lm_head" else ["model", *parts])


def to_hf_state_dict(model: LlamaDecoder) -> dict[str, torch.Tensor]:
    """Our weights under transformers' LlamaForCausalLM names."""
    return {our_key_to_hf(k): v for k, v in model.state_dict().items()}


def load_hf_llama_state_dict(model: LlamaDecoder, hf_state_dict: Mapping[str, torch.Tensor],
                             source: str = "transformers LlamaForCausalLM state dict") -> None:
    """Load a transformers LlamaForCausalLM state dict strictly. Missing, unexpected (both in transformers' names)
    and wrongly shaped keys raise CheckpointKeyError. A tied model may lack lm_head.weight (tied safetensors files
    drop it); if present it must equal the embedding."""
    expected = model.state_dict()
    ours = {hf_key_to_ours(k): v for k, v in hf_state_dict.items()}
    tied = model.config.tie_embeddings
    missing = [our_key_to_hf(k) for k in expected if k not in ours and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in hf_state_dict if hf_key_to_ours(k) not in expected]
    wrong_shape = [f"{our_key_to_hf(k)}: {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                   for k, v in ours.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise key_mismatch_error(f"{source} does not match LlamaDecoder:", missing, unexpected, wrong_shape)
    if tied and "lm_head.weight" in ours:
        if not torch.equal(ours.pop("lm_head.weight"), ours["embed_tokens.weight"]):
            raise CheckpointKeyError(f"{source}: lm_head.weight differs from the embedding, but the model ties them")
    model.load_state_dict(ours, strict=not tied)
