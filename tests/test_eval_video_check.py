"""Which generated videos count as finished (eval/video_check.py): a damaged, short or odd-sized file is deleted
(to be regenerated) and counted, temporary files of killed writes are removed, good files are kept untouched."""
from __future__ import annotations

import numpy as np
import pytest

from datamodules.video_io import write_video
from eval.generation import plan_jobs, video_path
from eval.video_check import check_videos, decoded_shape


def frames(num_frames: int, height: int = 16, width: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


@pytest.fixture()
def folder(tmp_path):
    """videos 0-5 of a 7-video protocol (9 frames, 16 x 24): 0, 1, 5 good; 2 cut to half its bytes; 3 has 5
    frames; 4 is 32 x 24; 6 absent. Plus the temporary files an interrupted writer leaves."""
    for index in (0, 1, 2, 5):
        write_video(video_path(tmp_path, index), frames(9, seed=index))
    write_video(video_path(tmp_path, 3), frames(5))
    write_video(video_path(tmp_path, 4), frames(9, height=32))
    path = video_path(tmp_path, 2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    videos = tmp_path / "videos"
    (videos / ".000006.k2j4x9_a.tmp.mp4").write_bytes(b"partial")  # datamodules.video_io.atomic_output's name
    (videos / "000003.mp4.tmp").write_bytes(b"partial")
    return tmp_path


def test_only_complete_videos_of_the_folders_size_are_finished(folder):
    kept = {i: video_path(folder, i).read_bytes() for i in (0, 1, 5)}
    report = check_videos(folder, plan_jobs([f"p{i}" for i in range(7)]), num_frames=9, progress=False)
    assert report.finished == 3 and report.frame_size == (16, 24)
    assert sorted(report.invalid) == [2, 3, 4]
    assert "5 frames, expected 9" in report.invalid[3] and "frame size 32x24" in report.invalid[4]
    assert sorted(report.stray_temp_files) == [".000006.k2j4x9_a.tmp.mp4", "000003.mp4.tmp"]
    assert sorted(p.name for p in (folder / "videos").iterdir()) == ["000000.mp4", "000001.mp4", "000005.mp4"]
    assert {i: video_path(folder, i).read_bytes() for i in (0, 1, 5)} == kept
    record = report.record()
    assert record["regenerated"] == 3 and record["stray_temp_files_removed"] == 2 and record["expected"] == 7


def test_a_second_check_finds_nothing_more(folder):
    jobs = plan_jobs([f"p{i}" for i in range(7)])
    check_videos(folder, jobs, num_frames=9, progress=False)
    again = check_videos(folder, jobs, num_frames=9, progress=False)
    assert again.finished == 3 and not again.invalid and not again.stray_temp_files


def test_decoded_shape_reports_why_a_file_is_unusable(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(2000))
    assert isinstance(decoded_shape(garbage), str)
    good = write_video(tmp_path / "good.mp4", frames(4, 15, 17))
    assert decoded_shape(good) == (4, 16, 18)  # odd sizes are padded to even by write_video
