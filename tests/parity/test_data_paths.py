"""The JAX data path (contentv_jax.data.StepBatches) and the torch one (DataLoader + step_inputs) give the same step:
same samples, timesteps, noise, loss weights and text dropout, for the whole batch and for each host/rank's slice."""

from pathlib import Path

import numpy as np
import pytest

from contentv_common.config.recipe import load_recipe
from contentv_common.data.build import build_cache
from contentv_common.data.cache import LatentCache
from contentv_common.data.synthetic import make_synthetic_set
from contentv_jax.data import StepBatches
from contentv_torch_npu.data import make_loader
from contentv_torch_npu.train import step_inputs
from tests.stand_in_encoders import StandInEncoders

TINY = Path(__file__).resolve().parents[2] / "tests" / "recipes" / "tiny.yaml"
BUCKETS = [
    {"width": 64, "height": 64, "frames": 9, "batch_size": 4},
    {"width": 96, "height": 64, "frames": 9, "batch_size": 4},
]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    manifest = make_synthetic_set(root / "set", num_videos=16, frames=12, fps=8, progress=False)
    overrides = {"data.manifest": str(manifest), "data.cache_dir": str(root / "cache"), "data.buckets": BUCKETS}
    overrides |= {"data.text_dropout": 0.5, "data.num_threads": 0, "seed": 3, "checkpoint.dir": str(root / "ckpt")}
    recipe = load_recipe(TINY, overrides)
    build_cache(manifest, root / "cache", StandInEncoders, list(recipe.data.buckets), 8, progress=False)
    return recipe


def _dropped(text: np.ndarray, empty: np.ndarray) -> np.ndarray:
    return np.all(text == empty[None], axis=(1, 2))


@pytest.mark.parametrize("ranks", [1, 2])
def test_jax_and_torch_draw_the_same_step(recipe, ranks):
    cache = LatentCache(recipe.data.cache_dir, list(recipe.data.buckets))
    masks = []
    for rank in range(ranks):
        jax_batches = StepBatches(recipe, shards=(rank, rank + 1, ranks))
        loader = iter(make_loader(cache, recipe.data, recipe.seed, 5, rank, ranks))  # resume at step 5
        for k in range(5, 11):
            ours = jax_batches(k)
            torch_batch = next(loader)
            assert torch_batch["batch_index"] == k
            theirs = step_inputs(recipe, torch_batch, (cache.empty_text, cache.empty_pooled))
            for name in ("latents", "noise", "sigmas", "weights", "text", "pooled"):
                got = getattr(theirs, name).numpy()
                assert got.dtype == ours[name].dtype and np.array_equal(got, ours[name]), (name, k, rank)
            mask = _dropped(ours["text"], cache.empty_text)
            assert np.array_equal(mask, _dropped(theirs.text.numpy(), cache.empty_text))
            assert np.array_equal(mask, np.all(ours["pooled"] == cache.empty_pooled[None], axis=1))
            assert len(ours["sigmas"]) == 4 // ranks
            masks.append(mask)
    masks = np.concatenate(masks)
    assert masks.any() and not masks.all(), "text_dropout 0.5 must drop some captions and keep others"
