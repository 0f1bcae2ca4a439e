"""The shared flow-matching schedules: distributions, shift, interpolation and determinism."""

import numpy as np
import pytest

from contentv_common.training import schedules as S


def test_logit_normal_matches_its_distribution():
    rng = np.random.default_rng(0)
    s = S.sample_logit_normal(rng, 20000, mean=0.5, std=0.8)
    assert s.min() > 0 and s.max() < 1
    logit = np.log(s / (1 - s))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03


def test_logit_normal_rejects_bad_std():
    with pytest.raises(ValueError, match="std"):
        S.sample_logit_normal(np.random.default_rng(0), 4, 0.0, 0.0)


def test_shift_and_token_shift():
    s = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(S.shift_sigmas(s, 1.0), s)
    assert np.all(S.shift_sigmas(s, 3.0) > s)
    assert S.token_shift(4096, 1024) == pytest.approx(2.0)
    assert S.resolve_shift("tokens", 7.0, 4096, 1024) == pytest.approx(2.0)
    assert S.resolve_shift("static", 3.0, 4096, 1024) == 3.0
    assert S.resolve_shift("none", 3.0, 4096, 1024) == 1.0
    with pytest.raises(ValueError, match="shift mode"):
        S.resolve_shift("dynamic", 1.0, 1, 1)


def test_interpolate_and_target_are_the_straight_path():
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((3, 2, 1, 4, 4))
    noise = rng.standard_normal(x0.shape)
    sigma = np.array([0.0, 0.5, 1.0])
    xt = S.interpolate(x0, noise, sigma)
    np.testing.assert_allclose(xt[0], x0[0])
    np.testing.assert_allclose(xt[2], noise[2])
    np.testing.assert_allclose(xt[1], 0.5 * (x0[1] + noise[1]))
    # d x_t / d sigma equals the target everywhere on the path
    eps = 1e-6
    np.testing.assert_allclose(
        (S.interpolate(x0, noise, sigma + eps) - xt) / eps, S.velocity_target(x0, noise), atol=1e-6
    )


def test_loss_weights():
    s = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(S.loss_weights(s, "uniform"), 1.0)
    cos = S.loss_weights(s, "cosmap")
    assert cos[1] > cos[0] and cos[0] == pytest.approx(cos[2])
    ln = S.loss_weights(s, "logit_normal")
    assert ln[1] == pytest.approx(1 / (np.sqrt(2 * np.pi) * 0.25))
    with pytest.raises(ValueError, match="weighting"):
        S.loss_weights(s, "snr")


def test_drop_text_uses_the_empty_prompt():
    rng = np.random.default_rng(0)
    text = np.ones((64, 3, 5), np.float32)
    pooled = np.ones((64, 2), np.float32)
    empty_t, empty_p = np.full((3, 5), 7.0, np.float32), np.full((2,), 9.0, np.float32)
    t, p, dropped = S.drop_text(rng, text, pooled, empty_t, empty_p, 0.5)
    assert 10 < dropped.sum() < 54
    assert np.all(t[dropped] == 7.0) and np.all(p[dropped] == 9.0)
    assert np.all(t[~dropped] == 1.0) and np.all(p[~dropped] == 1.0)
    _, _, none = S.drop_text(rng, text, pooled, empty_t, empty_p, 0.0)
    assert not none.any()


def test_flow_inputs_are_a_pure_function_of_seed_and_step():
    kw = dict(logit_mean=0.0, logit_std=1.0, shift=2.0, weighting="uniform")
    a = S.flow_inputs(S.step_rng(3, 10), (2, 4, 3, 8, 8), **kw)
    b = S.flow_inputs(S.step_rng(3, 10), (2, 4, 3, 8, 8), **kw)
    c = S.flow_inputs(S.step_rng(3, 11), (2, 4, 3, 8, 8), **kw)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["noise"], c["noise"])
    assert a["noise"].dtype == np.float32 and a["sigmas"].shape == (2,)
