"""The count of skipped unreadable files reaches the loggers: callbacks/data_skips.py."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger

from callbacks.data_skips import DataSkips, skip_counts
from datamodules.base import UnreadableFileWarning
from datamodules.synthetic import SyntheticDataModule
from datamodules.video_text import VideoTextDataModule
from tests.dataset_layouts import write_image_captions, write_video_text

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BROKEN_VIDEOS = 2  # of 6
BROKEN_IMAGES = 1  # of 2: with 2 images per video, every item meets it


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("skips")
    videos = write_video_text(root / "videos", num_videos=6, num_frames=4, size=(16, 16), corrupt=[1], missing=[4])
    images = write_image_captions(root / "images", num_images=2, size=(16, 16), corrupt=[0])
    return videos, images


def joint_datamodule(manifests, val: bool = False) -> VideoTextDataModule:
    videos, images = manifests
    return VideoTextDataModule(videos, num_frames=4, resolution=8, batch_size=2, images_per_video=2,
                               image_manifest=images, val_manifest=videos if val else None)


class TinyModel(LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return (batch["video"].mean() - self.weight) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def train(datamodule, tmp_path: Path, log_every_n_steps: int) -> list[dict[str, str]]:
    trainer = Trainer(
        max_steps=3, accelerator="cpu", logger=CSVLogger(tmp_path, name="csv"), callbacks=[DataSkips()],
        log_every_n_steps=log_every_n_steps, limit_val_batches=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyModel(), datamodule=datamodule)
    return list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))


def test_counts_per_split_look_through_joint_mode(manifests):
    datamodule = joint_datamodule(manifests, val=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        datamodule.setup("fit")
        for split in ("train", "val"):
            dataset = datamodule.datasets[split]
            for i in range(len(dataset)):
                dataset[i]
    assert skip_counts(datamodule) == {
        "data/skipped_train": BROKEN_VIDEOS, "data/skipped_train_images": BROKEN_IMAGES,
        "data/skipped_val": BROKEN_VIDEOS, "data/skipped_val_images": BROKEN_IMAGES,
    }
    synthetic = SyntheticDataModule(train_size=4, val_size=2)
    synthetic.setup("fit")
    assert skip_counts(synthetic) == {}  # nothing there can skip: nothing logged
    assert skip_counts(None) == {}


def test_counts_land_in_metrics_csv_every_logging_step(manifests, tmp_path):
    rows = train(joint_datamodule(manifests), tmp_path, log_every_n_steps=1)
    logged = [r for r in rows if r.get("data/skipped_train")]
    assert len(logged) >= 3  # one a step, and the final count
    counts = [float(r["data/skipped_train"]) for r in logged]
    assert counts == sorted(counts) and counts[-1] == BROKEN_VIDEOS  # 3 batches of 2 cover all 6 rows
    assert float(logged[-1]["data/skipped_train_images"]) == BROKEN_IMAGES


def test_the_final_count_is_written_when_training_ends(manifests, tmp_path):
    rows = train(joint_datamodule(manifests), tmp_path, log_every_n_steps=50)  # no step of these 3 logs
    logged = [r for r in rows if r.get("data/skipped_train")]
    assert [(r["step"], float(r["data/skipped_train"])) for r in logged] == [("3", BROKEN_VIDEOS)]


def test_default_callbacks_include_it():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train")
    assert isinstance(instantiate(cfg.callbacks.data_skips), DataSkips)
