"""CVQ quantiser: parity with the official CVQ-VAE `VectorQuantiser` through `<fixtures root>/loong`, plus the
update equations, the plain-VQ baseline, video layouts, DDP synchronisation and the rolling usage window.

The fixtures (see their README) hold the initial state, two input batches and the official module's outputs for
a training sequence, an eval pass and a contrastive training sequence, in float32 and float64. Every expected
number comes from the files and the module is configured from their metadata; only tolerances (from the README)
and the layout (run and tensor names) are written here, so the tests hold for any fixture set of that layout.
"""
from __future__ import annotations

import copy
import math
import os
import socket
import time
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_file

from modules.components.cvq import ClusteredVectorQuantizer, CodebookUsage

pytestmark = pytest.mark.usefixtures("single_thread")

# Layout of the fixture set: run name -> its step tags (each step feeds the next input to the same module).
RUNS = {"train": ("train_step1", "train_step2"), "eval": ("eval",), "contras": ("contras_step1", "contras_step2")}
INPUTS = ("z1", "z2")

# Tolerances suggested by the fixtures README (float32 vs float64 reference runs); cos_sim has no suggestion
# there (observed 2e-7), so it takes the z_q one.
FP32 = {
    "z_q": dict(atol=1e-6, rtol=0.0),
    "weight_after": dict(atol=1e-6, rtol=0.0),
    "cos_sim": dict(atol=1e-6, rtol=0.0),
    "loss": dict(atol=0.0, rtol=1e-6),
    "contra_loss": dict(atol=1e-7, rtol=0.0),
    "perplexity": dict(atol=0.0, rtol=1e-5),
    "decay": dict(atol=1e-7, rtol=0.0),
    "embed_prob_after": dict(atol=1e-7, rtol=0.0),
    "grad_z": dict(atol=1e-6, rtol=0.0),
    "grad_weight": dict(atol=1e-6, rtol=0.0),
    "grad_weight_preupdate": dict(atol=1e-6, rtol=0.0),
}
FP32_QUIRK_STEP1 = dict(atol=1e-4, rtol=0.0)  # contras_step1_grad_weight: the quirk amplifies round-off
FP64 = dict(atol=1e-12, rtol=0.0)
EXACT = ("indices", "anchor_idx")
# A negative control must miss the fixture by this many times the float32 tolerance of the quantity.
DISCRIMINATION = 100

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])


def tolerance(dtype: torch.dtype, tag: str, name: str) -> dict:
    if dtype == torch.float64:
        return FP64
    if tag == "contras_step1" and name == "grad_weight":
        return FP32_QUIRK_STEP1
    return FP32[name]


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


# ------------------------------------------------------------------------------------------------ fixture access
@lru_cache(maxsize=None)
def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata


class LoongCVQ:
    """Inputs, initial state, configuration and per-dtype reference outputs of the CVQ fixture set."""

    def __init__(self, root: Path):
        self.inputs, meta = _load(root / "cvq_inputs.safetensors")
        self.outputs = {
            torch.float32: _load(root / "cvq_outputs_fp32.safetensors")[0],
            torch.float64: _load(root / "cvq_outputs_fp64.safetensors")[0],
        }
        self.config = dict(
            num_codes=int(meta["num_embed"]), dim=int(meta["embed_dim"]), beta=float(meta["beta"]),
            decay=float(meta["decay"]), distance=meta["distance"], anchor=meta["anchor"],
            first_batch=meta["first_batch"] == "True",
        )

    def build(self, dtype: torch.dtype, **overrides) -> ClusteredVectorQuantizer:
        """The quantiser in the fixture's initial state (`weight_init`, `embed_prob_init`), loaded strictly."""
        q = ClusteredVectorQuantizer(**{**self.config, **overrides}).to(dtype)
        q.load_state_dict({"embedding.weight": self.inputs["weight_init"].to(dtype),
                           "embed_prob": self.inputs["embed_prob_init"].to(dtype)}, strict=True)
        q.record_details = True
        return q

    def z(self, step: int, dtype: torch.dtype) -> torch.Tensor:
        """Input of the step-th call; float64 runs were fed the float32 values cast (README)."""
        return self.inputs[INPUTS[step]].to(dtype).clone().requires_grad_(True)

    def expected(self, dtype: torch.dtype, tag: str, name: str) -> torch.Tensor:
        return self.outputs[dtype][f"{tag}_{name}"]


@pytest.fixture(scope="module")
def cvq(fixtures_dir: Path) -> LoongCVQ:
    path = fixtures_dir / "loong"
    if not path.is_dir():
        pytest.fail(f"Loong fixtures not found at {path}")
    return LoongCVQ(path)


def run_step(q: ClusteredVectorQuantizer, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward + backward of the returned loss (fresh gradients), and every quantity the fixture records."""
    q.zero_grad(set_to_none=True)
    out = q(z)
    out.loss.backward()
    got = dict(
        z_q=out.z_q, loss=out.loss, perplexity=out.perplexity, indices=out.indices.reshape(-1),
        cos_sim=q.details.cos_sim, embed_prob_after=q.embed_prob, weight_after=q.embedding.weight,
        grad_z=z.grad, grad_weight=q.embedding.weight.grad,
    )
    if q.details.decay is not None:
        got.update(decay=q.details.decay, anchor_idx=q.details.anchor_idx)
    if q.details.contrastive_loss is not None:
        got["contra_loss"] = q.details.contrastive_loss
    return {k: v.detach().clone() for k, v in got.items()}


def assert_matches(got: dict[str, torch.Tensor], cvq: LoongCVQ, dtype: torch.dtype, tag: str, names) -> None:
    for name in names:
        expected = cvq.expected(dtype, tag, name)
        actual = got["grad_weight" if name == "grad_weight_preupdate" else name]
        if name in EXACT:
            assert torch.equal(actual, expected), f"{tag}_{name}"
        else:
            assert actual.dtype == dtype, f"{tag}_{name}"
            torch.testing.assert_close(actual, expected, **tolerance(dtype, tag, name), msg=lambda m: f"{tag}_{name}: {m}")


STEP_NAMES = ("z_q", "loss", "perplexity", "indices", "cos_sim", "embed_prob_after", "weight_after", "grad_z")
TRAIN_NAMES = ("anchor_idx", "decay")


# ------------------------------------------------------------------------------------------------ parity
def test_fixture_set_matches_the_layout(cvq):
    """Each dtype's file holds exactly the runs and quantities the parity tests check."""
    expected = {f"{tag}_{name}" for tag in RUNS["train"] for name in (*STEP_NAMES, *TRAIN_NAMES, "grad_weight")}
    expected |= {f"eval_{name}" for name in (*STEP_NAMES, "grad_weight")}
    expected |= {f"{tag}_{name}" for tag in RUNS["contras"]
                 for name in (*STEP_NAMES, *TRAIN_NAMES, "grad_weight", "grad_weight_preupdate", "contra_loss")}
    for dtype, outputs in cvq.outputs.items():
        assert set(outputs) == expected
        assert all(t.dtype in (dtype, torch.int64) for t in outputs.values())


def test_state_dict_and_init_are_upstream(cvq):
    q = ClusteredVectorQuantizer(num_codes=cvq.config["num_codes"], dim=cvq.config["dim"])
    state = q.state_dict()
    assert set(state) == {"embedding.weight", "embed_prob"}
    official = cvq.inputs["weight_official_init_unperturbed"]
    assert state["embedding.weight"].shape == official.shape
    bound = 1.0 / cvq.config["num_codes"]  # uniform_(-1/K, 1/K), as the official init
    assert state["embedding.weight"].abs().max() <= bound and official.abs().max() <= bound
    assert torch.equal(state["embed_prob"], torch.zeros(cvq.config["num_codes"]))


@DTYPES
def test_training_steps_match_official(cvq, dtype):
    """Two training steps on one module: outputs from the pre-update codebook, then usage and re-anchoring."""
    q = cvq.build(dtype).train()
    for step, tag in enumerate(RUNS["train"]):
        got = run_step(q, cvq.z(step, dtype))
        assert_matches(got, cvq, dtype, tag, (*STEP_NAMES, *TRAIN_NAMES, "grad_weight"))


@DTYPES
def test_eval_matches_official_and_changes_no_state(cvq, dtype):
    q = cvq.build(dtype).eval()
    got = run_step(q, cvq.z(0, dtype))
    assert_matches(got, cvq, dtype, "eval", (*STEP_NAMES, "grad_weight"))
    assert torch.equal(q.embedding.weight.detach(), cvq.inputs["weight_init"].to(dtype))
    assert torch.equal(q.embed_prob, cvq.inputs["embed_prob_init"].to(dtype))
    assert q.details.decay is None and q.details.contrastive_loss is None


@DTYPES
@pytest.mark.parametrize("quirk", [False, True], ids=["clean-grad", "upstream-grad"])
def test_contrastive_steps_match_official(cvq, dtype, quirk):
    """Contrastive term on. The clean codebook gradient is the README's `grad_weight_preupdate`; with
    `upstream_grad_quirk` the module reproduces what the official code really produces (`grad_weight`)."""
    q = cvq.build(dtype, contrastive=True, upstream_grad_quirk=quirk).train()
    gradient = "grad_weight" if quirk else "grad_weight_preupdate"
    for step, tag in enumerate(RUNS["contras"]):
        got = run_step(q, cvq.z(step, dtype))
        assert_matches(got, cvq, dtype, tag, (*STEP_NAMES, *TRAIN_NAMES, "contra_loss", gradient))


def test_first_batch_reanchors_once(cvq):
    q = cvq.build(torch.float64, first_batch=True).train()
    first = run_step(q, cvq.z(0, torch.float64))
    assert_matches(first, cvq, torch.float64, RUNS["train"][0], ("weight_after", "embed_prob_after"))
    second = run_step(q, cvq.z(1, torch.float64))
    assert torch.equal(second["weight_after"], first["weight_after"])
    assert q.details.decay is None


@DTYPES
def test_plain_vq_baseline_keeps_the_codebook(cvq, dtype):
    """`reanchor=False`: same outputs, gradients and usage tracking as CVQ, codebook untouched by the forward."""
    q = cvq.build(dtype, reanchor=False).train()
    tag = RUNS["train"][0]
    got = run_step(q, cvq.z(0, dtype))
    assert_matches(got, cvq, dtype, tag, (*STEP_NAMES[:5], "embed_prob_after", "grad_z", "grad_weight"))
    assert torch.equal(got["weight_after"], cvq.inputs["weight_init"].to(dtype))
    assert q.details.decay is None
    # a second step still leaves it alone: only the optimiser moves it
    run_step(q, cvq.z(1, dtype))
    assert torch.equal(q.embedding.weight.detach(), cvq.inputs["weight_init"].to(dtype))


# ------------------------------------------------------------------------------------------------ negative controls
class StaleUsageQuantizer(ClusteredVectorQuantizer):
    """Mistake: the mixing coefficient from the usage BEFORE this step's EMA update."""

    def _update_usage(self, avg_probs):
        self._stale = self.embed_prob.clone()
        super()._update_usage(avg_probs)

    def mixing_coefficient(self):
        return torch.exp(-(self._stale * self.num_codes * 10) / (1 - self.decay) - 1e-3)


def test_parity_rejects_stale_usage_in_the_decay(cvq):
    q = cvq.build(torch.float32)
    q.__class__ = StaleUsageQuantizer  # same state, the mistaken method
    got = run_step(q.train(), cvq.z(0, torch.float32))
    tag = RUNS["train"][0]
    for name in ("decay", "weight_after"):
        assert max_error(got[name], cvq.expected(torch.float32, tag, name)) > DISCRIMINATION * FP32[name]["atol"]


def test_parity_rejects_unnormalised_distance(cvq):
    q = cvq.build(torch.float32, distance="l2").train()
    got = run_step(q, cvq.z(0, torch.float32))
    tag = RUNS["train"][0]
    assert not torch.equal(got["indices"], cvq.expected(torch.float32, tag, "indices"))
    for name in ("z_q", "weight_after"):
        assert max_error(got[name], cvq.expected(torch.float32, tag, name)) > DISCRIMINATION * FP32[name]["atol"]


def test_contrastive_gradient_checks_tell_the_two_gradients_apart(cvq):
    """Each gradient mode misses the other mode's reference at step 1 by far more than the tolerance."""
    tag = RUNS["contras"][0]
    for quirk, other in ((False, "grad_weight"), (True, "grad_weight_preupdate")):
        q = cvq.build(torch.float32, contrastive=True, upstream_grad_quirk=quirk).train()
        got = run_step(q, cvq.z(0, torch.float32))
        assert max_error(got["grad_weight"], cvq.expected(torch.float32, tag, other)) > DISCRIMINATION * 1e-6


# ------------------------------------------------------------------------------------------------ update equations
@pytest.mark.parametrize("p", [0.0, 1e-6, 2e-5, 1.0 / 16])
def test_mixing_coefficient_formula(p):
    q = ClusteredVectorQuantizer(num_codes=16, dim=4).double()
    q.embed_prob.fill_(p)
    expected = math.exp(-(p * 16 * 10) / (1 - 0.99) - 1e-3)
    torch.testing.assert_close(q.mixing_coefficient(), torch.full((16,), expected, dtype=torch.float64),
                               atol=0.0, rtol=1e-12)


def test_unused_codes_jump_to_their_anchor_fair_share_codes_stay():
    """Codes 8..15 (usage 0, unused now) move to 0.999 anchor + 0.001 old (exactly exp(-1e-3) mixing); codes at
    their fair share 1/K (4..7, unused now) and used codes (0..3) have decay exp(-990) or less: unchanged."""
    num_codes, dim = 16, 8
    q = ClusteredVectorQuantizer(num_codes=num_codes, dim=dim).double().train()
    q.record_details = True
    codebook = 0.5 * torch.cat([torch.eye(dim), -torch.eye(dim)]).double()  # code i = e_i/2, code 8+i = -e_i/2
    q.embedding.weight.data.copy_(codebook)
    q.embed_prob[: num_codes // 2] = 1.0 / num_codes
    gen = torch.Generator().manual_seed(0)
    zf = 2 * codebook[torch.arange(32) % 4] + 0.05 * torch.randn(32, dim, generator=gen, dtype=torch.float64)
    z = rearrange(zf, "(b h w) c -> b c h w", b=2, h=4)
    with torch.no_grad():
        out = q(z)
    assert set(out.indices.unique().tolist()) == {0, 1, 2, 3}
    unused, fair = slice(8, 16), slice(0, 8)
    assert torch.equal(q.embed_prob[unused], torch.zeros(8, dtype=torch.float64))

    g = math.exp(-1e-3)
    torch.testing.assert_close(q.details.decay[unused], torch.full((8,), g, dtype=torch.float64), atol=0, rtol=1e-12)
    cos = torch.nn.functional.normalize(zf, dim=1) @ torch.nn.functional.normalize(codebook, dim=1).T  # (N, K)
    anchor = zf[cos.argmax(dim=0)]  # per code, the most similar feature
    torch.testing.assert_close(q.embedding.weight[unused].detach(), g * anchor[unused] + (1 - g) * codebook[unused],
                               atol=0, rtol=1e-12)

    assert q.details.decay[fair].max() <= math.exp(-10 * 0.99 / (1 - 0.99))
    assert torch.equal(q.embedding.weight[fair].detach(), codebook[fair])


# ------------------------------------------------------------------------------------------------ layouts
def test_video_input_equals_the_folded_image_input_and_codes_invert():
    torch.manual_seed(0)
    q5 = ClusteredVectorQuantizer(num_codes=32, dim=8).train()
    q5.embedding.weight.data.normal_()
    q4 = copy.deepcopy(q5)
    z = torch.randn(2, 8, 3, 4, 5)  # (B, C, T, H, W)
    out5 = q5(z)
    out4 = q4(rearrange(z, "b c t h w -> b c (t h) w"))
    assert out5.indices.shape == (2, 3, 4, 5) and out5.z_q.shape == z.shape
    assert torch.equal(rearrange(out5.z_q, "b c t h w -> b c (t h) w"), out4.z_q)
    assert torch.equal(out5.indices.reshape(2, 12, 5), out4.indices)
    assert torch.equal(out5.loss, out4.loss) and torch.equal(out5.perplexity, out4.perplexity)
    assert torch.equal(q5.embedding.weight, q4.embedding.weight) and torch.equal(q5.embed_prob, q4.embed_prob)

    q5.eval()
    out = q5(z)
    codes = q5.codes(out.indices)
    assert codes.shape == z.shape
    torch.testing.assert_close(codes, out.z_q, atol=1e-6, rtol=0)  # straight-through adds <= 1 ulp of z
    assert torch.equal(codes, rearrange(q5.embedding.weight[out.indices], "b t h w c -> b c t h w"))
    with pytest.raises(ValueError):
        q5(torch.randn(2, 7, 3, 4))


def test_flat_row_order_is_channels_last():
    torch.manual_seed(1)
    q = ClusteredVectorQuantizer(num_codes=32, dim=8).eval()
    q.embedding.weight.data.normal_()
    z = torch.randn(2, 8, 3, 4, 5)
    rows = rearrange(z, "b c t h w -> (b t h w) c")
    assert torch.equal(q(z).indices.reshape(-1), q.similarity(rows, q.embedding.weight).argmax(1))


def test_low_precision_input_is_quantised_in_the_codebook_dtype():
    """bf16 features (or autocast) must pick the codes the float32 features pick: cosine scores in bf16 tie."""
    torch.manual_seed(2)
    q = ClusteredVectorQuantizer(num_codes=64, dim=8).eval()
    q.embedding.weight.data.normal_()
    z = torch.randn(2, 8, 6, 6).bfloat16()
    reference = q(z.float())
    out = q(z)
    assert out.z_q.dtype == torch.float32 and torch.equal(out.indices, reference.indices)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q(z.float()).indices, reference.indices)


# ------------------------------------------------------------------------------------------------ DDP
# (name, anchor, sync_ddp): the unsynchronised ones are negative controls.
DDP_CONFIGS = (
    ("closest", "closest", True),
    ("random", "random", True),
    ("probrandom", "probrandom", True),
    ("closest-nosync", "closest", False),
    ("random-nosync", "random", False),
)
DDP_WORLD = 2
DDP_STEPS = 4


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: the same-seeded quantiser, its own random data and anchor RNG, SGD on the all-reduced gradient
    (what DDP does to it; DDP itself and torch.optim are left out: their first use imports for seconds)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, anchor, sync in DDP_CONFIGS:
            torch.manual_seed(0)
            q = ClusteredVectorQuantizer(num_codes=16, dim=4, anchor=anchor, sync_ddp=sync).train()
            weight = q.embedding.weight
            initial = weight.detach().clone()
            data = torch.Generator().manual_seed(1000 + rank)
            torch.manual_seed(100 + rank)  # different anchor draws per rank
            for _ in range(DDP_STEPS):
                z = torch.randn(2, 4, 3, 3, generator=data)  # N = 18 > K = 16
                weight.grad = None
                q(z).loss.backward()
                dist.all_reduce(weight.grad)
                with torch.no_grad():
                    weight -= 0.5 * weight.grad / world
            torch.save({"weight": weight.detach().clone(), "embed_prob": q.embed_prob.clone(), "initial": initial},
                       Path(out_dir) / f"{name}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_states(tmp_path_factory) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Runs every DDP configuration in one pair of gloo processes (start-up dominates) and loads their states."""
    out_dir = tmp_path_factory.mktemp("cvq_ddp")
    # torch.multiprocessing.spawn's machinery; forked where possible: a spawned child re-imports torch (~6 s on two
    # shared cores), a forked one starts at once (one intra-op thread, as DataLoader's forked workers).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(_ddp_worker, args=(DDP_WORLD, _free_port(), str(out_dir)), nprocs=DDP_WORLD,
                                 join=False, start_method=method)
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish in 180 s")
    return {name: [torch.load(out_dir / f"{name}_rank{r}.pt") for r in range(DDP_WORLD)] for name, *_ in DDP_CONFIGS}


@pytest.mark.parametrize("name", ["closest", "random", "probrandom"])
def test_ddp_ranks_keep_identical_codebooks(ddp_states, name):
    ranks = ddp_states[name]
    assert not torch.equal(ranks[0]["weight"], ranks[0]["initial"])  # it did train and re-anchor
    for other in ranks[1:]:
        assert torch.equal(other["weight"], ranks[0]["weight"])
        assert torch.equal(other["embed_prob"], ranks[0]["embed_prob"])


@pytest.mark.parametrize("name", ["closest-nosync", "random-nosync"])
def test_ddp_without_sync_codebooks_diverge(ddp_states, name):
    """Negative control: DDP's gradient averaging alone does not keep the re-anchored codebooks equal."""
    ranks = ddp_states[name]
    assert torch.equal(ranks[0]["initial"], ranks[1]["initial"])
    assert not torch.equal(ranks[0]["weight"], ranks[1]["weight"])
    assert not torch.equal(ranks[0]["embed_prob"], ranks[1]["embed_prob"])


# ------------------------------------------------------------------------------------------------ usage window
def _hand_stats(window_contents: list[int], num_codes: int) -> tuple[float, float]:
    counts = [window_contents.count(k) for k in range(num_codes)]
    total = len(window_contents)
    entropy = -sum(c / total * math.log(c / total) for c in counts if c)
    return sum(c > 0 for c in counts) / num_codes, math.exp(entropy)


def test_codebook_usage_window_drops_old_indices():
    usage = CodebookUsage(num_codes=6, window=5)
    seen: list[int] = []
    for batch in ([0, 1], [2, 2, 3], [3, 4], [5, 5, 5, 5, 5, 5, 1]):  # the last one alone overflows the window
        usage.update(torch.tensor(batch).view(1, -1))
        seen += batch
        stats = usage.compute()
        expected_usage, expected_perplexity = _hand_stats(seen[-5:], 6)
        assert stats.usage.item() == pytest.approx(expected_usage, abs=1e-7)
        assert stats.perplexity.item() == pytest.approx(expected_perplexity, rel=1e-6)
        assert usage.histogram().sum() == min(len(seen), 5)


def test_codebook_usage_takes_video_indices():
    usage = CodebookUsage(num_codes=8, window=1000)
    indices = torch.arange(8).repeat(2, 3, 2, 1).view(2, 3, 4, 4)  # every code equally often
    usage.update(indices)
    stats = usage.compute()
    assert stats.usage.item() == 1.0 and stats.perplexity.item() == pytest.approx(8.0, rel=1e-6)
    usage.reset()
    usage.update(torch.zeros(2, 2, dtype=torch.long))
    assert usage.compute().usage.item() == pytest.approx(1 / 8) and usage.compute().perplexity.item() == 1.0
