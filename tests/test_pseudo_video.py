"""Pseudo-videos from images (datamodules/pseudo_video.py, `data=pseudo_video`): F frames of the asked size, a known
test pattern moves by the expected zoom and pan between frame 0 and frame F-1, same seed same clip (and resumable
through SeededItems), captions carried, `is_image` False, and the config composes over any image source."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from datamodules.pseudo_video import PseudoVideoDataModule, PseudoVideoDataset, camera_path, render
from datamodules.resumable import SeededItems
from datamodules.synthetic import SyntheticDataModule, SyntheticVideoDataset
from tests.dataset_layouts import write_image_captions

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZE = 64


def dot_image(x: int, y: int, size: int = SIZE) -> torch.Tensor:
    """(3, size, size) in [-1, 1]: black with one white 2x2 dot whose top-left pixel is (x, y)."""
    image = torch.full((3, size, size), -1.0)
    image[:, y:y + 2, x:x + 2] = 1.0
    return image


def centroid(frame: torch.Tensor) -> torch.Tensor:
    """(x, y) in pixels of the bright pixels of one frame (C, H, W)."""
    weight = (frame.mean(0) + 1).clamp_min(0)
    ys, xs = torch.meshgrid(torch.arange(frame.shape[1]), torch.arange(frame.shape[2]), indexing="ij")
    return torch.stack([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


class Stills(torch.utils.data.Dataset):
    """Image items as the image datasets give them: video (1, C, H, W), caption, is_image True."""

    def __init__(self, count: int = 3):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return {"video": torch.rand(1, 3, SIZE, SIZE, generator=generator) * 2 - 1, "caption": f"still {index}",
                "is_image": True}


def test_pan_moves_a_dot_by_the_expected_amount():
    # zoom 2: the window is half the image; u from -0.5 to 0.5 in x moves its centre by 0.5 * (1 - 1/2) * 2 = 0.5
    # of the half-width-normalised image = SIZE / 4 image pixels = SIZE / 2 output pixels (2x magnified), leftwards
    path = camera_path(5, zoom=(2.0, 2.0), position=((-0.5, 0.0), (0.5, 0.0)))
    frames = render(dot_image(SIZE // 2 - 1, SIZE // 2 - 1), path, (SIZE, SIZE))
    assert frames.shape == (5, 3, SIZE, SIZE)
    shift = centroid(frames[-1]) - centroid(frames[0])
    torch.testing.assert_close(shift, torch.tensor([-SIZE / 2, 0.0]), atol=0.05, rtol=0)
    # eased: the middle frame is halfway, the first step shorter than a uniform one
    torch.testing.assert_close(centroid(frames[2])[0], (centroid(frames[0])[0] + centroid(frames[-1])[0]) / 2,
                               atol=0.05, rtol=0)
    assert abs(float(centroid(frames[1])[0] - centroid(frames[0])[0])) < SIZE / 2 / 4


def test_zoom_scales_distances_from_the_centre():
    # a centred zoom from 1 to 2: a dot 12 px right of the centre ends 24 px right of it; the centre stays
    centre = SIZE / 2 - 0.5
    path = camera_path(4, zoom=(1.0, 2.0), position=((0.0, 0.0), (0.0, 0.0)))
    frames = render(dot_image(SIZE // 2 - 1 + 12, SIZE // 2 - 1), path, (SIZE, SIZE))
    torch.testing.assert_close(centroid(frames[0]), torch.tensor([centre + 12, centre]), atol=0.05, rtol=0)
    torch.testing.assert_close(centroid(frames[-1]), torch.tensor([centre + 24, centre]), atol=0.05, rtol=0)
    assert not torch.equal(frames[0], frames[-1])


def test_dataset_clips_have_the_asked_shape_carry_captions_and_are_videos():
    dataset = PseudoVideoDataset(Stills(), num_frames=6, resolution=(24, 32), vary_by_epoch=False)
    item = dataset[1]
    assert item["video"].shape == (6, 3, 24, 32)
    assert item["caption"] == "still 1" and item["is_image"] is False
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert not torch.allclose(item["video"][0], item["video"][-1], atol=1e-3)  # the camera moved


def test_same_seed_same_clip_other_seed_other_clip():
    fixed = lambda seed: PseudoVideoDataset(Stills(), 8, (SIZE, SIZE), seed=seed, vary_by_epoch=False)  # noqa: E731
    assert torch.equal(fixed(0)[2]["video"], fixed(0)[2]["video"])
    assert not torch.equal(fixed(0)[2]["video"], fixed(1)[2]["video"])
    # training: drawn under SeededItems, the same per (seed, epoch, item) in any run, another path next epoch
    training = lambda: SeededItems(PseudoVideoDataset(Stills(), 8, (SIZE, SIZE)), seed=5)  # noqa: E731
    assert torch.equal(training()[2]["video"], training()[2]["video"])
    assert not torch.equal(training()[2]["video"], training()[2 + len(Stills())]["video"])


def test_bad_settings_and_clip_sources_are_refused():
    with pytest.raises(ValueError, match="data.max_zoom"):
        PseudoVideoDataset(Stills(), 4, (8, 8), max_zoom=0.5)
    with pytest.raises(ValueError, match="data.max_pan"):
        PseudoVideoDataset(Stills(), 4, (8, 8), max_pan=2)
    clips = PseudoVideoDataset(SyntheticVideoDataset(2, 4, (8, 8)), 4, (8, 8))
    with pytest.raises(ValueError, match="image_mode=true"):
        clips[0]


def compose_data(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["data=pseudo_video", f"paths.data_dir={tmp_path}",
                                          f"paths.root_dir={CONFIGS.parent}", "data.resolution=[16,16]",
                                          "data.batch_size=2", *overrides])
    return instantiate(cfg.data, _convert_="all")


def test_config_over_an_image_manifest(tmp_path):
    write_image_captions(tmp_path / "images", num_images=3, size=(16, 16))
    datamodule = compose_data(tmp_path, "data.num_frames=5")
    assert isinstance(datamodule, PseudoVideoDataModule)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (2, 5, 3, 16, 16)
    assert all(caption.startswith("image ") for caption in batch["caption"])
    assert not batch["is_image"].any()


def test_config_over_synthetic_images_with_joint_mode(tmp_path):
    datamodule = compose_data(tmp_path, "data@data.source=synthetic", "data.source.image_mode=true",
                              "data.num_frames=4", "data.images_per_video=2")
    assert isinstance(datamodule.source, SyntheticDataModule)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (2, 4 + 2, 3, 16, 16)
    assert len(batch["image_captions"][0]) == 2
    # the pseudo-video's caption is its image's: a still synthetic caption (no motion phrase)
    assert all("moving" not in caption for caption in batch["caption"])
