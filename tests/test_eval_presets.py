"""The named measurement presets of the evaluation protocols (eval/presets/): FVD preprocessing checked against a hand
computation on a small non-square video, IS subsets (sizes, disjointness, seeding, class mixing) and their scores
against the reference fixtures, and the frame-rate stride."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from datamodules.ucf101 import videos_per_class
from eval.metrics.i3d import i3d_input
from eval.metrics.inception_score import inception_score
from eval.presets.frame_rate import real_frame_stride
from eval.presets.fvd import FVD_PRESETS, fvd_preset
from eval.presets.inception_score import IS_PRESETS, is_preset, is_subsets, preset_inception_score

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------------------ FVD
def bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (H, W) float64 by hand, align_corners=False: output pixel i samples the input at
    (i + 0.5) * in / out - 0.5, clamped at 0 (PyTorch's and TF2's half-pixel rule), between its two neighbours."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        matrix = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            lo = int(math.floor(src))
            hi, frac = min(lo + 1, n_in - 1), src - lo
            matrix[i, lo] += 1 - frac
            matrix[i, hi] += frac
        return matrix

    return weights(image.shape[0], height) @ image @ weights(image.shape[1], width).T


def by_hand(video: np.ndarray, preset: str, size: int) -> np.ndarray:
    """What each preset makes of one (T, H, W, 3) uint8 video: (3, T, size, size) in [-1, 1]."""
    t, h, w, _ = video.shape
    out = np.empty((3, t, size, size))
    for k in range(t):
        for c in range(3):
            frame = video[k, :, :, c].astype(np.float64)
            if preset == "center_square":  # 6 x 10 -> the centred 6 x 6 (columns 2..7) -> size x size
                side = min(h, w)
                top, left = (h - side) // 2, (w - side) // 2
                frame = bilinear(frame[top:top + side, left:left + side], size, size)
            elif preset == "stylegan_v":  # the whole 6 x 10 frame squeezed to size x size
                frame = bilinear(frame, size, size)
            else:  # tats: 6 x 10 -> 4 x ceil(10 * 4 / 6) = 4 x 7, then columns (7 - 4) // 2 = 1 .. 4
                long_side = math.ceil(w * size / min(h, w))
                resized = bilinear(frame, size, long_side) if h < w else bilinear(frame, long_side, size)
                top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
                frame = resized[top:top + size, left:left + size]
            out[c, k] = 2.0 * frame / 255.0 - 1.0
    return out


@pytest.mark.parametrize("name", sorted(FVD_PRESETS))
def test_fvd_preset_matches_the_hand_computation_on_a_non_square_video(name):
    video = np.random.default_rng(3).integers(0, 256, (2, 6, 10, 3), dtype=np.uint8)  # (T, H, W, 3), wide
    got = i3d_input(torch.from_numpy(video)[None], size=4, crop=fvd_preset(name).crop, min_frames=1)[0]
    assert got.shape == (3, 2, 4, 4)
    np.testing.assert_allclose(got.double().numpy(), by_hand(video, name, 4), atol=1e-5)


def test_fvd_presets_differ_on_non_square_frames_and_name_their_settings():
    video = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (1, 2, 24, 32, 3), dtype=np.uint8))
    outputs = {name: i3d_input(video, 16, preset.crop, min_frames=1) for name, preset in FVD_PRESETS.items()}
    names = sorted(outputs)
    assert all(not torch.allclose(outputs[a], outputs[b]) for a in names for b in names if a < b)
    record = fvd_preset("tats").record(224)
    assert record["name"] == "tats" and record["size"] == 224 and "shorter side to 224" in record["steps"]
    json.dumps(record)  # goes into results.json as is
    with pytest.raises(ValueError, match="eval.fvd_preset must be one of"):
        fvd_preset("center")


# ------------------------------------------------------------------------------------------------------------- IS
def test_tgan2_subsets_are_seeded_sized_and_spread_over_the_class_major_list():
    counts = videos_per_class(10_000, np.arange(101) % 7 + 90)  # the default list: 10,000 videos, class-major
    labels = np.repeat(np.arange(101), counts)
    tgan2 = is_preset("tgan2")
    subsets = is_subsets(10_000, tgan2, seed=0)
    assert len(subsets) == 10 and all(len(s) == 2048 and len(np.unique(s)) == 2048 for s in subsets)
    assert all(np.array_equal(s, np.sort(s)) for s in subsets)  # generation order inside a run
    uses = np.bincount(np.concatenate(subsets), minlength=10_000)
    assert uses.min() == 2 and uses.max() == 3  # 20,480 draws from 10,000: as even as it gets
    assert all(len(np.unique(labels[s])) == 101 for s in subsets)  # a consecutive block would hold ~21 classes
    assert all(np.array_equal(a, b) for a, b in zip(subsets, is_subsets(10_000, tgan2, seed=0)))
    assert not np.array_equal(subsets[0], is_subsets(10_000, tgan2, seed=1)[0])
    record = tgan2.record(10_000, 0)
    assert not record["disjoint"] and record["max_runs_per_video"] == 3 and record["subset_size"] == 2048


def test_subsets_are_disjoint_when_there_are_enough_videos():
    subsets = is_subsets(20_480, is_preset("tgan2"), seed=5)
    assert len(np.unique(np.concatenate(subsets))) == 20_480  # 10 x 2,048, no video twice
    assert is_preset("tgan2").record(20_480, 5)["disjoint"]
    (everything,) = is_subsets(7, is_preset("single_split"), seed=0)
    assert everything.tolist() == list(range(7))


@pytest.mark.parametrize("name, needed", [("tgan2", 2048), ("stylegan_v", 2048)])
def test_too_few_videos_for_a_preset_say_what_to_set(name, needed):
    is_preset(name).check(needed)
    with pytest.raises(ValueError, match=rf"eval.is_preset={name} .*{needed:,} .* generates {needed - 1:,}") as error:
        is_preset(name).check(needed - 1)
    assert "eval.num_videos" in str(error.value) and "eval.is_preset=single_split" in str(error.value)
    with pytest.raises(ValueError, match="eval.is_preset must be one of"):
        is_preset("tgan")


@pytest.fixture(scope="module")
def is_reference(fixtures_dir):
    probs = load_file(fixtures_dir / "eval" / "inception_probs.safetensors")["probs"]
    return probs, json.loads((fixtures_dir / "eval" / "inception_reference.json").read_text())


def test_preset_scores_equal_the_references(is_reference):
    probs, ref = is_reference  # 1,000 rows
    single = preset_inception_score(probs, is_preset("single_split"), seed=0)
    assert single["is"] == pytest.approx(ref["tgan2_inception_score_splits1_eps1e-20"][0], rel=1e-12)
    assert single["is_std"] == 0
    # StyleGAN-V's rule on 1,000 generated videos: RandomState(42) shuffle, 10 splits, no eps
    stylegan_v = dataclasses.replace(IS_PRESETS["stylegan_v"], subset_size=1000)
    scored = preset_inception_score(probs, stylegan_v, seed=123)  # all 1,000: the seed cannot matter
    assert scored["is"] == pytest.approx(ref["stylegan-v_compute_isv_num_splits10"][0], rel=1e-5)
    assert scored["is_std"] == pytest.approx(ref["stylegan-v_compute_isv_num_splits10"][1], rel=1e-4)


def test_tgan2_score_is_the_mean_and_std_over_runs(is_reference):
    probs, _ = is_reference
    small = dataclasses.replace(IS_PRESETS["tgan2"], subset_size=300)  # 10 runs of 300 from 1,000
    scored = preset_inception_score(probs, small, seed=7)
    by_run = [inception_score(probs[torch.from_numpy(s)], 1)[0] for s in is_subsets(1000, small, seed=7)]
    assert scored["is_runs"] == pytest.approx(by_run, rel=1e-12)
    assert scored["is"] == pytest.approx(np.mean(by_run), rel=1e-12)
    assert scored["is_std"] == pytest.approx(np.std(by_run), rel=1e-9) and scored["is_std"] > 0


# ----------------------------------------------------------------------------------------------------- frame rate
@pytest.mark.parametrize("setting, generated_fps, stride", [
    ("auto", 8, 3),  # 25 / 8 = 3.125 -> every 3rd frame, 8.33 fps
    ("auto", 10, 3),  # 2.5: halves round up
    ("auto", 25, 1), ("auto", 60, 1),  # never below 1
    (2, 8, 2), (1, None, 1),  # an explicit stride is used as given
])
def test_real_frame_stride(setting, generated_fps, stride):
    assert real_frame_stride(setting, 25.0, generated_fps) == stride


@pytest.mark.parametrize("setting, generated_fps, message", [
    (0, 8, "positive integer or 'auto'"), (True, 8, "positive integer"), ("3", 8, "positive integer"),
    ("auto", None, "needs the generator's frame rate"),
])
def test_bad_real_frame_stride(setting, generated_fps, message):
    with pytest.raises(ValueError, match=message):
        real_frame_stride(setting, 25.0, generated_fps)
