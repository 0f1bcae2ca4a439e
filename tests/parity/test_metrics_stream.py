"""One metrics stream per run, the same in both backends: metrics.jsonl lines with the same fields, validation
(recipe `eval`) on held-out samples logged beside them, and held-out samples never trained on."""

import json
from pathlib import Path

import numpy as np
import pytest

from contentv_common.config.recipe import load_recipe
from contentv_common.data.build import build_cache
from contentv_common.data.cache import LatentCache
from contentv_common.data.synthetic import make_synthetic_set
from contentv_common.training.metrics import FIELDS
from contentv_jax.data import StepBatches
from tests.stand_in_encoders import StandInEncoders

TINY = Path(__file__).resolve().parents[2] / "tests" / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    manifest = make_synthetic_set(root / "set", num_videos=12, sizes=((64, 64),), frames=12, fps=8, progress=False)
    buckets = [{"width": 64, "height": 64, "frames": 9, "batch_size": 2}]
    data = {"manifest": str(manifest), "cache_dir": str(root / "cache"), "encoders": "fake", "buckets": buckets}
    data |= {"num_threads": 0, "fps": 8}
    build_cache(
        manifest, root / "cache", StandInEncoders, list(load_recipe(TINY, {"data": data}).data.buckets), 8, "fake"
    )
    return data


def _recipe(data, folder):
    overrides = {"data": data, "steps": 4, "compute_dtype": "float32", "log_dir": str(folder / "logs")}
    overrides |= {"checkpoint": {"dir": str(folder / "ckpt"), "interval": 4}, "optimizer.warmup_steps": 2}
    return load_recipe(TINY, overrides | {"eval": {"interval": 2, "timesteps": [200, 800], "samples": 2}})


def _lines(folder):
    return [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_both_backends_write_one_stream_with_the_same_fields(dataset, tmp_path):
    from contentv_jax.train import run as run_jax
    from contentv_torch_npu.train import run as run_torch

    records = []
    run_jax(_recipe(dataset, tmp_path / "jax"), progress=False, on_step=records.append)
    run_torch(_recipe(dataset, tmp_path / "torch"), device="cpu", progress=False)
    jax_lines, torch_lines = _lines(tmp_path / "jax"), _lines(tmp_path / "torch")
    for lines in (jax_lines, torch_lines):
        steps = [r for r in lines if "eval" not in r]
        assert [r["step"] for r in steps] == [0, 1, 2, 3], "one line per step, no duplicates"
        assert all(tuple(r) == FIELDS for r in steps)
        evals = [r["eval"] for r in lines if "eval" in r]
        assert [e["step"] for e in evals] == [2, 4] and all(set(e) == {"step", "loss", "t200", "t800"} for e in evals)
        assert (tmp_path / "jax" / "logs" / "tensorboard").is_dir()
    assert [r["loss"] for r in records] == [r["loss"] for r in jax_lines if "eval" not in r]  # on_step: same record
    # each backend initialises its own weights, so losses differ; the schedule and the record layout do not
    assert [r["lr"] for r in jax_lines if "eval" not in r] == [r["lr"] for r in torch_lines if "eval" not in r]
    assert all(np.isfinite(r["eval"]["loss"]) and r["eval"]["loss"] > 0 for r in jax_lines + torch_lines if "eval" in r)


def test_held_out_samples_are_never_trained_on(dataset, tmp_path):
    recipe = _recipe(dataset, tmp_path)
    held = LatentCache(recipe.data.cache_dir, list(recipe.data.buckets)).hold_out(2, recipe.seed)
    batches = StepBatches(recipe)
    assert batches.held_out == held and len(held) == 2
    seen = {i for k in range(40) for i in batches.sampler.batch(k)}
    assert not seen & set(held) and len(seen) == 10
    with pytest.raises(ValueError, match="eval.samples=12 would hold out all 12"):
        LatentCache(recipe.data.cache_dir, list(recipe.data.buckets)).hold_out(12, 0)
    np.testing.assert_array_equal(batches.cache.bucket_ids, [-1 if i in held else 0 for i in range(12)])
