"""DMD2's terms against hand-written numpy on closed-form velocity fields (the JAX core matches the torch twin through
tests/parity/test_distill_parity.py)."""

from __future__ import annotations

import numpy as np
import torch

from contentv_common.config.distill import DmdConfig
from contentv_common.distill.schedule import student_sigmas, update_draws
from contentv_torch_npu.distill import train as td

SHAPE = (2, 3, 1, 2, 2)


class Linear(torch.nn.Module):
    """v = a x + c mean(pooled), per sample: a score whose guided x0 has a closed form."""

    def __init__(self, a: float, c: float):
        super().__init__()
        self.a, self.c = torch.nn.Parameter(torch.tensor(a)), torch.nn.Parameter(torch.tensor(c))

    def forward(self, x, timesteps, text, pooled):
        return self.a * x + self.c * pooled.mean(-1).reshape(-1, 1, 1, 1, 1)


class Constant(torch.nn.Module):
    """v = w whatever the input: a student whose x0 = x - sigma w is linear in its one parameter."""

    def __init__(self, w: np.ndarray):
        super().__init__()
        self.w = torch.nn.Parameter(torch.from_numpy(w))

    def forward(self, x, timesteps, text, pooled):
        return self.w.expand_as(x)


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    pooled, neg_pooled = rng.standard_normal((2, 2, 5), dtype=np.float32)
    text = np.zeros((2, 3, 4), np.float32)  # the closed-form scores read the pooled rows alone
    batch = {"text": text, "pooled": pooled, "neg_text": text, "neg_pooled": neg_pooled}
    return batch, rng.standard_normal(SHAPE[1:], dtype=np.float32)


def test_simulated_input_runs_the_students_earlier_steps():
    dmd = DmdConfig(steps=4, shift=3.0, fake_updates=1)
    batch, w = _inputs(0)
    draws = update_draws(np.random.default_rng(1), dmd, SHAPE)
    s = student_sigmas(dmd).astype(np.float64)
    x = draws["noise"].astype(np.float64)
    for i in range(2):  # the sampler's Euler step with the constant velocity w
        x = x + (s[i + 1] - s[i]) * w
    turn = td.to_device({"noise": draws["noise"], "k": np.asarray(2)})
    got = td.simulated_input(Constant(w), td.to_device(batch), turn, torch.from_numpy(student_sigmas(dmd)))
    np.testing.assert_allclose(got.numpy(), x, rtol=1e-5, atol=1e-6)
    turn["k"] = torch.tensor(0)
    assert torch.equal(td.simulated_input(Constant(w), td.to_device(batch), turn, torch.zeros(4)), turn["noise"])


def test_dmd_gradient_is_the_normalised_score_difference():
    """d loss / d x0 = dmd_weight (x0_fake - x0_real) / mean|x0 - x0_real| / x0.size, the real score guided."""
    dmd = DmdConfig(steps=4, shift=3.0, guidance=3.0, fake_updates=1, dmd_weight=2.0)
    batch, w = _inputs(2)
    draws = update_draws(np.random.default_rng(3), dmd, SHAPE)
    draws["k"] = np.asarray(0, np.int32)
    student, teacher, fake = Constant(w), Linear(0.3, 0.5), Linear(-0.2, 0.1)
    loss, metrics = td.dmd_loss(student, fake, teacher, td.to_device(batch), td.to_device(draws), dmd)
    loss.backward()

    f64 = {k: v.astype(np.float64) for k, v in draws.items()}
    s0, t = 1.0, f64["sigmas"].reshape(-1, 1, 1, 1, 1)
    x0 = f64["noise"] - s0 * w
    x_t = (1 - t) * x0 + t * f64["score_noise"]
    p, p_neg = (batch[k].mean(-1).reshape(-1, 1, 1, 1, 1).astype(np.float64) for k in ("pooled", "neg_pooled"))
    v_cond, v_uncond = 0.3 * x_t + 0.5 * p, 0.3 * x_t + 0.5 * p_neg
    x0_real = x_t - t * (v_uncond + 3.0 * (v_cond - v_uncond))
    x0_fake = x_t - t * (-0.2 * x_t + 0.1 * p)
    direction = (x0_fake - x0_real) / np.abs(x0 - x0_real).mean(axis=(1, 2, 3, 4), keepdims=True)
    np.testing.assert_allclose(float(metrics["dmd_loss"]), 0.5 * np.mean(direction**2), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), 2.0 * 0.5 * np.mean(direction**2), rtol=1e-5)
    grad_x0 = 2.0 * direction / direction.size  # x0 = x - s0 w: d loss / d w = -s0 sum over the batch
    np.testing.assert_allclose(student.w.grad.numpy(), -s0 * grad_x0.sum(0), rtol=1e-4, atol=1e-7)
    assert teacher.a.grad is None and fake.a.grad is None


def test_no_gradient_where_fake_and_real_scores_agree():
    """DMD's fixed point: a fake score equal to the (unguided) real score gives the student nothing to follow."""
    dmd = DmdConfig(steps=4, guidance=1.0, fake_updates=1)
    batch, w = _inputs(4)
    draws = td.to_device(update_draws(np.random.default_rng(5), dmd, SHAPE))
    student, score = Constant(w), Linear(0.3, 0.5)
    loss, metrics = td.dmd_loss(student, score, score, td.to_device(batch), draws, dmd)
    loss.backward()
    assert float(metrics["dmd_loss"]) == 0.0 and torch.count_nonzero(student.w.grad) == 0
    loss, _ = td.dmd_loss(student, Linear(0.3, 0.6), score, td.to_device(batch), draws, dmd)
    assert float(loss.detach()) > 0


def test_fake_score_learns_the_students_flow():
    """The fake score's loss is the flow-matching MSE on the student's x0, with gradients for the fake score alone."""
    dmd = DmdConfig(steps=4, fake_updates=1)
    batch, w = _inputs(6)
    draws = update_draws(np.random.default_rng(7), dmd, SHAPE)
    draws["k"] = np.asarray(0, np.int32)
    student, fake = Constant(w), Linear(0.3, 0.5)
    loss = td.fake_loss(student, fake, td.to_device(batch), td.to_device(draws), dmd)
    loss.backward()
    f64 = {k: v.astype(np.float64) for k, v in draws.items()}
    t = f64["sigmas"].reshape(-1, 1, 1, 1, 1)
    x0 = f64["noise"] - w
    x_t = (1 - t) * x0 + t * f64["score_noise"]
    v = 0.3 * x_t + 0.5 * batch["pooled"].mean(-1).reshape(-1, 1, 1, 1, 1)
    np.testing.assert_allclose(float(loss.detach()), np.mean((v - (f64["score_noise"] - x0)) ** 2), rtol=1e-5)
    assert student.w.grad is None and float(fake.a.grad) != 0
