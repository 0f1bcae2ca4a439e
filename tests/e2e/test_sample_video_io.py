"""mp4 written with PyAV and read back: frame count, size, fps and (lossy) content."""

import numpy as np
import pytest

from contentv_common.data.video_io import read_video, write_video


def _gradient_video(frames: int, height: int, width: int) -> np.ndarray:
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    video = np.stack([x * 255 // width, y * 255 // height, (t * 40 + 30) % 256], axis=-1)
    return video.astype(np.uint8)


@pytest.mark.parametrize("frames", [1, 9])
def test_roundtrip(tmp_path, frames):
    video = _gradient_video(frames, 48, 64)
    path = write_video(tmp_path / "out" / "clip.mp4", video, fps=24)
    back, fps = read_video(path)
    assert back.shape == (frames, 48, 64, 3) and back.dtype == np.uint8
    assert fps == 24
    assert np.abs(back.astype(int) - video.astype(int)).mean() < 4
    assert [p.name for p in path.parent.iterdir()] == ["clip.mp4"], "no temporary file left behind"


def test_bad_frames_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 9, 8, 3), np.uint8))
    assert not list(tmp_path.iterdir())
