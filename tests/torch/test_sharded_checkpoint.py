"""Sharded checkpoints on 4 gloo processes: each rank writes its own slices (DCP's safetensors layout, no pickle),
a run on another mesh (HSDP) reads them back resharded, a run with the state sharded over data too reads HSDP's,
`init_from` streams each rank's slices, and the `model/` and `ema/` folders convert to diffusers, single-file
safetensors and our JAX format bit for bit."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from contentv_common.checkpoint.convert import convert
from contentv_common.checkpoint.formats import open_checkpoint
from contentv_common.config.model import named_model_config
from contentv_common.config.recipe import MeshConfig, OptimizerConfig
from contentv_torch_npu.checkpointing import load_state
from contentv_torch_npu.distributed import init_distributed, shard_model
from contentv_torch_npu.loading import save_torch
from contentv_torch_npu.optim import make_optimizer
from contentv_torch_npu.sharded_checkpoint import is_sharded, load_sharded, save_sharded, stream_weights
from contentv_torch_npu.transformer import Transformer
from tools.launch_local import free_port


def _model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(named_model_config("tiny"), ops="torch")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def _full(t: torch.Tensor) -> np.ndarray:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().numpy().copy()


def full_state(model, optimizer, ema) -> dict[str, np.ndarray]:
    """Whole weights, EMA and AdamW state (every rank takes part; each gets all of it)."""
    out = {f"param/{n}": _full(p) for n, p in model.named_parameters()}
    out.update({f"ema/{n}": _full(t) for n, t in ema.items()})
    for n, s in get_optimizer_state_dict(model, optimizer)["state"].items():
        out.update({f"{k}/{n}": _full(s[k]) for k in ("exp_avg", "exp_avg_sq")} | {f"step/{n}": _full(s["step"])})
    return out


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    root = Path(folder)
    topo = init_distributed("cpu", MeshConfig(fsdp=4))
    model = shard_model(_model(), topo.shard_mesh)
    optimizer = make_optimizer(model, OptimizerConfig(lr=1e-2))
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    model(
        x, torch.tensor([300.0]), torch.randn(1, 6, 48, generator=g), torch.randn(1, 24, generator=g)
    ).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        for n, p in model.named_parameters():
            ema[n].mul_(0.5).add_(p.detach(), alpha=0.5)
    saved = full_state(model, optimizer, ema)
    save_sharded(root / "step_00000001", model, optimizer, ema, {"step": 1, "data_position": 1, "counters": {}})
    # another mesh (HSDP data 2 x fsdp 2) reads the same files, resharded
    topo = init_distributed("cpu", MeshConfig(data=2, fsdp=2))
    model = shard_model(Transformer(named_model_config("tiny"), ops="torch"), topo.shard_mesh)
    optimizer = make_optimizer(model, OptimizerConfig(lr=1e-2))
    ema = {n: torch.zeros_like(p.detach()) for n, p in model.named_parameters()}
    meta = load_sharded(root / "step_00000001", model, optimizer, ema)
    loaded = full_state(model, optimizer, ema)
    # init_from: a torch-format folder streamed slice by slice into a sharded model
    if rank == 0:
        save_torch(root / "init", _model())
    dist.barrier()
    with torch.device("meta"):
        streamed = Transformer(named_model_config("tiny"), ops="torch")
    shard_model(streamed, topo.shard_mesh).to_empty(device="cpu")
    stream_weights(streamed, open_checkpoint(root / "init"))
    local_rows = streamed.proj_out.weight.to_local().shape[0]
    init = {f"init/{n}": _full(p) for n, p in streamed.named_parameters()}
    # saved from HSDP (replicated over data), read back with the state sharded over data x sequence (shard_data)
    save_sharded(root / "step_00000002", model, optimizer, ema, {"step": 2, "data_position": 2, "counters": {}})
    topo = init_distributed("cpu", MeshConfig(data=2, sequence=2, shard_data=True))
    model = shard_model(Transformer(named_model_config("tiny"), ops="torch"), topo.shard_mesh)
    optimizer = make_optimizer(model, OptimizerConfig(lr=1e-2))
    ema = {n: torch.zeros_like(p.detach()) for n, p in model.named_parameters()}
    load_sharded(root / "step_00000002", model, optimizer, ema)
    zero3 = {f"zero3/{k}": v for k, v in full_state(model, optimizer, ema).items()}
    zero3_rows = model.proj_out.weight.to_local().shape[0]
    if rank == 0:
        np.savez(root / "saved.npz", **saved)
        np.savez(
            root / "loaded.npz", **loaded, **init, **zero3, step=meta["step"], local_rows=local_rows,
            zero3_rows=zero3_rows,
        )  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_save_reshard_resume_stream_and_convert(tmp_path, spawn_ranks):
    spawn_ranks(_worker, (4, free_port(), str(tmp_path)), 4)
    step = tmp_path / "step_00000001"
    assert is_sharded(step)
    for part in ("model", "ema", "optimizer"):  # one file per rank, each holding its slices only
        files = sorted((step / part).glob("shard-*.safetensors"))
        assert [f.name[:11] for f in files] == [f"shard-{r:05d}" for r in range(1, 5)]
    assert not list(step.rglob("*.metadata")) and not list(step.rglob("*.distcp"))  # nothing pickled
    saved, loaded = dict(np.load(tmp_path / "saved.npz")), dict(np.load(tmp_path / "loaded.npz"))
    assert int(loaded["step"]) == 1 and int(loaded["local_rows"]) == 64 // 2  # HSDP: 2 shards of proj_out
    assert int(loaded["zero3_rows"]) == 64 // 4  # shard_data: 4 shards of proj_out
    for key, value in saved.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
        np.testing.assert_array_equal(loaded[f"zero3/{key}"], value, err_msg=f"HSDP -> ZeRO-3 over data: {key}")
    reference = _model()
    for n, p in reference.named_parameters():
        np.testing.assert_array_equal(loaded[f"init/{n}"], p.detach().numpy(), err_msg=n)
    state = load_state(step)  # the whole state in one process (conversion of training states, comparisons)
    assert (state.step, state.adam_step, state.data_position) == (1, 1, 1)
    for n, a in state.params.items():
        np.testing.assert_array_equal(a, saved[f"param/{n}"], err_msg=n)
        np.testing.assert_array_equal(state.exp_avg_sq[n], saved[f"exp_avg_sq/{n}"], err_msg=n)
    # the parts are transformer folders: read, converted to diffusers and to one safetensors file, bit for bit
    source = open_checkpoint(step / "ema")
    ema = dict(source.tensors())
    assert sorted(ema) == sorted(n for n, _ in reference.named_parameters())
    for n, a in ema.items():
        np.testing.assert_array_equal(a, saved[f"ema/{n}"], err_msg=n)
    convert(step / "model", tmp_path / "diffusers", "diffusers", progress=False)
    convert(tmp_path / "diffusers", tmp_path / "single", "torch", progress=False)
    assert [f.name for f in (tmp_path / "single").glob("*.safetensors")] == ["model.safetensors"]
    for n, a in open_checkpoint(tmp_path / "single").tensors():
        np.testing.assert_array_equal(a, saved[f"param/{n}"], err_msg=n)
    import contentv_jax  # noqa: F401  (registers our JAX format)

    convert(step / "ema", tmp_path / "jax", "jax", progress=False)  # orbax, blocks stacked
    jax_ema = dict(open_checkpoint(tmp_path / "jax").tensors())
    assert sorted(jax_ema) == sorted(ema)
    for n, a in jax_ema.items():
        np.testing.assert_array_equal(a, saved[f"ema/{n}"], err_msg=n)
