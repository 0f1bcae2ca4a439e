"""Text-to-video sampling with the torch transformer: flow-match Euler + classifier-free guidance.

The twin of contentv_jax/sampling.py: the same numpy schedule, noise and update rule, so both backends walk the same
trajectory from the same seed.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from contentv_common.sampling import euler_step, flow_match_schedule, guidance_batch, guide


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()  # not inference_mode: FSDP keeps its all-gather buffers across calls, and training reuses them
def sample(
    model: torch.nn.Module,
    noise: np.ndarray,
    text: np.ndarray,
    pooled: np.ndarray,
    neg_text: np.ndarray | None = None,
    neg_pooled: np.ndarray | None = None,
    steps: int = 50,
    guidance: float = 6.0,
    shift: float = 3.0,
    progress: bool = True,
    shift_terminal: float | None = None,
) -> np.ndarray:
    """Denoise `noise` [B, C, F, H, W] into latents (float32 numpy) conditioned on text [B, L, D] and pooled [B, P].

    With guidance > 1 the negative prompt's embeddings (the unconditional branch) are required and run in the same
    forward as the prompt's, uncond first as in diffusers. `shift` and `shift_terminal` shape the schedule
    (contentv_common.sampling.flow_match_schedule).
    """
    schedule = flow_match_schedule(steps, shift, shift_terminal)
    text, pooled, guided = guidance_batch(text, pooled, neg_text, neg_pooled, guidance)
    device = _device(model)
    x = torch.as_tensor(np.asarray(noise, np.float32), device=device)
    text = torch.as_tensor(np.asarray(text, np.float32), device=device)
    pooled = torch.as_tensor(np.asarray(pooled, np.float32), device=device)
    for i in tqdm(range(schedule.steps), desc="sampling (torch)", disable=not progress):
        inputs = torch.cat([x, x]) if guided else x
        timesteps = torch.full((inputs.shape[0],), float(schedule.timesteps[i]), device=device)
        velocity = model(inputs, timesteps, text, pooled).float()
        if guided:
            uncond, cond = velocity.chunk(2)
            velocity = guide(uncond, cond, guidance)
        x = euler_step(x, velocity, float(schedule.step_sizes[i]))
    return x.cpu().numpy()
