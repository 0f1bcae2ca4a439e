"""The torch trainer end to end on the tiny recipe: it learns, checkpoints atomically, resumes exactly, and 2 gloo
processes (FSDP2 data parallel, or Ulysses sequence parallel) follow the single-process losses."""

import json
import os
import socket

import numpy as np
import pytest
import torch.multiprocessing as mp

from contentv_common.recipe import load_recipe
from contentv_torch_npu import checkpointing as ckpt
from contentv_torch_npu.train import learning_rate, run

RECIPE = "configs/recipes/tiny.yaml"


def _recipe(dataset, folder, **overrides):
    base = {
        "data": {**dataset, "text_dropout": 0.25, "num_threads": 0},
        "steps": 4,
        "compute_dtype": "float32",
        "checkpoint": {"dir": str(folder / "ckpt"), "interval": 2, "keep": 2},
        "log_dir": str(folder / "logs"),
        "optimizer.warmup_steps": 2,
    }
    return load_recipe(RECIPE, {**base, **overrides})


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_is_exact(tiny_dataset, tmp_path):
    straight = tmp_path / "straight"
    records = []
    recipe = _recipe(tiny_dataset, straight, steps=4, **{"checkpoint.interval": 2})
    metrics = run(recipe, device="cpu", progress=False, on_step=records.append)
    assert [r["step"] for r in records] == [0, 1, 2, 3] and all(r["batch"] == 2 for r in records)
    assert metrics["step"] == 4 and np.isfinite(metrics["loss"])
    assert [p.name for p in sorted((straight / "ckpt").iterdir())] == ["step_00000002", "step_00000004"]
    interrupted = tmp_path / "interrupted"
    run(_recipe(tiny_dataset, interrupted, steps=2, **{"checkpoint.interval": 2}), device="cpu", progress=False)
    run(_recipe(tiny_dataset, interrupted, steps=4, **{"checkpoint.interval": 2}), device="cpu", progress=False)
    assert _losses(interrupted) == _losses(straight)  # same numbers, step by step
    a = ckpt.load_state(straight / "ckpt" / "step_00000004")
    b = ckpt.load_state(interrupted / "ckpt" / "step_00000004")
    assert (a.step, a.adam_step, a.data_position) == (b.step, b.adam_step, b.data_position) == (4, 4, 4)
    for field in ("params", "exp_avg", "exp_avg_sq", "ema"):
        x, y = getattr(a, field), getattr(b, field)
        assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x), field
    assert not np.array_equal(a.ema["proj_out.weight"], a.params["proj_out.weight"])


def test_learning_rate_schedule():
    opt = load_recipe(RECIPE, {"optimizer.warmup_steps": 4, "optimizer.decay": "cosine"}).optimizer
    lrs = [learning_rate(opt, s, 14) for s in range(15)]
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(opt.lr / 2) and lrs[4] == pytest.approx(opt.lr)
    assert lrs[9] == pytest.approx(opt.lr / 2) and lrs[14] == pytest.approx(0.0, abs=1e-12)


def test_bad_mesh_is_an_error(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="mesh.tensor"):
        run(_recipe(tiny_dataset, tmp_path, **{"mesh.tensor": 2}), device="cpu", progress=False)


def _worker(rank, world, port, dataset, folder, overrides):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    run(_recipe(dataset, folder, **overrides), device="cpu", progress=False)
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mesh", [{"mesh.fsdp": 2}, {"mesh.sequence": 2}], ids=["fsdp2", "ulysses"])
def test_two_processes_follow_one(tiny_dataset, tmp_path, mesh, rel_err):
    single = tmp_path / "single"
    run(_recipe(tiny_dataset, single, steps=3), device="cpu", progress=False)
    multi = tmp_path / "multi"
    mp.spawn(_worker, args=(2, _free_port(), tiny_dataset, multi, {"steps": 3, **mesh}), nprocs=2, join=True)
    assert rel_err(_losses(multi), _losses(single)) < 1e-5
    a = ckpt.load_state(single / "ckpt" / "step_00000003")
    b = ckpt.load_state(multi / "ckpt" / "step_00000003")
    for k in a.params:
        assert rel_err(b.params[k], a.params[k]) < 1e-4, k
