"""The LLaMA decoder of Loong's language model (modules/components/llama.py): parity with transformers'
LlamaForCausalLM, cached decoding against full recomputation, a cache allocated once, and the paper sizes."""
from __future__ import annotations

import time
import types
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from modules.components.checkpoints import CheckpointKeyError
from modules.components.llama import (
    LlamaConfig,
    LlamaDecoder,
    load_hf_llama_state_dict,
    to_hf_state_dict,
)

pytestmark = pytest.mark.usefixtures("single_thread")

LM_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model" / "loong_lm"


def tiny_config(**overrides) -> LlamaConfig:
    shape = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, max_seq_len=64)
    return LlamaConfig(**{**shape, **overrides})


def hf_model(cfg: LlamaConfig) -> LlamaForCausalLM:
    hf_cfg = HFLlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
    )
    hf_cfg._attn_implementation = "sdpa"  # eager attention takes its softmax in float32
    return LlamaForCausalLM(hf_cfg).eval()


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from the N(0, 0.02) init (norm gains away from 1), so every part moves the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1 + 0.2 * noise if p.ndim == 1 else 0.1 * noise)


def _rms_norm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_in_input_dtype(self, x, position_ids):
    dim, base = 2 * self.inv_freq.shape[0], self.config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=x.dtype) / dim))
    freqs = position_ids[..., None].to(x.dtype) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def hf_in_float64(hf: LlamaForCausalLM) -> LlamaForCausalLM:
    """transformers takes RMSNorm statistics and rotary angles in float32 whatever the input dtype (for bf16
    training), which would cap a float64 comparison at ~1e-7. Those two forwards are swapped, on these instances
    only, for the same formulas in the input's dtype; attention, MLP, the rotary layout (rotate_half) and the wiring
    stay transformers' own."""
    hf.double()
    for module in hf.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
        elif isinstance(module, LlamaRotaryEmbedding):
            module.forward = types.MethodType(_rotary_in_input_dtype, module)
    return hf


def paired_models(cfg: LlamaConfig, dtype=torch.float64) -> tuple[LlamaDecoder, LlamaForCausalLM]:
    torch.manual_seed(0)
    hf = hf_model(cfg)
    randomize_(hf)
    hf = hf_in_float64(hf) if dtype == torch.float64 else hf.to(dtype)
    ours = LlamaDecoder(cfg).to(dtype).eval()
    load_hf_llama_state_dict(ours, hf.state_dict())
    return ours, hf


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("start", [0, 7])
@torch.no_grad()
def test_logits_match_transformers_in_float64(kv_heads, start):
    cfg = tiny_config(num_kv_heads=kv_heads)
    ours, hf = paired_models(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(start, start + 24).expand(2, -1)
    expected = hf(input_ids=tokens, position_ids=positions).logits
    got = ours(tokens, start_pos=start)
    assert got.dtype == torch.float64 and got.shape == (2, 24, cfg.vocab_size)
    assert expected.abs().max() > 1  # logits of order one: the bound below is relative as well
    assert (got - expected).abs().max() <= 1e-10


@torch.no_grad()
def test_tied_embeddings_match_transformers():
    cfg = tiny_config(tie_embeddings=True)
    ours, hf = paired_models(cfg)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    tokens = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    assert (ours(tokens) - hf(input_ids=tokens).logits).abs().max() <= 1e-10
    # a tied safetensors file drops lm_head.weight
    fresh = LlamaDecoder(cfg).double()
    load_hf_llama_state_dict(fresh, {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    assert torch.equal(fresh(tokens), ours(tokens))


@torch.no_grad()
def test_float32_matches_unmodified_transformers():
    """transformers as shipped (float32 norm statistics and angles, which ours also use in float32)."""
    cfg = tiny_config(num_kv_heads=2)
    ours, hf = paired_models(cfg, dtype=torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    assert (ours(tokens) - hf(input_ids=tokens).logits).abs().max() <= 1e-5


def test_state_dict_mapping_round_trips_and_names_bad_keys():
    cfg = tiny_config(num_kv_heads=2)
    ours, hf = paired_models(cfg)
    hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    assert set(to_hf_state_dict(ours)) == set(hf.state_dict())

    broken = dict(hf.state_dict())
    del broken["model.layers.1.post_attention_layernorm.weight"]
    broken["model.layers.0.self_attn.rotary.weight"] = torch.zeros(1)
    broken["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointKeyError) as err:
        load_hf_llama_state_dict(LlamaDecoder(cfg), broken, source="llama.safetensors")
    message = str(err.value)
    assert "llama.safetensors" in message
    assert "missing keys: 1 (model.layers.1.post_attention_layernorm.weight)" in message
    assert "unexpected keys: 1 (model.layers.0.self_attn.rotary.weight)" in message
    assert "model.norm.weight: (3,) vs model (64,)" in message


def decode_against_full(model: LlamaDecoder, tokens: torch.Tensor, prefix: int, chunk: int) -> None:
    """Prefill `prefix` tokens, then feed the rest `chunk` at a time through the cache; every step's logits must
    equal the full forward's at those positions."""
    B, T = tokens.shape
    full = model(tokens)
    cache = model.allocate_cache(B, max_len=T)
    assert (model(tokens[:, :prefix], 0, cache) - full[:, :prefix]).abs().max() <= 1e-12
    for start in range(prefix, T, chunk):
        step = model(tokens[:, start:start + chunk], start, cache)
        assert (step - full[:, start:start + chunk]).abs().max() <= 1e-12, f"positions {start}.."
    assert cache.length == T


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("chunk", [1, 3], ids=["token", "chunk3"])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(kv_heads, batch, chunk):
    torch.manual_seed(0)
    model = LlamaDecoder(tiny_config(num_kv_heads=kv_heads)).double().eval()
    randomize_(model)
    # two different sequences in the batch
    tokens = torch.randint(0, model.config.vocab_size, (batch, 20), generator=torch.Generator().manual_seed(3))
    decode_against_full(model, tokens, prefix=5, chunk=chunk)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@torch.no_grad()
def test_last_only_equals_the_last_row_of_the_full_logits(dtype, atol):
    """last_only runs the final norm and lm_head on the last position: (B, 1, V), the full logits' last row (up to
    the matmul's rounding for one row instead of L), with and without a cache, and the cache is filled the same."""
    torch.manual_seed(0)
    model = LlamaDecoder(tiny_config(num_kv_heads=2)).to(dtype).eval()
    randomize_(model)
    tokens = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    full = model(tokens)
    last = model(tokens, last_only=True)
    assert last.shape == (2, 1, model.config.vocab_size) and last.dtype == dtype
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=atol)

    full_cache, last_cache = model.allocate_cache(2, max_len=20), model.allocate_cache(2, max_len=20)
    prefill = model(tokens[:, :12], 0, last_cache, last_only=True)
    torch.testing.assert_close(prefill, model(tokens[:, :12], 0, full_cache)[:, -1:], rtol=0, atol=atol)
    torch.testing.assert_close(prefill, full[:, 11:12], rtol=0, atol=atol)
    assert torch.equal(last_cache.keys, full_cache.keys) and torch.equal(last_cache.values, full_cache.values)
    assert last_cache.length == full_cache.length == 12
    for t in range(12, 20):  # one token at a time: L = 1, so last_only is the same computation
        step = model(tokens[:, t:t + 1], t, last_cache, last_only=True)
        assert torch.equal(step, model(tokens[:, t:t + 1], t, full_cache))
        torch.testing.assert_close(step, full[:, t:t + 1], rtol=0, atol=atol)
    chunk = model(tokens[:, 16:20], 16, last_cache, last_only=True)  # a rewound chunk: start_pos > 0, L > 1
    torch.testing.assert_close(chunk, full[:, -1:], rtol=0, atol=atol)


@torch.no_grad()
def test_cache_is_allocated_once_and_reusable_after_reset():
    torch.manual_seed(0)
    model = LlamaDecoder(tiny_config(num_kv_heads=2)).double().eval()
    randomize_(model)
    gen = torch.Generator().manual_seed(4)
    first, second = (torch.randint(0, model.config.vocab_size, (2, 16), generator=gen) for _ in range(2))

    def run(cache, tokens):
        logits = [model(tokens[:, :6], 0, cache)]
        logits += [model(tokens[:, t:t + 1], t, cache) for t in range(6, tokens.shape[1])]
        return torch.cat(logits, dim=1)

    cache = model.allocate_cache(2, max_len=16)
    assert cache.keys.shape == (2, 2, 2, 16, 16)  # [layers, batch, kv_heads, max_len, head_dim]
    pointers = cache.keys.data_ptr(), cache.values.data_ptr()
    run(cache, first)
    assert (cache.keys.data_ptr(), cache.values.data_ptr()) == pointers
    cache.reset()
    assert cache.length == 0
    reused = run(cache, second)
    assert (cache.keys.data_ptr(), cache.values.data_ptr()) == pointers
    assert torch.equal(reused, run(model.allocate_cache(2, max_len=16), second))


def test_cache_misuse_is_refused():
    model = LlamaDecoder(tiny_config()).eval()
    cache = model.allocate_cache(2, max_len=8)
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="inference only"):
        model(tokens, 0, cache)
    with torch.no_grad():
        with pytest.raises(ValueError, match="unfilled"):
            model(tokens, 2, cache)
        with pytest.raises(ValueError, match="2 sequences"):
            model(tokens[:1], 0, cache)
        model(tokens, 0, cache)
        with pytest.raises(ValueError, match="do not fit a cache of 8"):
            model(tokens[:, :1].repeat(1, 5), 4, cache)
    with pytest.raises(ValueError, match="exceed max_seq_len 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# (parameters, range stated for the paper's size). 700m: LlamaGen-XL's shape; 0.73B without the embedding tables.
PAPER_SIZES = {
    "700m": (834_392_320, (0.65e9, 0.9e9)),
    "3b": (3_478_966_400, (2.7e9, 3.6e9)),
    "7b": (6_805_606_400, (6.5e9, 7.5e9)),
}


@pytest.mark.parametrize("size", sorted(PAPER_SIZES))
def test_paper_sizes_build_on_meta_device(size):
    cfg = hydra.utils.instantiate(OmegaConf.load(LM_CONFIGS / f"{size}.yaml"))
    assert isinstance(cfg, LlamaConfig) and cfg.vocab_size == 32_000 + 8_192 + 10
    with torch.device("meta"):
        model = LlamaDecoder(cfg)
        logits = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, 40_202)
    count = sum(p.numel() for p in model.parameters())
    expected, (low, high) = PAPER_SIZES[size]
    assert low <= count <= high
    assert count == expected  # the count stated in the yaml


def test_tiny_config_trains_on_cpu_quickly():
    start = time.perf_counter()
    cfg = hydra.utils.instantiate(OmegaConf.load(LM_CONFIGS / "tiny.yaml"), vocab_size=512 + 256 + 10)
    torch.manual_seed(0)
    model = LlamaDecoder(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 128))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    elapsed = time.perf_counter() - start
    assert 1e6 <= sum(p.numel() for p in model.parameters()) <= 3e6
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert elapsed < 1.0
