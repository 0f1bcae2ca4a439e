"""Ulysses at ContentV's real head and text-token counts: 38 heads and 333 text tokens divide by no sequence degree,
so heads and tokens are padded inside the sequence-parallel path. A narrow model (head_dim 8, 2 blocks, 18 image
tokens) gives the loss and gradients of one process on 4 gloo processes (sequence 4; FSDP2 x sequence 2) and on 8
(sequence 8: 40 heads, 24 image and 336 text tokens; the README's HSDP + SP command's mesh, data 2 x fsdp 2 x
sequence 2), and the 8-process mesh resumes the sharded checkpoint the 4-process run wrote, bit for bit."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import MeshConfig, OptimizerConfig
from contentv_torch_npu.distributed import (
    check_mesh,
    enable_sequence_parallel,
    init_distributed,
    padded,
    real_positions,
    shard_model,
)
from contentv_torch_npu.optim import global_grad_norm, make_optimizer
from contentv_torch_npu.sharded_checkpoint import load_sharded, save_sharded
from contentv_torch_npu.transformer import Transformer
from tests.torch.test_sharded_checkpoint import full_state
from tools.launch_local import free_port

CFG = ModelConfig(
    num_layers=2, num_attention_heads=38, attention_head_dim=8, hidden_size=304, joint_attention_dim=16,
    pooled_projection_dim=16, mlp_ratio=1,
)  # fmt: skip
TEXT = 333
MESHES = {
    4: {
        "sp4": MeshConfig(sequence=4),  # degree 4 over every rank (FSDP over the 4 ranks too)
        "fsdp2_sp2": MeshConfig(fsdp=2, sequence=2),  # FSDP2 over 4 ranks, 2 sequence groups with 1 sample each
    },
    8: {
        "hsdp_sp2": MeshConfig(data=2, fsdp=2, sequence=2),  # the README's 8-process HSDP + SP command
        "sp8": MeshConfig(sequence=8),  # heads padded to 40, image tokens to 24, text tokens to 336
    },
}
SAVED_BY, RESUMED_BY = "fsdp2_sp2", "hsdp_sp2"  # the checkpoint's mesh (4 processes) and the resuming one (8)


def _model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CFG, ops="torch")
    for p in model.parameters():  # adaLN-zero style zeros would hide bugs: give every weight a value
        torch.nn.init.normal_(p, std=0.05)
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(4, 16, 2, 6, 6, generator=g)  # 2 frames x 3 x 3 patches = 18 image tokens
    timesteps = torch.tensor([100.0, 700.0, 300.0, 900.0])  # 4 samples: one per data x fsdp group of 8 processes
    return latents, timesteps, torch.randn(4, TEXT, 16, generator=g), torch.randn(4, 16, generator=g)


def _loss(model, batch):
    latents, *rest = batch
    return (model(latents, *rest) - latents).square().mean()


def _reference() -> dict[str, np.ndarray]:
    model, batch = _model(), _batch()
    loss = _loss(model, batch)
    loss.backward()
    grads = {f"grad/{n}": p.grad.numpy().copy() for n, p in model.named_parameters()}
    norm = np.sqrt(sum(np.square(g.astype(np.float64)).sum() for g in grads.values()))
    return {"loss": loss.detach().numpy(), "grad_norm": norm, **grads}


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    root = Path(folder)
    for name, mesh in MESHES[world].items():
        topo = init_distributed("cpu", mesh, CFG)
        model = _model()
        enable_sequence_parallel(model, topo.sp_group, "cpu")
        shard_model(model, topo.shard_mesh)
        rows = 4 // topo.dp
        loss = _loss(model, tuple(t[topo.dp_rank * rows : (topo.dp_rank + 1) * rows] for t in _batch()))
        (loss * topo.sp).backward()  # the trainer's convention: FSDP averages, the sequence group sums
        dist.all_reduce(loss := loss.detach(), op=dist.ReduceOp.AVG)
        out = {"loss": loss.numpy(), "grad_norm": global_grad_norm(model).numpy()}  # from the local shards
        out.update({f"grad/{n}": p.grad.full_tensor().numpy() for n, p in model.named_parameters()})
        if rank == 0:
            np.savez(root / f"{name}.npz", **out)
        if name in (SAVED_BY, RESUMED_BY):
            _checkpoint(model, root, save=name == SAVED_BY)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def _checkpoint(model: Transformer, root: Path, save: bool) -> None:
    """Save a sharded checkpoint after one AdamW step (4 processes), or resume it into a fresh optimizer and EMA (8);
    rank 0 writes the whole state it holds either way."""
    optimizer = make_optimizer(model, OptimizerConfig(lr=1e-2))
    if save:
        optimizer.step()
        ema = {n: 0.5 * p.detach() for n, p in model.named_parameters()}  # unlike the weights: no mix-up hides
        save_sharded(root / "ckpt", model, optimizer, ema, {"step": 1, "data_position": 1, "counters": {}})
    else:
        ema = {n: torch.zeros_like(p.detach()) for n, p in model.named_parameters()}
        assert load_sharded(root / "ckpt", model, optimizer, ema)["step"] == 1
    state = full_state(model, optimizer, ema)
    if dist.get_rank() == 0:
        np.savez(root / ("saved.npz" if save else "resumed.npz"), **state)


@pytest.mark.slow
def test_38_heads_333_text_tokens_match_one_process_on_4_and_8_processes(tmp_path, rel_err, spawn_ranks):
    spawn_ranks(_worker, (4, free_port(), str(tmp_path)), 4)
    spawn_ranks(_worker, (8, free_port(), str(tmp_path)), 8)
    ref = _reference()
    for name in [*MESHES[4], *MESHES[8]]:
        got = dict(np.load(tmp_path / f"{name}.npz"))
        assert sorted(got) == sorted(ref), name
        for key, value in ref.items():
            assert rel_err(got[key], value) < 1e-5, (name, key, rel_err(got[key], value))
    saved, resumed = dict(np.load(tmp_path / "saved.npz")), dict(np.load(tmp_path / "resumed.npz"))
    assert sorted(saved) == sorted(resumed) and any(k.startswith("exp_avg_sq/") for k in saved)
    assert any(np.abs(saved[k]).max() > 0 for k in saved if k.startswith("exp_avg/"))  # the step did happen
    for key, value in saved.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)


@pytest.mark.parametrize("size", [2, 4, 8])
def test_real_positions_drop_exactly_the_padding(size):
    image, text = 18, TEXT
    keep = real_positions(size, image, text)
    ni, nt = padded(image, size) // size, padded(text, size) // size
    # the all-to-all'd sequence, labelled: image token i -> i, text token j -> 1000 + j, padding -> -1
    labels = []
    for rank in range(size):
        labels += [i if i < image else -1 for i in range(rank * ni, (rank + 1) * ni)]
        labels += [1000 + j if j < text else -1 for j in range(rank * nt, (rank + 1) * nt)]
    got = [labels[i] for i in keep.tolist()]
    assert sorted(got) == list(range(image)) + [1000 + j for j in range(text)]
    assert real_positions(size, 8 * size, 4 * size) is None


def test_mesh_the_model_cannot_honour_is_refused_at_start_up():
    check_mesh(MeshConfig(sequence=8), 8, CFG)
    check_mesh(MeshConfig(data=2, sequence=38), 76, CFG)
    with pytest.raises(ValueError, match="mesh.sequence 40 exceeds num_attention_heads 38"):
        check_mesh(MeshConfig(sequence=40), 40, CFG)
