"""`run(recipe)`: a DMD2 distillation run of the JAX transformer on one device, logged per step.

The teacher is `init_from`; the student and the fake score start as copies of it (contentv_jax.distill.train's
`Distiller`). Prompts are encoded once by the recipe's encoders (contentv_jax.encoders); each update's draws come
from contentv_common.distill.run, as in the torch twin. Writes `<log_dir>/distill_log.jsonl` (the update's losses per
step); every `checkpoint.interval` steps (and at the end) the student and the fake score, each with its AdamW state,
go to `<checkpoint.dir>/student` and `<checkpoint.dir>/fake` through the training `Checkpointer` (atomic, verified on
resume, locked by this run). A run whose checkpoint dir holds a checkpoint continues from it and gives the records
and weights of an uninterrupted run. An update with a non-finite loss or gradient norm is skipped and counted; more
than `nan_skip_limit` stop the run (RunStopped) before the next checkpoint. At the end the student is exported as a
transformer folder (our JAX format, read by either backend's `load_transformer`) at `<checkpoint.dir>/../transformer`.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from contentv_common.config.distill import DistillRecipe
from contentv_common.distill.run import (
    PARTS,
    DistillData,
    DistillPoint,
    check_skips,
    check_teacher,
    distill_log,
    export_folder,
    part_checkpoint,
    resume_step,
)
from contentv_jax import multihost
from contentv_jax.checkpointing import Checkpointer, abstract_like
from contentv_jax.distill.train import Distiller
from contentv_jax.encoders import named_encoders
from contentv_jax.loading import load_transformer


def _parts(state: dict[str, Any], part: str) -> dict[str, Any]:
    """One model's share of the state: its weights and its AdamW state."""
    return {part: state[part], f"{part}_opt": state[f"{part}_opt"]}


def run(recipe: DistillRecipe, progress: bool = True) -> dict[str, Any]:
    """Distill per the recipe, resuming from `checkpoint.dir` when it holds a checkpoint; returns the last step's
    record."""
    data = DistillData(recipe, named_encoders(recipe.encoders, recipe.seed))
    teacher = load_transformer(recipe.init_from)
    check_teacher(recipe, teacher.cfg)
    distiller = Distiller(recipe, teacher)
    state = distiller.init_state()
    checkpoints = {part: Checkpointer(part_checkpoint(recipe, part)) for part in PARTS}
    try:
        point = _resume(recipe, checkpoints, state)
        log = distill_log(recipe, point.log_lines if point else 0)
        start, skipped = (point.step, point.skipped) if point else (0, 0)
        record: dict[str, Any] = {}
        for step in tqdm(range(start, recipe.steps), desc="distill (jax)", initial=start, total=recipe.steps,
                         disable=not progress):  # fmt: skip
            batch, draws = data.update(step)
            state, metrics = distiller.step(state, batch, draws)
            skipped += int(metrics["skipped"])
            record = {"step": step, **metrics}
            log.write(record)
            check_skips(recipe, skipped)
            if (step + 1) % recipe.checkpoint.interval == 0 or step == recipe.steps - 1:
                counters = DistillPoint(step + 1, log.lines, recipe.seed, skipped).as_dict()
                for part in PARTS:  # the student last: its step is the run's resume point
                    checkpoints[part].save(step + 1, _parts(state, part), counters)
    finally:
        for ckpt in checkpoints.values():
            ckpt.close()
    multihost.export_model(export_folder(recipe), distiller.model(state["student"]))
    return record


def _resume(recipe: DistillRecipe, checkpoints: dict[str, Checkpointer], state: dict[str, Any]) -> DistillPoint | None:
    """The latest checkpoint's counters, its weights and AdamW states restored into `state`; None for a fresh run."""
    step = resume_step(checkpoints["student"].latest_step(), checkpoints["fake"].latest_step())
    if step is None:
        return None
    fake_step = checkpoints["fake"].latest_step()
    if fake_step is not None and fake_step > step:  # a stop between the two saves
        checkpoints["fake"].set_aside_from(step + 1)
    point = DistillPoint.read(checkpoints["student"].restore_data(step), recipe, checkpoints["student"].dir)
    for part, ckpt in checkpoints.items():
        restored, _ = ckpt.restore(abstract_like(_parts(state, part)), step)
        state.update(restored)
    return point
