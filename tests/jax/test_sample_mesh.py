"""The sampling mesh (`tools/sample.py --mesh data=D,sequence=S,cfg=C`) on 8 fake CPU devices: the weights placed as
training places them, the guidance pair's rows on their data shards, every device used. (The final latents equal one
device's: tests/e2e/test_sample_cli.py, through the CLI.) Training's in-loop clip runs the same sampler on the
training mesh and draws one device's clip, and a recipe's `eval.prompts` one device's clip of each prompt."""

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


def test_the_in_loop_clip_on_the_training_mesh_is_one_device_clip(tmp_path, rel_err):
    from contentv_common.config.model import from_dict
    from contentv_common.config.recipe import MeshConfig, Recipe
    from contentv_common.training.evaluation import EvalPrompts
    from contentv_jax.sharding import make_mesh
    from contentv_jax.train import clip_latents, get_trainer
    from tests.narrow_model import POOLED, TEXT, WIDTH

    data = {"manifest": str(tmp_path / "m.jsonl"), "cache_dir": str(tmp_path / "cache"),
            "buckets": [{"width": 64, "height": 64, "frames": 5, "batch_size": 2}]}  # fmt: skip
    recipe = from_dict(Recipe, {"model": NARROW, "data": data, "checkpoint": {"dir": str(tmp_path / "ckpt")},
                                "steps": 1, "compute_dtype": "float32", "attention": "xla"})  # fmt: skip
    rng = np.random.default_rng(0)
    shapes = {"noise": (1, 16, 2, 8, 8), "text": (1, TEXT, WIDTH), "pooled": (1, POOLED)}
    shapes |= {"neg_text": shapes["text"], "neg_pooled": shapes["pooled"]}
    inputs = {k: rng.standard_normal(v, dtype=np.float32) for k, v in shapes.items()}
    one = get_trainer(recipe, make_mesh(MeshConfig(), jax.devices()[:1]))
    params = jax.tree.map(lambda a: 0.05 * rng.standard_normal(a.shape, dtype=np.float32), one.init_state()["params"])
    one_params = jax.device_put(params, one.param_shardings)
    ref = clip_latents(one, one_params, inputs)
    assert rel_err(ref, inputs["noise"]) > 0.1, "the steps changed the latents"
    trainer = get_trainer(recipe, make_mesh(MeshConfig(data=2, fsdp=2, sequence=2), jax.devices()))
    mesh_params = jax.device_put(params, trainer.param_shardings)
    # the rows of a recipe's eval.prompts (the held-out clip's are one row copied): 2 prompts, the first the clip
    # above, padded with copies of it to the 4 data x fsdp shards; each row is its prompt's one-device clip
    second = {k: rng.standard_normal(v, dtype=np.float32) for k, v in shapes.items()}
    both = {k: np.concatenate([inputs[k], second[k]]) for k in ("noise", "text", "pooled")}
    prompts = EvalPrompts(("a", "b"), **both, neg_text=inputs["neg_text"][0], neg_pooled=inputs["neg_pooled"][0])
    got = clip_latents(trainer, mesh_params, prompts.inputs(shards=4), rows=2)
    assert got.shape == (2, *shapes["noise"][1:]) and rel_err(got[:1], ref) < 1e-5, rel_err(got[:1], ref)
    second_ref = clip_latents(
        one, one_params, {**second, "neg_text": inputs["neg_text"], "neg_pooled": inputs["neg_pooled"]}
    )
    assert rel_err(got[1:], second_ref) < 1e-5, rel_err(got[1:], second_ref)
