"""The torch trainer end to end on the tiny recipe: it learns, checkpoints atomically, resumes exactly, trains in
bf16 autocast over fp32 masters, skips non-finite steps (then stops), and 2 gloo processes (FSDP2, Ulysses
sequence parallel, or the replicated data axis) follow the single-process losses."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from contentv_common.config.model import named_model_config
from contentv_common.config.recipe import load_recipe
from contentv_common.errors import TrainingStopped
from contentv_torch_npu import checkpointing as ckpt
from contentv_torch_npu.loading import load_transformer
from contentv_torch_npu.train import StepInputs, learning_rate, make_optimizer, run, train_step
from contentv_torch_npu.transformer import Transformer
from tests.cache_edit import nan_latents
from tools.launch_local import free_port

RECIPE = "tests/recipes/tiny.yaml"


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


def test_train_resume_is_exact(tiny_dataset, tmp_path, monkeypatch):
    from contentv_torch_npu import train

    straight = tmp_path / "straight"
    records, events = [], []
    step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: events.append("start") or step(*a, **k))
    recipe = _recipe(tiny_dataset, straight, steps=4, **{"checkpoint.interval": 2})
    result = run(recipe, device="cpu", progress=False, on_step=lambda r: records.append(r) or events.append(r["step"]))
    assert [r["step"] for r in records] == [0, 1, 2, 3] and all(r["batch"] == 2 for r in records)
    # the host never sits between two steps: step k is read once step k + 1 is started, except before a checkpoint
    assert events == ["start", "start", 0, 1, "start", "start", 2, 3]
    assert result.final_step == 4 and np.isfinite(result.losses[3]) and not result.skipped_steps
    assert [p.name for p in sorted((straight / "ckpt").glob("step_*"))] == ["step_00000002", "step_00000004"]
    interrupted = tmp_path / "interrupted"
    run(_recipe(tiny_dataset, interrupted, steps=2, **{"checkpoint.interval": 2}), device="cpu", progress=False)
    run(_recipe(tiny_dataset, interrupted, steps=4, **{"checkpoint.interval": 2}), device="cpu", progress=False)
    assert _losses(interrupted) == _losses(straight)  # same numbers, step by step
    stopped = tmp_path / "stopped"  # stop_after interrupts a run of the same recipe (as the JAX core's)
    first = run(_recipe(tiny_dataset, stopped, steps=4), device="cpu", progress=False, stop_after=3)
    assert first.final_step == 3 and sorted(first.losses) == [0, 1, 2]
    assert [p.name for p in sorted((stopped / "ckpt").glob("step_*"))] == ["step_00000002", "step_00000003"]
    rest = run(_recipe(tiny_dataset, stopped, steps=4), device="cpu", progress=False)
    assert [first.losses[k] for k in range(3)] + [rest.losses[3]] == [r["loss"] for r in records]
    a = ckpt.load_state(straight / "ckpt" / "step_00000004")
    b = ckpt.load_state(interrupted / "ckpt" / "step_00000004")
    assert (a.step, a.adam_step, a.data_position) == (b.step, b.adam_step, b.data_position) == (4, 4, 4)
    for field in ("params", "exp_avg", "exp_avg_sq", "ema"):
        x, y = getattr(a, field), getattr(b, field)
        assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x), field
    assert not np.array_equal(a.ema["proj_out.weight"], a.params["proj_out.weight"])
    # the next stage starts from these weights and EMA (stop_after=0: nothing trained)
    stage2 = _recipe(tiny_dataset, tmp_path / "stage2", resume_from=str(straight / "ckpt"))
    start = run(stage2, device="cpu", progress=False, stop_after=0)
    assert start.final_step == 0 and not start.losses
    assert all(np.array_equal(t.numpy(), a.params[n]) for n, t in start.state["model"].state_dict().items())
    assert all(np.array_equal(t.numpy(), a.ema[n]) for n, t in start.state["ema"].items())


def test_learning_rate_schedule():
    opt = load_recipe(RECIPE, {"optimizer.warmup_steps": 4, "optimizer.decay": "cosine"}).optimizer
    lrs = [learning_rate(opt, s, 14) for s in range(15)]
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(opt.lr / 2) and lrs[4] == pytest.approx(opt.lr)
    assert lrs[9] == pytest.approx(opt.lr / 2) and lrs[14] == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def single_run(tiny_dataset, tmp_path_factory):
    """3 fp32 steps in one process: the reference of the multi-process and bf16 runs."""
    folder = tmp_path_factory.mktemp("single")
    run(_recipe(tiny_dataset, folder, steps=3), device="cpu", progress=False)
    return folder


def test_the_trained_model_is_exported_beside_the_checkpoints(tiny_dataset, single_run):
    """The torch backend's export (contentv-train's, after a run): the last checkpoint's EMA as a transformer folder in
    `<checkpoint.dir>/../transformer` (where the README's follow-ups look for the demo's model), as after a JAX run."""
    from contentv_common.backend import get

    out = get("torch").export(_recipe(tiny_dataset, single_run, steps=3))
    assert out == single_run / "transformer"
    state = ckpt.load_state(single_run / "ckpt" / "step_00000003")
    exported = load_transformer(out).state_dict()
    assert sorted(exported) == sorted(state.ema)
    assert all(np.array_equal(exported[k].numpy(), state.ema[k]) for k in state.ema)


def test_bad_mesh_is_an_error(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="mesh.tensor"):
        run(_recipe(tiny_dataset, tmp_path, **{"mesh.tensor": 2}), device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"mesh.data 2 x mesh.fsdp 1 x mesh.sequence 1 = 2 .* world size is 1"):
        run(_recipe(tiny_dataset, tmp_path, **{"mesh.data": 2}), device="cpu", progress=False)


def test_bf16_autocast_keeps_fp32_masters(tiny_dataset, tmp_path, single_run, rel_err):
    """A sanity check, not parity: bf16 compute changes the losses a little, the weights and moments stay fp32."""
    run(_recipe(tiny_dataset, tmp_path, steps=3, compute_dtype="bfloat16"), device="cpu", progress=False)
    bf16, fp32 = np.array(_losses(tmp_path)), np.array(_losses(single_run))
    assert np.isfinite(bf16).all() and not np.array_equal(bf16, fp32)  # autocast did run in bf16
    assert rel_err(bf16, fp32) < 1e-2, (bf16, fp32)
    state = ckpt.load_state(tmp_path / "ckpt" / "step_00000003")
    for field in ("params", "exp_avg", "exp_avg_sq", "ema"):
        assert {a.dtype for a in getattr(state, field).values()} == {np.dtype(np.float32)}, field
    fp32_state = ckpt.load_state(single_run / "ckpt" / "step_00000003")
    assert rel_err(state.params["proj_out.weight"], fp32_state.params["proj_out.weight"]) < 5e-2


def test_non_finite_step_changes_nothing():
    """A NaN batch: the step reports itself skipped and leaves weights, AdamW moments and the EMA untouched."""
    torch.manual_seed(0)
    model = Transformer(named_model_config("tiny"), ops="torch")
    recipe = load_recipe(RECIPE)
    optimizer = make_optimizer(model, recipe.optimizer)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 1, 4, 4, generator=g)
    latents[1, 0, 0, 0, 0] = float("nan")
    inputs = StepInputs(
        latents, torch.randn(latents.shape, generator=g), torch.tensor([0.3, 0.7]), torch.ones(2),
        torch.randn(2, 5, 48, generator=g), torch.randn(2, 24, generator=g),
    )  # fmt: skip
    loss, norm, applied = train_step(model, optimizer, inputs, lr=1e-3, grad_clip=1.0, ema=ema, ema_decay=0.9)
    assert not applied and not np.isfinite(loss.item())
    assert all(p.grad is None for p in model.parameters())
    for state in optimizer.state.values():  # the fused AdamW makes its state, then skips: fresh moments, no step
        assert state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and torch.equal(ema[n], before[n]), n


def test_nan_steps_are_skipped_then_the_run_stops(tiny_dataset, tmp_path):
    """Twin of tests/jax/test_train.py: after 2 good steps the cache turns NaN; each step is skipped, counted and
    reported, and the third skip (nan_skip_limit 2) stops the run; the step-2 checkpoint (whose parameters made the
    first bad step) is set aside and step 1, the last one before it, stays intact as the resume point."""
    every = {"checkpoint.interval": 1}
    run(_recipe(tiny_dataset, tmp_path, steps=2, nan_skip_limit=2, **every), device="cpu", progress=False)
    good = ckpt.load_state(tmp_path / "ckpt" / "step_00000001")
    bad = tmp_path / "nan_cache"
    shutil.copytree(tiny_dataset["cache_dir"], bad)
    nan_latents(bad)
    data = {**tiny_dataset, "cache_dir": str(bad), "text_dropout": 0.25, "num_threads": 0}
    recipe = _recipe(tiny_dataset, tmp_path, steps=10, nan_skip_limit=2, data=data, **{"checkpoint.interval": 100})
    seen = []
    with pytest.raises(TrainingStopped, match=r"3 skipped steps .*nan_skip_limit=2.*first at step 2; .*step_00000001"):
        run(recipe, device="cpu", progress=False, on_step=seen.append)
    assert [(r["step"], r["skipped"]) for r in seen] == [(2, True), (3, True), (4, True)]
    logged = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["skipped"], r["nan_skips"]) for r in logged] == [(False, 0), (False, 0), (True, 1), (True, 2), (True, 3)]
    assert ckpt.latest_checkpoint(tmp_path / "ckpt").name == "step_00000001"
    assert (tmp_path / "ckpt" / ".diverged.step_00000002").is_dir()
    kept = ckpt.load_state(tmp_path / "ckpt" / "step_00000001")
    assert all(np.array_equal(kept.params[k], good.params[k]) for k in good.params)
    assert all(np.isfinite(a).all() for a in kept.params.values())


def _worker(rank, world, port, dataset, folder, overrides):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    run(_recipe(dataset, folder, **overrides), device="cpu", progress=False)
    torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh", [{"mesh.fsdp": 2}, {"mesh.sequence": 2}, {"mesh.data": 2}], ids=["fsdp2", "ulysses", "replicate"]
)
def test_two_processes_follow_one(tiny_dataset, tmp_path, mesh, rel_err, single_run, spawn_ranks):
    single = single_run
    multi = tmp_path / "multi"
    spawn_ranks(_worker, (2, free_port(), tiny_dataset, multi, {"steps": 3, **mesh}), 2, outputs=multi)
    assert rel_err(_losses(multi), _losses(single)) < 1e-5
    a = ckpt.load_state(single / "ckpt" / "step_00000003")
    b = ckpt.load_state(multi / "ckpt" / "step_00000003")
    for k in a.params:
        assert rel_err(b.params[k], a.params[k]) < 1e-4, k
    exported = ckpt.export_weights(multi / "ckpt" / "step_00000003", tmp_path / "transformer", "ema")  # rank shards
    weights = load_transformer(exported).state_dict()
    assert sorted(weights) == sorted(b.ema) and all(np.array_equal(weights[k].numpy(), b.ema[k]) for k in b.ema)
