"""Reward tuning with LoRA (ReFL on the tiny recipe) in each backend: only the adapters train, the adapter file is
written, and the exported model is the untouched seeded base with those adapters merged in."""

from __future__ import annotations

import numpy as np
import pytest

from contentv_common.lora.adapters import load_adapters, merge
from tests.e2e.test_reward_run import _recipe, _rows, synthetic  # noqa: F401 (the synthetic set fixture)

LORA = {"lora.rank": 4, "lora.alpha": 8.0, "steps": 1, "rollout.steps": 1, "refl.grad_steps": 1, "refl.sft_weight": 0.0}


def _check(tmp_path, base: dict[str, np.ndarray], exported: dict[str, np.ndarray], rel_err) -> None:
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0] and all(r["skipped"] == 0 for r in rows)
    adapters, rank, alpha = load_adapters(tmp_path / "ckpt" / "lora.safetensors")
    assert (rank, alpha) == (4, 8.0) and len(adapters) == 42
    assert max(np.abs(v).max() for k, v in adapters.items() if ".lora_B." in k) > 0  # the adapters trained
    expected = merge(base, adapters, alpha / rank)
    assert sorted(exported) == sorted(expected)
    for k in expected:
        assert rel_err(exported[k], expected[k]) < 1e-6, k  # the base untouched, the adapters merged


@pytest.mark.slow
def test_jax_reward_lora(synthetic, tmp_path, rel_err):  # noqa: F811
    from flax import nnx

    from contentv_jax.loading import canonical_tensors, load_transformer
    from contentv_jax.reward.run import run
    from contentv_jax.transformer import Transformer

    recipe = _recipe("reward_refl_tiny", synthetic, tmp_path, **LORA)
    run(recipe, progress=False)
    base = dict(canonical_tensors(Transformer(recipe.model_config, rngs=nnx.Rngs(recipe.seed))))
    exported = dict(canonical_tensors(load_transformer(tmp_path / "transformer")))
    _check(tmp_path, base, exported, rel_err)


def test_torch_reward_lora(synthetic, tmp_path, rel_err):  # noqa: F811
    import torch

    from contentv_torch_npu import checkpointing as ckpt
    from contentv_torch_npu.loading import load_transformer
    from contentv_torch_npu.reward.run import run
    from contentv_torch_npu.transformer import Transformer

    recipe = _recipe("reward_refl_tiny", synthetic, tmp_path, **LORA)
    run(recipe, progress=False, device="cpu")
    torch.manual_seed(recipe.seed)
    base = {k: v.numpy() for k, v in Transformer(recipe.model_config).state_dict().items()}
    state = ckpt.load_state(ckpt.latest_checkpoint(tmp_path / "ckpt"))
    assert sorted(state.exp_avg) == sorted(k for k in state.params if ".lora_" in k)  # AdamW: the adapters alone
    adapters, _, _ = load_adapters(tmp_path / "ckpt" / "lora.safetensors")
    assert all(np.array_equal(state.params[k], adapters[k]) for k in adapters)
    exported = {k: v.numpy() for k, v in load_transformer(tmp_path / "transformer").state_dict().items()}
    _check(tmp_path, base, exported, rel_err)  # as the JAX twin: the tuned model beside the checkpoints
