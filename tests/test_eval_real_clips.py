"""Real UCF-101 clips for FVD statistics (datamodules.ucf101.real_clips) as the protocols use them: frame-stride
sampling, the skip report (how many videos, and why), and a clear ValueError when the split gives too few clips."""
from __future__ import annotations

import warnings

import pytest

from datamodules.base import UnreadableFileWarning
from datamodules.ucf101 import real_clips
from tests.dataset_layouts import decoded_levels, ucf101_video, write_ucf101

# fold 1 trains on videos 1, 2, 3 of each class (video 0 is in its test groups): 6 train videos for 2 classes
CLASSES = ("ApplyEyeMakeup", "Archery")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("ucf") / "UCF101"
    return write_ucf101(root, classes=CLASSES, videos_per_class=4, num_frames=24, size=(16, 16),
                        corrupt=[ucf101_video("Archery", 1)], short=[ucf101_video("Archery", 2)],
                        missing=[ucf101_video("ApplyEyeMakeup", 3)])


def draw(layout, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableFileWarning)
        return list(real_clips(layout.root, "train", 1, **kwargs))


def test_frame_stride_takes_every_kth_frame(layout):
    for clip in draw(layout, num_frames=6, num_clips=3, frame_stride=3, clip_sampling="first"):
        assert decoded_levels(clip) == [0, 3, 6, 9, 12, 15]


def test_the_report_counts_skipped_videos_by_reason(layout):
    report = {}
    clips = draw(layout, num_frames=8, num_clips=5, max_passes=2, report=report)
    assert len(clips) == 5 and report["videos"] == 6 and report["clips"] == 5 and report["passes"] == 2
    assert report["skipped"] == {"unreadable": 1, "too short": 1, "missing": 1}
    assert report["skipped_examples"]["missing"] == [ucf101_video("ApplyEyeMakeup", 3)]
    assert report["clip_fps"] == {"25": 5}
    strided = {}
    draw(layout, num_frames=4, num_clips=2, frame_stride=3, report=strided)
    assert strided["clip_fps"] == {"8.33333": 2}  # 25 fps files, every 3rd frame


def test_too_few_clips_within_the_passes_is_a_clear_value_error(layout):
    with pytest.raises(ValueError) as error:
        draw(layout, num_frames=8, num_clips=4, max_passes=1)  # 3 usable videos, one pass
    message = str(error.value)
    assert "UCF-101 train split (trainlist01.txt, 6 videos" in message and "only 3 of 4 real clips" in message
    assert "skipped 3 videos" in message and "1 too short" in message and "1 unreadable" in message
    assert "1 missing" in message


def test_no_clip_long_enough_is_a_value_error_even_without_a_pass_limit(layout):
    with pytest.raises(ValueError, match=r"only 0 of 2 real clips of 16 frames \(frame stride 2\).*4 too short"):
        draw(layout, num_frames=16, num_clips=2, frame_stride=2)  # spans 31 frames; the videos have 24
