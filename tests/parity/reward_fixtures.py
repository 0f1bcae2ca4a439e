"""Shared inputs of the reward tests: tiny batches drawn in numpy, one set of configs, C1's tiny Wan VAE."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from contentv_common.config.recipe import OptimizerConfig
from contentv_common.config.reward import GrpoConfig, ReflConfig, RewardRecipe, RolloutConfig
from contentv_common.reward.models import TargetColour
from contentv_common.reward.sde import exploration_noise

C, F, H, W = 16, 2, 4, 4
TEXT_LEN, TEXT_DIM, POOLED_DIM = 5, 48, 24
TARGET = (0.9, 0.2, 0.1)
REWARD = TargetColour(TARGET)  # frozen: one instance serves every test and compiled step

# One set of configs and batch sizes for every JAX reward test, so the compiled steps are shared between them.
ROLLOUT = RolloutConfig(prompts=("p",), steps=3, shift=3.0, guidance=2.0)
REFL = ReflConfig(grad_steps=2, reward_weight=1.0, sft_weight=0.5, anchor="frozen", anchor_weight=0.3)
REFL_BATCH = 2
GRPO = GrpoConfig(group_size=4, noise_level=0.7, clip_range=0.2, kl_weight=0.05, sft_weight=0.1, updates_per_rollout=2)
GRPO_BATCH = 4
EVAL_SEED, EVAL_BATCH = 1000, 4


def tiny_vae_decoder_torch(seed: int = 3):
    """C1's tiny random Wan VAE behind the reward's first-frame decoder (torch)."""
    import torch

    from contentv_common.vae.config import tiny_vae_config
    from contentv_torch_npu.reward.train import VaeFirstFrameDecoder
    from contentv_torch_npu.vae import WanVAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VaeFirstFrameDecoder(WanVAE(tiny_vae_config()))


def torch_model(seed: int = 0):
    """The tiny transformer with torch's initialisation (the JAX tests load the same weights)."""
    import torch

    from contentv_common.config.model import named_model_config
    from contentv_torch_npu.transformer import Transformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Transformer(named_model_config("tiny"))


def reward_recipe(method: str, refl: ReflConfig = REFL, grpo: GrpoConfig = GRPO, **optimizer) -> RewardRecipe:
    """A one-device recipe around the shared configs (for the JAX RewardTuner; its data section is never read)."""
    from contentv_common.config.model import from_dict

    data = {
        "manifest": "unused",
        "cache_dir": "unused",
        "buckets": [{"width": 32, "height": 32, "frames": 5, "batch_size": 2}],
    }
    base = {"method": method, "model": "tiny", "reward": {"kind": "target_colour", "target": list(TARGET)},
            "rollout": {"prompts": ["p"]}, "checkpoint": {"dir": "unused"}, "steps": 8, "data": data}  # fmt: skip
    return replace(from_dict(RewardRecipe, base), rollout=ROLLOUT, refl=refl, grpo=grpo,
                   optimizer=OptimizerConfig(**optimizer))  # fmt: skip


def jax_twins(folder) -> tuple:
    """(JAX model, JAX first-frame decoder) with the weights of `torch_model()` and `tiny_vae_decoder_torch()`."""
    from contentv_jax.loading import load_transformer
    from contentv_jax.reward.train import VaeFirstFrameDecoder
    from contentv_jax.vae import load_vae
    from contentv_torch_npu.loading import save_torch
    from contentv_torch_npu.vae import save_vae

    save_torch(folder / "model", torch_model())
    save_vae(folder / "vae", tiny_vae_decoder_torch().vae)
    return load_transformer(folder / "model"), VaeFirstFrameDecoder(load_vae(folder / "vae"))


def prompt_embeddings(seed: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((batch, TEXT_LEN, TEXT_DIM), dtype=np.float32)
    return text, rng.standard_normal((batch, POOLED_DIM), dtype=np.float32)


def sft_batch(seed: int, batch: int) -> dict[str, np.ndarray]:
    """A stand-in 'real' batch: smooth latents (a fixed per-channel pattern + small noise) and their text."""
    rng = np.random.default_rng(seed)
    base = np.linspace(-1.0, 1.0, C, dtype=np.float32)[None, :, None, None, None]
    x0 = (base + 0.1 * rng.standard_normal((batch, C, F, H, W))).astype(np.float32)
    text, pooled = prompt_embeddings(seed + 1, batch)
    return {
        "sft_x0": x0,
        "sft_noise": rng.standard_normal(x0.shape, dtype=np.float32),
        "sft_sigmas": rng.uniform(0.05, 0.95, batch).astype(np.float32),
        "sft_weights": np.ones(batch, np.float32),
        "sft_text": text,
        "sft_pooled": pooled,
    }


def rollout_batch(seed: int, batch: int, guided: bool, group_size: int = 1) -> dict[str, np.ndarray]:
    """Start noise and prompt embeddings; rows come in groups of `group_size` sharing one prompt."""
    rng = np.random.default_rng(seed)
    text, pooled = prompt_embeddings(seed + 1, batch // group_size)
    text, pooled = np.repeat(text, group_size, axis=0), np.repeat(pooled, group_size, axis=0)
    out = {"noise": rng.standard_normal((batch, C, F, H, W), dtype=np.float32), "text": text, "pooled": pooled,
           "tokens": np.zeros((batch, 0), np.int32)}  # fmt: skip
    if guided:
        neg_text, neg_pooled = prompt_embeddings(99, 1)  # one negative prompt, as in sampling
        out.update(neg_text=np.repeat(neg_text, batch, axis=0), neg_pooled=np.repeat(neg_pooled, batch, axis=0))
    return out


def step_noise(seed: int, batch: int, steps: int, grid: int | None = None) -> np.ndarray:
    """GRPO's exploration noise [steps, batch, C, F, H, W] (steps: the explored ones), on `grid`'s cells when set."""
    return exploration_noise(np.random.default_rng(seed), (steps, batch, C, F, H, W), grid)
