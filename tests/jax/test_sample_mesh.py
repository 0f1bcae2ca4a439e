"""Sampling on a mesh (`tools/sample.py --mesh data=D,sequence=S,cfg=C`) at ContentV's 38 heads and 333 text tokens
on 8 fake CPU devices: the final latents equal one device's, with the cond/uncond rows on two device groups, image
tokens split over `sequence` (heads padded 38 -> 40 at sequence 4) and prompts over `data`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contentv_common.checkpoint.formats import write_torch
from contentv_common.config.model import ModelConfig
from contentv_common.sample_mesh import SampleMesh, pair_rows, split_pair
from contentv_common.tiny_models import random_weights
from contentv_jax.backend import BACKEND
from contentv_jax.sampling import load_sampling_transformer, sample
from tests.narrow_model import NARROW, POOLED, TEXT, WIDTH


@pytest.fixture(scope="module")
def narrow_checkpoint(tmp_path_factory):
    cfg = ModelConfig(**NARROW)
    folder = tmp_path_factory.mktemp("narrow")
    return write_torch(folder / "transformer", cfg, iter(random_weights(BACKEND.transformer_shapes(cfg), 3).items()))


def _inputs(prompts: int = 2) -> dict[str, np.ndarray]:
    """Noise of 2 latent frames x 8 x 8 (32 image tokens: split 2, 4 or 8 ways), 333 text tokens."""
    rng = np.random.default_rng(0)
    return {
        "noise": rng.standard_normal((prompts, 16, 2, 8, 8), dtype=np.float32),
        "text": rng.standard_normal((prompts, TEXT, WIDTH), dtype=np.float32),
        "pooled": rng.standard_normal((prompts, POOLED), dtype=np.float32),
        "neg_text": rng.standard_normal((prompts, TEXT, WIDTH), dtype=np.float32),
        "neg_pooled": rng.standard_normal((prompts, POOLED), dtype=np.float32),
    }


def _latents(path, mesh: SampleMesh, inputs) -> np.ndarray:
    model = load_sampling_transformer(path, jnp.float32, "xla", mesh)
    return sample(model, **inputs, steps=2, guidance=6.0, progress=False, mesh=mesh)


def test_mesh_latents_equal_one_device(narrow_checkpoint, rel_err):
    inputs = _inputs()
    one = _latents(narrow_checkpoint, SampleMesh(), inputs)
    assert one.shape == (2, 16, 2, 8, 8) and np.isfinite(one).all()
    assert rel_err(one, inputs["noise"]) > 0.1, "the steps changed the latents"
    for mesh in (SampleMesh(data=2, sequence=2, cfg=2), SampleMesh(data=1, sequence=4, cfg=2)):
        model = load_sampling_transformer(narrow_checkpoint, jnp.float32, "xla", mesh)
        kernel = model.blocks.attn.to_q.kernel[...]  # sharded by training's rules: width over sequence
        assert len(kernel.sharding.device_set) == 8
        assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // mesh.sequence
        got = sample(model, **inputs, steps=2, guidance=6.0, progress=False, mesh=mesh)
        assert rel_err(got, one) < 1e-5, (mesh, rel_err(got, one))


def test_pair_rows_put_each_branch_on_its_data_shards():
    uncond, cond = np.arange(4) * -1 - 1, np.arange(4) + 1  # prompts 1..4: uncond -p, cond +p
    assert list(pair_rows(uncond, cond, SampleMesh(data=2, cfg=2))) == [-1, -2, -3, -4, 1, 2, 3, 4]
    assert list(pair_rows(uncond, cond, SampleMesh(data=2))) == [-1, -2, 1, 2, -3, -4, 3, 4]
    assert list(pair_rows(uncond, cond, SampleMesh())) == [-1, -2, -3, -4, 1, 2, 3, 4]
    for mesh in (SampleMesh(data=2, cfg=2), SampleMesh(data=2), SampleMesh(data=4, cfg=2)):
        back = split_pair(pair_rows(uncond, cond, mesh), mesh)
        assert list(back[0]) == list(uncond) and list(back[1]) == list(cond)


def test_mesh_must_use_every_device():
    with pytest.raises(ValueError, match="data x sequence x cfg = 4 does not match the 8 devices"):
        BACKEND.join_sampling("auto", SampleMesh(data=2, sequence=2))
    groups = BACKEND.join_sampling("auto", SampleMesh(data=4, cfg=2))
    assert groups.owners == (0, 0, 0, 0) and groups.together and groups.sampled == [0, 1, 2, 3]
    assert jax.device_count() == 8
