"""Peak host memory per rank of the sharded torch checkpoint paths (save, resume, init_from streaming).

    torchrun --nproc_per_node=4 tools/measure_checkpoint_rss.py --out /tmp/ckpt_rss [--blocks 4]

A narrow model (38 heads x 16, width 608, `--blocks` blocks; ~13 M parameters per block) is sharded over every rank
(FSDP2). For each path the rank's peak RSS above its RSS just before (Linux VmHWM, reset through
/proc/self/clear_refs) is printed next to the rank's share of the training state (fp32 weights, two AdamW
moments, EMA) and the largest single tensor: the bound docs/scale.md states is share + one tensor.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from contentv_common.checkpoint.formats import open_checkpoint
from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import MeshConfig, OptimizerConfig
from contentv_torch_npu.distributed import init_distributed, shard_model
from contentv_torch_npu.loading import save_torch
from contentv_torch_npu.optim import make_optimizer
from contentv_torch_npu.sharded_checkpoint import load_sharded, save_sharded, stream_weights
from contentv_torch_npu.transformer import Transformer


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _start() -> int:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status("VmRSS")


def _sharded(cfg: ModelConfig, mesh) -> tuple[Transformer, torch.optim.Optimizer, dict]:
    with torch.device("meta"):
        model = Transformer(cfg, ops="torch")
    shard_model(model, mesh).to_empty(device="cpu")
    optimizer = make_optimizer(model, OptimizerConfig(lr=1e-4))
    for p in model.parameters():
        optimizer.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
    return model, optimizer, {n: torch.zeros_like(p.detach()) for n, p in model.named_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="scratch folder for the checkpoints")
    ap.add_argument("--blocks", type=int, default=4)
    args = ap.parse_args()
    cfg = ModelConfig(
        num_layers=args.blocks, num_attention_heads=38, attention_head_dim=16, hidden_size=608,
        joint_attention_dim=256, pooled_projection_dim=64,
    )  # fmt: skip
    out = Path(args.out)
    topo = init_distributed("cpu", MeshConfig(fsdp=int(os.environ.get("WORLD_SIZE", "1"))))
    torch.set_num_threads(1)
    if topo.is_main:
        torch.manual_seed(0)
        save_torch(out / "init", Transformer(cfg, ops="torch"), overwrite=True)
    dist.barrier()
    result = {}
    base = _start()
    model, optimizer, ema = _sharded(cfg, topo.shard_mesh)
    stream_weights(model, open_checkpoint(out / "init"))
    result["init_from (build + stream)"] = _status("VmHWM") - base
    share = sum(t.to_local().nbytes for t in ema.values()) * 4
    with torch.device("meta"):
        largest = max(p.numel() * 4 for p in Transformer(cfg, ops="torch").parameters())
    base = _start()
    save_sharded(out / "step_00000001", model, optimizer, ema, {"step": 1, "data_position": 1, "counters": {}})
    result["save"] = _status("VmHWM") - base
    del model, optimizer, ema
    base = _start()
    model, optimizer, ema = _sharded(cfg, topo.shard_mesh)
    load_sharded(out / "step_00000001", model, optimizer, ema)
    result["resume (build + load)"] = _status("VmHWM") - base
    row = {"rank": topo.rank, "share_MiB": share / 2**20, "largest_tensor_MiB": largest / 2**20}
    row.update({k: v / 2**20 for k, v in result.items()})
    print(json.dumps(row), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
