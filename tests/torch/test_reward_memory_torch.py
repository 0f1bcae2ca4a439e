"""GRPO's backward runs per trained sampler step: the tensors autograd keeps alive do not grow with the steps."""

from __future__ import annotations

import numpy as np
import torch

from contentv_common.config.reward import GrpoConfig, RolloutConfig
from tests.parity.reward_fixtures import GRPO_BATCH, rollout_batch, step_noise, torch_model

STEPS = 4


class SavedBytes:
    """Peak bytes of the tensors autograd holds for backward (saved_tensors_hooks; freed ones are subtracted)."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        return _Held(tensor, size, self)

    @staticmethod
    def unpack(held: _Held) -> torch.Tensor:
        return held.tensor


class _Held:
    def __init__(self, tensor: torch.Tensor, size: int, owner: SavedBytes):
        self.tensor, self.size, self.owner = tensor, size, owner

    def __del__(self):
        self.owner.live -= self.size


def _peak_saved_bytes(train_steps: int) -> tuple[int, dict[str, torch.Tensor]]:
    from contentv_torch_npu.reward import train as tr

    model = torch_model()
    rollout = RolloutConfig(prompts=("p",), steps=STEPS, shift=3.0, guidance=2.0)
    grpo = GrpoConfig(group_size=GRPO_BATCH, noise_level=0.7, kl_weight=0.0, sft_weight=0.0, train_steps=train_steps)
    batch = tr.to_device_batch(rollout_batch(3, GRPO_BATCH, guided=True, group_size=GRPO_BATCH))
    noise = torch.from_numpy(step_noise(5, GRPO_BATCH, train_steps))
    states, log_probs = tr.sde_rollout(model, batch, noise, rollout, grpo)
    advantages = torch.from_numpy(np.array([1.0, -1.0, 0.5, -0.5], np.float32))
    batch.update(states=states, old_log_probs=log_probs + 0.1, advantages=advantages)
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        tr.grpo_backward(model, None, batch, rollout, grpo)
    return counter.peak, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grpo_saved_activations_do_not_grow_with_trained_steps():
    peak2, grads2 = _peak_saved_bytes(2)
    peak4, grads4 = _peak_saved_bytes(4)
    assert peak2 > 0 and peak4 < 1.1 * peak2, (peak2, peak4)
    assert any(not torch.equal(grads2[n], grads4[n]) for n in grads2)  # 4 steps did train 2 more steps
