"""The sampling mesh (`tools/sample.py --mesh data=D,sequence=S,cfg=C`) on 8 fake CPU devices: the weights placed as
training places them, the guidance pair's rows on their data shards, every device used. (The final latents equal one
device's: tests/e2e/test_sample_cli.py, through the CLI.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contentv_common.checkpoint.formats import write_torch
from contentv_common.config.model import ModelConfig
from contentv_common.sample_mesh import SampleMesh, pair_rows, split_pair
from contentv_common.tiny_models import random_weights
from contentv_jax.backend import BACKEND
from contentv_jax.sampling import load_sampling_transformer
from tests.narrow_model import NARROW


@pytest.fixture(scope="module")
def narrow_checkpoint(tmp_path_factory):
    cfg = ModelConfig(**NARROW)
    folder = tmp_path_factory.mktemp("narrow")
    return write_torch(folder / "transformer", cfg, iter(random_weights(BACKEND.transformer_shapes(cfg), 3).items()))


def test_weights_are_sharded_by_trainings_rules(narrow_checkpoint):
    mesh = SampleMesh(data=2, sequence=2, cfg=2)
    model = load_sampling_transformer(narrow_checkpoint, jnp.float32, "xla", mesh)
    kernel = model.blocks.attn.to_q.kernel[...]  # [layers, width, heads x head_dim]: width over fsdp x sequence
    assert len(kernel.sharding.device_set) == 8
    assert kernel.addressable_shards[0].data.shape == (1, 152, 304)
    assert model.blocks.attn.attention.mesh.shape == {"data": 4, "fsdp": 1, "sequence": 2, "tensor": 1}


def test_pair_rows_put_each_branch_on_its_data_shards():
    uncond, cond = np.arange(4) * -1 - 1, np.arange(4) + 1  # prompts 1..4: uncond -p, cond +p
    # data shard d * cfg + c: with cfg=2 shards 0, 1, 2, 3 hold group 0's uncond, its cond, group 1's uncond, cond
    assert list(pair_rows(uncond, cond, SampleMesh(data=2, cfg=2))) == [-1, -2, 1, 2, -3, -4, 3, 4]
    assert list(pair_rows(uncond, cond, SampleMesh())) == [-1, -2, -3, -4, 1, 2, 3, 4]  # as diffusers batches it
    for mesh in (SampleMesh(data=2, cfg=2), SampleMesh(data=2), SampleMesh(data=4, cfg=2)):
        back = split_pair(pair_rows(uncond, cond, mesh), mesh)
        assert list(back[0]) == list(uncond) and list(back[1]) == list(cond)


def test_mesh_must_use_every_device():
    with pytest.raises(ValueError, match="data x sequence x cfg = 4 does not match the 8 devices"):
        BACKEND.join_sampling("auto", SampleMesh(data=2, sequence=2))
    groups = BACKEND.join_sampling("auto", SampleMesh(data=4, cfg=2))
    assert groups.owners == (0, 0, 0, 0) and groups.together and groups.sampled == [0, 1, 2, 3]
    assert groups.written == [0, 1, 2, 3]
    assert jax.device_count() == 8
