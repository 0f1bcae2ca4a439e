"""The numpy flow-match Euler sampler vs diffusers' FlowMatchEulerDiscreteScheduler, step for step."""

import numpy as np
import pytest
import torch

from contentv_common.sampling import (
    draw_noise,
    euler_step,
    flow_match_schedule,
    guide,
    latent_shape,
)


def _velocity(x: np.ndarray, t: float) -> np.ndarray:
    """A stand-in model whose output depends on the sample and the timestep, so errors would compound."""
    return (np.tanh(1.7 * x) * (0.3 + t / 1000.0) - 0.5 * x + 0.1).astype(np.float32)


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (7, 1.0), (25, 3.0), (50, 5.0)])
def test_trajectory_matches_diffusers(steps, shift, rel_err):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device="cpu")  # as ContentV's pipeline
    ours = flow_match_schedule(steps, shift)
    assert ours.sigmas.dtype == np.float32 and ours.timesteps.dtype == np.float32
    # the shift is computed in float64 (contentv_common.training.schedules) and rounded: within 1 ulp of diffusers'
    # float32
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=2e-7, atol=0)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=2e-7, atol=0)
    assert ours.sigmas[0] == 1.0 and ours.sigmas[-1] == 0.0 and len(ours.sigmas) == steps + 1

    x = draw_noise(0, (2, 4, 3, 5))
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(torch.from_numpy(_velocity(x_ref.numpy(), float(t))), t, x_ref).prev_sample
        x = euler_step(x, _velocity(x, float(ours.timesteps[i])), ours.step_sizes[i])
        assert x.dtype == np.float32
        assert rel_err(x, x_ref.numpy()) < 1e-6, f"step {i}"
    assert rel_err(x, draw_noise(0, x.shape)) > 0.1, "the trajectory must have moved"


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="steps"):
        flow_match_schedule(0, 3.0)
    with pytest.raises(ValueError, match="shift"):
        flow_match_schedule(10, 0.0)


def test_guidance_and_noise():
    uncond, cond = np.float32([1.0, 2.0]), np.float32([3.0, 0.0])
    np.testing.assert_allclose(guide(uncond, cond, 6.0), [13.0, -10.0])
    np.testing.assert_allclose(guide(uncond, cond, 1.0), cond)
    a, b, c = draw_noise(7, (2, 3)), draw_noise(7, (2, 3)), draw_noise(8, (2, 3))
    assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_latent_shape():
    assert latent_shape(16, 125, 432, 768, batch=2) == (2, 16, 32, 54, 96)
    assert latent_shape(16, 1, 32, 48) == (1, 16, 1, 4, 6)
    with pytest.raises(ValueError, match="frames"):
        latent_shape(16, 4, 32, 32)
    with pytest.raises(ValueError, match="width"):
        latent_shape(16, 5, 32, 40)
