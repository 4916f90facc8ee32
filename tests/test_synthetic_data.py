from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from datamodules.synthetic import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    RGB,
    SHAPES,
    Attributes,
    Layout,
    SyntheticDataModule,
    SyntheticVideoDataset,
    attributes_for,
    caption_for,
    drawn_colour,
    object_pixels,
    render,
)
from datamodules.transforms import to_uint8

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "data" / "synthetic.yaml"


def names_of(label: dict) -> Attributes:
    return Attributes(
        SHAPES[label["shape"]], COLOURS[label["colour"]], MOTIONS[label["motion"]], BACKGROUNDS[label["background"]]
    )


def object_mask(frames: np.ndarray) -> np.ndarray:
    """bool [T, H, W]: pixels far from the background colour, read off a corner (plain backgrounds only)."""
    background = frames[:, :1, :1].astype(np.float32)
    return np.linalg.norm(frames.astype(np.float32) - background, axis=-1) > 60


def test_item_format():
    item = SyntheticVideoDataset(4, num_frames=16, resolution=(32, 32))[0]
    assert item["video"].shape == (16, 3, 32, 32) and item["video"].dtype == torch.float32
    assert -1 <= item["video"].min() < item["video"].max() <= 1
    assert item["fps"] == 8 and item["is_image"] is False
    assert set(item["label"]) == {"shape", "colour", "motion", "background"}


def test_deterministic_per_index_and_seed():
    a = SyntheticVideoDataset(16, 8, (32, 32), seed=0)
    b = SyntheticVideoDataset(16, 8, (32, 32), seed=0)
    other_seed = SyntheticVideoDataset(16, 8, (32, 32), seed=1)
    val = SyntheticVideoDataset(16, 8, (32, 32), seed=0, split="val")
    assert all(torch.equal(a[i]["video"], b[i]["video"]) and a[i]["caption"] == b[i]["caption"] for i in range(16))
    assert torch.equal(a[5]["video"], a[5]["video"])
    for different in (other_seed, val):
        assert sum(torch.equal(a[i]["video"], different[i]["video"]) for i in range(16)) == 0
    assert not torch.equal(a[0]["video"], a[1]["video"])


def test_any_resolution_and_length():
    item = SyntheticVideoDataset(2, num_frames=5, resolution=(24, 40))[1]
    assert item["video"].shape == (5, 3, 24, 40)
    assert render(attributes_for(0), 3, (17, 9)).shape == (3, 17, 9, 3)


def test_caption_matches_labels_and_attributes_for():
    dataset = SyntheticVideoDataset(200, 2, (16, 16), seed=3)
    seen = {name: set() for name in ("shape", "colour", "motion", "background")}
    for i in range(len(dataset)):
        item = dataset[i]
        attributes = names_of(item["label"])
        assert attributes == attributes_for(i, seed=3)
        assert item["caption"] == caption_for(*attributes)
        for name, value in attributes._asdict().items():
            seen[name].add(value)
            assert f" {value} " in f" {item['caption']} " or name == "motion"
        assert not (attributes.shape == "circle" and attributes.motion == "rotate")  # would look still
    assert seen == {
        "shape": set(SHAPES), "colour": set(COLOURS), "motion": set(MOTIONS), "background": set(BACKGROUNDS)
    }
    assert caption_for("red", "circle", "left", "dark") != caption_for("circle", "red", "left", "dark")
    assert caption_for("circle", "red", "left", "dark") == "a red circle moving left on a dark background"
    assert caption_for("square", "blue", "grow", "light") == "a blue square growing on a light background"


@pytest.mark.parametrize("motion", MOTIONS)
@pytest.mark.parametrize("shape", ["square", "star"])
def test_motion_is_visible(shape, motion):
    frames = render(Attributes(shape, "red", motion, "dark"), num_frames=12, resolution=(32, 32))
    mask = object_mask(frames)  # (T, H, W)
    area = mask.sum(axis=(1, 2)).astype(np.float32)
    ys, xs = np.mgrid[0:32, 0:32]
    cx = (mask * xs).sum(axis=(1, 2)) / area
    cy = (mask * ys).sum(axis=(1, 2)) / area
    steps = {"x": np.diff(cx), "y": np.diff(cy), "area": np.diff(area)}
    moved = {"left": ("x", -1), "right": ("x", 1), "up": ("y", -1), "down": ("y", 1)}
    if motion in moved:
        axis, sign = moved[motion]
        assert (sign * steps[axis] > 0).all()  # every frame moves the right way
        assert sign * (steps[axis].sum()) > 10  # more than 10 px across a 32 px frame
        other = "y" if axis == "x" else "x"
        assert np.abs(steps[other]).max() < 0.5
    elif motion in ("grow", "shrink"):
        sign = 1 if motion == "grow" else -1
        assert (sign * steps["area"] >= 0).all()  # pixel areas of an upright square change in whole rows
        assert area.max() / area.min() > 4
    elif motion == "rotate":
        assert np.abs(steps["x"]).max() < 0.5 and np.abs(steps["y"]).max() < 0.5  # spins in place
        assert not np.array_equal(frames[0], frames[-1])
        assert (mask[0] != mask[-1]).sum() > 10
    else:  # still
        assert all(np.array_equal(frames[0], frame) for frame in frames)
    assert area.min() > 20  # visible at 32x32


def test_object_size_follows_the_radius():
    """A still square (half-width 0.85 radii, the default layout) spans 2 * 0.85 * radius of a 30-pixel frame:
    about 15 pixels, half the frame, big enough at 32x32 for the tiny models to see its colour and shape."""
    import datamodules.synthetic as synthetic

    mask = object_mask(render(Attributes("square", "blue", "still", "dark"), 1, (30, 30)))[0]
    width = mask.any(axis=0).sum()
    assert abs(width - 2 * 0.85 * synthetic._RADIUS * 30) <= 1.5
    assert 0.4 * 30 <= width <= 0.6 * 30


def test_drawn_colour_matches_named_colour():
    dataset = SyntheticVideoDataset(150, 4, (32, 32), seed=7)
    checked = 0
    for i in range(len(dataset)):
        item = dataset[i]
        attributes = names_of(item["label"])
        if attributes.background == "checkered":
            continue
        frames = to_uint8(item["video"]).numpy()  # (T, H, W, 3)
        mean = frames[object_mask(frames)].astype(np.float32).mean(axis=0)
        nearest = min(RGB, key=lambda name: np.linalg.norm(mean - np.array(RGB[name])))
        assert nearest == attributes.colour, (i, item["caption"], mean)
        checked += 1
    assert checked > 80


def test_read_back_helpers_find_the_drawn_object():
    """`drawn_colour` and `object_pixels` (used on generated videos and reconstructions) recover what the renderer
    drew, on every background, the checkered one included (its two tones are grey, so never saturated)."""
    dataset = SyntheticVideoDataset(120, 4, (32, 32), seed=3)
    for i in range(len(dataset)):
        item = dataset[i]
        attributes = names_of(item["label"])
        frames = to_uint8(item["video"]).numpy()
        assert drawn_colour(frames) == attributes.colour, (i, item["caption"])
        if attributes.background != "checkered":  # object_mask reads the background off a corner
            truth, found = object_mask(frames), object_pixels(frames)
            assert (truth & found).sum() / (truth | found).sum() > 0.85, (i, item["caption"])
    for background in BACKGROUNDS:  # nothing coloured: no colour, no object pixels
        empty = render(Attributes("circle", "red", "still", background), 1, (32, 32), Layout(2.0, 2.0, 0.1, 0, 1))
        assert drawn_colour(empty) is None and not object_pixels(empty).any()


def test_backgrounds_differ():
    frames = {b: render(Attributes("circle", "red", "still", b), 1, (32, 32))[0] for b in BACKGROUNDS}
    corners = {b: tuple(f[0, 0]) for b, f in frames.items()}
    assert len(set(corners.values())) == len(BACKGROUNDS)
    checker = frames["checkered"]
    assert not np.array_equal(checker[0, 0], checker[0, 4])  # cells of 32 / 8 = 4 px


def test_image_mode():
    dataset = SyntheticVideoDataset(20, num_frames=16, resolution=(32, 32), image_mode=True)
    for i in range(20):
        item = dataset[i]
        assert item["video"].shape == (1, 3, 32, 32) and item["is_image"] is True and "fps" not in item
        attributes = names_of(item["label"])
        assert attributes.motion == "still"
        assert item["caption"] == caption_for(attributes.shape, attributes.colour, None, attributes.background)
    videos = SyntheticVideoDataset(20, 1, (32, 32))
    assert sum(torch.equal(videos[i]["video"], dataset[i]["video"]) for i in range(20)) == 0  # own seed stream


def test_datamodule_batch():
    datamodule = SyntheticDataModule(num_frames=8, resolution=[24, 32], train_size=20, val_size=6, batch_size=4)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (4, 8, 3, 24, 32)
    assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])
    assert batch["fps"].shape == (4,) and batch["is_image"].dtype == torch.bool and not batch["is_image"].any()
    assert set(batch["label"]) == {"shape", "colour", "motion", "background"}
    assert all(v.dtype == torch.long and v.shape == (4,) for v in batch["label"].values())
    val_sizes = [len(b["caption"]) for b in datamodule.val_dataloader()]
    assert val_sizes == [4, 2]
    assert datamodule.hparams.train_size == 20


def test_config_instantiates():
    datamodule = instantiate(OmegaConf.load(CONFIG), train_size=8, batch_size=2)
    assert isinstance(datamodule, SyntheticDataModule)
    datamodule.setup("fit")
    assert next(iter(datamodule.train_dataloader()))["video"].shape == (2, 16, 3, 32, 32)
