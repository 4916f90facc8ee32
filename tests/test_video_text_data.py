import csv
import json
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning import LightningModule, Trainer
from omegaconf import OmegaConf

from datamodules.base import UnreadableFileWarning
from datamodules.video_io import write_video
from datamodules.video_text import VideoTextDataModule, VideoTextDataset
from tests.dataset_layouts import write_video_text
from utils.cli import user_errors_exit

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
GOOD = 6
BAD = {"corrupt.mp4", "missing.mp4", "short.mp4"}


def level(frame_index: int) -> int:
    """Brightness of frame k in every good video, so a clip's pixel values say which frames it holds."""
    return 20 + 10 * frame_index


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """videos/: GOOD readable 16-frame clips, a corrupt file and a 2-frame clip; manifests also list a missing one."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "videos").mkdir()
    rows = []
    for i in range(GOOD):
        frames = np.stack([np.full((24, 32, 3), level(k), np.uint8) for k in range(16)])  # (16, H, W, 3)
        write_video(root / "videos" / f"good{i}.mp4", frames, fps=8)
        rows.append({"video": f"videos/good{i}.mp4", "caption": f"clip number {i}"})
    (root / "videos" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    write_video(root / "videos" / "short.mp4", np.zeros((2, 24, 32, 3), np.uint8))
    rows += [{"video": f"videos/{name}", "caption": f"broken {name}"} for name in sorted(BAD)]

    with (root / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["video", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    with (root / "train.jsonl").open("w") as handle:  # other column names, absolute paths
        for row in rows:
            handle.write(json.dumps({"path": str(root / row["video"]), "text": row["caption"]}) + "\n")
    return root


def read_everything(make_dataset, passes: int = 1) -> tuple[Any, list, list[str]]:
    """Build a dataset (its readability check may already meet unreadable rows) and read every item `passes` times;
    the UnreadableFileWarning messages of both."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = make_dataset()
        items = [dataset[i] for _ in range(passes) for i in range(len(dataset))]
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableFileWarning)]
    return dataset, items, messages


def named(messages: list[str]) -> list[str]:
    return [Path(re.search(r"cannot read video (\S+):", m).group(1)).name for m in messages]


class CountingReads(VideoTextDataset):
    """Counts the reads of each file, to show a file known to be unreadable is never read again."""

    reads: Counter

    def load(self, path: Path, caption: str) -> dict[str, Any]:
        self.reads[path.name] += 1
        return super().load(path, caption)


def test_unreadable_videos_are_replaced_warned_and_counted_once(corpus):
    dataset, items, messages = read_everything(
        lambda: VideoTextDataset(corpus / "train.csv", num_frames=4, resolution=(16, 16), frame_stride=2), passes=2
    )
    assert len(dataset) == GOOD + len(BAD)
    assert all(item["video"].shape == (4, 3, 16, 16) for item in items)
    assert all(item["caption"].startswith("clip number") for item in items)  # replacements are good rows
    assert sorted(named(messages)) == sorted(BAD)  # each file once, though two passes met each several times
    assert dataset.num_skipped == len(BAD)
    assert messages[-1].endswith(f"skipped {len(BAD)} unreadable videos so far")


def test_a_file_known_to_be_unreadable_is_never_read_again(corpus):
    CountingReads.reads = Counter()
    dataset, items, _ = read_everything(
        lambda: CountingReads(corpus / "train.csv", num_frames=4, resolution=(16, 16), frame_stride=2), passes=3
    )
    assert {name: CountingReads.reads[name] for name in BAD} == dict.fromkeys(BAD, 1)
    assert sum(CountingReads.reads[f"good{i}.mp4"] for i in range(GOOD)) >= len(items)  # good rows are re-read


def test_a_manifest_without_a_readable_file_says_so(tmp_path):
    # the audit's case: 3 unreadable files once gave a traceback and a skip count of 22
    manifest = write_video_text(tmp_path, num_videos=3, num_frames=4, corrupt=[0], short=[1], missing=[2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError) as error:
            VideoTextDataset(manifest, num_frames=4, resolution=8)
    message = str(error.value)
    assert message.startswith(f"no readable file in {manifest}: all 3 rows are unreadable (3 of 3 rows found")
    assert re.search(r"e\.g\. cannot read video \S+/v\d\.mp4: (not a readable video|too short|file does not)", message)
    assert len([w for w in caught if issubclass(w.category, UnreadableFileWarning)]) == 3

    datamodule = VideoTextDataModule(manifest, num_frames=4, resolution=8)  # through train.py: exit 2, no traceback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        with pytest.raises(SystemExit) as exit_info:
            user_errors_exit(datamodule.setup)("fit")
    assert exit_info.value.code == 2


def test_files_that_break_after_the_start_stop_reading_with_the_same_error(tmp_path):
    manifest = write_video_text(tmp_path, num_videos=3, num_frames=4)
    dataset = VideoTextDataset(manifest, num_frames=4, resolution=8)
    assert dataset.num_skipped == 0
    shutil.rmtree(tmp_path / "videos")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        with pytest.raises(ValueError, match=rf"no readable file in {re.escape(str(manifest))}: all 3 rows .*3 of 3"):
            dataset[1]
    assert dataset.num_skipped == 3


def test_a_mostly_broken_manifest_still_finds_its_readable_file(tmp_path):
    manifest = write_video_text(tmp_path, num_videos=30, num_frames=4, missing=range(1, 30))

    class NoRandomDraws(VideoTextDataset):
        max_resamples = 0  # straight to the walk over rows not known to be unreadable

    dataset, items, messages = read_everything(lambda: NoRandomDraws(manifest, num_frames=4, resolution=8))
    assert [item["caption"] for item in items] == ["video 0"] * 30
    assert dataset.num_skipped == len(messages) == 29


def test_the_readability_check_is_capped_and_leaves_the_rng_alone(tmp_path, corpus):
    manifest = write_video_text(tmp_path, num_videos=100, num_frames=4, missing=range(100))
    CountingReads.reads = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        with pytest.raises(ValueError, match=r": all 64 rows tried \(at random, of 100\) are unreadable \(64 of 100"):
            CountingReads(manifest, num_frames=4, resolution=8)
    assert sum(CountingReads.reads.values()) == 64 == len(CountingReads.reads)

    torch.manual_seed(0)
    state = torch.get_rng_state()
    VideoTextDataset(corpus / "train.csv", num_frames=4, resolution=8, random_start=True)  # reads a random clip
    assert torch.equal(torch.get_rng_state(), state)


def test_validation_clip_is_the_first(corpus):
    dataset = VideoTextDataset(corpus / "train.csv", num_frames=4, resolution=(16, 16), frame_stride=2)
    item = dataset[0]
    levels = (item["video"][:, 0].mean(dim=(1, 2)) + 1) * 127.5  # back to 0..255 per frame
    assert torch.allclose(levels, torch.tensor([level(k) for k in (0, 2, 4, 6)], dtype=torch.float32), atol=3)
    assert item["fps"] == pytest.approx(4.0)  # 8 fps source, every 2nd frame
    assert item["is_image"] is False


def test_training_clips_start_at_random_but_keep_the_stride(corpus):
    dataset = VideoTextDataset(
        corpus / "train.csv", num_frames=4, resolution=(16, 16), frame_stride=2, random_start=True
    )
    torch.manual_seed(0)
    starts = set()
    for _ in range(12):
        levels = ((dataset[1]["video"][:, 0].mean(dim=(1, 2)) + 1) * 127.5).numpy()
        assert np.allclose(np.diff(levels), level(2) - level(0), atol=3)
        starts.add(int(round((levels[0] - level(0)) / 10)))
    assert len(starts) > 3 and min(starts) >= 0 and max(starts) <= 16 - 7


def test_jsonl_manifest_with_custom_columns(corpus):
    dataset, items, messages = read_everything(
        lambda: VideoTextDataset(
            corpus / "train.jsonl", num_frames=2, resolution=(8, 8), video_column="path", caption_column="text"
        )
    )
    assert [item["caption"] for item in items[:GOOD]] == [f"clip number {i}" for i in range(GOOD)]
    assert sorted(named(messages)) == ["corrupt.mp4", "missing.mp4"]  # 2 frames are enough: short.mp4 reads


def test_manifest_errors_explain_the_format(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="header row.*'video'.*'caption'"):
        VideoTextDataset(tmp_path / "nope.csv", num_frames=2, resolution=8)
    (tmp_path / "wrong.csv").write_text("file,text\na.mp4,hello\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['video', 'caption'\]"):
        VideoTextDataset(tmp_path / "wrong.csv", num_frames=2, resolution=8)


def test_datamodule_batches_stay_full(corpus):
    datamodule = VideoTextDataModule(
        corpus / "train.csv", num_frames=4, resolution=[16, 16], frame_stride=2, batch_size=3, random_crop=True
    )
    datamodule.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        sizes, batch = [], None
        for batch in datamodule.train_dataloader():
            sizes.append(len(batch["caption"]))
    assert sizes == [3, 3, 3]  # 9 rows, 3 unreadable, none dropped
    assert batch["video"].shape == (3, 4, 3, 16, 16) and batch["video"].dtype == torch.float32
    assert batch["fps"].tolist() == [4.0, 4.0, 4.0] and not batch["is_image"].any()
    assert datamodule.datasets["train"].num_skipped == len(BAD)
    assert datamodule.val_dataloader() == []  # no val_manifest


def test_skips_are_counted_once_across_worker_processes(corpus):
    datamodule = VideoTextDataModule(corpus / "train.csv", num_frames=4, resolution=8, batch_size=3, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        totals = [sum(len(batch["caption"]) for batch in loader) for _epoch in range(2)]
    assert totals == [GOOD + len(BAD)] * 2
    assert datamodule.datasets["train"].num_skipped == len(BAD)  # distinct files, whichever worker met them


class TinyModel(LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.shapes = []

    def training_step(self, batch, batch_idx):
        self.shapes.append(tuple(batch["video"].shape))
        return (batch["video"].mean() - self.weight) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_config_composes_and_trains_in_lightning(corpus, tmp_path):
    # The config's manifest is ${paths.data_dir}/video_text/train.csv: put one there (absolute video paths).
    (tmp_path / "video_text").mkdir()
    rows = (corpus / "train.csv").read_text().splitlines()
    absolute = [rows[0]] + [f"{corpus / line.split(',')[0]},{line.split(',', 1)[1]}" for line in rows[1:]]
    (tmp_path / "video_text" / "train.csv").write_text("\n".join(absolute) + "\n")
    data = OmegaConf.load(CONFIGS / "video_text.yaml")
    config = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": data})
    datamodule = instantiate(config.data, num_frames=4, resolution=[16, 16], batch_size=2, num_workers=0)
    model = TinyModel()
    trainer = Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=datamodule)
    assert model.shapes == [(2, 4, 3, 16, 16)] * 2
