"""One optimizer in both backends (contentv_jax/optim.py, contentv_torch_npu/optim.py) as reward tuning drives it:
the recipe's warm-up + cosine schedule, no decay on biases and norm scales, clipping, NaN steps skipped and counted,
EMA of the weights; the same parameters, rates and EMA after every step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from contentv_common.config.reward import load_reward_recipe
from contentv_common.reward.run import optimizer_updates
from contentv_common.training.divergence import DivergenceGuard
from contentv_common.training.optim import learning_rate

RECIPE = "configs/recipes/reward_refl_tiny.yaml"
STEPS = 6
NAN_STEP = 2


def _recipe():
    overrides = {
        "steps": STEPS,
        "optimizer.lr": 0.05,
        "optimizer.warmup_steps": 2,
        "optimizer.decay": "cosine",
        "optimizer.weight_decay": 0.3,
        "optimizer.grad_clip": 1.0,
        "optimizer.ema_decay": 0.9,
    }
    return load_reward_recipe(RECIPE, overrides)


class JaxNet(nnx.Module):
    def __init__(self):
        self.fc = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        self.norm = nnx.LayerNorm(3, rngs=nnx.Rngs(0))


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)


def _torch_twin(model: JaxNet) -> TorchNet:
    net = TorchNet()
    with torch.no_grad():
        net.fc.weight.copy_(torch.from_numpy(np.array(model.fc.kernel[...]).T))
        net.fc.bias.copy_(torch.from_numpy(np.array(model.fc.bias[...])))
        net.norm.weight.copy_(torch.from_numpy(np.array(model.norm.scale[...])))
        net.norm.bias.copy_(torch.from_numpy(np.array(model.norm.bias[...])) + 0.5)
    return net


def _as_torch(tree) -> dict[str, np.ndarray]:
    """JAX parameters under torch's names and layout."""
    return {
        "fc.weight": np.asarray(tree["fc"]["kernel"]).T,
        "fc.bias": np.asarray(tree["fc"]["bias"]),
        "norm.weight": np.asarray(tree["norm"]["scale"]),
        "norm.bias": np.asarray(tree["norm"]["bias"]),
    }


def _grads(step: int) -> dict[str, np.ndarray]:
    """Gradients (torch layout) with a global norm above the clip; NaN at NAN_STEP."""
    rng = np.random.default_rng(step)
    shapes = {"fc.weight": (3, 4), "fc.bias": (3,), "norm.weight": (3,), "norm.bias": (3,)}
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    if step == NAN_STEP:
        grads["fc.bias"][0] = np.nan
    return grads


def _params(model: JaxNet) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _jax_grads(grads: dict[str, np.ndarray]) -> dict:
    return jax_tree({"fc": {"kernel": grads["fc.weight"].T, "bias": grads["fc.bias"]},
                     "norm": {"scale": grads["norm.weight"], "bias": grads["norm.bias"]}})  # fmt: skip


def test_reward_optimizer_follows_schedule_and_matches_across_backends():
    from contentv_jax.optim import applied_updates, guarded_update, lr_schedule, make_optimizer
    from contentv_torch_npu.optim import make_optimizer as torch_optimizer
    from contentv_torch_npu.reward import train as tr

    recipe = _recipe()
    opt, total = recipe.optimizer, optimizer_updates(recipe)
    j_model = JaxNet()
    j_model.norm.bias[...] = j_model.norm.bias[...] + 0.5  # a nonzero bias: decay would move it
    t_model = _torch_twin(JaxNet())
    tx, t_opt = make_optimizer(opt, total), torch_optimizer(t_model, opt)
    j_params = _params(j_model)
    j_opt, j_ema = tx.init(j_params), j_params
    t_ema = {n: p.detach().clone() for n, p in t_model.named_parameters()}
    j_guard = DivergenceGuard(recipe.divergence, recipe.nan_skip_limit)
    t_guard = DivergenceGuard(recipe.divergence, recipe.nan_skip_limit)

    applied = 0
    for step in range(STEPS):
        grads = _grads(step)
        expected_lr = learning_rate(opt, applied, total)
        rate = lr_schedule(opt, total)(applied_updates(j_opt))  # read back from the optax state
        assert rate == np.float32(expected_lr), step

        loss = float(np.sum(grads["fc.bias"]))
        limits = jnp.asarray(j_guard.limits(), jnp.float32)
        j_params, j_opt, j_ema, ok, norm = guarded_update(tx, j_params, j_opt, _jax_grads(grads), jnp.float32(loss),
                                                          limits, j_ema, opt.ema_decay)  # fmt: skip
        j_guard.record(step, loss, float(norm), bool(ok))

        for name, p in t_model.named_parameters():
            p.grad = torch.from_numpy(grads[name].copy())
        metrics = tr.guarded_update(t_opt, t_model, loss, tr.Tuning(opt, total, t_guard, step, t_ema))
        assert bool(metrics["skipped"]) == (not ok) == (step == NAN_STEP), step
        if ok:
            assert t_opt.param_groups[0]["lr"] == expected_lr  # the rate torch's AdamW just used
            applied += 1

        j_weights, j_average = _as_torch(j_params), _as_torch(j_ema)
        for name, p in t_model.named_parameters():
            np.testing.assert_allclose(j_weights[name], p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(j_average[name], t_ema[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
        if step == 0:  # the first warm-up update has rate 0: nothing moves
            assert np.array_equal(j_weights["fc.weight"], np.asarray(JaxNet().fc.kernel[...]).T)

    assert j_guard.skipped == t_guard.skipped == 1 and j_guard.first_bad_step == NAN_STEP
    assert applied_updates(j_opt) == applied == STEPS - 1


def test_weight_decay_spares_biases_and_norm_scales_in_both_backends():
    """With zero gradients AdamW's step is decay alone: kernels shrink by lr * wd, biases and norm scales stay."""
    from contentv_jax.optim import guarded_update, make_optimizer
    from contentv_torch_npu.optim import make_optimizer as torch_optimizer
    from contentv_torch_npu.reward import train as tr

    opt = dataclasses.replace(_recipe().optimizer, lr=0.1, weight_decay=0.5, warmup_steps=0, ema_decay=None)
    j_model, t_model = JaxNet(), _torch_twin(JaxNet())
    tx, t_opt = make_optimizer(opt, STEPS), torch_optimizer(t_model, opt)
    params = _params(j_model)
    before = _as_torch(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    params = guarded_update(tx, params, tx.init(params), zeros, jnp.float32(0.0), None)[0]
    for p in t_model.parameters():
        p.grad = torch.zeros_like(p)
    tr.guarded_update(t_opt, t_model, 0.0, tr.Tuning(opt, STEPS))
    after = _as_torch(params)
    t_after = {n: p.detach().numpy() for n, p in t_model.named_parameters()}
    np.testing.assert_allclose(after["fc.weight"], before["fc.weight"] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(t_after["fc.weight"], before["fc.weight"] * (1 - 0.1 * 0.5), rtol=1e-6)
    for name in ("fc.bias", "norm.weight", "norm.bias"):
        assert np.array_equal(after[name], before[name]), name
        np.testing.assert_array_equal(t_after[name], before[name] + (0.5 if name == "norm.bias" else 0.0))


def jax_tree(tree):
    return {k: jax_tree(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in tree.items()}
