"""`run(recipe)`: a DMD2 distillation run of the torch transformer in one process, twin of
contentv_jax/distill/run.py (same prompts, draws, log, checkpoint folders and export; see that module).

Checkpoints are the training `Checkpointer`'s format (safetensors + JSON, never pickle), one folder per model:
`<checkpoint.dir>/student` and `<checkpoint.dir>/fake`, each with its model and AdamW; the student is exported in
our torch format at `<checkpoint.dir>/../transformer`.
"""

from __future__ import annotations

from typing import Any

import torch
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
from contentv_torch_npu.checkpointing import Checkpointer
from contentv_torch_npu.distill.train import Distiller
from contentv_torch_npu.distributed import Topology
from contentv_torch_npu.encoders import named_encoders
from contentv_torch_npu.loading import load_transformer, save_torch


def _parts(distiller: Distiller) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    return {"student": (distiller.student, distiller.student_opt), "fake": (distiller.fake, distiller.fake_opt)}


def run(recipe: DistillRecipe, progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Distill per the recipe, resuming from `checkpoint.dir` when it holds a checkpoint; returns the last step's
    record."""
    topo = Topology(device=torch.device(device))
    data = DistillData(recipe, named_encoders(recipe.encoders, recipe.seed, device=device))
    teacher = load_transformer(recipe.init_from, device=device)
    check_teacher(recipe, teacher.cfg)
    distiller = Distiller(recipe, teacher)
    checkpoints = {part: Checkpointer(part_checkpoint(recipe, part), topo) for part in PARTS}
    try:
        point = _resume(recipe, checkpoints, distiller)
        log = distill_log(recipe, point.log_lines if point else 0)
        start, skipped = (point.step, point.skipped) if point else (0, 0)
        record: dict[str, Any] = {}
        for step in tqdm(range(start, recipe.steps), desc="distill (torch)", initial=start, total=recipe.steps,
                         disable=not progress):  # fmt: skip
            batch, draws = data.update(step)
            metrics = distiller.step(batch, draws)
            skipped += int(metrics["skipped"])
            record = {"step": step, **metrics}
            log.write(record)
            check_skips(recipe, skipped)
            if (step + 1) % recipe.checkpoint.interval == 0 or step == recipe.steps - 1:
                meta = {"data_position": step + 1,
                        "counters": DistillPoint(step + 1, log.lines, recipe.seed, skipped).as_dict()}  # fmt: skip
                for part in PARTS:  # the student last: its step is the run's resume point
                    model, optimizer = _parts(distiller)[part]
                    checkpoints[part].save(step + 1, model, optimizer, None, meta)
    finally:
        for ckpt in checkpoints.values():
            ckpt.close()
    save_torch(export_folder(recipe), distiller.student, overwrite=True)
    return record


def _resume(recipe: DistillRecipe, checkpoints: dict[str, Checkpointer], distiller: Distiller) -> DistillPoint | None:
    """The latest checkpoint's counters, with both models and their AdamW restored in place; None for a fresh run."""
    step = resume_step(checkpoints["student"].latest_step(), checkpoints["fake"].latest_step())
    if step is None:
        return None
    fake_step = checkpoints["fake"].latest_step()
    if fake_step is not None and fake_step > step:  # a stop between the two saves
        checkpoints["fake"].set_aside_from(step + 1)
    meta = checkpoints["student"].restore_data()
    point = DistillPoint.read(meta.get("counters", {}), recipe, checkpoints["student"].folder())
    for part, (model, optimizer) in _parts(distiller).items():
        checkpoints[part].restore(model, optimizer, None)
    return point
