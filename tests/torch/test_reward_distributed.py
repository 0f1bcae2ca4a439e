"""Reward fine-tuning on the training mesh (FSDP2 / HSDP + Ulysses) equals the single-process step.

A narrow model that keeps ContentV's 38 heads and 333 text tokens (head_dim 8, 2 blocks, 9 image tokens) takes one
ReFL step (2 differentiable sampler steps with CFG, SFT term, EMA anchor) and one GRPO iteration (SDE rollout,
black-box rewards, 2 clipped updates with KL and SFT) with FSDP2 over 2 gloo processes and with FSDP 2 x sequence 2
over 4, blocks recomputed in the backward pass there (`remat: full`); the gradients each AdamW update sees, the
metrics, the updated weights and anchor, and the gradient w.r.t. the model's input match one process on the whole
batch (< 1e-5 relative, fp32).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import MeshConfig, OptimizerConfig
from contentv_common.config.reward import GrpoConfig, ReflConfig, RolloutConfig
from contentv_common.errors import ConfigError
from contentv_common.reward.models import TargetColour, as_black_box
from contentv_torch_npu.distributed import Topology, enable_sequence_parallel, init_distributed, shard_model
from contentv_torch_npu.optim import make_optimizer
from contentv_torch_npu.transformer import Transformer
from tests.parity.reward_fixtures import tiny_vae_decoder_torch
from tools.launch_local import free_port

pytestmark = pytest.mark.slow  # every test here trains, tunes or compiles for real

CFG = ModelConfig(
    num_layers=2, num_attention_heads=38, attention_head_dim=8, hidden_size=304, joint_attention_dim=16,
    pooled_projection_dim=16, mlp_ratio=1,
)  # fmt: skip
TEXT = 333
LATENT = (16, 1, 6, 6)  # 1 latent frame of 3 x 3 patches: 9 image tokens (odd, so Ulysses pads them too)
BATCH = 2  # prompts per step: one per data-parallel group
OPT = OptimizerConfig(lr=1e-3, grad_clip=1.0)
REFL_ROLLOUT = RolloutConfig(prompts=("p",), steps=2, shift=3.0, guidance=2.0)
REFL = ReflConfig(grad_steps=2, sft_weight=0.5, anchor="ema", anchor_weight=0.3, anchor_ema_decay=0.9)
GRPO_ROLLOUT = RolloutConfig(prompts=("p",), steps=2, shift=3.0, guidance=1.0)
GRPO = GrpoConfig(group_size=2, noise_level=0.7, clip_range=0.05, kl_weight=0.05, sft_weight=0.1, updates_per_rollout=2)
REWARD = TargetColour((0.9, 0.2, 0.1))


def _model(seed: int, remat: bool = False) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CFG, ops="torch", gradient_checkpointing=remat)
    for p in model.parameters():  # adaLN-zero style zeros would hide bugs: give every weight a value
        torch.nn.init.normal_(p, std=0.05)
    return model


def _inputs(seed: int, rows: int, sft_rows: int) -> dict[str, np.ndarray]:
    """Rollout inputs for `rows` rows and an SFT batch of `sft_rows` rows, as RewardData lays them out."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    return {
        "noise": normal(rows, *LATENT), "text": normal(rows, TEXT, 16), "pooled": normal(rows, 16),
        "neg_text": np.repeat(normal(1, TEXT, 16), rows, 0), "neg_pooled": np.repeat(normal(1, 16), rows, 0),
        "tokens": np.zeros((rows, 0), np.int32),
        "sft_x0": normal(sft_rows, *LATENT), "sft_noise": normal(sft_rows, *LATENT),
        "sft_sigmas": rng.uniform(0.05, 0.95, sft_rows).astype(np.float32),
        "sft_weights": np.ones(sft_rows, np.float32), "sft_text": normal(sft_rows, TEXT, 16),
        "sft_pooled": normal(sft_rows, 16),
    }  # fmt: skip


def _full(t: torch.Tensor) -> np.ndarray:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().numpy().copy()


def _record_gradients(model: torch.nn.Module, into: list):
    """An optimizer step pre-hook: the whole gradients this update applies (collective on a mesh)."""

    def hook(*_) -> None:
        into.append({n: _full(p.grad) for n, p in model.named_parameters()})

    return hook


def _train(topo: Topology) -> dict[str, np.ndarray]:
    """One ReFL step and one GRPO iteration on this rank's rows; every tensor the test compares, gathered."""
    from contentv_torch_npu.reward import train as tr
    from contentv_torch_npu.reward.run import local_batch

    out: dict[str, np.ndarray] = {}
    for method in ("refl", "grpo"):
        # a reference that differs, so the anchor / KL terms count; on the mesh, blocks recomputed (remat: full)
        model, ref = _model(0, remat=topo.world > 1), _model(1).requires_grad_(False)
        if topo.world > 1:
            shard_model(model, topo.shard_mesh)
            shard_model(ref, topo.shard_mesh)
        if topo.sp > 1:
            enable_sequence_parallel(model, topo.sp_group, "cpu")
            enable_sequence_parallel(ref, topo.sp_group, "cpu")
        optimizer = make_optimizer(model, OPT)
        updates: list[dict[str, np.ndarray]] = []
        optimizer.register_step_pre_hook(_record_gradients(model, updates))
        tuning = tr.Tuning(OPT, 10)
        if method == "refl":
            batch, _ = local_batch(_inputs(7, BATCH, BATCH), [""] * BATCH, topo)
            metrics = tr.refl_train_step(optimizer, tuning, model, ref, tiny_vae_decoder_torch(), REWARD,
                                         tr.to_device_batch(batch), REFL_ROLLOUT, REFL, topo)  # fmt: skip
        else:
            rows = BATCH * GRPO.group_size
            noise = np.random.default_rng(9).standard_normal((GRPO_ROLLOUT.steps, rows, *LATENT), dtype=np.float32)
            batch, prompts = local_batch(_inputs(8, rows, BATCH), [""] * rows, topo)
            noise = noise[:, tr.row_slice(rows, topo)]
            metrics = tr.grpo_iteration(optimizer, tuning, model, ref, tiny_vae_decoder_torch(), as_black_box(REWARD),
                                        batch, noise, prompts, GRPO_ROLLOUT, GRPO, topo)  # fmt: skip
        out.update({f"{method}/metric/{k}": np.float64(v) for k, v in metrics.items()})
        for i, grads in enumerate(updates):
            out.update({f"{method}/grad{i}/{n}": g for n, g in grads.items()})
        out.update({f"{method}/param/{n}": _full(p) for n, p in model.named_parameters()})
        if method == "refl":
            out.update({f"refl/anchor/{n}": _full(p) for n, p in ref.named_parameters()})
    # the gradient w.r.t. the model's input, which chained sampler steps differentiate: a sequence rank's own is
    # only its tokens' share, every rank must hold the whole
    x = torch.from_numpy(batch["noise"]).requires_grad_()
    v = model(x, torch.full((len(x),), 500.0), torch.from_numpy(batch["text"]), torch.from_numpy(batch["pooled"]))
    (v.square() * torch.linspace(-1.0, 1.0, x[0].numel()).reshape(x.shape[1:])).sum().backward()
    out["input_grad"] = tr.gather_rows(x.grad, topo).numpy()
    return out


def _worker(rank: int, world: int, port: int, folder: str, mesh: MeshConfig) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out = _train(init_distributed("cpu", mesh, CFG))
    if rank == 0:
        np.savez(os.path.join(folder, "out.npz"), **out)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process() -> dict[str, np.ndarray]:
    out = _train(Topology())
    assert len([k for k in out if k.startswith("refl/grad")]) == len(list(_model(0).parameters()))
    assert any(k.startswith("grpo/grad1/") for k in out)  # both GRPO updates were applied
    assert out["refl/metric/anchor"] > 0 and out["grpo/metric/kl"] > 0 and out["grpo/metric/clip_fraction"] > 0
    return out


@pytest.mark.parametrize(
    "mesh", [MeshConfig(fsdp=2), MeshConfig(fsdp=2, sequence=2)], ids=["fsdp2", "fsdp2_x_sequence2"]
)
def test_sharded_refl_and_grpo_steps_match_one_process(mesh, single_process, tmp_path, rel_err, spawn_ranks):
    world = mesh.fsdp * mesh.sequence
    spawn_ranks(_worker, (world, free_port(), str(tmp_path), mesh), world, outputs=None)
    got = dict(np.load(tmp_path / "out.npz"))
    assert sorted(got) == sorted(single_process)
    for key, want in single_process.items():
        if key.endswith("reward_std"):  # a small spread of rewards near -0.2: its rounding error is the mean's
            scale = abs(single_process[key.replace("std", "mean")])
            assert abs(got[key] - want) < 1e-5 * scale, (key, got[key], want)
        else:
            assert rel_err(got[key], want) < 1e-5, (key, rel_err(got[key], want))


def test_a_mesh_the_world_cannot_honour_is_one_line():
    from contentv_common.config.reward import load_reward_recipe
    from contentv_torch_npu.reward.run import check_world

    recipe = load_reward_recipe("configs/recipes/reward_grpo_tiny.yaml", {"mesh.fsdp": 2})
    check_world(recipe, 2)
    with pytest.raises(ConfigError, match=r"^mesh.data 1 x mesh.fsdp 2 x mesh.sequence 1 = 2 processes, .* is 4"):
        check_world(recipe, 4)
    with pytest.raises(ConfigError, match="^mesh.tensor: the torch twin has no tensor parallelism"):
        check_world(load_reward_recipe("configs/recipes/reward_refl_tiny.yaml", {"mesh.tensor": 2}), 2)
