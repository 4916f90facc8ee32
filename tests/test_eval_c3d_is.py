"""C3D (TGAN2's C3DVersion1UCF101) and the video Inception Score against the reference fixtures (README sections 2, 4).

The C3D weights are regenerated from the recipe in the fixtures README with the seed and bounds stored in the
fixture's metadata, and checked against the metadata checksums (and the README's SHA-256 when it states one).
No reference number is written here: every expected value is read from the fixtures root.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eval.metrics.c3d import C3D, load_c3d, tgan2_preprocess, videos_to_c3d_input
from eval.metrics.inception_score import VideoInceptionScore, inception_score
from modules.components.checkpoints import CheckpointKeyError
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("single_thread")

PRE_ATOL, FC8_ATOL, PROB_ATOL, FC7_RTOL = 5e-3, 1e-4, 1e-5, 1e-5


@pytest.fixture(scope="module")
def c3d_fixture(fixtures_dir):
    path = fixtures_dir / "eval" / "c3d_io.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return load_file(path), meta


def _readme_sha256(fixtures_dir) -> str | None:
    readme = fixtures_dir / "eval" / "README.md"
    if not readme.is_file():
        return None
    match = re.search(r"SHA-256[^`]*`([0-9a-f]{64})`", readme.read_text())
    return match.group(1) if match else None


@pytest.fixture(scope="module")
def tgan2_c3d(c3d_fixture, fixtures_dir):
    """The official-shape C3D with the fixture's regenerated random weights (built once per module)."""
    _, meta = c3d_fixture
    bounds = json.loads(meta["weight_bounds_json"])  # SPEC order: each layer's weight, then its bias
    checksums = json.loads(meta["weight_checksums_json"])
    with torch.device("meta"):
        model = C3D()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(bounds) == list(shapes), "bounds must follow the SPEC order, which is the module's key order"
    rs = np.random.RandomState(int(meta["seed"]))
    digest, state = hashlib.sha256(), {}
    for name, shape in shapes.items():
        u = rs.random_sample(math.prod(shape))
        w = ((2.0 * u - 1.0) * float(bounds[name])).astype(np.float32).reshape(shape)
        digest.update(w.astype("<f4").tobytes())
        ref = checksums[name]
        assert [float(np.float32(v)) for v in ref["first4"]] == [float(v) for v in w.ravel()[:4]], name
        assert math.isclose(float(w.astype(np.float64).sum()), float(ref["sum_f64"]), rel_tol=1e-9, abs_tol=1e-9)
        state[name] = torch.from_numpy(w)
    expected_sha = _readme_sha256(fixtures_dir)
    if expected_sha is not None:
        assert digest.hexdigest() == expected_sha
    model.load_state_dict(state, assign=True)
    return model.eval()


def _davidea_head(model: C3D, conv5b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DavideA/c3d-pytorch's pool5 (MaxPool3d(2, 2, padding=(0, 1, 1))) on conv5b activations, then the same fcs."""
    return model.head(F.max_pool3d(conv5b, 2, stride=2, padding=(0, 1, 1)))


@pytest.fixture(scope="module")
def net_outputs(tgan2_c3d, c3d_fixture):
    """Network outputs on the fixture's own preprocessed inputs; conv5b kept for the DavideA pool5 control."""
    io, _ = c3d_fixture
    model, out = tgan2_c3d, {}
    with torch.no_grad():
        for case in "ab":
            out[f"conv5b_{case}"] = conv5b = model.conv_features(io[f"tgan2_pre_{case}"], pool5=False)
            out[f"fc7_{case}"], out[f"fc8_{case}"] = model.head(F.max_pool3d(conv5b, 2, ceil_mode=True))
    return out


@pytest.mark.parametrize("case", ["a", "b"])
def test_tgan2_preprocess_matches_reference(c3d_fixture, case):
    io, _ = c3d_fixture
    pre = tgan2_preprocess(io[f"x_{case}"], io["mean_crop_bgr"])
    assert pre.shape == io[f"tgan2_pre_{case}"].shape
    torch.testing.assert_close(pre, io[f"tgan2_pre_{case}"], atol=PRE_ATOL, rtol=0)


@pytest.mark.parametrize("case", ["a", "b"])
def test_c3d_outputs_match_tgan2(tgan2_c3d, c3d_fixture, net_outputs, case):
    io, _ = c3d_fixture
    fc7, fc8 = net_outputs[f"fc7_{case}"], net_outputs[f"fc8_{case}"]
    ref7 = io[f"tgan2_fc7_{case}"]
    assert (fc7 - ref7).abs().max() <= FC7_RTOL * ref7.abs().max()
    torch.testing.assert_close(fc8, io[f"tgan2_fc8_{case}"], atol=FC8_ATOL, rtol=0)
    torch.testing.assert_close(fc8.softmax(-1), io[f"tgan2_prob_{case}"], atol=PROB_ATOL, rtol=0)


def test_c3d_probs_end_to_end(tgan2_c3d, c3d_fixture):
    """`probs` on our preprocessing of the raw [-1, 1] video (171x128 -> 112x112) agrees with the reference."""
    io, _ = c3d_fixture
    with torch.no_grad():
        probs = tgan2_c3d.probs(tgan2_preprocess(io["x_b"], io["mean_crop_bgr"]))
    torch.testing.assert_close(probs, io["tgan2_prob_b"], atol=PROB_ATOL, rtol=0)
    assert tgan2_c3d.pool5_size == (1, 4, 4)


def test_davidea_pool5_is_a_different_network(tgan2_c3d, c3d_fixture, net_outputs):
    """Negative control: DavideA's padded pool5 reproduces its own reference and not TGAN2's probabilities."""
    io, _ = c3d_fixture
    conv5b = net_outputs["conv5b_a"]
    if not torch.equal(io["davidea_input"], io["tgan2_pre_a"]):  # the README says they are equal
        with torch.no_grad():
            conv5b = tgan2_c3d.conv_features(io["davidea_input"], pool5=False)
    with torch.no_grad():
        _, fc8 = _davidea_head(tgan2_c3d, conv5b)
    torch.testing.assert_close(fc8, io["davidea_fc8"], atol=FC8_ATOL, rtol=0)
    torch.testing.assert_close(fc8.softmax(-1), io["davidea_prob"], atol=PROB_ATOL, rtol=0)
    gap = (io["davidea_prob"] - io["tgan2_prob_a"]).abs().max()
    assert gap > 100 * PROB_ATOL  # the control is meaningful on this fixture root
    assert (net_outputs["fc8_a"].softmax(-1) - io["davidea_prob"]).abs().max() > 100 * PROB_ATOL


def test_videos_to_c3d_input_bridge(c3d_fixture):
    io, _ = c3d_fixture
    u = torch.randint(0, 256, (2, 16, 20, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = videos_to_c3d_input(u, io["mean_crop_bgr"])
    ref = tgan2_preprocess(u.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0, io["mean_crop_bgr"])
    assert x.shape == (2, 3, 16, 112, 112)
    torch.testing.assert_close(x, ref)
    # corner pixels survive an align_corners resize: BGR order and the (u / 127.5) * 128 - mean mapping
    expected = u[:, :, 0, 0, [2, 1, 0]].permute(0, 2, 1).float() / 127.5 * 128 - io["mean_crop_bgr"][:, :, 0, 0]
    torch.testing.assert_close(x[:, :, :, 0, 0], expected, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        videos_to_c3d_input(u.float(), io["mean_crop_bgr"])


@pytest.mark.parametrize(("size", "pool5"),
                         [((16, 32, 32), (1, 1, 1)), ((16, 64, 64), (1, 2, 2)), ((8, 48, 40), (1, 2, 1))])
def test_small_c3d_shapes(size, pool5):
    model = C3D(num_classes=7, width=0.0625, input_size=size, fc_dim=32).eval()
    assert model.pool5_size == pool5
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fc7, fc8 = model.head(model.conv_features(x))
        assert fc8.shape == (2, 7) and fc7.shape == (2, 32)
        torch.testing.assert_close(model(x), fc8)
        torch.testing.assert_close(model.fc7(x), fc7)
        torch.testing.assert_close(model.probs(x), fc8.softmax(-1))
    assert set(model.state_dict()) == {f"{n}.{p}" for n in ("conv1a", "conv2a", "conv3a", "conv3b", "conv4a",
                                                            "conv4b", "conv5a", "conv5b", "fc6", "fc7", "fc8")
                                       for p in ("weight", "bias")}
    with pytest.raises(ValueError, match="too small"):
        C3D(input_size=(4, 16, 16))


# ---- Inception Score --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def is_reference(fixtures_dir):
    probs = load_file(fixtures_dir / "eval" / "inception_probs.safetensors")["probs"]
    ref = json.loads((fixtures_dir / "eval" / "inception_reference.json").read_text())
    return probs, ref


def _tgan2_cases(ref: dict) -> list[tuple[str, int, float]]:
    cases = []
    for key in ref:
        m = re.fullmatch(r"tgan2_inception_score_splits(\d+)_eps(.+)", key)
        if m:
            cases.append((key, int(m.group(1)), float(m.group(2))))
    return cases


def test_inception_score_matches_tgan2(is_reference):
    probs, ref = is_reference
    cases = _tgan2_cases(ref)
    assert {s for _, s, _ in cases} >= {1, 10} and {e for *_, e in cases} >= {0.0, 1e-20}
    for key, splits, eps in cases:
        mean, std = inception_score(probs, splits=splits, eps=eps)
        assert math.isclose(mean, ref[key][0], rel_tol=1e-12), key
        assert math.isclose(std, ref[key][1], rel_tol=1e-9, abs_tol=1e-12), key


def test_inception_score_vs_stylegan_v(is_reference):
    """StyleGAN-V agrees on one split (float32 there); its 10 splits come from rows shuffled by RandomState(42)."""
    probs, ref = is_reference
    assert math.isclose(inception_score(probs, 1, eps=0)[0], ref["stylegan-v_compute_isv_num_splits1"][0], rel_tol=1e-6)
    perm = np.arange(len(probs))
    np.random.RandomState(42).shuffle(perm)
    mean, std = inception_score(probs[torch.from_numpy(perm)], splits=10, eps=0)
    assert math.isclose(mean, ref["stylegan-v_compute_isv_num_splits10"][0], rel_tol=1e-5)
    assert math.isclose(std, ref["stylegan-v_compute_isv_num_splits10"][1], rel_tol=1e-4)


@pytest.mark.parametrize("splits", [1, 10])
def test_metric_chunked_probs(is_reference, splits):
    probs, ref = is_reference
    metric = VideoInceptionScore(splits=splits)
    for lo, hi in [(0, 7), (7, 300), (300, 301), (301, len(probs))]:
        metric.update_probs(probs[lo:hi])
    mean, std = metric.compute()
    key = f"tgan2_inception_score_splits{splits}_eps1e-20"
    assert math.isclose(mean.item(), ref[key][0], rel_tol=1e-12)
    assert math.isclose(std.item(), ref[key][1], rel_tol=1e-9, abs_tol=1e-12)
    metric.reset()
    metric.update(probs=probs[:500])
    assert math.isclose(metric.compute()[0].item(), inception_score(probs[:500], splits)[0], rel_tol=1e-12)


def test_metric_runs_classifier_in_chunks():
    torch.manual_seed(0)
    size = (16, 32, 32)
    model = C3D(num_classes=5, width=0.0625, input_size=size, fc_dim=16).eval()
    mean = torch.rand(3, *size) * 255
    videos = torch.randint(0, 256, (5, 16, 40, 48, 3), dtype=torch.uint8)
    metric = VideoInceptionScore(model, mean, splits=2, chunk_size=2)
    metric.train()  # Lightning may flip modes; the scoring net must stay in eval
    assert not model.training
    metric.update(videos[:3])
    metric.update(videos[3:])
    with torch.no_grad():
        probs = model.probs(videos_to_c3d_input(videos, mean))
    assert len(metric.probs) == 3 and all(p.device.type == "cpu" and p.dtype == torch.float64 for p in metric.probs)
    mean_is, std_is = metric.compute()
    ref = inception_score(probs, splits=2)
    assert math.isclose(mean_is.item(), ref[0], rel_tol=1e-6) and math.isclose(std_is.item(), ref[1], rel_tol=1e-5,
                                                                                abs_tol=1e-7)
    with pytest.raises(RuntimeError, match="classifier"):
        VideoInceptionScore().update(videos)


# ---- weight file: converter and loader --------------------------------------------------------------------------

CONVERTER = REPO / "scripts" / "convert_tgan2_c3d.py"
LAYERS = ("conv1a", "conv2a", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b", "fc6", "fc7", "fc8")


@pytest.fixture(scope="module")
def converter():
    spec = importlib.util.spec_from_file_location("convert_tgan2_c3d", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_tgan2_npz(tmp_path, prefix: str = "", drop: str | None = None):
    """A width-1/16 C3D in TGAN2's chainer npz layout (`<layer>/W`, `<layer>/b`) plus a mean2.npz."""
    ref = C3D(num_classes=101, width=0.0625, fc_dim=64)
    arrays = {}
    for layer in LAYERS:
        arrays[f"{prefix}{layer}/W"] = ref._modules[layer].weight.detach().numpy()
        arrays[f"{prefix}{layer}/b"] = ref._modules[layer].bias.detach().numpy()
    if drop:
        del arrays[drop]
    weights, mean = tmp_path / "conv3d_deepnetA_ucf.npz", tmp_path / "mean2.npz"
    np.savez(weights, **arrays)
    np.savez(mean, mean=np.random.RandomState(0).uniform(0, 255, (3, 16, 128, 171)).astype(np.float32))
    return ref, weights, mean


@pytest.mark.parametrize("prefix", ["", "predictor/"])
def test_converter_round_trip(tmp_path, converter, prefix):
    ref, weights, mean = _fake_tgan2_npz(tmp_path, prefix)
    out = converter.main(["--weights", str(weights), "--mean", str(mean), "--out", str(tmp_path / "c3d.safetensors")])
    model, mean_crop = load_c3d(out, width=0.0625, fc_dim=64)
    assert not model.training
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    full = torch.from_numpy(np.load(mean)["mean"])
    assert torch.equal(mean_crop, full[:, :, 8:120, 8:120])
    x = videos_to_c3d_input(torch.zeros(1, 16, 64, 80, 3, dtype=torch.uint8), mean_crop)
    with torch.no_grad():
        assert torch.isfinite(model.probs(x)).all()


def test_converter_reports_keys(tmp_path, converter):
    _, weights, mean = _fake_tgan2_npz(tmp_path, drop="fc8/b")
    with pytest.raises(KeyError, match=r"conv1a/W.*fc8/b.*keys: "):
        converter.convert(weights, mean)


def test_load_c3d_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)missing\.safetensors.*conv3d_deepnetA_ucf\.npz.*mean2\.npz.*"
                                                r"convert_tgan2_c3d\.py"):
        load_c3d(tmp_path / "missing.safetensors")
    small = C3D(width=0.0625, fc_dim=64)
    state = {k: v for k, v in small.state_dict().items() if k != "fc8.bias"}
    state["fc9.weight"] = torch.zeros(1)
    state["mean"] = torch.zeros(3, 16, 128, 171)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointKeyError, match=r"(?s)missing keys.*fc8\.bias.*unexpected keys.*fc9\.weight"):
        load_c3d(tmp_path / "bad.safetensors", width=0.0625, fc_dim=64)
