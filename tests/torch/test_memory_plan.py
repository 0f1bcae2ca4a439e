"""The torch planner traces the real FSDP2 train step under FakeTensorMode on a fake world: its persistent bytes
are the rank's share of parameters, AdamW moments and EMA (over every rank with `mesh.shard_data`), its peak follows
what the step keeps alive, and a LoRA recipe on one process keeps the frozen base and the adapters' state."""

import dataclasses

import pytest

from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import BucketConfig, LoraConfig, MeshConfig, load_recipe
from contentv_torch_npu.memory_plan import plan_recipe

# 38 heads and 333 text tokens (padded inside Ulysses), narrow otherwise
CFG = ModelConfig(
    num_layers=3, num_attention_heads=38, attention_head_dim=16, hidden_size=608, joint_attention_dim=64,
    pooled_projection_dim=32, mlp_ratio=1,
)  # fmt: skip


BUCKETS = (BucketConfig(64, 64, 9, 4), BucketConfig(96, 64, 9, 4))  # 48 and 72 image tokens


def _recipe(mesh: MeshConfig, remat: str = "none", buckets: tuple[BucketConfig, ...] = BUCKETS, **overrides):
    recipe = load_recipe("tests/recipes/tiny.yaml", {"remat": remat})
    data = dataclasses.replace(recipe.data, buckets=buckets)
    return dataclasses.replace(recipe, model=CFG, mesh=mesh, data=data, **overrides)


def _params(lora: LoraConfig | None = None) -> tuple[int, int]:
    """(frozen, trained) parameter counts: (0, all) without LoRA, (base, adapters) with it."""
    import torch

    from contentv_torch_npu.lora import add_adapters
    from contentv_torch_npu.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(CFG, compute_dtype=torch.bfloat16)
    if lora is not None:
        add_adapters(model, lora, 0)
    counts = [0, 0]
    for p in model.parameters():
        counts[p.requires_grad] += p.numel()
    return counts[0], counts[1]


@pytest.mark.slow
def test_state_is_the_rank_share_and_remat_lowers_the_peak():
    mesh = MeshConfig(data=2, fsdp=2, sequence=2)  # HSDP, 8 fake ranks, parameters sharded 4 ways, 1 sample per rank
    plans, state_bytes = plan_recipe(_recipe(mesh), 2**30)
    assert [p.bucket for p in plans] == ["64x64x9", "96x64x9"]
    state = 4 * 4 * _params()[1] / 4  # fp32 params + 2 AdamW moments + EMA, over fsdp x sequence = 4 shards
    assert state <= sum(state_bytes.values()) < 1.05 * state and state_bytes["optimizer"] == 2 * state_bytes["ema"]
    for p in plans:
        assert state <= p.argument_bytes < 1.05 * state + 2**20  # + FSDP's dim-0 padding and the inputs
        assert p.temp_bytes > 0 and p.peak_bytes == p.argument_bytes + p.temp_bytes and p.fits
    small, big = plans
    assert (small.tokens, big.tokens) == (48 + 333, 72 + 333) and big.peak_bytes > small.peak_bytes
    (remat,), _ = plan_recipe(_recipe(mesh, remat="full", buckets=BUCKETS[:1]), small.peak_bytes - 1)
    assert remat.argument_bytes == small.argument_bytes and remat.peak_bytes < small.peak_bytes and remat.fits
    (tight,), _ = plan_recipe(_recipe(mesh, buckets=BUCKETS[:1]), small.peak_bytes - 1)
    assert tight.peak_bytes == small.peak_bytes and not tight.fits
    # ZeRO-3 over every rank: the state splits over data as well (8 shards), the inputs stay the rank's rows
    over_data = dataclasses.replace(mesh, shard_data=True)
    (zero3,), _ = plan_recipe(_recipe(over_data, buckets=BUCKETS[:1]), 2**30)
    assert state / 2 <= zero3.argument_bytes < 1.05 * state / 2 + 2**20 and zero3.argument_bytes < small.argument_bytes


@pytest.mark.slow
def test_lora_on_one_process_keeps_the_frozen_base_and_the_adapters_state():
    """World 1 (no FSDP, as contentv_torch_npu.train runs one process): bf16 base, fp32 adapters with their two AdamW
    moments and EMA; the whole batch on the one rank."""
    lora = LoraConfig(rank=4, alpha=4.0, base_dtype="bfloat16")
    recipe = _recipe(MeshConfig(), remat="full", buckets=BUCKETS[:1], lora=lora, compute_dtype="bfloat16")
    (plan,), state_bytes = plan_recipe(recipe, 2**30)
    base, adapters = _params(lora)
    state = 2 * base + 4 * 4 * adapters
    assert state_bytes == {"params": 2 * base + 4 * adapters, "optimizer": 8 * adapters, "ema": 4 * adapters}
    inputs = 4 * 4 * (2 * 16 * 3 * 8 * 8 + 333 * 64 + 32 + 2)  # 4 rows of latents, noise, text, pooled, sigma, weight
    assert adapters < base / 10 and plan.batch == 4 and plan.fits
    assert plan.argument_bytes == pytest.approx(state + inputs, rel=1e-4)  # + AdamW's step counts
    assert plan.temp_bytes > 4 * adapters  # at least the adapters' gradients


def test_mesh_the_model_cannot_honour_is_refused():
    with pytest.raises(ValueError, match="mesh.sequence 40 exceeds num_attention_heads 38"):
        plan_recipe(_recipe(MeshConfig(sequence=40), buckets=(BucketConfig(160, 64, 9, 4),)), 2**30)  # 120 tokens


def test_online_text_counts_the_encoders_weights_and_flops():
    """data.text: online: every rank keeps the text encoders' float32 weights (here the tiny ones, counted from their
    torch modules) beside the train state, and the step's FLOPs add their forward on the batch's prompts."""
    import torch

    from contentv_common.model.flops import text_encoder_flops
    from contentv_common.tiny_models import tiny_text
    from contentv_torch_npu.text_encoders import tiny_text_encoders

    cached = _recipe(MeshConfig(), buckets=BUCKETS[:1], compute_dtype="float32")
    online = dataclasses.replace(cached, data=dataclasses.replace(cached.data, text="online", encoders="tiny"))
    (plain,), plain_state = plan_recipe(cached, 2**30)
    (plan,), state = plan_recipe(online, 2**30)
    text = tiny_text_encoders(0)
    weights = 4 * sum(p.numel() for m in (*text.clips, text.t5) for p in m.parameters())
    assert all(p.dtype == torch.float32 for m in (*text.clips, text.t5) for p in m.parameters())
    assert state == {**plain_state, "text_encoders": weights}
    assert plan.argument_bytes - plain.argument_bytes == weights and plan.peak_bytes - plain.peak_bytes == weights
    assert plan.flops - plain.flops == text_encoder_flops(tiny_text().configs, 77, 256, 4)
