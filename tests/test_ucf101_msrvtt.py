"""UCF-101 and MSR-VTT in their official formats: parsing, splits, clips, skipping, captions, prompts, configs."""
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from datamodules.base import UnreadableFileWarning
from datamodules.msrvtt import (
    SPLIT_SIZES,
    MSRVTTDataModule,
    MSRVTTDataset,
    find_annotation,
    read_msrvtt_annotations,
    select_captions,
)
from datamodules.transforms import to_uint8
from datamodules.ucf101 import (
    DESCRIPTIVE_PROMPTS,
    UCF101_CLASSES,
    UCF101Dataset,
    class_caption,
    class_names,
    read_class_index,
    read_clip,
    read_descriptive_prompts,
    read_split,
    real_clips,
    train_class_distribution,
    ucf101_prompts,
    videos_per_class,
)
from tests.dataset_layouts import decoded_levels, ucf101_video, write_msrvtt, write_ucf101

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
NUM_FRAMES = 16
BROKEN = {  # in the train list of every fold (video 3 of a class is in no test group)
    ucf101_video("Archery", 3): "corrupt",
    ucf101_video("YoYo", 3): "short",
    ucf101_video("ApplyEyeMakeup", 3): "missing",
}


@pytest.fixture(scope="module", params=["subset_index", "full_index"])
def ucf(request, tmp_path_factory):
    """3 classes x 4 videos; classInd.txt lists the 3 classes or all 101. No broken files."""
    root = tmp_path_factory.mktemp(f"ucf_{request.param}")
    return write_ucf101(root, num_frames=NUM_FRAMES, full_class_index=request.param == "full_index")


@pytest.fixture(scope="module")
def broken_ucf(tmp_path_factory):
    by_kind = {kind: [v for v, k in BROKEN.items() if k == kind] for kind in ("corrupt", "short", "missing")}
    return write_ucf101(tmp_path_factory.mktemp("ucf_broken"), num_frames=NUM_FRAMES, **by_kind)


def skip_messages(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, UnreadableFileWarning)]


def named(messages: list[str]) -> set[str]:
    return {"/".join(Path(re.search(r"cannot read video (\S+):", m).group(1)).parts[-2:]) for m in messages}


# ------------------------------------------------------------------------------------------------- UCF-101 parsing


def test_class_list_is_the_official_one():
    assert len(UCF101_CLASSES) == len(set(UCF101_CLASSES)) == 101
    assert list(UCF101_CLASSES) == sorted(UCF101_CLASSES, key=str.lower)  # classInd.txt is case-insensitive sorted
    assert UCF101_CLASSES[0] == "ApplyEyeMakeup" and UCF101_CLASSES[-1] == "YoYo"
    assert UCF101_CLASSES.index("Shotput") == 78 and UCF101_CLASSES.index("SkateBoarding") == 79  # "79", "80"
    assert class_names() == list(UCF101_CLASSES)


def test_class_index_and_splits(ucf):
    index = read_class_index(ucf.root)
    assert {index[UCF101_CLASSES.index(c)] for c in ucf.classes} == set(ucf.classes)
    assert index[100] == "YoYo"  # official label, whether classInd lists 3 classes or 101
    names = class_names(ucf.root)
    assert len(names) == 101 and names[2] == "Archery"
    for fold in (1, 2, 3):
        train, test = read_split(ucf.root, "train", fold), read_split(ucf.root, "test", fold)
        assert train == ucf.expected("train", fold) and test == ucf.expected("test", fold)
        assert len(train) == 9 and len(test) == 3  # per class: 3 train, 1 test
        assert not {v for v, _ in train} & {v for v, _ in test}
        assert read_split(ucf.root, "all", fold) == train + test
    assert read_split(ucf.root, "test", 2)[0] == ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0)
    lines = (ucf.root / "ucfTrainTestlist" / "trainlist01.txt").read_bytes().split(b"\r\n")
    assert lines[0] == b"ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"  # the official format, CRLF included


def test_split_errors(ucf, tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        read_split(ucf.root, "val")
    with pytest.raises(ValueError, match="fold must be one of"):
        read_split(ucf.root, "train", fold=4)
    shutil.copytree(ucf.root / "ucfTrainTestlist", tmp_path / "ucfTrainTestlist")
    (tmp_path / "ucfTrainTestlist" / "trainlist01.txt").write_text("Archery/v_Archery_g08_c01.avi 1\n")
    with pytest.raises(ValueError, match="label 1 disagrees with classInd.txt \\(Archery is 3\\)"):
        read_split(tmp_path, "train", 1)
    (tmp_path / "ucfTrainTestlist" / "testlist01.txt").write_text("Parkour/v_Parkour_g01_c01.avi\n")  # no such class
    with pytest.raises(ValueError, match="testlist01.txt:1: expected"):
        read_split(tmp_path, "test", 1)


def test_train_class_distribution(ucf):
    counts = train_class_distribution(ucf.root, fold=1)
    assert counts.shape == (101,) and counts.sum() == 9
    assert counts[[0, 2, 100]].tolist() == [3, 3, 3] and np.count_nonzero(counts) == 3
    allocation = videos_per_class(10_000, counts)
    assert allocation.sum() == 10_000 and allocation[[0, 2, 100]].tolist() == [3334, 3333, 3333]
    assert videos_per_class(7, [1, 0, 2, 1]).tolist() == [2, 0, 3, 2]  # remainders .75, 0, .5, .75: ties to low
    official_like = np.arange(101) % 7 + 90  # uneven counts, as in trainlist01 (about 70-120 per class)
    allocation = videos_per_class(10_000, official_like)
    assert allocation.sum() == 10_000
    assert np.abs(allocation - 10_000 * official_like / official_like.sum()).max() < 1


def test_missing_dataset_says_what_and_where(tmp_path, ucf):
    expected = [
        r"UCF-101/<ClassName>/v_<ClassName>_gXX_cYY\.avi", r"classInd\.txt", r"trainlist0\{1,2,3\}\.txt",
        r"testlist0\{1,2,3\}\.txt", r"UCF101\.rar", r"UCF101TrainTestSplits-RecognitionTask\.zip",
        r"https://www\.crcv\.ucf\.edu/data/UCF101\.php",
    ]
    for call in (lambda: read_split(tmp_path), lambda: UCF101Dataset(tmp_path), lambda: next(real_clips(tmp_path))):
        with pytest.raises(FileNotFoundError) as error:
            call()
        assert all(re.search(pattern, str(error.value)) for pattern in expected), str(error.value)
    shutil.copytree(ucf.root / "ucfTrainTestlist", tmp_path / "ucfTrainTestlist")  # lists but no videos
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path / 'UCF-101'))} not found"):
        UCF101Dataset(tmp_path)


# --------------------------------------------------------------------------------------------------- UCF-101 clips


def test_dataset_items(ucf):
    dataset = UCF101Dataset(ucf.root, "train", 1, num_frames=4, resolution=(16, 16), frame_stride=2)
    assert len(dataset) == 9
    item = dataset[0]
    assert item["video"].shape == (4, 3, 16, 16) and item["video"].dtype == torch.float32
    assert -1 <= item["video"].min() <= item["video"].max() <= 1
    assert decoded_levels(to_uint8(item["video"])) == [0, 2, 4, 6]  # "first" clip, every 2nd frame
    assert (item["caption"], item["label"], item["is_image"]) == ("apply eye makeup", 0, False)
    assert item["fps"] == pytest.approx(12.5)  # 25 fps files, stride 2
    assert [dataset[i]["caption"] for i in (3, 8)] == ["archery", "yo yo"]
    assert [dataset[i]["label"] for i in (3, 8)] == [2, 100]
    descriptive = UCF101Dataset(ucf.root, "test", 1, num_frames=2, resolution=8, captions="descriptive")
    assert descriptive[0]["caption"] == "a person applying eye makeup in front of a mirror"


def test_clip_sampling(ucf):
    path = ucf.root / "UCF-101" / ucf101_video("Archery", 3)
    levels = lambda sampling, **kw: decoded_levels(read_clip(path, 4, 2, sampling, **kw)[0])  # noqa: E731
    assert levels("first") == [0, 2, 4, 6]
    assert levels("center") == [4, 6, 8, 10]  # 16 frames, span 7: starts 0..9, middle 4
    assert levels("uniform") == [0, 5, 10, 15]  # stride 5 spans the whole video
    assert levels("seeded", seed=3, key=11) == levels("seeded", seed=3, key=11)
    assert len({levels("seeded", seed=s, key=11)[0] for s in range(12)}) > 3
    torch.manual_seed(0)
    starts = {levels("random")[0] for _ in range(12)}
    assert len(starts) > 3 and min(starts) >= 0 and max(starts) <= 9
    clip, fps = read_clip(path, 4, 1)
    assert clip.dtype == torch.uint8 and clip.shape == (4, 32, 40, 3) and fps == 25
    with pytest.raises(ValueError, match="clip sampling must be one of"):
        read_clip(path, 4, sampling="middle")


def test_unreadable_videos_are_skipped_warned_and_counted(broken_ucf):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = UCF101Dataset(broken_ucf.root, "train", 1, num_frames=NUM_FRAMES, resolution=(8, 8))
        items = [dataset[i] for _ in range(2) for i in range(len(dataset))]
    messages = skip_messages(caught)
    assert all(item is not None and item["video"].shape == (NUM_FRAMES, 3, 8, 8) for item in items)
    assert named(messages) == set(BROKEN)
    assert dataset.num_skipped == len(messages) == len(BROKEN)  # distinct files, however often they were met
    assert messages[-1].endswith(f"skipped {len(BROKEN)} unreadable videos so far")
    assert any("too short: 2 frames, a clip needs 16" in m for m in messages)


def test_a_split_without_a_readable_video_says_so(tmp_path):
    layout = write_ucf101(tmp_path, classes=["Archery"], corrupt=[ucf101_video("Archery", 3)],
                          missing=[ucf101_video("Archery", j) for j in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        with pytest.raises(ValueError) as error:
            UCF101Dataset(layout.root, "train", 1, num_frames=4, resolution=8)
    assert str(error.value).startswith(
        f"no readable file in {layout.root / 'ucfTrainTestlist' / 'trainlist01.txt'}: all 3 rows are unreadable "
        "(3 of 3 rows found unreadable so far), e.g. cannot read video"
    )


def test_real_clips_are_deterministic(ucf):
    def collect(**kw):
        return [decoded_levels(c) + [int(c[0, 0, 0, 2])] for c in real_clips(ucf.root, "train", 1, 4, **kw)]

    first = collect(num_clips=20, seed=0)
    assert len(first) == 20 and collect(num_clips=20, seed=0) == first
    assert collect(num_clips=7, seed=0) == first[:7]  # a shorter request is a prefix
    assert collect(num_clips=20, seed=1) != first
    assert len({tuple(c) for c in first}) > 9  # 9 videos: later passes take other clips
    videos = {c[-1] for c in first[:9]}  # blue channel identifies the video
    assert len(videos) == 9  # the first pass visits every video once
    assert len(collect(seed=0)) == 9  # num_clips None: one per video
    clip = next(real_clips(ucf.root, "test", 2, num_frames=5, resolution=(16, 16)))
    assert clip.dtype == torch.uint8 and clip.shape == (5, 16, 16, 3)
    # the "seeded" dataset clip of a video is real_clips' first-pass clip of it
    dataset = UCF101Dataset(ucf.root, "train", 1, num_frames=4, resolution=(32, 40), clip_sampling="seeded")
    by_video = {int(c[0, 0, 0, 2]): c for c in real_clips(ucf.root, "train", 1, 4, seed=0)}
    for i in range(len(dataset)):
        frames = to_uint8(dataset[i]["video"])
        assert torch.equal(frames, by_video[int(frames[0, 0, 0, 2])])


def test_real_clips_skip_unreadable_once(broken_ucf):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clips = list(real_clips(broken_ucf.root, "train", 1, num_frames=8, num_clips=30, seed=0))
    assert len(clips) == 30 and all(c.shape == (8, 32, 40, 3) for c in clips)
    messages = skip_messages(caught)
    assert named(messages) == set(BROKEN) and len(messages) == len(BROKEN)
    assert messages[-1].endswith("skipped 3 unreadable videos so far")


def test_file_name_case_differences_are_tolerated(tmp_path):
    # Official quirk: class folder HandstandPushups holds v_HandStandPushups_*.avi
    layout = write_ucf101(tmp_path, classes=["HandstandPushups"], videos_per_class=4, num_frames=8)
    relative = layout.videos[0]
    original = tmp_path / "UCF-101" / relative
    original.rename(original.with_name(original.name.replace("HandstandPushups", "HandStandPushups")))
    dataset = UCF101Dataset(tmp_path, "all", 1, num_frames=8, resolution=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadableFileWarning)
        assert all(dataset[i]["label"] == 36 for i in range(len(dataset)))
    assert dataset.num_skipped == 0


def test_datamodule_from_config(ucf, tmp_path):
    (tmp_path / "UCF101").symlink_to(ucf.root)
    config = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(CONFIGS / "ucf101.yaml")})
    assert config.data.root == str(tmp_path / "UCF101")
    datamodule = instantiate(
        config.data, num_frames=4, resolution=[16, 16], batch_size=4, num_workers=0, val_split="test"
    )
    batches = list(datamodule.train_dataloader())
    assert [len(b["caption"]) for b in batches] == [4, 4, 1]
    assert batches[0]["video"].shape == (4, 4, 3, 16, 16) and batches[0]["label"].dtype == torch.long
    assert sorted(l for b in batches for l in b["label"].tolist()) == [0] * 3 + [2] * 3 + [100] * 3
    val = next(iter(datamodule.val_dataloader()))
    assert val["caption"] == ["apply eye makeup", "archery", "yo yo"]


# ------------------------------------------------------------------------------------------------------ prompts


def test_descriptive_prompt_file():
    lines = DESCRIPTIVE_PROMPTS.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == 101  # exactly 101 lines, newline-terminated
    rows = [line.split("\t") for line in lines[:-1]]
    assert all(len(row) == 2 and row[1] == row[1].strip() != "" for row in rows)
    assert tuple(name for name, _ in rows) == UCF101_CLASSES
    assert rows[0] == ["ApplyEyeMakeup", "a person applying eye makeup in front of a mirror"]
    assert len({prompt for _, prompt in rows}) == 101
    descriptive = ucf101_prompts("descriptive")
    assert descriptive == [prompt for _, prompt in rows]
    names = ucf101_prompts("class_name")
    assert len(names) == 101 and names[:3] == ["apply eye makeup", "apply lipstick", "archery"]
    with pytest.raises(ValueError, match="kind must be"):
        ucf101_prompts("label")


def test_prompt_file_order_is_checked(tmp_path):
    lines = DESCRIPTIVE_PROMPTS.read_text(encoding="utf-8").splitlines()
    (tmp_path / "swapped.txt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match="line 1 is 'ApplyLipstick', expected 'ApplyEyeMakeup'"):
        read_descriptive_prompts(tmp_path / "swapped.txt")
    (tmp_path / "short.txt").write_text("\n".join(lines[:100]) + "\n")
    with pytest.raises(ValueError, match="has 100 lines"):
        read_descriptive_prompts(tmp_path / "short.txt")


@pytest.mark.parametrize(
    ("name", "caption"),
    [("ApplyEyeMakeup", "apply eye makeup"), ("YoYo", "yo yo"), ("RockClimbingIndoor", "rock climbing indoor"),
     ("Skijet", "skijet"), ("TaiChi", "tai chi"), ("CleanAndJerk", "clean and jerk")],
)
def test_class_caption(name, caption):
    assert class_caption(name) == caption


# ------------------------------------------------------------------------------------------------------ MSR-VTT

TEST_IDS = (7010, 7011, 7012, 7013, 8000, 9999)


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory):
    """videos/all layout with separate test / train_val jsons; video7012 corrupt, video7013 too short."""
    return write_msrvtt(
        tmp_path_factory.mktemp("msrvtt"), TEST_IDS, captions_per_video=5, num_frames=12, corrupt=[7012], short=[7013]
    )


def test_annotations(msrvtt):
    test = read_msrvtt_annotations(msrvtt.root / "test_videodatainfo.json")
    assert list(test) == [f"video{n}" for n in TEST_IDS]
    assert test["video8000"] == [f"video 8000 caption {k}" for k in range(5)]  # file order, sentences interleaved
    train_val = msrvtt.root / "train_val_videodatainfo.json"
    assert list(read_msrvtt_annotations(train_val, "train")) == ["video0", "video1", "video2"]
    assert list(read_msrvtt_annotations(train_val, "val")) == ["video6513"]
    assert len(read_msrvtt_annotations(train_val, None)) == 4
    with pytest.raises(ValueError, match="no videos of split 'test'; its splits are \\['train', 'validate'\\]"):
        read_msrvtt_annotations(train_val, "test")
    assert SPLIT_SIZES == {"train": 6513, "validate": 497, "test": 2990}


def test_caption_selection_is_seeded_and_independent_of_the_subset(msrvtt):
    test = read_msrvtt_annotations(msrvtt.root / "test_videodatainfo.json")
    chosen = select_captions(test, seed=0)
    assert [v for v, _ in chosen] == list(test) and select_captions(test, seed=0) == chosen
    for video_id, caption in chosen:  # the documented rule
        pick = int(np.random.default_rng([0, int(video_id[5:])]).integers(5))
        assert caption == test[video_id][pick]
    subset = {v: test[v] for v in ("video9999", "video7011")}
    assert dict(select_captions(subset, seed=0)) == {v: dict(chosen)[v] for v in subset}
    reordered = dict(reversed(list(test.items())))
    assert dict(select_captions(reordered, seed=0)) == dict(chosen)
    other_seeds = [dict(select_captions(test, seed=s)) for s in range(1, 6)]
    assert any(choice != dict(chosen) for choice in other_seeds)
    assert select_captions(test, rule="first")[0] == ("video7010", "video 7010 caption 0")
    with pytest.raises(ValueError, match="rule must be one of"):
        select_captions(test, rule="random")


def test_dataset_skips_unreadable_and_uses_the_seeded_caption(msrvtt):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = MSRVTTDataset(msrvtt.root, "test", num_frames=4, resolution=(16, 16), frame_stride=2)
        items = [dataset[i] for _ in range(2) for i in range(len(dataset))]
    assert len(dataset) == len(TEST_IDS)
    item = dataset[0]
    assert item["video"].shape == (4, 3, 16, 16) and item["video_id"] == "video7010"
    assert decoded_levels(to_uint8(item["video"])) == [0, 2, 4, 6]
    assert item["fps"] == pytest.approx(7.5) and item["is_image"] is False
    annotations = read_msrvtt_annotations(msrvtt.root / "test_videodatainfo.json")
    assert item["caption"] == dict(select_captions(annotations))["video7010"]
    messages = skip_messages(caught)
    assert {Path(re.search(r"cannot read video (\S+):", m).group(1)).name for m in messages} == {
        "video7012.mp4", "video7013.mp4"
    }
    assert dataset.num_skipped == len(messages) == 2
    assert all(item["video_id"] not in ("video7012", "video7013") for item in items)


def test_training_reads_a_random_caption_of_the_video(msrvtt):
    dataset = MSRVTTDataset(msrvtt.root, "train", num_frames=2, resolution=8, captions="random")
    torch.manual_seed(0)
    seen = {dataset[0]["caption"] for _ in range(20)}
    assert seen <= set(msrvtt.captions["video0"]) and len(seen) >= 3


def test_original_release_layout_and_combined_json(tmp_path):
    layout = write_msrvtt(tmp_path, (7010, 9999), train_ids=(5, 6600), video_layout="split", combined_json=True)
    assert (tmp_path / "TestVideo" / "video9999.mp4").is_file()
    assert (tmp_path / "TrainValVideo" / "video5.mp4").is_file()
    assert find_annotation(tmp_path, "test") == tmp_path / "MSRVTT_data.json"
    test = MSRVTTDataset(tmp_path, "test", num_frames=2, resolution=8)
    assert [test[i]["video_id"] for i in range(2)] == ["video7010", "video9999"]
    validate = MSRVTTDataset(tmp_path, "val", num_frames=2, resolution=8, captions="first")
    assert validate[0]["caption"] == layout.captions["video6600"][0]


def test_missing_msrvtt_says_what_and_where(tmp_path, msrvtt):
    for call in (lambda: MSRVTTDataset(tmp_path), lambda: find_annotation(tmp_path, "test")):
        with pytest.raises(FileNotFoundError) as error:
            call()
        message = str(error.value)
        for needle in ("MSR-VTT 2016", "test_videodatainfo.json", "videos/all", "TrainValVideo", "MSRVTT.zip",
                       "CLIP4Clip", "frozen-in-time", "Microsoft Research"):
            assert needle in message, message
    with pytest.raises(FileNotFoundError, match="MSR-VTT annotation .* not found.*test_videodatainfo.json"):
        read_msrvtt_annotations(tmp_path / "test_videodatainfo.json")
    shutil.copy(msrvtt.root / "test_videodatainfo.json", tmp_path)  # annotations but no videos
    with pytest.raises(FileNotFoundError, match="no video folder.*videos/all.*TrainValVideo"):
        MSRVTTDataset(tmp_path)
    (tmp_path / "TestVideo").mkdir()
    (tmp_path / "TestVideo" / "video7010.mp4").write_bytes(b"")  # one of six present, and empty: nothing to read
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError) as error:
            MSRVTTDataset(tmp_path)
    assert any("5 of 6 videos are in none of" in str(w.message) for w in caught)
    assert str(error.value).startswith(
        f"no readable file in {tmp_path / 'test_videodatainfo.json'}: all 6 rows are unreadable (6 of 6 rows found"
    )
    assert len(skip_messages(caught)) == 6


def test_msrvtt_datamodule_from_config(msrvtt, tmp_path):
    (tmp_path / "MSRVTT").symlink_to(msrvtt.root)
    config = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(CONFIGS / "msrvtt.yaml")})
    datamodule = instantiate(
        config.data, num_frames=4, resolution=[16, 16], batch_size=2, num_workers=0, val_split="test"
    )
    assert isinstance(datamodule, MSRVTTDataModule)
    batches = list(datamodule.train_dataloader())
    assert [len(b["caption"]) for b in batches] == [2, 1]  # train: video0, video1, video2
    assert batches[0]["video"].shape == (2, 4, 3, 16, 16)
    pairs = [(caption, video_id) for b in batches for caption, video_id in zip(b["caption"], b["video_id"])]
    assert all(caption.startswith(f"video {int(video_id[5:])} caption") for caption, video_id in pairs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        val = list(datamodule.val_dataloader())
    assert sum(len(b["caption"]) for b in val) == len(TEST_IDS)  # unreadable ones replaced, batches stay full
