"""The data path: manifest, decode at a target fps, buckets, deterministic batches, skipped files, the cache."""

import json

import numpy as np
import pytest

from contentv_common.config.recipe import BucketConfig
from contentv_common.data.buckets import (
    BucketBatchSampler,
    assign_bucket,
    available_frames,
    epoch_batches,
    host_slice,
)
from contentv_common.data.build import build_cache
from contentv_common.data.cache import LatentCache, cache_is_current, cache_settings
from contentv_common.data.decode import decode_clip
from contentv_common.data.manifest import read_manifest, write_manifest
from contentv_common.data.prepare import summary
from contentv_common.data.synthetic import make_synthetic_set, render, write_mp4
from contentv_common.errors import ClipError, ManifestError
from tests.stand_in_encoders import StandInEncoders

BUCKETS = [
    BucketConfig(64, 64, 9, 2),
    BucketConfig(96, 64, 9, 2),
    BucketConfig(64, 64, 5, 2),
    BucketConfig(64, 64, 1, 4),
]


def test_bucket_assignment():
    assert available_frames(1.5, 8.0, 8.0) == 12
    assert available_frames(1.0, 24.0, 8.0) == 8
    assert assign_bucket(640, 360, 12, False, BUCKETS) == 1  # widest aspect, longest clip that fits
    assert assign_bucket(300, 310, 12, False, BUCKETS) == 0
    assert assign_bucket(300, 310, 6, False, BUCKETS) == 2  # too short for 9 frames: shorter bucket
    assert assign_bucket(300, 310, 3, False, BUCKETS) is None
    assert assign_bucket(300, 310, 1, True, BUCKETS) == 3  # images only go to 1-frame buckets


def test_batches_are_deterministic_bucket_pure_and_sized():
    ids = [0] * 7 + [1] * 5 + [3] * 9
    sizes = [b.batch_size for b in BUCKETS]
    a = epoch_batches(ids, sizes, seed=1, epoch=0)
    assert a == epoch_batches(ids, sizes, seed=1, epoch=0)
    assert a != epoch_batches(ids, sizes, seed=2, epoch=0)
    assert a != epoch_batches(ids, sizes, seed=1, epoch=1)
    assert len(a) == 3 + 2 + 2
    for batch in a:
        buckets = {ids[i] for i in batch}
        assert len(buckets) == 1 and len(batch) == sizes[buckets.pop()]
    flat = [i for b in a for i in b]
    assert len(flat) == len(set(flat))
    sampler = BucketBatchSampler(ids, sizes, seed=1)
    assert [sampler.batch(k) for k in range(len(a))] == a
    assert sampler.batch(len(a)) == epoch_batches(ids, sizes, 1, 1)[0]
    assert list(sampler) == a
    assert host_slice([5, 6, 7, 8], 1, 2) == [7, 8]
    with pytest.raises(ValueError, match="enough samples"):
        BucketBatchSampler([0], sizes, seed=0)


def test_decode_resamples_fps_and_crops(tmp_path):
    video = render("square", "red", "right", 96, 64, 12, seed=0)
    write_mp4(tmp_path / "v.mp4", video, fps=8)
    clip = decode_clip(tmp_path / "v.mp4", fps=4, frames=5, width=64, height=64)
    assert clip.shape == (5, 64, 64, 3) and clip.dtype == np.uint8
    # at half the source rate, clip frame k is source frame 2k (centre crop of the 96-wide frame)
    for k in range(5):
        errors = [np.abs(clip[k].astype(float) - src[:, 16:80]).mean() for src in video]
        assert int(np.argmin(errors)) == 2 * k and errors[2 * k] < 3
    with pytest.raises(ClipError) as e:
        decode_clip(tmp_path / "v.mp4", fps=8, frames=13, width=64, height=64)
    assert e.value.reason == "too_short"


def test_manifest_errors_name_line_and_key(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"path": "a.mp4", "caption": "x"}\n{"path": "b.mp4", "caption": "y", "fps": -2}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:2: fps"):
        read_manifest(p)
    p.write_text('{"caption": "x"}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:1: path"):
        read_manifest(p)
    p.write_text('{"path": "a.mp4", "caption": 3}\n{"path": "b.mp4"}\n')  # kept, for the cache build to skip
    assert [e.problem for e in read_manifest(p)] == ["bad_caption", "bad_caption"]


def test_cache_skips_bad_files_and_reads_back(tmp_path, capsys):
    """Garbage bytes, an empty file, a too-short clip, a missing file and a non-string caption are skipped with their
    reasons, counted in the index and summarised one line per reason; the good clips read back."""
    manifest = make_synthetic_set(tmp_path / "set", num_videos=4, num_images=2, frames=12, fps=8, progress=False)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    (tmp_path / "set" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    (tmp_path / "set" / "empty.mp4").write_bytes(b"")
    write_mp4(tmp_path / "set" / "short.mp4", render("circle", "blue", "up", 64, 64, 3, 0), fps=8)
    rows += [
        {"path": "corrupt.mp4", "caption": "broken"},
        {"path": "empty.mp4", "caption": "zero bytes"},
        {"path": "short.mp4", "caption": "too short"},
        {"path": "missing.mp4", "caption": "gone"},
        {"path": rows[0]["path"], "caption": ["not", "a", "string"]},
    ]
    write_manifest(manifest, rows)
    cache_dir = tmp_path / "cache"
    encoders = CountingEncoders()
    index = build_cache(manifest, cache_dir, lambda: encoders, BUCKETS, fps=8, progress=False, batch=4)
    assert index.skip_counts == {"corrupt": 2, "too_short": 1, "missing": 1, "bad_caption": 1}
    assert len(index.samples) == 6
    lines = summary(index, str(cache_dir))
    assert lines[0].endswith("6 samples (float32)") and len(lines) == 5
    assert "skipped 2 corrupt, e.g. " in lines[2] and "corrupt.mp4" in lines[2]
    assert encoders.text_batches == [4, 2, 1], "captions encoded 4 at a time, then the empty prompt"
    assert sum(encoders.video_batches) == 6 and max(encoders.video_batches) > 1, "clips of one shape encoded together"
    assert [s["caption"] for s in index.samples] == [r["caption"] for r in rows[:6]]
    assert cache_is_current(cache_dir, cache_settings(manifest, BUCKETS, 8, ""))
    assert not cache_is_current(cache_dir, cache_settings(manifest, BUCKETS, 4, ""))
    cache = LatentCache(cache_dir, BUCKETS)
    assert sorted(set(cache.bucket_ids)) == [0, 1, 3]
    batch = cache.batch([i for i, b in enumerate(cache.bucket_ids) if b == 0])
    assert batch["latents"].shape == (2, 16, 3, 8, 8)
    assert batch["text"].shape == (2, 333, 48) and batch["pooled"].shape == (2, 24)  # 77 CLIP + 256 T5 tokens
    sizes = {f"{b.width}x{b.height}x{b.frames}": b for b in BUCKETS}
    for i, sample in enumerate(index.samples):  # each sample's latents are its own clip's, whatever its batch
        b = sizes[sample["bucket"]]
        clip = decode_clip(tmp_path / "set" / rows[i]["path"], 8, b.frames, b.width, b.height)
        expect = StandInEncoders().encode_video(clip[None])[0]
        np.testing.assert_allclose(cache.sample(i)["latents"], expect, rtol=1e-6)
    np.testing.assert_allclose(cache.empty_text, StandInEncoders().encode_text([""])[0][0])
    for i in (3, 5):  # each sample's text is its own caption's, batched or not
        np.testing.assert_allclose(cache.sample(i)["text"], StandInEncoders().encode_text([rows[i]["caption"]])[0][0])


class CountingEncoders(StandInEncoders):
    """Stand-in encoders that record how many captions each text call gets."""

    def __init__(self):
        super().__init__()
        self.text_batches: list[int] = []
        self.video_batches: list[int] = []

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        self.video_batches.append(len(frames))
        return super().encode_video(frames)

    def encode_text(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        self.text_batches.append(len(captions))
        return super().encode_text(captions)
