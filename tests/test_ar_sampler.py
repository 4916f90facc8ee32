"""Loong's token sampler (modules/samplers/autoregressive.py) on a tiny random LLaMA decoder: cached decoding against
full recomputation with guidance, greedy and top-k, per-row seeds, one cache for every call, errors, and the draw
frequencies of the Gumbel-max helper."""
from __future__ import annotations

import pytest
import torch

from modules.components.llama import LlamaConfig, LlamaDecoder
from modules.components.loong_sequence import LoongVocab, build_prefix
from modules.samplers.autoregressive import sample_top_k, sample_video_tokens

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = LoongVocab(text_size=50, video_size=40)
BUDGET = 6  # prefix length BUDGET + 3
PROMPTS = [[3, 17, 9], [41, 2], [5, 5, 5, 30, 11, 8]]


@pytest.fixture(scope="module")
def decoder() -> LlamaDecoder:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB.size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      max_seq_len=64)
    model = LlamaDecoder(cfg).double().eval()
    with torch.no_grad():  # weights well away from the N(0, 0.02) init, so the logits spread and prompts matter
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


def prefixes(prompts=PROMPTS):
    return build_prefix(prompts, VOCAB, BUDGET), build_prefix([[]] * len(prompts), VOCAB, BUDGET)


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def recomputed_logits(decoder, cond, uncond, tokens, scale):
    """Guided video logits of every step by full recomputation without a cache, [B, N, V_video]."""
    n, video = tokens.shape[1], VOCAB.video_slice
    cond_logits = decoder(torch.cat([cond, tokens], 1))[:, cond.shape[1] - 1 : cond.shape[1] - 1 + n, video]
    if uncond is None or scale == 1:
        return cond_logits
    uncond_logits = decoder(torch.cat([uncond, tokens], 1))[:, uncond.shape[1] - 1 : uncond.shape[1] - 1 + n, video]
    return uncond_logits + scale * (cond_logits - uncond_logits)


@torch.no_grad()
@pytest.mark.parametrize("scale", [7.5, 1.0])
def test_cached_decoding_equals_recomputation(decoder, scale):
    cond, uncond = prefixes()
    tokens, logits = sample_video_tokens(decoder, cond, uncond, 20, VOCAB, top_k=10, guidance_scale=scale,
                                         generators=gens(0, 1, 2), return_logits=True)
    assert tokens.shape == (3, 20) and logits.shape == (3, 20, VOCAB.video_size) and logits.dtype == torch.float64
    assert VOCAB.is_video(tokens).all()
    torch.testing.assert_close(logits, recomputed_logits(decoder, cond, uncond, tokens, scale), rtol=0, atol=1e-10)


class FullLogitsDecoder:
    """The decoder as it was before `last_only`: every call computes the logits of every position (the sampler
    then keeps the last row). Records the keyword arguments each call got."""

    def __init__(self, decoder: LlamaDecoder):
        self.decoder, self.config, self.allocate_cache = decoder, decoder.config, decoder.allocate_cache
        self.calls: list[dict] = []

    def __call__(self, tokens, start_pos=0, cache=None, **kwargs):
        self.calls.append(kwargs)
        return self.decoder(tokens, start_pos, cache)


@torch.no_grad()
@pytest.mark.parametrize("scale, top_k", [(7.5, 10), (1.0, 1)])
def test_last_position_logits_do_not_change_sampling(decoder, scale, top_k):
    """The sampler asks the decoder for the last position's logits only (prefill and steps); the tokens are those
    of the full-logits path and the logits agree to float64 rounding."""
    cond, uncond = prefixes()
    kwargs = dict(top_k=top_k, guidance_scale=scale, return_logits=True)
    full = FullLogitsDecoder(decoder)
    expected, expected_logits = sample_video_tokens(full, cond, uncond, 20, VOCAB, generators=gens(3, 4, 5), **kwargs)
    assert full.calls == [{"last_only": True}] * 20  # the prefill and 19 steps all asked for the last row only
    tokens, logits = sample_video_tokens(decoder, cond, uncond, 20, VOCAB, generators=gens(3, 4, 5), **kwargs)
    assert torch.equal(tokens, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-12)


@torch.no_grad()
def test_guidance_changes_the_logits(decoder):
    """Sanity of the test model: the prompt matters, so guidance is not a no-op that the other tests would miss."""
    cond, uncond = prefixes()
    _, guided = sample_video_tokens(decoder, cond, uncond, 3, VOCAB, generators=gens(0, 1, 2), return_logits=True)
    _, plain = sample_video_tokens(decoder, cond, None, 3, VOCAB, generators=gens(0, 1, 2), return_logits=True)
    assert (guided[:, 0] - plain[:, 0]).abs().max() > 0.1


@torch.no_grad()
def test_top_1_is_greedy(decoder):
    cond, uncond = prefixes()
    tokens = sample_video_tokens(decoder, cond, uncond, 15, VOCAB, top_k=1, temperature=0.7, generators=gens(4, 5, 6))
    # greedy rebuilt independently: argmax of the recomputed guided logits, one step at a time
    greedy = cond.new_empty(3, 0)
    for _ in range(15):
        dummy = torch.full((3, 1), VOCAB.video_offset)  # the last step's logits never see the token after it
        step = recomputed_logits(decoder, cond, uncond, torch.cat([greedy, dummy], 1), 7.5)[:, -1]
        greedy = torch.cat([greedy, step.argmax(-1, keepdim=True) + VOCAB.video_offset], 1)
    assert torch.equal(tokens, greedy)


@torch.no_grad()
def test_only_top_k_video_tokens_are_drawn(decoder):
    cond, uncond = prefixes()
    counts = torch.zeros(3, dtype=torch.long)  # how often the 1st, 2nd, 3rd largest logit was drawn
    for seed in range(4):
        tokens, logits = sample_video_tokens(decoder, cond, uncond, 30, VOCAB, top_k=3, temperature=2.0,
                                             generators=gens(seed, seed + 10, seed + 20), return_logits=True)
        assert VOCAB.is_video(tokens).all()
        rank = (logits.argsort(-1, descending=True) == (tokens - VOCAB.video_offset)[..., None]).float().argmax(-1)
        assert (rank < 3).all(), "a token outside the top 3 was drawn"
        counts += torch.bincount(rank.flatten(), minlength=3)
    assert (counts > 0).all()  # 360 draws: all three ranks occur, so the test is not passing on greedy


@torch.no_grad()
def test_guidance_1_is_conditional_sampling(decoder):
    cond, uncond = prefixes()
    with_uncond = sample_video_tokens(decoder, cond, uncond, 12, VOCAB, guidance_scale=1.0, generators=gens(7, 8, 9))
    without = sample_video_tokens(decoder, cond, None, 12, VOCAB, guidance_scale=7.5, generators=gens(7, 8, 9))
    assert torch.equal(with_uncond, without)


@torch.no_grad()
def test_same_seed_same_tokens_whatever_the_batch(decoder):
    cond, uncond = prefixes()
    batch = sample_video_tokens(decoder, cond, uncond, 16, VOCAB, top_k=20, generators=gens(11, 42, 13))
    alone = sample_video_tokens(decoder, cond[1:2], uncond[1:2], 16, VOCAB, top_k=20, generators=gens(42))
    assert torch.equal(batch[1:2], alone)
    other = sample_video_tokens(decoder, cond, uncond, 16, VOCAB, top_k=20, generators=gens(11, 43, 13))
    assert not torch.equal(other[1], batch[1]) and torch.equal(other[[0, 2]], batch[[0, 2]])


@torch.no_grad()
def test_cache_allocated_once_and_reused(decoder):
    cond, uncond = prefixes()
    cache = decoder.allocate_cache(6, 40)
    pointers = (cache.keys.data_ptr(), cache.values.data_ptr())
    steps = []
    # first a different call (other prompts) so the cache holds stale entries, then the call under test
    sample_video_tokens(decoder, cond.flip(0), uncond, 25, VOCAB, generators=gens(0, 0, 0), cache=cache)
    reused = sample_video_tokens(decoder, cond, uncond, 20, VOCAB, generators=gens(1, 2, 3), cache=cache,
                                 progress=lambda done, total: steps.append((done, total)))
    assert (cache.keys.data_ptr(), cache.values.data_ptr()) == pointers
    assert cache.length == cond.shape[1] + 19  # the last token is drawn, never fed
    fresh = sample_video_tokens(decoder, cond, uncond, 20, VOCAB, generators=gens(1, 2, 3))
    assert torch.equal(reused, fresh)
    assert steps == [(i, 20) for i in range(1, 21)]


@torch.no_grad()
def test_top_k_above_the_video_vocabulary_is_clamped(decoder):
    cond, uncond = prefixes()
    full = sample_video_tokens(decoder, cond, uncond, 8, VOCAB, top_k=VOCAB.video_size, generators=gens(1, 2, 3))
    more = sample_video_tokens(decoder, cond, uncond, 8, VOCAB, top_k=10_000, generators=gens(1, 2, 3))
    assert torch.equal(full, more) and VOCAB.is_video(more).all()


@pytest.mark.parametrize("change, message", [
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(guidance_scale=-0.5), "guidance_scale must be >= 0"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(num_tokens=0), "num_tokens must be >= 1"),
    (dict(generators="two"), "2 generators for 3 prompts"),
    (dict(uncond_prefix="short"), "uncond_prefix has length 8, cond_prefix 9"),
    (dict(cache=(3, 40)), r"cache holds 3 sequences, this call needs 6 \(2 x batch with guidance"),
    (dict(cache=(6, 40), guidance_scale=1.0), r"cache holds 6 sequences, this call needs 3 \(batch size, no guid"),
    (dict(cache=(6, 20)), "cache of max_len 20 is too short: prefix 9 \\+ 20 tokens need 28 positions"),
    (dict(num_tokens=60), "prefix 9 \\+ 60 tokens need 68 positions, more than the decoder's max_seq_len 64"),
])
def test_errors(decoder, change, message):
    cond, uncond = prefixes()
    kwargs = dict(uncond_prefix=uncond, num_tokens=20, generators=gens(0, 1, 2))
    kwargs.update(change)
    if kwargs["generators"] == "two":
        kwargs["generators"] = gens(0, 1)
    if isinstance(kwargs["uncond_prefix"], str):
        kwargs["uncond_prefix"] = uncond[:, 1:]
    if "cache" in kwargs:
        kwargs["cache"] = decoder.allocate_cache(*kwargs["cache"])
    with pytest.raises(ValueError, match=message):
        sample_video_tokens(decoder, cond, vocab=VOCAB, **kwargs)


@pytest.mark.parametrize("top_k, temperature", [(5, 1.0), (2, 0.5), (4, 2.0)])
def test_draw_frequencies_follow_the_softmax(top_k, temperature):
    """20,000 draws of the Gumbel-max helper match softmax(top-k logits / T): every frequency within 0.01 of its
    probability (binomial standard deviation at most 0.0035, so 0.01 is about three of them; the seed is fixed)."""
    logits = torch.tensor([2.0, 1.0, 0.5, -0.3, 1.6], dtype=torch.float64)
    draws = 20_000
    generator = torch.Generator().manual_seed(123)
    drawn = sample_top_k(logits.expand(draws, -1), top_k, temperature, [generator] * draws)
    frequencies = torch.bincount(drawn, minlength=5).double() / draws
    kept = logits.topk(top_k).indices
    expected = torch.zeros(5, dtype=torch.float64)
    expected[kept] = torch.softmax(logits[kept] / temperature, 0)
    assert frequencies[expected == 0].sum() == 0  # nothing outside the top k
    assert (frequencies - expected).abs().max() < 0.01, (frequencies, expected)
