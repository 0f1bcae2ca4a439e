"""data.text: online in JAX: the step encodes the captions' token ids with the frozen tiny text encoders and trains as
the cached text does (same losses, text dropout included), on one device and sharded (the encoders by
TEXT_PARAM_AXES); the encoders stay out of the train state, the optimizer and checkpoints, and resume is exact."""

import jax
import numpy as np
import pytest
from flax import nnx

from contentv_common.config.recipe import MeshConfig, load_recipe
from contentv_common.data.cache import LatentCache
from contentv_common.errors import ConfigError
from contentv_jax.data import StepBatches
from contentv_jax.sharding import make_mesh
from contentv_jax.text_encoders import tiny_text_encoders
from contentv_jax.train import get_trainer, run
from tests.narrow_model import NARROW
from tests.online_caches import TINY, build_caches, online_recipe

TOL = 1e-5


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return build_caches(tmp_path_factory.mktemp("online"), tiny_text_encoders(0))


def one_device():
    return make_mesh(MeshConfig(), jax.devices()[:1])


def dropped(recipe, steps) -> np.ndarray:
    """Which rows of the cached path's batches 0..steps-1 carry the empty prompt (text dropout)."""
    batches, cache = StepBatches(recipe), LatentCache(recipe.data.cache_dir, list(recipe.data.buckets))
    return np.stack([np.all(batches(k)["text"] == cache.empty_text[None], axis=(1, 2)) for k in range(steps)])


def test_online_trains_as_cached_frozen_and_resumes(caches, rel_err):
    cached = online_recipe(caches, "cached", "cached")
    online = online_recipe(caches, "online", "online")
    mask = dropped(cached, cached.steps)
    assert mask.any() and not mask.all(), "the compared steps must drop some captions and keep others"
    sample = LatentCache(caches / "online", list(online.data.buckets)).sample(0)
    assert set(sample) == {"latents"}  # the online cache holds no text
    want = run(cached, mesh=one_device(), progress=False).losses
    got = run(online, mesh=one_device(), progress=False)
    assert sorted(got.losses) == sorted(want) == [0, 1, 2]
    for k in want:
        assert rel_err(got.losses[k], want[k]) < TOL, (k, got.losses[k], want[k])
    # frozen: the train state (params, AdamW moments, EMA) and so the checkpoints are the cached run's, tree for tree
    trainer, plain = get_trainer(online, one_device()), get_trainer(cached, one_device())
    assert trainer.text_graphdef is not None and plain.text_graphdef is None
    assert jax.tree.structure(trainer.abstract_state()) == jax.tree.structure(plain.abstract_state())
    used, seeded = (
        jax.tree.leaves(t) for t in (trainer.text_params(), nnx.to_pure_dict(nnx.state(tiny_text_encoders(0).model)))
    )
    assert len(used) == len(seeded) > 0 and all(np.array_equal(a, b) for a, b in zip(used, seeded, strict=True))
    # resume from the step-2 checkpoint: the same losses as the straight run
    resumed = online_recipe(caches, "online", "resumed")
    first = run(resumed, mesh=one_device(), progress=False, stop_after=2)
    second = run(resumed, mesh=one_device(), progress=False)
    assert sorted(first.losses) == [0, 1] and sorted(second.losses) == [2]
    assert {**first.losses, **second.losses} == got.losses


def test_online_step_sharded_equals_one_device(caches, rel_err):
    """One AdamW step of the narrow model (38 heads, 333 text tokens) on 8 devices (fsdp 2, sequence 2, tensor 2), the
    text encoders split by TEXT_PARAM_AXES and the prompts over fsdp x sequence, against one device: the same loss
    and weight update."""
    narrow = NARROW | {"num_layers": 1, "joint_attention_dim": 48, "pooled_projection_dim": 24}  # the encoders' widths
    adamw = {"optimizer.eps": 10.0, "optimizer.lr": 10.0, "optimizer.weight_decay": 0.0}  # update ~ -lr g / eps
    recipe = online_recipe(caches, "online", "mesh", model=narrow, **adamw)
    host = StepBatches(recipe)(0)
    assert {"clip_l_ids", "clip_g_ids", "t5_ids"} <= set(host) and "text" not in host

    def one_step(mesh, params=None):
        trainer = get_trainer(recipe, mesh)
        state = trainer.init_state(params)
        initial = jax.device_get(state["params"])
        batch = trainer.device_batch(host)
        state, metrics = trainer.jitted_step(state, batch)(state, batch)
        return trainer, initial, jax.device_get(state["params"]), float(metrics["loss"])

    _, params, ref, ref_loss = one_step(one_device())
    mesh = make_mesh(MeshConfig(fsdp=2, sequence=2, tensor=2), jax.devices()[:8])
    trainer, _, got, loss = one_step(mesh, params)
    assert rel_err(loss, ref_loss) < TOL, (loss, ref_loss)

    def update(tree) -> np.ndarray:
        pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True)
        return np.concatenate([np.ravel(a - b) for a, b in pairs])

    assert rel_err(update(got), update(ref)) < TOL
    split = [a for a in jax.tree.leaves(trainer.text_params()) if a.addressable_shards[0].data.shape != a.shape]
    assert len(split) >= 10, "the text encoders' weights must be split over the mesh, not replicated"
    assert trainer.prompt_rows(4).spec[0] == ("data", "fsdp", "sequence")  # 4 prompts: one per fsdp x sequence rank


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.text": "online"}, "data.text: online needs text encoders"),
        ({"data.text": "sometimes"}, "data.text"),
        ({"data.text": "online", "data.encoders": "tiny", "eval.interval": 5}, "eval.interval: held-out"),
    ],
)
def test_online_recipe_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(TINY, overrides)
