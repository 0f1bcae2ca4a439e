"""JAX core vs torch twin training, fp32 on CPU: same weights (through the shared parameter table), same batch,
timesteps and noise -> same loss and gradients; same weights after K AdamW steps; and a training state moved
between the frameworks mid-run (JAX -> torch and torch -> JAX) continues on the same trajectory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from contentv_common.checkpoint.formats import TensorSource
from contentv_common.config.recipe import MeshConfig, load_recipe
from contentv_jax import loading as jax_loading
from contentv_jax import sharding
from contentv_jax.optim import lr_schedule
from contentv_jax.train import Trainer
from contentv_torch_npu import checkpointing as ckpt
from contentv_torch_npu.train import StepInputs, flow_matching_loss, learning_rate, make_optimizer, train_step
from contentv_torch_npu.transformer import Transformer

STEPS = 6
GRAD_TOL = 1e-5  # loss and gradients, fp32
PARAM_TOL = 1e-5  # weights and EMA after several AdamW steps (measured 2e-7; Adam amplifies rounding of tiny grads)


@pytest.fixture(scope="module")
def setup():
    recipe = load_recipe(
        "tests/recipes/tiny.yaml",
        {"compute_dtype": "float32", "steps": STEPS, "optimizer.warmup_steps": 2, "optimizer.decay": "cosine"},
    )
    trainer = Trainer(recipe, sharding.make_mesh(MeshConfig(), jax.devices()[:1]))
    torch.manual_seed(0)
    model = Transformer(recipe.model_config, ops="torch")
    with torch.no_grad():
        for p in model.parameters():  # every weight non-zero and not at init scale: no path hides
            p.normal_(0.0, 0.05)
    canonical = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(STEPS):
        batches.append(
            {
                "latents": rng.standard_normal((2, 16, 3, 8, 8), dtype=np.float32),
                "noise": rng.standard_normal((2, 16, 3, 8, 8), dtype=np.float32),
                "sigmas": rng.uniform(0.05, 0.95, 2).astype(np.float32),
                "weights": rng.uniform(0.5, 1.5, 2).astype(np.float32),
                "text": rng.standard_normal((2, 333, 48), dtype=np.float32),
                "pooled": rng.standard_normal((2, 24), dtype=np.float32),
            }
        )
    step_fn = jax.jit(trainer.step)
    return recipe, trainer, step_fn, canonical, batches


@pytest.fixture(scope="module")
def loss_and_grad(setup):
    return jax.jit(jax.value_and_grad(setup[1].loss))


def jax_tree(cfg, arrays: dict[str, np.ndarray]) -> dict:
    """Canonical (torch layout) arrays -> the JAX trainer's parameter tree, through the shared table."""
    source = TensorSource(
        path="memory",
        config=cfg,
        shapes={k: v.shape for k, v in arrays.items()},
        dtypes={k: str(v.dtype) for k, v in arrays.items()},
        tensors=lambda: iter(arrays.items()),
    )
    model = jax_loading.fill_from_source(jax_loading.abstract_transformer(cfg), source)
    return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])


def canonical(trainer, tree) -> dict[str, np.ndarray]:
    return dict(jax_loading.canonical_tensors(trainer.model(tree)))


def torch_model(recipe, arrays):
    model = Transformer(recipe.model_config, ops="torch")
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    return model


def torch_inputs(batch) -> StepInputs:
    return StepInputs(**{k: torch.from_numpy(v) for k, v in batch.items()})


def adam_state(opt_state) -> optax.ScaleByAdamState:
    (adam,) = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
               if isinstance(s, optax.ScaleByAdamState)]  # fmt: skip
    return adam


def jax_to_train_state(recipe, trainer, state) -> ckpt.TrainState:
    adam = adam_state(state["opt_state"])
    return ckpt.TrainState(
        config=recipe.model_config,
        params=canonical(trainer, state["params"]),
        exp_avg=canonical(trainer, adam.mu),
        exp_avg_sq=canonical(trainer, adam.nu),
        ema=canonical(trainer, state["ema"]),
        step=int(state["step"]),
        adam_step=int(adam.count),
        data_position=int(state["step"]),
    )


def train_state_to_jax(recipe, trainer, ts: ckpt.TrainState) -> dict:
    cfg = recipe.model_config
    state = trainer.init_state(jax_tree(cfg, ts.params))
    count = jnp.asarray(ts.adam_step, jnp.int32)
    opt_state = optax.tree_utils.tree_set(
        state["opt_state"], mu=jax_tree(cfg, ts.exp_avg), nu=jax_tree(cfg, ts.exp_avg_sq), count=count
    )
    state = {**state, "opt_state": opt_state, "ema": jax_tree(cfg, ts.ema), "step": jnp.asarray(ts.step, jnp.int32)}
    return jax.device_put(state, trainer.state_shardings(state))  # same layout as a fresh state: no recompile


def torch_from_train_state(recipe, ts: ckpt.TrainState):
    model = torch_model(recipe, ts.params)
    optimizer = make_optimizer(model, recipe.optimizer)
    ckpt.restore_optimizer(model, optimizer, ts)
    ema = ckpt.restore_ema(model, ts.ema)
    return model, optimizer, ema


def run_torch(recipe, model, optimizer, ema, batches, start):
    opt = recipe.optimizer
    losses = []
    for i, batch in enumerate(batches, start=start):
        loss, _, applied = train_step(
            model, optimizer, torch_inputs(batch), lr=learning_rate(opt, i, recipe.steps), grad_clip=opt.grad_clip,
            ema=ema, ema_decay=opt.ema_decay,
        )  # fmt: skip
        assert applied
        losses.append(loss)
    return losses


def run_jax(step_fn, state, batches):
    losses = []
    for batch in batches:
        state, metrics = step_fn(state, {k: jnp.asarray(v) for k, v in batch.items()})
        losses.append(float(metrics["loss"]))
    return state, losses


def test_loss_and_gradients_match(setup, loss_and_grad, rel_err):
    recipe, trainer, _, weights, batches = setup
    params = jax_tree(recipe.model_config, weights)
    jax_loss, grads = loss_and_grad(params, {k: jnp.asarray(v) for k, v in batches[0].items()})
    model = torch_model(recipe, weights)
    loss = flow_matching_loss(model, torch_inputs(batches[0]))
    loss.backward()
    assert rel_err(loss.item(), float(jax_loss)) < GRAD_TOL
    jax_grads = canonical(trainer, grads)
    torch_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    assert sorted(jax_grads) == sorted(torch_grads) and len(torch_grads) == 74
    errors = {n: rel_err(torch_grads[n], jax_grads[n]) for n in torch_grads}
    assert max(errors.values()) < GRAD_TOL, max(errors.items(), key=lambda kv: kv[1])


def test_learning_rate_matches_optax_schedule():
    """The shared schedule (contentv_common.training.optim), as the JAX optimizer reads it, equals optax's own warm-up +
    cosine / constant schedules."""
    for decay in ("cosine", "constant"):
        opt = load_recipe("tests/recipes/tiny.yaml", {"optimizer.warmup_steps": 3, "optimizer.decay": decay}).optimizer
        schedule = [float(lr_schedule(opt, 10)(c)) for c in range(12)]
        assert schedule == [np.float32(learning_rate(opt, c, 10)) for c in range(12)]
        expected = (
            optax.warmup_cosine_decay_schedule(0.0, opt.lr, 3, 10)
            if decay == "cosine"
            else optax.join_schedules([optax.linear_schedule(0.0, opt.lr, 3), optax.constant_schedule(opt.lr)], [3])
        )
        np.testing.assert_allclose(schedule, [float(expected(c)) for c in range(12)], rtol=1e-6, atol=1e-12)


@pytest.mark.slow
def test_adamw_steps_match(setup, rel_err):
    recipe, trainer, step_fn, weights, batches = setup
    state, jax_losses = run_jax(step_fn, trainer.init_state(jax_tree(recipe.model_config, weights)), batches)
    model = torch_model(recipe, weights)
    optimizer = make_optimizer(model, recipe.optimizer)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch_losses = run_torch(recipe, model, optimizer, ema, batches, 0)
    assert rel_err(torch_losses, jax_losses) < GRAD_TOL
    jax_params, jax_ema = canonical(trainer, state["params"]), canonical(trainer, state["ema"])
    for n, p in model.named_parameters():
        assert rel_err(p.detach().numpy(), jax_params[n]) < PARAM_TOL, n
        assert rel_err(ema[n].numpy(), jax_ema[n]) < PARAM_TOL, n
    moved = max(rel_err(jax_params[n], weights[n]) for n in weights)
    assert moved > 1000 * PARAM_TOL  # the weights did move far more than the tolerance


def test_jax_checkpoint_continues_in_torch(setup, tmp_path, rel_err):
    recipe, trainer, step_fn, weights, batches = setup
    state, _ = run_jax(step_fn, trainer.init_state(jax_tree(recipe.model_config, weights)), batches[:3])
    folder = ckpt.save_state(tmp_path, jax_to_train_state(recipe, trainer, state), keep=1)
    jax_state, jax_losses = run_jax(step_fn, state, batches[3:])
    loaded = ckpt.load_state(folder)
    assert (loaded.step, loaded.adam_step) == (3, 3)
    model, optimizer, ema = torch_from_train_state(recipe, loaded)
    torch_losses = run_torch(recipe, model, optimizer, ema, batches[3:], 3)
    assert rel_err(torch_losses, jax_losses) < GRAD_TOL
    jax_params = canonical(trainer, jax_state["params"])
    for n, p in model.named_parameters():
        assert rel_err(p.detach().numpy(), jax_params[n]) < PARAM_TOL, n


def test_torch_checkpoint_continues_in_jax(setup, tmp_path, rel_err):
    recipe, trainer, step_fn, weights, batches = setup
    model = torch_model(recipe, weights)
    optimizer = make_optimizer(model, recipe.optimizer)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_torch(recipe, model, optimizer, ema, batches[:3], 0)
    full = ckpt.gather_state(model, optimizer, ema, step=3, data_position=3, counters={})
    folder = ckpt.save_state(tmp_path, full, keep=1)
    torch_losses = run_torch(recipe, model, optimizer, ema, batches[3:], 3)
    state, jax_losses = run_jax(step_fn, train_state_to_jax(recipe, trainer, ckpt.load_state(folder)), batches[3:])
    assert rel_err(jax_losses, torch_losses) < GRAD_TOL
    jax_params, jax_ema = canonical(trainer, state["params"]), canonical(trainer, state["ema"])
    for n, p in model.named_parameters():
        assert rel_err(jax_params[n], p.detach().numpy()) < PARAM_TOL, n
        assert rel_err(jax_ema[n], ema[n].numpy()) < PARAM_TOL, n
