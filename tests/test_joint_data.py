import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from datamodules.base import UnreadableFileWarning
from datamodules.images import ImageTextDataModule, ImageTextDataset
from datamodules.joint import JointImageVideoDataset, collate
from datamodules.msrvtt import MSRVTTDataModule
from datamodules.synthetic import SyntheticDataModule, SyntheticVideoDataset, attributes_for, caption_for
from datamodules.ucf101 import UCF101DataModule
from datamodules.video_io import write_video
from tests.dataset_layouts import write_image_captions, write_msrvtt, write_ucf101

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The layout the data configs expect (video_text/train.csv, images/train.csv), plus images/train.jsonl."""
    root = tmp_path_factory.mktemp("data")
    (root / "video_text").mkdir()
    (root / "images").mkdir()
    lines = ["video,caption"]
    for i in range(4):
        write_video(root / "video_text" / f"v{i}.mp4", np.full((10, 20, 28, 3), 40 * i, np.uint8))
        lines.append(f"v{i}.mp4,video {i}")
    (root / "video_text" / "train.csv").write_text("\n".join(lines) + "\n")
    rows = []
    for i in range(5):
        Image.new("RGB", (40, 30), (50 * i, 0, 0)).save(root / "images" / f"im{i}.png")
        rows.append({"image": f"im{i}.png", "caption": f"image {i}"})
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    rows.append({"image": "broken.png", "caption": "broken"})
    (root / "images" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_rows = "".join(f"{r['image']},{r['caption']}\n" for r in rows)
    (root / "images" / "train.csv").write_text("image,caption\n" + csv_rows)
    return root


def test_joint_item_appends_images_on_the_frame_axis():
    videos = SyntheticVideoDataset(6, num_frames=5, resolution=(16, 16))
    images = SyntheticVideoDataset(10, num_frames=1, resolution=(16, 16), image_mode=True)
    joint = JointImageVideoDataset(videos, images, images_per_video=3, seed=0)
    item = joint[2]
    picks = joint.image_indices(2)
    assert item["video"].shape == (5 + 3, 3, 16, 16)
    assert torch.equal(item["video"][:5], videos[2]["video"])
    for m, j in enumerate(picks):
        assert torch.equal(item["video"][5 + m], images[j]["video"][0])
        assert item["image_captions"][m] == images[j]["caption"]
    assert item["caption"] == videos[2]["caption"] and item["is_image"] is False
    assert joint.image_indices(2) == picks  # deterministic per (index, seed)
    others = JointImageVideoDataset(videos, images, 3, seed=1)
    assert any(others.image_indices(i) != joint.image_indices(i) for i in range(6))


def test_joint_rejects_mismatched_resolution():
    videos = SyntheticVideoDataset(2, 2, (16, 16))
    images = SyntheticVideoDataset(2, 1, (8, 8), image_mode=True)
    with pytest.raises(ValueError, match="same resolution"):
        JointImageVideoDataset(videos, images, 1)[0]


def test_collate_layout():
    items = [
        {"video": torch.full((3, 1, 2, 2), float(i)), "caption": f"c{i}", "label": {"shape": i, "colour": 2 * i},
         "fps": 8.0, "is_image": False, "image_captions": [f"i{i}a", f"i{i}b"]}
        for i in range(3)
    ]
    batch = collate([items[0], None, items[1], items[2]])
    assert batch["video"].shape == (3, 3, 1, 2, 2) and batch["video"][2].eq(2).all()
    assert batch["caption"] == ["c0", "c1", "c2"]
    assert batch["label"]["colour"].tolist() == [0, 2, 4] and batch["label"]["shape"].dtype == torch.long
    assert batch["fps"].dtype == torch.float32 and batch["is_image"].dtype == torch.bool
    assert batch["image_captions"] == [["i0a", "i0b"], ["i1a", "i1b"], ["i2a", "i2b"]]
    with pytest.raises(RuntimeError, match="unreadable"):
        collate([None, None])
    with pytest.raises(ValueError, match="different fields"):
        collate([items[0], {"video": items[1]["video"], "caption": "x"}])


def test_synthetic_datamodule_in_joint_mode():
    datamodule = SyntheticDataModule(num_frames=6, resolution=[16, 16], train_size=12, val_size=4, batch_size=4,
                                     images_per_video=2, seed=5)
    datamodule.setup("fit")
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        batch = next(iter(loader))
        assert batch["video"].shape == (4, 6 + 2, 3, 16, 16)
        assert len(batch["image_captions"]) == 4 and all(len(c) == 2 for c in batch["image_captions"])
        assert not batch["is_image"].any() and batch["label"]["motion"].shape == (4,)
    joint = datamodule.datasets["train"]
    j = joint.image_indices(0)[0]
    shape, colour, _, background = attributes_for(j, seed=5, image_mode=True)
    assert joint[0]["image_captions"][0] == caption_for(shape, colour, None, background)


def test_image_datamodule_skips_broken_images(data_dir):
    datamodule = ImageTextDataModule(data_dir / "images" / "train.jsonl", resolution=[16, 24], batch_size=3)
    with pytest.warns(UnreadableFileWarning, match=r"broken\.png.*skipped 1 unreadable images so far"):
        datamodule.setup("fit")  # its readability check may be the first to meet broken.png
        batches = [batch for _epoch in range(2) for batch in datamodule.train_dataloader()]
    assert [len(b["caption"]) for b in batches] == [3, 3] * 2
    batch = batches[0]
    assert batch["video"].shape == (3, 1, 3, 16, 24) and batch["is_image"].all() and "fps" not in batch
    assert "broken" not in sum((b["caption"] for b in batches), [])
    assert datamodule.datasets["train"].num_skipped == 1


def test_an_image_manifest_without_a_readable_image_says_so(tmp_path):
    manifest = write_image_captions(tmp_path, num_images=2, corrupt=[0], missing=[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        with pytest.raises(ValueError) as error:
            ImageTextDataset(manifest, resolution=8)
    assert str(error.value).startswith(
        f"no readable file in {manifest}: all 2 rows are unreadable (2 of 2 rows found unreadable so far), e.g. "
        "cannot read image"
    )


def test_image_datamodule_refuses_what_images_cannot_give(data_dir):
    manifest = data_dir / "images" / "train.csv"
    with pytest.raises(ValueError, match=r"one-frame items, but num_frames=8 .*data\.num_frames=1.*data=joint"):
        ImageTextDataModule(manifest, num_frames=8)
    with pytest.raises(ValueError, match=r"images_per_video=4 .*no videos: set data\.images_per_video=0"):
        ImageTextDataModule(manifest, images_per_video=4)
    datamodule = ImageTextDataModule(manifest, resolution=8, num_frames=1, frame_stride=3, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        assert next(iter(datamodule.train_dataloader()))["video"].shape == (2, 1, 3, 8, 8)


def test_image_is_resized_to_cover_then_centre_cropped(data_dir):
    item = ImageTextDataset(data_dir / "images" / "train.jsonl", resolution=(10, 10))[3]  # 40x30 -> 13x10 -> 10x10
    assert item["video"].shape == (1, 3, 10, 10)
    red = (item["video"][0, 0] + 1) * 127.5
    assert torch.allclose(red, torch.full((10, 10), 150.0), atol=1)


def test_joint_config_gives_video_plus_images(data_dir):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        config = compose(config_name="data/joint", overrides=[f"+paths.data_dir={data_dir}"])
    assert config.data.images_per_video == 4 and config.data.manifest == str(data_dir / "video_text" / "train.csv")
    datamodule = instantiate(config.data, num_frames=4, resolution=[16, 16], batch_size=2, num_workers=0,
                             images_per_video=3, _convert_="all")
    datamodule.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (2, 4 + 3, 3, 16, 16)
    assert len(batch["image_captions"]) == 2 and all(len(c) == 3 for c in batch["image_captions"])
    assert all(c.startswith("image ") for captions in batch["image_captions"] for c in captions)
    assert all(c.startswith("video ") for c in batch["caption"])


def test_joint_needs_an_image_manifest(data_dir, tmp_path):
    from datamodules.video_text import VideoTextDataModule

    with pytest.raises(ValueError, match=r"images_per_video=2 .*needs image_manifest.*data\.images_per_video=0"):
        VideoTextDataModule(data_dir / "video_text" / "train.csv", images_per_video=2)
    for datamodule in (UCF101DataModule, MSRVTTDataModule):
        with pytest.raises(ValueError, match=r"images_per_video=2 .*needs image_manifest"):
            datamodule(tmp_path, images_per_video=2)


@pytest.mark.parametrize("dataset", ["ucf101", "msrvtt"])
def test_official_layout_datasets_in_joint_mode(dataset, data_dir, tmp_path):
    if dataset == "ucf101":
        write_ucf101(tmp_path, classes=["Archery"], num_frames=6, size=(16, 16))
        datamodule = UCF101DataModule(tmp_path, num_frames=4, resolution=8, batch_size=2, images_per_video=3,
                                      image_manifest=data_dir / "images" / "train.csv")
    else:
        write_msrvtt(tmp_path, video_ids=(7010,), train_ids=(0, 1), num_frames=6, size=(16, 16))
        datamodule = MSRVTTDataModule(tmp_path, num_frames=4, resolution=8, batch_size=2, images_per_video=3,
                                      image_manifest=data_dir / "images" / "train.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (2, 4 + 3, 3, 8, 8)
    assert all(c.startswith("image ") for captions in batch["image_captions"] for c in captions)
