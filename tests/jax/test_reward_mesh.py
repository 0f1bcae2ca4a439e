"""Reward runs on the training mesh, on 8 fake CPU devices with ContentV's 38 heads and 333 text tokens: one sharded
ReFL update and one sharded GRPO iteration (SDE rollout, black-box reward, update) equal the single-device ones in
float32, the weights and AdamW moments keep training's shardings, and a recipe the mesh cannot run fails at load.

The optimizer has a large epsilon, so AdamW's first update is about -lr g / eps: the weight updates carry the
gradients themselves (with a small epsilon the first update is about -lr sign(g) and would hide gradient errors)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from einops import rearrange
from flax import nnx

from contentv_common.config.model import from_dict
from contentv_common.config.reward import RewardRecipe, load_reward_recipe
from contentv_common.errors import ConfigError
from contentv_common.reward.models import TargetColour, as_black_box
from contentv_jax.reward import train as jr
from contentv_jax.reward.mesh import device_batch, replicate
from contentv_jax.sharding import make_mesh
from contentv_jax.transformer import Transformer
from tests.narrow_model import NARROW, POOLED, TEXT, WIDTH

C, F, H, W = 16, 2, 8, 8  # 2 x 4 x 4 = 32 image tokens: split over sequence 2, 4 and 8
ROWS = 8
REWARD = TargetColour((0.9, 0.2, 0.1))
SFT_DATA = {"manifest": "unused", "cache_dir": "unused", "buckets": [{"width": 64, "height": 64, "frames": 5,
                                                                       "batch_size": ROWS}]}  # fmt: skip


def _recipe(method: str, mesh: tuple[int, ...]) -> RewardRecipe:
    return from_dict(
        RewardRecipe,
        {
            "method": method,
            "model": NARROW,
            "reward": {"kind": "target_colour", "target": [0.9, 0.2, 0.1]},
            "rollout": {
                "prompts": ["p"],
                "width": 64,
                "height": 64,
                "frames": 5,
                "batch_size": ROWS if method == "refl" else ROWS // 4,
                "steps": 3,
                "shift": 3.0,
                "guidance": 2.0,
            },  # fmt: skip
            "refl": {"grad_steps": 2, "sft_weight": 0.5, "anchor": "frozen", "anchor_weight": 0.3},
            "grpo": {"group_size": 4, "kl_weight": 0.05, "sft_weight": 0.0, "noise_level": 0.7},
            "optimizer": {"lr": 100.0, "eps": 10.0, "grad_clip": None},  # update ~ -10 g: well above fp32 rounding
            "data": SFT_DATA if method == "refl" else None,  # GRPO runs without the SFT term here
            "checkpoint": {"dir": "unused"},
            "steps": 1,
            "attention": "xla",
            "remat": "full",
            "mesh": dict(zip(("data", "fsdp", "sequence", "tensor"), mesh, strict=True)),
        },
    )


class TinyDecoder(nnx.Module):
    """First-frame latents -> RGB in [0, 1] through one linear map (a stand-in VAE with weights to replicate)."""

    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(C, 3, rngs=rngs)

    def __call__(self, latents: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.proj(rearrange(latents[:, :, 0], "b c h w -> b h w c")))


def _rollout_batch(seed: int, group: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts = ROWS // group
    text = np.repeat(rng.standard_normal((prompts, TEXT, WIDTH), dtype=np.float32), group, axis=0)
    pooled = np.repeat(rng.standard_normal((prompts, POOLED), dtype=np.float32), group, axis=0)
    return {
        "noise": rng.standard_normal((ROWS, C, F, H, W), dtype=np.float32),
        "text": text,
        "pooled": pooled,
        "neg_text": np.repeat(rng.standard_normal((1, TEXT, WIDTH), dtype=np.float32), ROWS, axis=0),
        "neg_pooled": np.repeat(rng.standard_normal((1, POOLED), dtype=np.float32), ROWS, axis=0),
    }


def _sft_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sft_x0": rng.standard_normal((ROWS, C, F, H, W), dtype=np.float32),
        "sft_noise": rng.standard_normal((ROWS, C, F, H, W), dtype=np.float32),
        "sft_sigmas": rng.uniform(0.05, 0.95, ROWS).astype(np.float32),
        "sft_weights": np.ones(ROWS, np.float32),
        "sft_text": rng.standard_normal((ROWS, TEXT, WIDTH), dtype=np.float32),
        "sft_pooled": rng.standard_normal((ROWS, POOLED), dtype=np.float32),
    }


@pytest.fixture(scope="module")
def weights():
    """Single-device transformer and decoder weights shared by every mesh."""
    recipe = _recipe("refl", (1, 1, 1, 1))
    model = Transformer(recipe.model_config, rngs=nnx.Rngs(0))
    return model, TinyDecoder(nnx.Rngs(1))


def _setup(weights, method: str, shape: tuple[int, ...]):
    """The tuner on a mesh of `shape`, its state from the shared weights (the frozen anchor a copy)."""
    recipe = _recipe(method, shape)
    mesh = make_mesh(recipe.mesh, jax.devices()[: int(np.prod(shape))])
    decoder = replicate(nnx.clone(weights[1]), mesh)  # placed anew, the fixture's kept
    tuner = jr.RewardTuner(recipe, mesh, decoder, REWARD if method == "refl" else None)
    return recipe, mesh, tuner, tuner.init_state(nnx.to_pure_dict(nnx.state(weights[0], nnx.Param)))


def _flat(state: dict) -> np.ndarray:
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(jax.device_get(state["params"]))])


def _check_layout(tuner: jr.RewardTuner, state: dict) -> None:
    """The updated weights keep the training rules' shardings, and each AdamW moment its weight's."""
    expected = jax.tree.leaves(tuner.trainer.param_shardings)
    params = jax.tree.leaves(state["params"])
    assert all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(params, expected, strict=True))
    split = [
        a for a in jax.tree.leaves(state["opt_state"]) if a.ndim > 1 and any(s is not None for s in a.sharding.spec)
    ]
    assert split, "no AdamW moment is sharded"


def _run_refl(weights, shape):
    recipe, mesh, tuner, state = _setup(weights, "refl", shape)
    before = _flat(state)
    batch = {**_rollout_batch(0), **_sft_batch(1), "tokens": np.zeros((ROWS, 0), np.int32)}
    state, metrics = tuner.update(state, device_batch(batch, mesh))
    return metrics, _flat(state) - before, (tuner, state)


def _run_grpo(weights, shape):
    recipe, mesh, tuner, state = _setup(weights, "grpo", shape)
    before = _flat(state)
    noise = np.random.default_rng(2).standard_normal((recipe.rollout.steps, ROWS, C, F, H, W), dtype=np.float32)
    state, metrics = tuner.grpo_iteration(state, _rollout_batch(0, group=4), noise, ["p"] * ROWS,
                                          as_black_box(REWARD), lambda b: device_batch(b, mesh))  # fmt: skip
    return metrics, _flat(state) - before, (tuner, state)


RUNS = {"refl": _run_refl, "grpo": _run_grpo}


@pytest.fixture(scope="module")
def one_device(weights):
    """The single-device step of each method, computed once: method -> (metrics, weight update)."""
    cache = {}

    def get(method: str):
        if method not in cache:
            metrics, delta, _ = RUNS[method](weights, (1, 1, 1, 1))
            cache[method] = ({k: float(v) for k, v in metrics.items()}, delta)
        return cache[method]

    return get


# one mesh per method (compiles are CI time), together every axis: ReFL on data x FSDP x sequence, GRPO on FSDP x
# sequence x tensor, where sequence x tensor = 4 pads the 38 heads to 40 inside attention
@pytest.mark.slow
@pytest.mark.parametrize("method, shape", [("refl", (2, 2, 2, 1)), ("grpo", (1, 2, 2, 2))])
def test_sharded_step_equals_one_device(weights, one_device, method, shape, rel_err):
    ref_metrics, ref_delta = one_device(method)
    assert ref_metrics["skipped"] == 0 and np.linalg.norm(ref_delta) > 0
    metrics, delta, (tuner, state) = RUNS[method](weights, shape)
    assert rel_err(delta, ref_delta) < 1e-5, (shape, rel_err(delta, ref_delta))
    for key, value in ref_metrics.items():  # GRPO's policy loss at ratio 1 cancels to ~0: an absolute floor there
        got = float(metrics[key])
        assert abs(got - value) <= 1e-5 * max(abs(value), 1e-2), (shape, key, got, value)
    _check_layout(tuner, state)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rollout.batch_size": 3}, "rollout.batch_size: 3 rollout rows do not split over mesh data x fsdp = 1 x 8"),
        (
            {"rollout.width": 848},
            "rollout: 848x480x49 has 20670 image tokens per sample, which do not split over mesh sequence = 8",
        ),
        (
            {"data.buckets": [{"width": 848, "height": 480, "frames": 49, "batch_size": 8}]},
            r"data.buckets\[0\] \(848x480x49\): 20670 image tokens",
        ),
    ],
)
def test_a_mesh_the_run_cannot_honour_fails_at_load(overrides, message):
    with pytest.raises(ConfigError, match=f"reward_refl_480p.yaml: {message}"):
        load_reward_recipe("configs/recipes/reward_refl_480p.yaml", overrides)


def test_grpo_rows_name_the_group_size():
    with pytest.raises(
        ConfigError, match=r"grpo.group_size: 12 rollout rows \(rollout.batch_size 4 x grpo.group_size 3"
    ):
        load_reward_recipe("configs/recipes/reward_grpo_4step.yaml", {"rollout.batch_size": 4, "grpo.group_size": 3})


def test_the_sft_batch_must_split_too():
    with pytest.raises(ConfigError, match=r"the SFT batch \(rollout.batch_size 2 real samples\) does not split"):
        load_reward_recipe("configs/recipes/reward_grpo_4step.yaml", {"rollout.batch_size": 2, "grpo.group_size": 4})


def test_eval_rows_pad_to_the_mesh():
    from contentv_jax.reward.mesh import pad_rows

    mesh = make_mesh(_recipe("refl", (2, 2, 2, 1)).mesh, jax.devices()[:8])
    padded, n = pad_rows({"noise": np.arange(6.0).reshape(3, 2)}, mesh)
    assert n == 3 and padded["noise"].shape == (4, 2) and np.array_equal(padded["noise"][3], padded["noise"][2])
