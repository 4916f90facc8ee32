"""Loong's token sampler (paper sections 3.3 and 4.1): video tokens one at a time from a LLaMA decoder, with a static
KV cache, top-k sampling and classifier-free guidance.

    prefill:  the prefix [cond; uncond] (one doubled batch, one cache)  -> logits of its last position only
    step:     guided = uncond + s * (cond - uncond) over the video ids only
              token  = argmax over the top k of (guided / T + Gumbel noise of the row's own generator)
              feed the token to both halves at the next position

Only video tokens are drawn: the logits are cut to `vocab.video_slice` before anything else, so text and special
tokens (`<eoi>` included) never come out; the clip length is the caller's `num_tokens`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from modules.components.llama import KVCache, LlamaDecoder
from modules.components.loong_sequence import LoongVocab

# progress(done, total): called after each of the `total` drawn tokens (modules.base.ProgressHook)
Progress = Callable[[int, int], None]


def gumbel_noise(generators: Sequence[torch.Generator], size: int, dtype: torch.dtype,
                 device: torch.device | str) -> torch.Tensor:
    """Standard Gumbel noise [len(generators), size], row i drawn from generators[i] alone (on the generator's own
    device, then moved), so a row's draws do not depend on the other rows of the batch."""
    rows = [torch.rand(size, generator=g, dtype=dtype, device=g.device) for g in generators]
    u = torch.stack([r.to(device) for r in rows])  # (B, size), in [0, 1)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))  # u = 0 would be -inf: never the argmax


def sample_top_k(logits: torch.Tensor, top_k: int, temperature: float,
                 generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One draw per row of `logits` [B, V] from softmax(logits / temperature) restricted to the row's top_k largest
    logits: LongTensor [B] of indices into V.

    Gumbel-max: argmax over the top k of (logits / T + G), G iid standard Gumbel, is a draw from that softmax; G of
    row i comes from generators[i] only (k uniforms per row and call). top_k is clamped to V (top_k = V is plain
    multinomial sampling); top_k = 1 is the argmax itself, greedy decoding, and draws no noise. With ties torch.topk
    decides which of the tied entries are kept.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(generators) != logits.shape[0]:
        raise ValueError(f"{len(generators)} generators for {logits.shape[0]} rows: pass one per row")
    if top_k == 1:
        return logits.argmax(-1)
    k = min(top_k, logits.shape[-1])
    values, indices = logits.topk(k, dim=-1)  # (B, k), (B, k)
    compute = torch.promote_types(values.dtype, torch.float32)
    scores = values.to(compute) / temperature + gumbel_noise(generators, k, compute, values.device)  # (B, k)
    return indices.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)  # (B,)


@torch.no_grad()
def sample_video_tokens(
    decoder: LlamaDecoder,
    cond_prefix: torch.Tensor,
    uncond_prefix: torch.Tensor | None,
    num_tokens: int,
    vocab: LoongVocab,
    *,
    top_k: int = 50,
    temperature: float = 1.0,
    guidance_scale: float = 7.5,
    generators: list[torch.Generator],
    cache: KVCache | None = None,
    progress: Progress | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw `num_tokens` video tokens after each row's prefix -> vocab ids [B, num_tokens], each a video id (not a
    codebook index: `vocab.video_codes` turns them into codes).

    cond_prefix: LongTensor [B, P], the text prefix (`build_prefix`) and any video tokens to continue from.
    uncond_prefix: LongTensor [B, P] for classifier-free guidance (`build_prefix([[]] * B, ...)`, plus the same video
        tokens when continuing), or None. It must have the same length P as cond_prefix: both halves of the doubled
        batch then sit at the same positions of one cache and step together. `build_prefix` pads every caption, the
        empty one included, to the same budget, so equal lengths is the normal case; a different length is a
        ValueError.
    Guidance: guided = uncond + s * (cond - uncond) on the raw logits of the video ids (LlamaGen's form, which the
        paper follows, s = 7.5 in section 4.1). On log-probabilities instead, each half would shift by its own
        log-normaliser, a per-row constant, so the guided values would differ by a constant and softmax, top-k and
        argmax, hence every draw, are the same; raw logits save the two log-softmaxes. With guidance_scale == 1 or
        no uncond_prefix only the conditional batch runs (no unconditional half), so guidance 1 is conditional
        sampling exactly. guidance_scale 0 samples unconditionally.
    top_k, temperature: `sample_top_k` (top k first, then temperature; top_k above vocab.video_size is clamped to
        it, which is multinomial sampling over all video tokens; top_k = 1 is greedy).
    generators: one per row; row i's draws depend only on generators[i] (and its own prompt), whatever else is in
        the batch. A generator on the logits' device saves a small copy per row and step.
    cache: a `KVCache` of batch 2B with guidance, B without, and max_len >= P + num_tokens - 1 (the last token is
        drawn, not fed), e.g. `decoder.allocate_cache(2 * B, max_len)` once for every clip of a long video. It is
        reset here and filled from position 0; its storage is written in place, never re-allocated. None allocates
        one of exactly that size.
    progress(done, total): called after each drawn token, total = num_tokens.
    return_logits: also return the guided video logits each token was drawn from (before top-k and temperature),
        [B, num_tokens, vocab.video_size], in the logits' dtype promoted to at least float32.
    """
    if cond_prefix.ndim != 2 or cond_prefix.dtype != torch.long or 0 in cond_prefix.shape:
        raise ValueError(f"cond_prefix must be a non-empty LongTensor [B, P], got {cond_prefix.dtype} of shape "
                         f"{tuple(cond_prefix.shape)}")
    batch, length = cond_prefix.shape
    if uncond_prefix is not None and (uncond_prefix.ndim != 2 or uncond_prefix.dtype != torch.long):
        raise ValueError(f"uncond_prefix must be a LongTensor [B, P], got {uncond_prefix.dtype} of shape "
                         f"{tuple(uncond_prefix.shape)}")
    if uncond_prefix is not None and uncond_prefix.shape[0] != batch:
        raise ValueError(f"uncond_prefix has {uncond_prefix.shape[0]} rows, cond_prefix {batch}")
    if uncond_prefix is not None and uncond_prefix.shape[1] != length:
        raise ValueError(f"uncond_prefix has length {uncond_prefix.shape[1]}, cond_prefix {length}: guidance steps "
                         f"both halves at the same positions of one cache, so they must be equally long (pad both "
                         f"with build_prefix to the same text budget)")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for {batch} prompts: pass one per row")
    if vocab.size > decoder.config.vocab_size:
        raise ValueError(f"vocabulary {vocab.describe()} exceeds the decoder's {decoder.config.vocab_size} logits")

    guided = uncond_prefix is not None and guidance_scale != 1.0
    rows = 2 * batch if guided else batch
    needed = length + num_tokens - 1  # positions written: the prefix and every drawn token but the last
    if needed > decoder.config.max_seq_len:
        raise ValueError(f"prefix {length} + {num_tokens} tokens need {needed} positions, more than the decoder's "
                         f"max_seq_len {decoder.config.max_seq_len}")
    if cache is None:
        cache = decoder.allocate_cache(rows, needed, device=cond_prefix.device)
    elif cache.batch_size != rows:
        why = "2 x batch with guidance" if guided else "batch size, no guidance (guidance_scale 1 or no uncond_prefix)"
        raise ValueError(f"cache holds {cache.batch_size} sequences, this call needs {rows} ({why}, batch {batch})")
    elif cache.max_len < needed:
        raise ValueError(f"cache of max_len {cache.max_len} is too short: prefix {length} + {num_tokens} tokens "
                         f"need {needed} positions")
    cache.reset()

    video = vocab.video_slice
    tokens = cond_prefix.new_empty(batch, num_tokens)
    all_logits = None
    inputs = torch.cat([cond_prefix, uncond_prefix]) if guided else cond_prefix  # (rows, P): [cond; uncond]
    logits = decoder(inputs, 0, cache, last_only=True)[:, -1, video]  # prefill, (rows, V_video)
    for step in range(num_tokens):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if guided:
            cond, uncond = logits.chunk(2)  # (B, V_video) each
            logits = uncond + guidance_scale * (cond - uncond)
        if return_logits:
            if all_logits is None:
                all_logits = logits.new_empty(batch, num_tokens, logits.shape[-1])
            all_logits[:, step] = logits
        drawn = sample_top_k(logits, top_k, temperature, generators) + vocab.video_offset  # (B,) vocab ids
        tokens[:, step] = drawn
        if progress is not None:
            progress(step + 1, num_tokens)
        if step + 1 < num_tokens:
            feed = torch.cat([drawn, drawn]) if guided else drawn  # (rows,)
            logits = decoder(feed[:, None], length + step, cache, last_only=True)[:, -1, video]  # (rows, V_video)
    return (tokens, all_logits) if return_logits else tokens
