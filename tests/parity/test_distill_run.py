"""A distillation run in each backend: the log, checkpoints, resume and the exported student (tiny model, CPU)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from contentv_common.config.distill import DistillRecipe, DmdConfig
from contentv_common.config.model import from_dict
from contentv_common.distill.run import LOG_NAME
from tests.parity.reward_fixtures import torch_model

KEYS = ("loss", "dmd_loss", "fake_loss", "grad_norm", "fake_grad_norm")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from contentv_torch_npu.loading import save_torch

    return save_torch(tmp_path_factory.mktemp("distill_teacher") / "transformer", torch_model(0))


def _recipe(teacher: Path, root: Path, steps: int) -> DistillRecipe:
    base = {"distill": {}, "model": "tiny", "init_from": str(teacher), "encoders": "tiny",
            "data": {"prompts": ["a red circle", "a blue square"], "width": 32, "height": 32, "frames": 5,
                     "batch_size": 2},
            "checkpoint": {"dir": str(root / "checkpoint"), "interval": 2}, "steps": steps,
            "log_dir": str(root / "logs"), "optimizer": {"lr": 1e-3}, "fake_optimizer": {"lr": 2e-3}}  # fmt: skip
    return replace(from_dict(DistillRecipe, base), distill=DmdConfig(steps=3, guidance=3.0, fake_updates=2))


def _records(recipe: DistillRecipe) -> list[dict]:
    import json

    lines = (Path(recipe.log_dir) / LOG_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines]


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from contentv_common.checkpoint.formats import open_checkpoint

    return {k: np.asarray(v, np.float32) for k, v in open_checkpoint(folder).tensors()}


def _run(backend: str, recipe: DistillRecipe) -> dict:
    if backend == "jax":
        from contentv_jax.distill.run import run
    else:
        from contentv_torch_npu.distill.run import run
    return run(recipe, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_resumed_run_equals_an_uninterrupted_one(backend, teacher, tmp_path, rel_err):
    """4 steps in one go vs 2 steps, then the same run resumed to 4 from its checkpoint: the same records and the
    same exported student, which moved away from the teacher."""
    whole = _recipe(teacher, tmp_path / "whole", 4)
    last = _run(backend, whole)
    assert last["step"] == 3 and [r["step"] for r in _records(whole)] == [0, 1, 2, 3]

    resumed = _recipe(teacher, tmp_path / "resumed", 4)
    _run(backend, replace(resumed, steps=2))
    assert [r["step"] for r in _records(resumed)] == [0, 1]
    log = Path(resumed.log_dir) / LOG_NAME
    log.write_text(log.read_text().replace('"step": 0,', '"step": 0, "kept": 1,'))  # a fresh run would rewrite it
    _run(backend, resumed)
    records = _records(resumed)
    assert [r["step"] for r in records] == [0, 1, 2, 3] and records[0]["kept"] == 1
    for a, b in zip(_records(whole), _records(resumed), strict=True):
        assert all(a[k] == b[k] for k in KEYS), (a, b)

    student, again = _weights(tmp_path / "whole" / "transformer"), _weights(tmp_path / "resumed" / "transformer")
    start = _weights(teacher)
    assert set(student) == set(start)
    assert all(np.array_equal(student[k], again[k]) for k in student)
    assert max(float(np.abs(student[k] - start[k]).max()) for k in student) > 1e-4


@pytest.mark.slow
def test_jax_and_torch_runs_log_the_same_losses(teacher, tmp_path, rel_err):
    """The same recipe in both backends: the same prompts and draws (contentv_common.distill.run), the same
    losses step after step and the same exported student."""
    runs = {b: _recipe(teacher, tmp_path / b, 3) for b in ("jax", "torch")}
    for backend, recipe in runs.items():
        _run(backend, recipe)
    for a, b in zip(_records(runs["jax"]), _records(runs["torch"]), strict=True):
        for key in KEYS:
            assert rel_err(a[key], b[key]) < 1e-4, (a["step"], key)
    ours, theirs = _weights(tmp_path / "jax" / "transformer"), _weights(tmp_path / "torch" / "transformer")
    flat = sorted(ours)
    assert (
        rel_err(np.concatenate([ours[k].ravel() for k in flat]), np.concatenate([theirs[k].ravel() for k in flat]))
        < 1e-5
    )


def test_train_cli_runs_the_distill_recipe(teacher, tmp_path, capsys):
    """`contentv-train --config configs/recipes/distill_tiny.yaml` dispatches on the `distill` section: the run, its
    log, its checkpoint folders and the exported student (here on the tiny model through overrides; torch, the
    quicker to start: the JAX run is the same call, `Backend.distill`, tested above)."""
    backend = "torch"
    from contentv_common.cli.train import main

    overrides = ["model=tiny", "encoders=tiny", f"init_from={teacher}", "data.width=32", "data.height=32",
                 "data.frames=5", "data.batch_size=2", "distill.fake_updates=1", "steps=2",
                 f"checkpoint.dir={tmp_path / 'checkpoint'}", f"log_dir={tmp_path / 'logs'}"]  # fmt: skip
    argv = ["--config", "configs/recipes/distill_tiny.yaml", "--backend", backend, "--no-progress", *overrides]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"distillation (dmd2, {backend}): last step {{'step': 1" in out
    assert f"student: {tmp_path / 'transformer'}" in out
    assert len((tmp_path / "logs" / LOG_NAME).read_text().splitlines()) == 2
    assert all((tmp_path / "checkpoint" / part).is_dir() for part in ("student", "fake"))
    student, start = _weights(tmp_path / "transformer"), _weights(teacher)
    assert set(student) == set(start) and any(not np.array_equal(student[k], start[k]) for k in student)


def test_a_teacher_of_another_model_is_refused(teacher, tmp_path):
    from contentv_common.errors import ConfigError
    from contentv_torch_npu.distill.run import run

    recipe = replace(_recipe(teacher, tmp_path, 2), model="demo")
    with pytest.raises(ConfigError, match=r"^model: the teacher .* has \w+=.*, the recipe's model .*; name the"):
        run(recipe, progress=False)
