"""Text-to-video sampling with the torch transformer: flow-match Euler + classifier-free guidance.

The twin of contentv_jax/sampling.py: the same numpy schedule, noise and update rule, so both backends walk the same
trajectory from the same seed.
"""

from __future__ import annotations

import numpy as np
import torch

from contentv_common.sample_mesh import SampleMesh, pair_rows, split_pair
from contentv_common.sampling import StepFn, euler_step, flow_match_sampler, guide


def _prepare(
    model: torch.nn.Module,
    noise: np.ndarray,
    text: np.ndarray,
    pooled: np.ndarray,
    guided: bool,
    guidance: float,
    mesh: SampleMesh | None,
) -> tuple[torch.Tensor, StepFn]:
    """The torch half of `sample` (contentv_common.sampling.flow_match_sampler): inputs on the model's devices and
    one guided Euler step."""
    layout = mesh or SampleMesh()
    device = next(model.parameters()).device
    text = torch.as_tensor(np.asarray(text, np.float32), device=device)
    pooled = torch.as_tensor(np.asarray(pooled, np.float32), device=device)

    def step(x: torch.Tensor, timestep: np.float32, dt: np.float32) -> torch.Tensor:
        inputs = pair_rows(x, x, layout) if guided else x
        timesteps = torch.full((inputs.shape[0],), float(timestep), device=device)
        velocity = model(inputs, timesteps, text, pooled).float()
        if guided:
            velocity = guide(*split_pair(velocity, layout), guidance)
        return euler_step(x, velocity, float(dt))

    return torch.as_tensor(np.asarray(noise, np.float32), device=device), step


# not inference_mode: FSDP keeps its all-gather buffers across calls, and training reuses them
sample = torch.no_grad()(flow_match_sampler(_prepare, lambda x: x.cpu().numpy(), "sampling (torch)"))
