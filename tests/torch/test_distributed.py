"""gloo processes on CPU: FSDP2 data parallel (2 ranks) and HSDP (4 ranks, data 2 x fsdp 2) equal one process on the
whole batch, Ulysses sequence parallel equals no sequence parallelism (outputs and summed gradients), and the
recipe's mesh maps to process groups as documented."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from contentv_common.config.model import named_model_config
from contentv_common.config.recipe import MeshConfig
from contentv_torch_npu.distributed import (
    check_mesh,
    enable_sequence_parallel,
    init_distributed,
    sequence_groups,
    shard_mesh_shape,
    shard_model,
)
from contentv_torch_npu.transformer import Transformer
from tools.launch_local import free_port

STEPS = 2


def _model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(named_model_config("tiny"), ops="torch")
    for p in model.parameters():  # adaLN-zero style zeros would hide bugs: give every weight a value
        torch.nn.init.normal_(p, std=0.05)
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 16, 2, 8, 8, generator=g)  # 2 frames x 4 x 4 patches = 32 image tokens
    return latents, torch.tensor([100.0, 700.0]), torch.randn(2, 6, 48, generator=g), torch.randn(2, 24, generator=g)


def _loss(model, batch):
    latents, *rest = batch
    return (model(latents, *rest) - latents).square().mean()


def _reference() -> dict[str, np.ndarray]:
    model, batch = _model(), _batch()
    out = {"sp_out": model(*batch).detach().numpy()}
    loss = _loss(model, batch)
    loss.backward()
    out["sp_loss"] = loss.detach().numpy()
    out.update({f"sp_grad/{n}": p.grad.numpy().copy() for n, p in model.named_parameters()})
    model.zero_grad()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for step in range(STEPS):
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out[f"dp_loss/{step}"] = loss.detach().numpy()
    out.update({f"dp_param/{n}": p.detach().numpy().copy() for n, p in model.named_parameters()})
    return out


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    topo = init_distributed("cpu", MeshConfig(sequence=world))
    out = {}
    batch = _batch()
    # Ulysses: both ranks see the whole batch and split its tokens.
    model = _model()
    enable_sequence_parallel(model, topo.sp_group, "cpu")
    out["sp_out"] = model(*batch).detach().numpy()
    loss = _loss(model, batch)
    loss.backward()
    out["sp_loss"] = loss.detach().numpy()
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad, group=topo.sp_group)  # each rank holds its tokens' share
        out[f"sp_grad/{n}"] = p.grad.numpy()
    # FSDP2: each rank takes one sample; gradients are averaged by the reduce-scatter.
    model = shard_model(_model(), topo.shard_mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    mine = tuple(t[rank : rank + 1] for t in batch)
    for step in range(STEPS):
        loss = _loss(model, mine)
        loss.backward()
        opt.step()
        opt.zero_grad()
        dist.all_reduce(loss := loss.detach(), op=dist.ReduceOp.AVG)
        out[f"dp_loss/{step}"] = loss.numpy()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out.update({f"dp_param/{n}": t.numpy() for n, t in full.items() if n != "patch_embed.pos_table"})
    np.savez(os.path.join(folder, f"rank{rank}.npz"), **out)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_fsdp_and_ulysses_match_single_process(tmp_path, rel_err, spawn_ranks):
    spawn_ranks(_worker, (2, free_port(), str(tmp_path)), 2)
    ref = _reference()
    for rank in range(2):
        got = dict(np.load(tmp_path / f"rank{rank}.npz"))
        expected = [k for k in ref if rank == 0 or not k.startswith("dp_param")]  # full params come to rank 0
        assert sorted(got) == sorted(expected)
        assert rel_err(got["sp_out"], ref["sp_out"]) < 1e-6
        for key in expected:
            tol = 1e-5 if key.startswith(("sp_", "dp_loss")) else 1e-4
            assert rel_err(got[key], ref[key]) < tol, (rank, key, rel_err(got[key], ref[key]))
    assert float(ref["dp_loss/1"]) < float(ref["dp_loss/0"])  # the steps did train


def _hsdp_batch():
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(4, 16, 1, 8, 8, generator=g)
    return (
        latents,
        torch.tensor([100.0, 300.0, 600.0, 900.0]),
        torch.randn(4, 6, 48, generator=g),
        torch.randn(4, 24, generator=g),
    )


def _hsdp_train(model, batch, losses):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(STEPS):
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return model


def _hsdp_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    topo = init_distributed("cpu", MeshConfig(data=2, fsdp=2))
    model = shard_model(_model(), topo.shard_mesh)
    weight = model.proj_out.weight
    placements = [type(p).__name__ for p in weight.placements]
    local_rows = weight.to_local().shape[0]
    losses = []
    _hsdp_train(model, tuple(t[topo.dp_rank : topo.dp_rank + 1] for t in _hsdp_batch()), losses)
    loss = torch.stack(losses)
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = {"loss": loss.numpy(), "placements": np.array(placements), "local_rows": np.array(local_rows)}
    if rank == 0:
        out.update({f"param/{n}": t.numpy() for n, t in full.items() if n != "patch_embed.pos_table"})
    np.savez(os.path.join(folder, f"rank{rank}.npz"), **out)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


@pytest.mark.slow
def test_hsdp_four_processes_match_single_process(tmp_path, rel_err, spawn_ranks):
    """mesh data=2 x fsdp=2: parameters replicated over data and sharded over fsdp; the AdamW trajectory equals one
    process on the whole batch."""
    spawn_ranks(_hsdp_worker, (4, free_port(), str(tmp_path)), 4)
    losses = []
    ref = _hsdp_train(_model(), _hsdp_batch(), losses)
    rows = ref.proj_out.weight.shape[0]
    for rank in range(4):
        got = dict(np.load(tmp_path / f"rank{rank}.npz"))
        assert list(got["placements"]) == ["Replicate", "Shard"] and int(got["local_rows"]) == rows // 2
        assert rel_err(got["loss"], torch.stack(losses).numpy()) < 1e-5
    got = dict(np.load(tmp_path / "rank0.npz"))
    for n, p in ref.named_parameters():
        assert rel_err(got[f"param/{n}"], p.detach().numpy()) < 1e-4, n


def test_mesh_must_cover_the_world():
    check_mesh(MeshConfig(data=2, fsdp=2, sequence=2), 8)
    with pytest.raises(
        ValueError, match=r"mesh.data 2 x mesh.fsdp 2 x mesh.sequence 1 = 4 processes, .* world size is 8"
    ):
        check_mesh(MeshConfig(data=2, fsdp=2), 8)
    with pytest.raises(ValueError, match="mesh.tensor"):
        check_mesh(MeshConfig(tensor=2), 2)


@pytest.mark.parametrize(
    "mesh, shape, groups",
    [
        (MeshConfig(data=2, fsdp=2), ((2, 2), ("data", "shard")), [[0], [1], [2], [3]]),  # HSDP
        (MeshConfig(data=2), ((2, 1), ("data", "shard")), [[0], [1]]),  # pure replication
        (MeshConfig(fsdp=4), ((4,), ("shard",)), [[0], [1], [2], [3]]),  # FSDP over every rank
        (MeshConfig(data=2, sequence=2), ((2, 2), ("data", "shard")), [[0, 1], [2, 3]]),  # Ulysses pairs share shards
        (MeshConfig(fsdp=2, sequence=2), ((4,), ("shard",)), [[0, 1], [2, 3]]),
        (MeshConfig(data=2, sequence=2, shard_data=True), ((4,), ("shard",)), [[0, 1], [2, 3]]),  # ZeRO-3 over all
    ],
)
def test_mesh_layout(mesh, shape, groups):
    """Parameters replicate over `data` only (unless `shard_data`); sequence ranks fold into the shard side (ZeRO-3
    over fsdp x sequence)."""
    assert shard_mesh_shape(mesh) == shape
    assert sequence_groups(mesh) == groups
