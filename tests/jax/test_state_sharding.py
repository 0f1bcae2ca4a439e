"""The JAX train state is ZeRO-3: weights, AdamW moments and EMA sharded over fsdp x sequence (and over data with
`mesh.shard_data`), and a checkpoint saved on one layout restores onto another, value for value. The narrow model:
38 heads, 333 text tokens."""

import dataclasses

import jax
import numpy as np
import pytest

from contentv_common.config.recipe import MeshConfig, load_recipe
from contentv_jax.checkpointing import Checkpointer
from contentv_jax.memory_plan import argument_bytes
from contentv_jax.sharding import make_mesh
from contentv_jax.train import Trainer
from tests.narrow_model import NARROW

TINY = "tests/recipes/tiny.yaml"


def _trainer(tmp_path, mesh: MeshConfig) -> Trainer:
    overrides = {"model": NARROW, "checkpoint.dir": str(tmp_path / "ckpt")}
    overrides["data.buckets"] = [{"width": 64, "height": 64, "frames": 9, "batch_size": 8}]
    recipe = dataclasses.replace(load_recipe(TINY, overrides), mesh=mesh)
    return Trainer(recipe, make_mesh(mesh, jax.devices()[: int(np.prod(mesh.shape))]))


def _flat(tree) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize(
    "mesh, shards",
    [
        (MeshConfig(fsdp=2, sequence=4), 8),  # ZeRO-3 over fsdp x sequence
        (MeshConfig(data=2, fsdp=2, sequence=2), 4),  # replicated over data (hybrid sharding)
        (MeshConfig(data=2, fsdp=2, sequence=2, shard_data=True), 8),  # and over data too
    ],
)
def test_state_is_split_over_every_axis_that_splits_the_work(tmp_path, mesh, shards):
    state = _trainer(tmp_path, mesh).abstract_state()
    for name in ("params", "opt_state", "ema"):
        whole = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(state[name]))
        per_device = argument_bytes(state[name])
        # norm scales and biases (whole on every device) are under 2% of the narrow model
        assert whole / shards <= per_device < 1.02 * whole / shards + 2**16, (name, whole / per_device)
    kernel = state["params"]["blocks"]["attn"]["to_q"]["kernel"]  # [layers, width, heads x head_dim]
    assert kernel.sharding.shard_shape(kernel.shape)[1] * shards == kernel.shape[1]


@pytest.mark.slow
def test_a_checkpoint_restores_onto_other_layouts(tmp_path):
    """Saved on fsdp 2 x sequence 4 (state in 8 shards), restored onto data 2 x fsdp 2 x sequence 2 with the state
    over data too, onto the same mesh replicated over data, and onto one device: every leaf equal, on the target's
    shardings."""
    source = _trainer(tmp_path, MeshConfig(fsdp=2, sequence=4))
    state = source.init_state()
    state = {**state, "step": state["step"] + 3}
    saved = {k: np.asarray(jax.device_get(v)) for k, v in _flat(state).items()}
    ckpt = Checkpointer(source.recipe.checkpoint)
    ckpt.save(3, state, {"position": 3})
    ckpt.close()
    for mesh in (MeshConfig(data=2, fsdp=2, sequence=2, shard_data=True), MeshConfig(data=2, fsdp=2, sequence=2),
                 MeshConfig()):  # fmt: skip
        target = _trainer(tmp_path, mesh)
        reader = Checkpointer(target.recipe.checkpoint, writer=False)
        restored, data = reader.restore(target.abstract_state())
        reader.close()
        assert data == {"position": 3}
        want = _flat(target.abstract_state())
        for key, array in _flat(restored).items():
            assert array.sharding.is_equivalent_to(want[key].sharding, array.ndim), (mesh, key)
            np.testing.assert_array_equal(np.asarray(jax.device_get(array)), saved[key], err_msg=f"{mesh} {key}")
