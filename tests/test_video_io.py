import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.video_io import VideoReadError, read_video, video_info, write_grid_png, write_video


def ramp_video(num_frames: int = 12, height: int = 32, width: int = 48) -> np.ndarray:
    """Smooth content (codec-friendly) whose brightness encodes the frame index: frame k has mean ~ 30 + 15k."""
    x = np.linspace(0, 40, width, dtype=np.float32)[None, :, None]
    frames = np.stack([np.broadcast_to(30 + 15 * k + x, (height, width, 3)) for k in range(num_frames)])
    frames = frames.copy()
    frames[..., 1] *= 0.5  # not gray, so a channel swap would show
    return frames.round().astype(np.uint8)  # (T, H, W, 3)


def test_roundtrip_mp4(tmp_path):
    frames = ramp_video()
    path = write_video(tmp_path / "clip.mp4", torch.from_numpy(frames), fps=8)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp files left

    info = video_info(path)
    assert (info.num_frames, info.fps, info.height, info.width) == (12, 8.0, 32, 48)
    video = read_video(path)
    assert video.dtype == torch.uint8 and video.shape == (12, 32, 48, 3)
    assert (video.float() - torch.from_numpy(frames).float()).abs().mean() < 3  # h264 at crf 18 is near-lossless


def test_read_clip_with_start_and_stride(tmp_path):
    path = write_video(tmp_path / "clip.mp4", ramp_video())
    clip = read_video(path, num_frames=3, start=2, stride=4)  # frames 2, 6, 10
    brightness = clip[..., 0].float().mean(dim=(1, 2))
    expected = torch.tensor([30 + 15 * k + 20 for k in (2, 6, 10)], dtype=torch.float32)
    assert clip.shape == (3, 32, 48, 3)
    assert torch.allclose(brightness, expected, atol=3)


def test_odd_size_is_padded_to_even(tmp_path):
    frames = ramp_video(num_frames=5, height=33, width=31)
    video = read_video(write_video(tmp_path / "odd.mp4", frames))
    assert video.shape == (5, 34, 32, 3)  # yuv420p needs even sizes: last row/column repeated
    assert (video[:, :33, :31].float() - torch.from_numpy(frames).float()).abs().mean() < 3


def test_write_rejects_wrong_layout_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="channels last"):
        write_video(tmp_path / "bad.mp4", np.zeros((4, 3, 16, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "bad.mp4", np.zeros((4, 16, 16, 3), dtype=np.float32))
    assert list(tmp_path.iterdir()) == []


def test_read_errors_name_the_file_and_reason(tmp_path):
    with pytest.raises(VideoReadError, match="does not exist") as missing:
        read_video(tmp_path / "missing.mp4")
    assert missing.value.path == tmp_path / "missing.mp4"

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(VideoReadError, match="corrupt.mp4.*not a readable video"):
        read_video(corrupt)
    with pytest.raises(VideoReadError, match="not a readable video"):
        video_info(corrupt)

    path = write_video(tmp_path / "short.mp4", ramp_video(num_frames=4))
    with pytest.raises(VideoReadError, match="too short"):
        read_video(path, num_frames=3, stride=2)  # needs frames 0, 2, 4

    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(write_video(tmp_path / "full.mp4", ramp_video()).read_bytes()[:600])
    with pytest.raises(VideoReadError):
        read_video(truncated, num_frames=12)


def test_grid_png_layout(tmp_path):
    videos = np.zeros((3, 10, 16, 20, 3), dtype=np.uint8)
    for b in range(3):
        for t in range(10):
            videos[b, t] = 10 * t + b  # each tile's value says which video and frame it shows
    path = write_grid_png(tmp_path / "grid.png", videos, max_frames=4, gap=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * 16 + 2 * 2, 4 * 20 + 3 * 2, 3)
    frame_indices = [0, 3, 6, 9]  # 4 evenly spaced frames of 10
    for b in range(3):
        for column, t in enumerate(frame_indices):
            tile = grid[b * 18 : b * 18 + 16, column * 22 : column * 22 + 20]
            assert (tile == 10 * t + b).all()
    assert (grid[16:18] == 255).all() and (grid[:, 20:22] == 255).all()  # white gaps


def test_grid_png_with_short_videos(tmp_path):
    path = write_grid_png(tmp_path / "grid.png", [np.zeros((3, 8, 8, 3), np.uint8), np.zeros((12, 8, 8, 3), np.uint8)])
    assert Image.open(path).size == (8 * 8 + 7 * 2, 2 * 8 + 2)  # (W, H): 8 columns, 2 rows
