"""The official demo's initial noise (`--noise torch`) and scheduler_config.json fields vs diffusers itself."""

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from contentv_common.errors import ConfigError
from contentv_common.sampling import (
    flow_match_schedule,
    initial_noise,
    latent_shape,
    official_noise,
    read_scheduler_settings,
    scheduler_settings,
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_noise_is_the_official_pipelines(dtype):
    """ContentVPipeline.prepare_latents: randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype)."""
    shape = latent_shape(16, 9, 32, 48, batch=3)
    want = randn_tensor(shape, generator=torch.Generator().manual_seed(42), device=torch.device("cpu"), dtype=dtype)
    got = official_noise(42, shape, str(dtype).removeprefix("torch."))
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, want.float().numpy())
    # the CLI draws all prompts in one call from --seed, as the pipeline does for a list of prompts
    cli = initial_noise("torch", 42, latent_shape(16, 9, 32, 48), 3, str(dtype).removeprefix("torch."))
    np.testing.assert_array_equal(cli, got)
    assert not np.array_equal(cli, initial_noise("numpy", 42, latent_shape(16, 9, 32, 48), 3, "float32"))


@pytest.mark.parametrize("steps,shift,terminal", [(10, 3.0, 0.1), (25, 5.0, 0.02), (7, 1.0, None)])
def test_shift_terminal_matches_diffusers(steps, shift, terminal):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift, shift_terminal=terminal)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device="cpu")  # as ContentV's pipeline
    ours = flow_match_schedule(steps, shift, terminal)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    if terminal:
        assert abs(ours.sigmas[-2] - terminal) < 1e-6


def test_scheduler_config_fields_honoured_or_rejected(tmp_path):
    ok = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.05).config  # every field, diffusers' defaults
    settings = scheduler_settings(dict(ok))
    assert (settings.shift, settings.shift_terminal) == (3.0, 0.05)
    for field, value in [
        ("use_karras_sigmas", True),
        ("use_exponential_sigmas", True),
        ("use_beta_sigmas", True),
        ("invert_sigmas", True),
        ("stochastic_sampling", True),
        ("use_dynamic_shifting", True),
        ("num_train_timesteps", 500),
        ("made_up_field", 1),
    ]:
        path = tmp_path / "scheduler_config.json"
        path.write_text(json.dumps({**ok, field: value}))
        with pytest.raises(ConfigError, match=rf"scheduler_config.json: {field}") as e:
            read_scheduler_settings(path)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="_class_name"):
        scheduler_settings({"_class_name": "DDIMScheduler"})
    with pytest.raises(ConfigError, match="shift_terminal"):
        scheduler_settings({"shift_terminal": 1.5})
