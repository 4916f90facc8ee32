"""I3D and FVD against the reference fixtures (fixtures/eval/README.md sections 1 and 3).

Every expected number is read from the fixture files; none is written here, so any fixture root
(FIXTURES_DIR, other seeds) can be checked.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from eval.metrics.frechet import FrechetDistance, FrechetVideoDistance, frechet_distance
from eval.metrics.i3d import MIN_FRAMES, InceptionI3d, i3d_input, load_i3d
from modules.components.checkpoints import CheckpointKeyError

pytestmark = pytest.mark.usefixtures("single_thread")
ATOL, RTOL = 1e-3, 1e-4  # README section 1: float32 vs the reference's float32 outputs
UNBIASED = ("_check_eigh_unbiased_ddof1", "tfgan_frechet_classifier_distance_from_activations_float64in",
            "torchmetrics_compute_fid_float64", "fvd-comparison_our_fvd_float64in", "TATS_frechet_distance_float64")
BIASED = ("_check_eigh_biased_ddof0", "stylegan-v_compute_fvd", "cdfvd_compute_fvd_from_stats")


@pytest.fixture(scope="module")
def eval_dir(fixtures_dir):
    return fixtures_dir / "eval"


@pytest.fixture(scope="module")
def weights_path(eval_dir):
    return eval_dir / "i3d_random_weights_fp16.safetensors"


@pytest.fixture(scope="module")
def io(eval_dir):
    return load_file(eval_dir / "i3d_io.safetensors")


@pytest.fixture(scope="module")
def i3d(weights_path):
    return load_i3d(weights_path)


def fixture_input(io, name: str) -> torch.Tensor:
    """The fixture's uint8 (B, 3, T, H, W) video through `i3d_input` (generator layout (B, T, H, W, 3))."""
    return i3d_input(io[f"video_uint8_{name}"].permute(0, 2, 3, 4, 1))


@pytest.fixture(scope="module")
def outputs(i3d, io):
    """One forward per fixture video: (pool per t, logits per t)."""
    with torch.no_grad():
        return {name: i3d.pool_and_logits(fixture_input(io, name)) for name in "ab"}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def small_i3d(width: float = 0.25, num_classes: int = 400, seed: int = 0) -> InceptionI3d:
    """Random weights, BN statistics perturbed so eval-mode BN is not an identity."""
    torch.manual_seed(seed)
    model = InceptionI3d(num_classes=num_classes, width=width)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval().requires_grad_(False)


def random_videos(n: int, t: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t, size, size, 3), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------------- I3D
def test_fixture_weights_load_strictly(weights_path):
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(weights_path).items()}
    model = InceptionI3d()
    model.load_state_dict(state, strict=True)
    reference = model.state_dict()
    assert list(state) and set(state) == set(reference)
    assert all(state[k].shape == reference[k].shape for k in state)
    # width 1.0 has exactly the official number of values (parameters + BN buffers)
    assert sum(v.numel() for v in reference.values()) == sum(v.numel() for v in state.values())


def test_load_i3d_is_eval_float32_without_grad(i3d):
    assert not i3d.training and all(not m.training for m in i3d.modules())
    assert all(not p.requires_grad for p in i3d.parameters())
    assert all(p.dtype == torch.float32 for p in i3d.parameters())
    assert i3d.num_classes == 400 and i3d.feature_dim == 1024
    assert all(m.eps == 1e-3 for m in i3d.modules() if isinstance(m, torch.nn.BatchNorm3d))


def test_input_is_the_tf_fvd_scaling(io):
    for name in "ab":
        u = io[f"video_uint8_{name}"]
        x = fixture_input(io, name)
        assert x.dtype == torch.float32 and x.shape == u.shape
        assert torch.equal(x, 2.0 * u.float() / 255.0 - 1.0)


@pytest.mark.parametrize("name", ["a", "b"])
def test_i3d_matches_reference(outputs, io, name):
    pool, logits_per_t = outputs[name]
    torch.testing.assert_close(logits_per_t, io[f"logits_per_t_{name}"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits_per_t.mean(dim=2), io[f"logits_{name}"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(pool.mean(dim=2), io[f"pool_{name}"], atol=ATOL, rtol=RTOL)
    # and the float64 reference run, within the same tolerance
    torch.testing.assert_close(logits_per_t.mean(dim=2), io[f"logits_f64_{name}"], atol=ATOL, rtol=RTOL)


def test_tats_bn_eps_would_be_caught(i3d, io, outputs):
    """Negative control: PyTorch's BN eps 1e-5 (the VideoGPT/TATS port) lands on `logits_eps1e-5`, not on `logits`."""
    tats = copy.deepcopy(i3d)
    for module in tats.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.eps = 1e-5
    with torch.no_grad():
        logits = tats.logits(fixture_input(io, "a"))
    torch.testing.assert_close(logits, io["logits_eps1e-5_a"], atol=ATOL, rtol=RTOL)
    assert max_diff(logits, io["logits_a"]) > 100 * ATOL
    assert max_diff(outputs["a"][1].mean(dim=2), io["logits_eps1e-5_a"]) > 100 * ATOL


def test_small_width_runs_on_small_videos():
    model = small_i3d(width=0.25)
    x = i3d_input(random_videos(2, t=16, size=64))
    with torch.no_grad():
        pool, per_t = model.pool_and_logits(x)
        logits, features = model.logits(x), model.features(x)
    assert logits.shape == (2, 400) and torch.isfinite(logits).all()
    assert features.shape == (2, model.feature_dim) and model.feature_dim == 256
    torch.testing.assert_close(logits, per_t.mean(dim=2))
    torch.testing.assert_close(features, pool.mean(dim=2))
    torch.testing.assert_close(model(x), per_t)


def test_official_time_steps_and_minimum_frames():
    """T' = ceil(T / 8) - 1 at 224 px: 9 frames is the least that gives one step (8 leaves none)."""
    model = small_i3d(width=0.125)
    with torch.no_grad():
        for frames, steps in ((MIN_FRAMES, 1), (16, 1), (17, 2)):
            assert model(torch.zeros(1, 3, frames, 224, 224)).shape == (1, 400, steps)
        # what the official (2, 7, 7) average pool would see: a single time step at 8 frames
        assert model._trunk(torch.zeros(1, 3, MIN_FRAMES - 1, 224, 224)).shape[2:] == (1, 7, 7)
    assert MIN_FRAMES == 9


# ---------------------------------------------------------------------------------------- input checks
def test_i3d_input_crop_and_resize():
    videos = random_videos(2, t=9, size=48)[:, :, :40]  # (2, 9, 40, 48, 3)
    centre = i3d_input(videos, size=40)
    assert centre.shape == (2, 3, 9, 40, 40)
    assert torch.equal(centre, 2.0 * videos[:, :, :, 4:44].permute(0, 4, 1, 2, 3).float() / 255.0 - 1.0)
    resized = i3d_input(videos, size=32, crop="none")
    assert resized.shape == (2, 3, 9, 32, 32) and resized.min() >= -1 and resized.max() <= 1


def test_i3d_input_errors():
    with pytest.raises(ValueError, match="uint8"):
        i3d_input(random_videos(1).float())
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        i3d_input(random_videos(1).permute(0, 4, 1, 2, 3))
    with pytest.raises(ValueError, match=f"at least {MIN_FRAMES} frames"):
        i3d_input(random_videos(1, t=MIN_FRAMES - 1))
    with pytest.raises(ValueError, match="crop"):
        i3d_input(random_videos(1), crop="random")


# ------------------------------------------------------------------------------------------- loading
def test_missing_weights_name_the_file(tmp_path):
    path = tmp_path / "i3d_pretrained_400.pt"
    with pytest.raises(FileNotFoundError) as excinfo:
        load_i3d(path)
    assert str(path) in str(excinfo.value) and "TATS" in str(excinfo.value)


def test_tats_layout_loads(tmp_path):
    """A .pt state dict without `num_batches_tracked` (as TATS' file), nested under "state_dict", any width."""
    model = small_i3d(width=0.25, num_classes=101)
    state = {k: v.half() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state}, tmp_path / "i3d.pt")
    loaded = load_i3d(tmp_path / "i3d.pt")
    assert (loaded.width, loaded.num_classes) == (0.25, 101)
    assert all(torch.equal(v.float(), loaded.state_dict()[k]) for k, v in state.items())


def test_wrong_keys_are_listed(tmp_path):
    state = small_i3d().state_dict()
    state["Mixed_3b.b9.conv3d.weight"] = state.pop("Mixed_3b.b0.conv3d.weight")
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointKeyError) as excinfo:
        load_i3d(tmp_path / "bad.safetensors")
    message = str(excinfo.value)
    assert "bad.safetensors" in message
    assert "missing keys" in message and "Mixed_3b.b0.conv3d.weight" in message
    assert "unexpected keys" in message and "Mixed_3b.b9.conv3d.weight" in message


# ---------------------------------------------------------------------------------- Frechet distance
@pytest.fixture(scope="module")
def frechet(eval_dir):
    features = load_file(eval_dir / "frechet_features.safetensors")
    return features["real"], features["fake"], json.loads((eval_dir / "frechet_reference.json").read_text())


def test_frechet_distance_matches_the_unbiased_references(frechet):
    real, fake, reference = frechet
    r, f = real.double(), fake.double()
    value = frechet_distance(r.mean(0), torch.cov(r.T), f.mean(0), torch.cov(f.T))
    assert isinstance(value, float)
    for key in UNBIASED:
        assert value == pytest.approx(reference[key], rel=1e-9), key
    for key in BIASED:
        assert value != pytest.approx(reference[key], rel=1e-4), key
    biased = frechet_distance(r.mean(0), torch.cov(r.T, correction=0), f.mean(0), torch.cov(f.T, correction=0))
    for key in BIASED:
        assert biased == pytest.approx(reference[key], rel=1e-9), key
    # numpy inputs give the same value
    assert frechet_distance(r.mean(0).numpy(), torch.cov(r.T).numpy(), f.mean(0).numpy(),
                            torch.cov(f.T).numpy()) == pytest.approx(value, rel=1e-12)


def test_metric_in_chunks_matches(frechet):
    real, fake, reference = frechet
    metric = FrechetDistance(real.shape[1])
    for chunk in real.split(100):
        metric.update(chunk, real=True)
    for chunk in fake.split(128):
        metric.update(chunk, real=False)
    value = metric.compute()
    assert value.dtype == torch.float64 and value.ndim == 0
    assert value.item() == pytest.approx(reference["_check_eigh_unbiased_ddof1"], rel=1e-9)
    assert metric.real_count.item() == len(real) and metric.fake_count.item() == len(fake)


def test_real_stats_round_trip(frechet, tmp_path):
    real, fake, _ = frechet
    full = FrechetDistance(real.shape[1])
    full.update(real, real=True)
    full.update(fake, real=False)
    expected = full.compute().item()

    torch.save(full.real_stats(), tmp_path / "real_stats.pt")
    stats = torch.load(tmp_path / "real_stats.pt", weights_only=True)
    assert set(stats) == {"count", "sum", "outer"} and all(v.dtype == torch.float64 for v in stats.values())
    cached = FrechetDistance(real.shape[1], reset_real_features=False)
    cached.load_real_stats(**stats)
    cached.update(fake, real=False)
    assert cached.compute().item() == pytest.approx(expected, rel=1e-12)
    assert all(torch.equal(cached.real_stats()[k], stats[k]) for k in stats)
    cached.reset()  # keeps the real side
    cached.update(fake, real=False)
    assert cached.compute().item() == pytest.approx(expected, rel=1e-12)

    fresh = FrechetDistance(real.shape[1])  # reset_real_features=True forgets them
    fresh.load_real_stats(**stats)
    fresh.reset()
    fresh.update(fake, real=False)
    with pytest.raises(ValueError, match="at least 2 real"):
        fresh.compute()


def test_frechet_errors():
    metric = FrechetDistance(8)
    metric.update(torch.randn(1, 8), real=True)
    metric.update(torch.randn(5, 8), real=False)
    with pytest.raises(ValueError, match="at least 2 real samples, got 1"):
        metric.compute()
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        metric.update(torch.randn(4, 7), real=True)
    with pytest.raises(ValueError, match=r"\(D, D\)"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(4))


# ---------------------------------------------------------------------------------------------- FVD
def test_fvd_metric_equals_the_manual_computation():
    model = small_i3d(width=0.125)
    real, fake = random_videos(3, size=32, seed=1), random_videos(4, size=32, seed=2)
    fvd = FrechetVideoDistance(model, size=32, batch_size=2)
    fvd.update(real, real=True)
    fvd.update(fake, real=False)
    with torch.no_grad():
        r = model.logits(i3d_input(real, size=32)).double()
        f = model.logits(i3d_input(fake, size=32)).double()
    expected = frechet_distance(r.mean(0), torch.cov(r.T), f.mean(0), torch.cov(f.T))
    value = fvd.compute()
    assert value.dtype == torch.float64 and value.item() == pytest.approx(expected, rel=1e-6)
    assert fvd.real_sum.device.type == "cpu" and fvd.real_sum.dtype == torch.float64
    fvd.train()  # e.g. a parent LightningModule: the extractor's BatchNorm stays in eval mode
    assert not model.training and not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="uint8"):
        fvd.update(real.float(), real=True)
