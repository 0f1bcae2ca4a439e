"""LoRA training in the JAX core: a run trains only the adapters from its `init_from` base, writes the adapter file at
each checkpoint, resumes exactly, and a step on a sharded mesh (adapters sharded like their base) equals one device."""

import jax
import numpy as np
import pytest
import torch

from contentv_common.config.model import named_model_config
from contentv_common.config.recipe import MeshConfig
from contentv_common.lora.adapters import load_adapters
from contentv_common.lora.training import adapter_file
from contentv_jax.multihost import to_host
from contentv_jax.sharding import make_mesh
from contentv_jax.train import get_trainer, initial_params, run
from contentv_torch_npu.loading import save_torch
from contentv_torch_npu.transformer import Transformer
from tests.jax.test_train import _batch, cached_set, tiny_recipe  # noqa: F401 (the cached set fixture)

LORA = {"lora.rank": 4, "lora.alpha": 8.0, "optimizer.warmup_steps": 0}


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@pytest.mark.slow
def test_lora_run_trains_adapters_only_and_resumes_exactly(cached_set, tmp_path):  # noqa: F811
    torch.manual_seed(1)
    save_torch(tmp_path / "base", Transformer(named_model_config("tiny")))
    opts = {**LORA, "init_from": str(tmp_path / "base"), "steps": 4, "checkpoint.interval": 2}
    straight_recipe = tiny_recipe(cached_set, "lora_straight", **opts)
    straight = run(straight_recipe, progress=False)
    split_recipe = tiny_recipe(cached_set, "lora_split", **opts)
    first = run(split_recipe, progress=False, stop_after=2)
    adapters_at_2, _, _ = load_adapters(adapter_file(split_recipe.checkpoint.dir))
    second = run(split_recipe, progress=False)
    assert [straight.losses[k] for k in range(4)] == [{**first.losses, **second.losses}[k] for k in range(4)]
    np.testing.assert_array_equal(_flat(straight.state["params"]), _flat(second.state["params"]))
    np.testing.assert_array_equal(_flat(straight.state["opt_state"]), _flat(second.state["opt_state"]))

    trainer = get_trainer(straight_recipe, make_mesh(MeshConfig(), jax.devices()[:1]))
    trained, frozen = trainer.trained(straight.state["params"])
    start = trainer.init_state(initial_params(straight_recipe))
    start_trained, start_frozen = trainer.trained(start["params"])
    np.testing.assert_array_equal(_flat(frozen), _flat(start_frozen))  # the init_from base, untouched
    assert not np.array_equal(_flat(trained), _flat(start_trained))
    # the EMA of the adapters (the tiny recipe keeps one)
    adapters, rank, alpha = load_adapters(adapter_file(straight_recipe.checkpoint.dir))
    assert (rank, alpha) == (4, 8.0) and len(adapters) == 42
    expected = trainer.adapters(straight.state)
    assert sorted(adapters) == sorted(expected) and all(np.array_equal(adapters[k], expected[k]) for k in adapters)
    assert any(not np.array_equal(adapters[k], adapters_at_2[k]) for k in adapters)  # rewritten at each checkpoint


@pytest.mark.slow
def test_lora_step_is_the_same_on_a_sharded_mesh(cached_set, rel_err):  # noqa: F811
    recipe = tiny_recipe(cached_set, "lora_mesh", **LORA)
    states = {}
    for shape in [(1, 1, 1, 1), (2, 4, 1, 1)]:
        trainer = get_trainer(recipe, make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))]))
        state = trainer.init_state()
        batch = trainer.device_batch(_batch(np.random.default_rng(0)))
        state, metrics = trainer.jitted_step(state, batch)(state, batch)
        states[shape] = (jax.device_get(state), float(metrics["loss"]), state)
    (ref, ref_loss, _), (got, loss, live) = states[(1, 1, 1, 1)], states[(2, 4, 1, 1)]
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    assert rel_err(_flat(got["params"]), _flat(ref["params"])) < 1e-6
    assert rel_err(_flat(got["opt_state"]), _flat(ref["opt_state"])) < 1e-6
    fc1 = live["params"]["blocks"]["ff"]["fc1"]
    assert "fsdp" in str(fc1["kernel"].sharding.spec) and "fsdp" in str(fc1["lora_a"].sharding.spec)
    assert fc1["lora_a"].addressable_shards[0].data.shape[1] == fc1["lora_a"].shape[1] // 4  # A [L, in / 4, rank]
    assert "fsdp" not in str(fc1["lora_b"].sharding.spec)  # B's output dim follows the kernel's (tensor axis)


def test_bf16_base_with_fp32_adapters(cached_set, tmp_path):  # noqa: F811
    """A bf16 base (bf16 compute) with fp32 adapters, optimizer state and EMA, its `init_from` read in bf16 (never
    whole in fp32 on the device); bf16 base with fp32 compute is a recipe error (the torch twin cannot run it)."""
    import pytest

    from contentv_common.errors import ConfigError

    torch.manual_seed(1)
    save_torch(tmp_path / "base", Transformer(named_model_config("tiny")))
    opts = {**LORA, "lora.base_dtype": "bfloat16", "init_from": str(tmp_path / "base")}
    recipe = tiny_recipe(cached_set, "lora_bf16", compute_dtype="bfloat16", **opts)
    read = jax.tree.leaves(initial_params(recipe))
    assert {x.dtype for x in read} == {np.dtype(jax.numpy.bfloat16)}
    state = get_trainer(recipe, make_mesh(MeshConfig(), jax.devices()[:1])).abstract_state()
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    assert {x.dtype for p, x in flat if str(p[-1].key).startswith("lora_")} == {np.dtype("float32")}
    assert {x.dtype for p, x in flat if not str(p[-1].key).startswith("lora_")} == {np.dtype(jax.numpy.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state["ema"])} == {np.dtype("float32")}
    with pytest.raises(ConfigError, match="lora.base_dtype: bfloat16 needs compute_dtype: bfloat16"):
        tiny_recipe(cached_set, "lora_bf16", **{**LORA, "lora.base_dtype": "bfloat16"})


def test_adapting_a_sharded_model_shards_its_adapters():
    """The reward runs' form (a live nnx.Module on a mesh): adapters placed like their base, starting values the
    training state's."""
    from flax import nnx

    from contentv_common.config.recipe import LoraConfig
    from contentv_jax import lora
    from contentv_jax.sharding import param_shardings
    from contentv_jax.transformer import Transformer

    mesh = make_mesh(MeshConfig(1, 4, 1, 1), jax.devices()[:4])
    model = Transformer(named_model_config("tiny"), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    nnx.replace_by_pure_dict(params, jax.device_put(pure, param_shardings(pure, mesh)))
    nnx.update(model, params)
    plan = lora.adapt_model(model, LoraConfig(rank=4), seed=3, mesh=mesh)
    fc1 = model.blocks.ff.fc1
    assert "fsdp" in str(fc1.kernel[...].sharding.spec) and "fsdp" in str(fc1.lora_a[...].sharding.spec)
    assert fc1.lora_a[...].addressable_shards[0].data.shape == (1, 8, 4)  # [L - 1, in / fsdp, rank]
    got = lora.canonical_adapters(plan, to_host(nnx.to_pure_dict(nnx.state(model, lora.LoraParam))))
    expected = lora.canonical_adapters(plan, lora.initial_tree(plan, 3))
    assert sorted(got) == sorted(expected) and all(np.array_equal(got[k], expected[k]) for k in got)
