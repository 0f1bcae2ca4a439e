"""LoRA in both backends, fp32 on CPU, on a narrow model that keeps ContentV's 38 heads and 333 text tokens: the same
adapter gradients, the same loss trajectory and adapters over a few AdamW steps from the same seed and batches, the
base untouched, optimizer state only for the adapters, and the adapted model equal to its merged weights."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from contentv_common.config.recipe import LoraConfig, MeshConfig, load_recipe
from contentv_common.lora.adapters import merge
from contentv_common.lora.training import initial_adapters
from contentv_jax import lora as jax_lora
from contentv_jax import sharding
from contentv_jax.train import Trainer
from contentv_torch_npu import lora as torch_lora
from contentv_torch_npu.train import StepInputs, flow_matching_loss, learning_rate, make_optimizer, train_step
from contentv_torch_npu.transformer import Transformer
from tests.parity.test_train_parity import jax_tree

STEPS = 3
TOL = 1e-5  # loss, gradients, merged vs adapted outputs (fp32)
# adapters after AdamW steps from B = 0: Adam normalises A's tiny first gradients, amplifying their rounding (measured
# 7e-5 worst, 2e-6 median); the losses along the way agree to 3e-7
ADAPTER_TOL = 2e-4


def _recipe(num_layers: int, targets: tuple[str, ...] | None = None):
    recipe = load_recipe(
        "tests/recipes/tiny.yaml",
        {"compute_dtype": "float32", "steps": STEPS, "optimizer.warmup_steps": 0, "optimizer.ema_decay": 0.9},
    )
    cfg = replace(
        recipe.model_config, num_layers=num_layers, num_attention_heads=38, attention_head_dim=8, hidden_size=304
    )
    lora = LoraConfig(rank=4, alpha=8.0) if targets is None else LoraConfig(rank=4, alpha=8.0, targets=targets)
    return replace(recipe, model=cfg, lora=lora)


def _batches(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [
        {
            "latents": rng.standard_normal((2, 16, 2, 4, 4), dtype=np.float32),
            "noise": rng.standard_normal((2, 16, 2, 4, 4), dtype=np.float32),
            "sigmas": rng.uniform(0.05, 0.95, 2).astype(np.float32),
            "weights": rng.uniform(0.5, 1.5, 2).astype(np.float32),
            "text": rng.standard_normal((2, 333, 48), dtype=np.float32),
            "pooled": rng.standard_normal((2, 24), dtype=np.float32),
        }
        for _ in range(n)
    ]


def _base(cfg) -> dict[str, np.ndarray]:
    """Canonical base weights, all non-zero and away from init scale (no path hides)."""
    torch.manual_seed(0)
    model = Transformer(cfg, ops="torch")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _trainer(recipe) -> Trainer:
    return Trainer(recipe, sharding.make_mesh(MeshConfig(), jax.devices()[:1]))


def _twins(trainer, base, adapters=None):
    """The JAX trainer's state and the adapted torch model from the same base and adapters (new ones: the seed's)."""
    recipe = trainer.recipe
    params = jax_tree(recipe.model_config, base)
    if adapters is not None:
        params = jax_lora.join(jax_lora.adapter_tree(trainer.lora_plan, adapters), params)
    state = trainer.init_state(params)
    model = Transformer(recipe.model_config, ops="torch")
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in base.items()})
    torch_lora.add_adapters(model, recipe.lora, recipe.seed)
    if adapters is not None:
        torch_lora.set_adapters(model, adapters)
    return state, model


def _inputs(batch) -> StepInputs:
    return StepInputs(**{k: torch.from_numpy(v) for k, v in batch.items()})


def _random_adapters(recipe, modules_shapes) -> dict[str, np.ndarray]:
    """Seeded A and a non-zero B, so that A's gradient is not zero either."""
    adapters = initial_adapters(modules_shapes, recipe.lora.rank, recipe.seed)
    rng = np.random.default_rng(11)
    return {k: (rng.normal(0, 0.05, v.shape).astype(np.float32) if ".lora_B." in k else v) for k, v in adapters.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "layers, targets",
    [(2, None), (3, ("blocks.1.attn.to_q", "blocks.2.ff.fc1", "blocks.0.ff_context.fc2"))],
    ids=["default-targets", "some-layers"],
)
def test_adapter_gradients_match(layers, targets, rel_err):
    recipe = _recipe(layers, targets)
    base = _base(recipe.model_config)
    trainer = _trainer(recipe)
    adapters = _random_adapters(recipe, trainer.lora_plan.shapes)
    state, model = _twins(trainer, base, adapters)
    batch = _batches(1)[0]
    trained, frozen = trainer.trained(state["params"])
    loss_fn = jax.jit(jax.value_and_grad(lambda t, b: trainer.loss(jax_lora.join(t, frozen), b)))
    jax_loss, grads = loss_fn(trained, {k: jnp.asarray(v) for k, v in batch.items()})
    jax_grads = jax_lora.canonical_adapters(trainer.lora_plan, jax.device_get(grads))

    loss = flow_matching_loss(model, _inputs(batch))
    loss.backward()
    torch_grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    assert rel_err(loss.item(), float(jax_loss)) < TOL
    assert sorted(torch_grads) == sorted(jax_grads) == sorted(adapters)  # only the adapters get gradients
    if targets is None:  # every attention and MLP projection; the last block has no add_out / ff_context
        assert len(adapters) == 2 * (12 + 9)
    dead = f"blocks.{layers - 1}.attn.add_q."  # the last block's text queries feed no output (context-pre-only)
    for name, g in torch_grads.items():
        assert (np.linalg.norm(g) > 0) != name.startswith(dead), name
        assert rel_err(g, jax_grads[name]) < TOL, name
    if targets is not None:  # the stacked layers the targets leave out stay at zero gradient
        stacked = jax.device_get(grads)["blocks"]["attn"]["to_q"]["lora_b"]
        assert np.abs(stacked[0]).max() == 0 and np.abs(stacked[1]).max() > 0


@pytest.mark.slow
def test_lora_training_trajectory_matches(rel_err):
    recipe = _recipe(2)
    base = _base(recipe.model_config)
    trainer = _trainer(recipe)
    state, model = _twins(trainer, base)  # new adapters from the seed in both
    batches = _batches(STEPS)
    start_jax = jax_lora.canonical_adapters(trainer.lora_plan, jax.device_get(trainer.trained(state["params"])[0]))
    start_torch = torch_lora.get_adapters(dict(model.named_parameters()))
    assert all(np.array_equal(start_jax[k], start_torch[k]) for k in start_torch)

    step = jax.jit(trainer.step)
    jax_losses = []
    for batch in batches:
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        assert bool(metrics["ok"])
        jax_losses.append(float(metrics["loss"]))
    opt = recipe.optimizer
    optimizer = make_optimizer(model, opt)
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch_losses = []
    for i, batch in enumerate(batches):
        loss, _, applied = train_step(
            model, optimizer, _inputs(batch), lr=learning_rate(opt, i, recipe.steps), grad_clip=opt.grad_clip,
            ema=ema, ema_decay=opt.ema_decay,
        )  # fmt: skip
        assert applied
        torch_losses.append(loss)
    assert rel_err(torch_losses, jax_losses) < TOL
    assert len(set(jax_losses)) == STEPS  # every step changed the model

    jax_adapters = jax_lora.canonical_adapters(trainer.lora_plan, jax.device_get(trainer.trained(state["params"])[0]))
    jax_ema = jax_lora.canonical_adapters(trainer.lora_plan, jax.device_get(state["ema"]))
    torch_adapters = torch_lora.get_adapters(dict(model.named_parameters()))
    errors = {name: rel_err(a, jax_adapters[name]) for name, a in torch_adapters.items()}
    assert max(errors.values()) < ADAPTER_TOL, max(errors.items(), key=lambda kv: kv[1])
    for name in torch_adapters:
        assert rel_err(ema[name].numpy(), jax_ema[name]) < ADAPTER_TOL, name
    live = [n for n in jax_adapters if ".lora_B." in n and not n.startswith("blocks.1.attn.add_q.")]  # see above
    assert min(np.abs(jax_adapters[n]).max() for n in live) > 100 * TOL  # B left zero: the adapters did train

    # the base is untouched in both backends
    _, frozen = trainer.trained(state["params"])
    expected = jax.tree.leaves(jax_tree(recipe.model_config, base))
    for a, b in zip(jax.tree.leaves(frozen), expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name, t in model.state_dict().items():
        if name in base:
            np.testing.assert_array_equal(t.numpy(), base[name])
    # optimizer state only for the adapters
    adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]  # fmt: skip
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(adam[0].mu)[0]]
    assert paths and all(jax_lora.is_adapter(tuple(k.key for k in p)) for p in paths)
    assert len(paths) == 2 * len(trainer.lora_plan.paths())
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in optimizer.state) == sorted(torch_adapters)


def test_merged_model_equals_adapted_model(rel_err):
    recipe = _recipe(2)
    base = _base(recipe.model_config)
    trainer = _trainer(recipe)
    adapters = _random_adapters(recipe, trainer.lora_plan.shapes)
    state, model = _twins(trainer, base, adapters)
    batch = _batches(1)[0]
    args = (batch["latents"], batch["sigmas"] * 1000.0, batch["text"], batch["pooled"])
    with torch.no_grad():
        adapted = model(*(torch.from_numpy(a) for a in args)).numpy()
        plain = Transformer(recipe.model_config, ops="torch")
        plain.load_state_dict({k: torch.from_numpy(v) for k, v in merge(base, adapters, recipe.lora.scale).items()})
        merged = plain(*(torch.from_numpy(a) for a in args)).numpy()
    assert rel_err(merged, adapted) < TOL
    assert rel_err(adapted, plain_output(recipe, base, args)) > 100 * TOL  # the adapters change the output
    adapted_fn = jax.jit(lambda p, *a: trainer.model(p)(*a))
    merged_fn = jax.jit(lambda p, *a: trainer.plain_model(p)(*a))
    jax_adapted = np.asarray(adapted_fn(state["params"], *args))
    jax_merged = np.asarray(merged_fn(state["params"], *args))
    assert rel_err(jax_adapted, adapted) < TOL
    assert rel_err(jax_merged, jax_adapted) < TOL


def plain_output(recipe, base, args) -> np.ndarray:
    model = Transformer(recipe.model_config, ops="torch")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    with torch.no_grad():
        return model(*(torch.from_numpy(a) for a in args)).numpy()
