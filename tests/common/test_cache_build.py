"""The cache build: resumable after SIGKILL, one build per cache dir, stale caches rebuilt, bfloat16 records, a
manifest without a usable clip refused before any encoder loads."""

import fcntl
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from contentv_common.config.recipe import BucketConfig
from contentv_common.data.build import build_cache
from contentv_common.data.cache import LatentCache, cache_is_current, cache_settings, read_index
from contentv_common.data.manifest import write_manifest
from contentv_common.data.record import from_bytes, to_bytes
from contentv_common.data.synthetic import make_synthetic_set
from contentv_common.errors import DataError
from tests.stand_in_encoders import StandInEncoders

ROOT = Path(__file__).resolve().parents[2]
BUCKETS = [BucketConfig(64, 64, 9, 2), BucketConfig(96, 64, 9, 2)]
KILLED_BUILD = """
import os, signal, sys
from contentv_common.config.recipe import BucketConfig
from contentv_common.data.build import build_cache
from tests.stand_in_encoders import StandInEncoders

class KilledAtCall(StandInEncoders):
    calls = 0

    def encode_video(self, frames):
        KilledAtCall.calls += 1
        if KilledAtCall.calls == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode_video(frames)

buckets = [BucketConfig(64, 64, 9, 2), BucketConfig(96, 64, 9, 2)]
build_cache(sys.argv[1], sys.argv[2], KilledAtCall, buckets, 8, chunk_size=2, progress=False)
"""


class CountingEncoders(StandInEncoders):
    """Stand-in encoders that count the clips they encode, and fail on the call that holds clip `fail_at` (a crash
    mid-build)."""

    def __init__(self, fail_at: int = 0):
        super().__init__()
        self.videos, self.fail_at = 0, fail_at

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        self.videos += len(frames)
        if self.videos - len(frames) < self.fail_at <= self.videos:
            raise RuntimeError("encoder crashed")
        return super().encode_video(frames)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("set")
    return make_synthetic_set(root, num_videos=8, num_images=0, frames=12, fps=8, progress=False)


def cache_bytes(cache_dir: Path) -> dict[str, bytes]:
    """index.json and every file of the data folder it names."""
    data = cache_dir / read_index(cache_dir).data
    return {"index.json": (cache_dir / "index.json").read_bytes()} | {p.name: p.read_bytes() for p in data.iterdir()}


def test_a_killed_build_resumes_without_re_encoding_and_ends_equal(manifest, tmp_path):
    """SIGKILL at the 6th clip (4 chunks of 2): chunks 0 and 1 are done and not encoded again; the dead build's lock
    is taken over at once; the result equals an uninterrupted build byte for byte."""
    cache = tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(manifest), str(cache), "6"], cwd=ROOT, timeout=120)
    assert killed.returncode == -9
    assert not (cache / "index.json").exists()  # a killed build never reads as complete
    assert (cache / ".lock.0").read_text().startswith("pid ")  # the dead holder's lock file stays
    encoders = CountingEncoders()
    start = time.monotonic()
    build_cache(manifest, cache, lambda: encoders, BUCKETS, 8, chunk_size=2, progress=False)
    assert time.monotonic() - start < 30  # the lock was free: no wait
    assert encoders.videos == 4  # chunks 2 and 3 only
    whole = tmp_path / "whole"
    build_cache(manifest, whole, StandInEncoders, BUCKETS, 8, chunk_size=2, progress=False)
    assert cache_bytes(cache) == cache_bytes(whole)
    assert sorted(p.name for p in cache.iterdir()) == [".lock.0", read_index(cache).data, "index.json"]


def test_a_second_build_waits_for_the_lock(manifest, tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    with open(cache / ".lock.0", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        other = threading.Thread(target=build_cache, args=(manifest, cache, StandInEncoders, BUCKETS, 8))
        other.start()
        time.sleep(1.0)
        assert other.is_alive() and not (cache / "index.json").exists()
        assert "another build of this cache holds the lock" in capsys.readouterr().out
    other.join(timeout=60)
    assert not other.is_alive() and len(read_index(cache).samples) == 8


def test_a_stale_cache_is_rebuilt_and_stays_readable_until_then(manifest, tmp_path):
    """A build of new settings that crashes leaves the previous cache current and readable; the next one resumes
    from the crashed one's finished chunks, commits, and removes the old data."""
    cache = tmp_path / "cache"
    build_cache(manifest, cache, StandInEncoders, BUCKETS, 8, chunk_size=2, progress=False)
    old = read_index(cache).data
    before = LatentCache(cache, BUCKETS).sample(5)
    crashing = CountingEncoders(fail_at=4)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        build_cache(manifest, cache, lambda: crashing, BUCKETS, 8, chunk_size=3, progress=False)
    assert cache_is_current(cache, cache_settings(manifest, BUCKETS, 8, "", "float32", 2))
    np.testing.assert_array_equal(LatentCache(cache, BUCKETS).sample(5)["latents"], before["latents"])
    encoders = CountingEncoders()
    build_cache(manifest, cache, lambda: encoders, BUCKETS, 8, chunk_size=3, progress=False)
    assert encoders.videos == 5  # chunk 0 (3 clips) was done before the crash
    assert cache_is_current(cache, cache_settings(manifest, BUCKETS, 8, "", "float32", 3))
    assert not (cache / old).exists() and not list(cache.glob(".build-*"))
    np.testing.assert_array_equal(LatentCache(cache, BUCKETS).sample(5)["latents"], before["latents"])


def test_bfloat16_records_round_to_nearest_and_read_as_float32(manifest, tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    record = to_bytes({"latents": x}, "bfloat16")
    back = from_bytes(record, "bfloat16")["latents"]
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    big = {"latents": np.zeros((40, 100), np.float32)}
    assert len(to_bytes(big, "bfloat16")) < 0.55 * len(to_bytes(big, "float32"))  # 2 bytes a value, and a header
    build_cache(manifest, tmp_path / "bf16", StandInEncoders, BUCKETS, 8, cache_dtype="bfloat16", progress=False)
    build_cache(manifest, tmp_path / "fp32", StandInEncoders, BUCKETS, 8, progress=False)
    bf16, fp32 = LatentCache(tmp_path / "bf16", BUCKETS), LatentCache(tmp_path / "fp32", BUCKETS)
    for i in (0, 7):
        for name, value in bf16.sample(i).items():
            expect = fp32.sample(i)[name].astype(ml_dtypes.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(value, expect, err_msg=name)
    np.testing.assert_array_equal(bf16.empty_text, fp32.empty_text.astype(ml_dtypes.bfloat16).astype(np.float32))


def unusable_manifest(folder: Path) -> Path:
    (folder / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video" * 10)
    (folder / "empty.mp4").write_bytes(b"")
    rows = [{"path": "garbage.mp4", "caption": "a"}, {"path": "empty.mp4", "caption": "b"}]
    return write_manifest(folder / "m.jsonl", [*rows, {"path": "garbage.mp4", "caption": 7}])


def test_no_usable_clip_is_refused_before_the_encoders_load(tmp_path):
    def never() -> StandInEncoders:
        raise AssertionError("the encoders were loaded")

    with pytest.raises(DataError, match=r"m.jsonl: no usable clip among its 3 entries \(1 bad_caption, 2 corrupt\)"):
        build_cache(unusable_manifest(tmp_path), tmp_path / "cache", never, BUCKETS, 8)
    cmd = [sys.executable, "tools/prepare_data.py", "--no-progress", f"data.manifest={tmp_path / 'm.jsonl'}"]
    done = subprocess.run([*cmd, f"data.cache_dir={tmp_path / 'cli'}"], cwd=ROOT, capture_output=True, text=True)
    errors = [line for line in done.stderr.splitlines() if "prepare_data" in line]
    assert done.returncode == 2 and len(errors) == 1 and "no usable clip" in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "cli" / "index.json").exists()


def test_a_cache_of_the_older_layout_is_rebuilt(manifest, tmp_path):
    cache = tmp_path / "cache"
    (cache / "samples").mkdir(parents=True)
    (cache / "samples" / "000000.safetensors").write_bytes(b"old")
    (cache / "index.json").write_text(json.dumps({"samples": [], "skipped": [], "settings": {}}))
    with pytest.raises(DataError, match="older one-file-per-sample layout"):
        LatentCache(cache, BUCKETS)
    build_cache(manifest, cache, StandInEncoders, BUCKETS, 8, progress=False)
    assert len(LatentCache(cache, BUCKETS)) == 8 and not (cache / "samples").exists()
