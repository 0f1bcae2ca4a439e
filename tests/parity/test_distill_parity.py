"""DMD2's loss terms and update agree between JAX and torch on the same weights and draws (fp32, tiny model)."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from contentv_common.config.distill import DistillRecipe, DmdConfig
from contentv_common.config.model import from_dict
from contentv_common.distill.schedule import fake_turn, update_draws
from tests.parity.reward_fixtures import C, F, H, W, prompt_embeddings, torch_model

DMD = DmdConfig(steps=3, shift=3.0, guidance=3.0, fake_updates=2)
BATCH = 2
SHAPE = (BATCH, C, F, H, W)
NAMES = ("teacher", "student", "fake")


def _batch() -> dict[str, np.ndarray]:
    text, pooled = prompt_embeddings(11, BATCH)
    neg_text, neg_pooled = prompt_embeddings(99, 1)
    return {"text": text, "pooled": pooled, "neg_text": np.repeat(neg_text, BATCH, axis=0),
            "neg_pooled": np.repeat(neg_pooled, BATCH, axis=0)}  # fmt: skip


def _perturbed(seed: int, scale: float) -> torch.nn.Module:
    """The teacher (torch_model(0)) moved by `scale` x noise: a student or fake score some updates in."""
    model = torch_model(0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (torch, jax)} for the teacher, a student and a fake score, distinct weights, the same in both."""
    from contentv_jax.loading import load_transformer
    from contentv_torch_npu.loading import save_torch

    folder = tmp_path_factory.mktemp("distill_parity")
    out = {}
    for name, model in (("teacher", torch_model(0)), ("student", _perturbed(1, 0.02)), ("fake", _perturbed(2, 0.02))):
        save_torch(folder / name, model)
        out[name] = (model, load_transformer(folder / name))
    return out


def _draws(k: int) -> dict[str, np.ndarray]:
    draws = update_draws(np.random.default_rng([5, k]), DMD, SHAPE)
    draws["k"] = np.asarray(k, np.int32)
    draws["fake_k"] = np.full(DMD.fake_updates, k, np.int32)
    return draws


def _jax_grads(grads, model) -> dict[str, np.ndarray]:
    """Gradients under canonical (torch) names: written into a copy of the model, read back per block."""
    from flax import nnx

    from contentv_jax.loading import canonical_tensors

    holder = nnx.clone(model)
    nnx.update(holder, grads)
    return dict(canonical_tensors(holder))


def _jax(arrays: dict[str, np.ndarray]) -> dict:
    import jax.numpy as jnp

    return {k: jnp.asarray(v) for k, v in arrays.items()}


def _flat(tensors: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[k]).ravel() for k in sorted(tensors)])


def _torch_grads(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: p.grad.numpy() for k, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 2])
def test_fake_score_loss_and_gradients_match(models, k, rel_err):
    """The fake score's flow-matching loss on a student sample from step k (k = 2: two simulated steps first)."""
    from contentv_jax.distill import train as jd
    from contentv_torch_npu.distill import train as td

    (t_student, j_student), (t_fake, j_fake) = models["student"], models["fake"]
    batch, turn = _batch(), fake_turn(_draws(k), 0)
    loss_j, grads_j = jd.fake_grads(j_student, j_fake, _jax(batch), _jax(turn), DMD)
    t_student.zero_grad()
    t_fake.zero_grad()
    loss_t = td.fake_loss(t_student, t_fake, td.to_device(batch), td.to_device(turn), DMD)
    loss_t.backward()
    assert float(loss_t.detach()) > 0 and all(p.grad is None for p in t_student.parameters())
    assert rel_err(loss_j, loss_t.detach().numpy()) < 1e-5
    ours, theirs = _jax_grads(grads_j, j_fake), _torch_grads(t_fake)
    assert set(ours) == set(theirs) and np.linalg.norm(_flat(theirs)) > 0
    assert rel_err(_flat(ours), _flat(theirs)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("k", "guidance"), [(0, 3.0), (1, 3.0), (2, 3.0), (1, 1.0)])
def test_dmd_loss_and_gradients_match(models, k, guidance, rel_err):
    """The student's DMD loss at its step k (inputs by backward simulation) and its gradients, with a guided real
    score and an unguided one."""
    from contentv_jax.distill import train as jd
    from contentv_torch_npu.distill import train as td

    (t_teacher, j_teacher), (t_student, j_student), (t_fake, j_fake) = (models[n] for n in NAMES)
    batch, draws = _batch(), _draws(k)
    turn = {n: draws[n] for n in ("k", "noise", "sigmas", "score_noise")}
    dmd = replace(DMD, guidance=guidance)
    loss_j, grads_j, metrics_j = jd.dmd_grads(j_student, j_fake, j_teacher, _jax(batch), _jax(turn), dmd)
    for model in (t_teacher, t_student, t_fake):
        model.zero_grad()
    loss_t, metrics_t = td.dmd_loss(t_student, t_fake, t_teacher, td.to_device(batch), td.to_device(turn), dmd)
    loss_t.backward()
    assert all(p.grad is None for p in t_fake.parameters()) and all(p.grad is None for p in t_teacher.parameters())
    assert float(metrics_t["dmd_loss"]) > 0
    for key in ("loss", "dmd_loss"):
        assert rel_err(metrics_j[key], metrics_t[key].numpy()) < 1e-5, key
    assert rel_err(loss_j, loss_t.detach().numpy()) < 1e-5
    ours, theirs = _jax_grads(grads_j, j_student), _torch_grads(t_student)
    assert set(ours) == set(theirs) and np.linalg.norm(_flat(theirs)) > 0
    assert rel_err(_flat(ours), _flat(theirs)) < 1e-5


def _recipe() -> DistillRecipe:
    base = {"distill": {}, "model": "tiny", "init_from": "unused", "data": {"prompts": ["p"]},
            "checkpoint": {"dir": "unused"}, "steps": 4}  # fmt: skip
    recipe = from_dict(DistillRecipe, base)
    # AdamW with eps 10 moves each weight by about lr g / 10, linear in the gradients (at eps 1e-8 its first steps
    # move by lr sign(g), and gradients near eps by rounding noise); lr 100 makes the moves large against the weights'
    # float32 rounding (at lr 1 that rounding alone was 1e-5 of them): the moves compare at the parity bar
    linear = replace(recipe.optimizer, lr=100.0, eps=10.0)
    return replace(recipe, distill=DMD, optimizer=linear, fake_optimizer=replace(linear, lr=200.0))


@pytest.mark.slow
def test_distill_step_matches(models, rel_err):
    """A whole update (2 fake score updates, then the student's) from the same weights and draws: the same losses
    and the same weights after it, in both backends; both models moved."""
    import jax
    from flax import nnx

    from contentv_jax.distill import train as jd
    from contentv_jax.loading import canonical_tensors
    from contentv_torch_npu.distill import train as td

    recipe = _recipe()
    (t_teacher, j_teacher), (t_student, j_student), (t_fake, j_fake) = (models[n] for n in NAMES)
    draws = update_draws(np.random.default_rng(3), DMD, SHAPE)
    draws["k"], draws["fake_k"] = np.asarray(1, np.int32), np.array([2, 0], np.int32)  # every path of the loop
    before = {n: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()} for n, m in
              (("student", t_student), ("fake", t_fake))}  # fmt: skip

    j = jd.Distiller(recipe, j_teacher)
    params = {n: nnx.to_pure_dict(nnx.state(m, nnx.Param)) for n, m in (("student", j_student), ("fake", j_fake))}
    state = j.init_state(params["student"], params["fake"])
    state, metrics_j = j.step(state, _batch(), draws)
    t = td.Distiller(recipe, _copy(t_teacher), _copy(t_student), _copy(t_fake))
    metrics_t = t.step(_batch(), draws)

    assert metrics_t["skipped"] == 0 and metrics_j["skipped"] == 0
    for key in ("loss", "dmd_loss", "fake_loss", "grad_norm", "fake_grad_norm"):
        assert rel_err(metrics_j[key], metrics_t[key]) < 1e-5, key
    for name, t_model in (("student", t.student), ("fake", t.fake)):
        ours = dict(canonical_tensors(j.model(jax.device_get(state[name]))))
        theirs = {k: v.detach().numpy() for k, v in t_model.state_dict().items()}
        start = before[name]
        moved = {k: theirs[k] - start[k] for k in theirs}
        assert np.linalg.norm(_flat(moved)) > 0, name
        assert rel_err(_flat({k: ours[k] - start[k] for k in ours}), _flat(moved)) < 1e-5, name
        assert rel_err(_flat(ours), _flat(theirs)) < 1e-5, name

    # a non-finite DMD loss (NaN score noise) skips the student's update alone, in both backends
    draws["score_noise"] = np.full_like(draws["score_noise"], np.nan)
    student_j = [np.array(x, copy=True) for x in jax.tree.leaves(state["student"])]  # the state is donated
    student_t = {k: v.clone() for k, v in t.student.state_dict().items()}
    fake_t = {k: v.clone() for k, v in t.fake.state_dict().items()}
    state, metrics_j = j.step(state, _batch(), draws)
    metrics_t = t.step(_batch(), draws)
    assert metrics_j["skipped"] == 1 and metrics_t["skipped"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(student_j, jax.tree.leaves(state["student"]), strict=True))
    assert all(torch.equal(student_t[k], v) for k, v in t.student.state_dict().items())
    assert any(not torch.equal(fake_t[k], v) for k, v in t.fake.state_dict().items())


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)
