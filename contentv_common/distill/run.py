"""What a distillation run does the same way in both backends (numpy): each update's prompts and draws, the
checkpoint's counters (`DistillPoint`), the per-step log, and where the run writes.

Every draw of an update is a pure function of (seed, step) through `contentv_common.training.schedules.step_rng`, so
the JAX run and the torch run of one recipe see the same prompts and noise, and the step alone is the position a
resumed run needs.

A checkpoint is two folders under `checkpoint.dir`, `student/` and `fake/` (each model with its AdamW, in the
backend's training checkpoint format), the fake score's saved first: a run stopped between the two saves holds a
fake score one checkpoint ahead, which resuming sets aside (`resume_step`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from contentv_common.config.distill import DistillRecipe
from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import CheckpointConfig
from contentv_common.data.cache import Encoders
from contentv_common.distill.schedule import update_draws
from contentv_common.errors import CheckpointError, ConfigError, RunStopped
from contentv_common.reward.run import RewardLog
from contentv_common.sampling import latent_shape
from contentv_common.training.schedules import step_rng

LOG_NAME = "distill_log.jsonl"
PARTS = ("fake", "student")
"""The two checkpoint folders, in the order a checkpoint saves them: the student last, its step the resume point."""


class DistillData:
    """The run's prompts, encoded once, and each update's rows and draws."""

    def __init__(self, recipe: DistillRecipe, encoders: Encoders):
        self.recipe = recipe
        d = recipe.data
        self.text, self.pooled = encoders.encode_text(list(d.prompts))
        neg_text, neg_pooled = encoders.encode_text([d.negative_prompt])
        self.neg_text, self.neg_pooled = neg_text[0], neg_pooled[0]
        self.shape = latent_shape(encoders.latent_channels, d.frames, d.height, d.width, d.batch_size)

    def update(self, step: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(the prompts' rows: text, pooled and the negative prompt's, the draws of `update_draws`) of update `step`."""
        rng = step_rng(self.recipe.seed, step)
        ids = rng.integers(len(self.recipe.data.prompts), size=self.shape[0])
        n = len(ids)
        batch = {
            "text": self.text[ids].astype(np.float32),
            "pooled": self.pooled[ids].astype(np.float32),
            "neg_text": np.repeat(self.neg_text[None], n, axis=0).astype(np.float32),
            "neg_pooled": np.repeat(self.neg_pooled[None], n, axis=0).astype(np.float32),
        }
        return batch, update_draws(rng, self.recipe.distill, self.shape)


@dataclass(frozen=True)
class DistillPoint:
    """A checkpoint's counters: the next step (also the data and RNG position), the log's line count when it was
    written (later lines belong to steps a resumed run redoes), the seed, and the updates skipped so far."""

    step: int
    log_lines: int
    seed: int
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def read(cls, values: Mapping[str, Any], recipe: DistillRecipe, where: str | Path) -> DistillPoint:
        """Parse a checkpoint's counters and check that `recipe` can continue from them."""
        try:
            point = cls(**{k: int(values[k]) for k in ("step", "log_lines", "seed", "skipped")})
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: not a distillation checkpoint ({type(e).__name__}: {e})") from None
        if point.seed != recipe.seed:
            raise ConfigError(
                f"seed: the recipe has {recipe.seed} but the checkpoint in {where} continues a run with seed "
                f"{point.seed}; use the same seed or a new checkpoint.dir"
            )
        return point


def check_teacher(recipe: DistillRecipe, cfg: ModelConfig) -> None:
    """The teacher `init_from` must be the model the recipe names (its plans and checks are made for that one)."""
    want = recipe.model_config
    if cfg != want:
        field = next(f.name for f in fields(want) if getattr(cfg, f.name) != getattr(want, f.name))
        raise ConfigError(
            f"model: the teacher {recipe.init_from} has {field}={getattr(cfg, field)!r}, the recipe's model "
            f"{getattr(want, field)!r}; name the teacher's model"
        )


def check_skips(recipe: DistillRecipe, skipped: int) -> None:
    """RunStopped once more updates (the student's and the fake score's) were skipped than `nan_skip_limit` allows."""
    if skipped > recipe.nan_skip_limit:
        raise RunStopped(
            f"{skipped} skipped updates (non-finite loss or gradient norm; limit nan_skip_limit="
            f"{recipe.nan_skip_limit}); resume point: the latest checkpoint in {recipe.checkpoint.dir}"
        )


def part_checkpoint(recipe: DistillRecipe, part: str) -> CheckpointConfig:
    """The checkpoint settings of one model's folder, `<checkpoint.dir>/<part>` (student or fake)."""
    return replace(recipe.checkpoint, dir=str(Path(recipe.checkpoint.dir) / part))


def resume_step(student: int | None, fake: int | None) -> int | None:
    """The step a run resumes from, given the newest checkpoint of each folder: the student's (saved last), once the
    fake score holds it too; None for a fresh run. A fake score ahead (a stop between the saves) is set aside by
    the caller; one behind means the folders do not belong together."""
    if student is None and fake is None:
        return None
    if student is None or fake is None or fake < student:
        raise CheckpointError(
            f"the student's newest checkpoint is step {student} but the fake score's is {fake}: the two folders of "
            "the checkpoint dir do not belong together; restore them or use a new checkpoint.dir"
        )
    return student


def distill_log(recipe: DistillRecipe, keep_lines: int = 0) -> RewardLog:
    """The run's per-step JSONL log, `<log_dir>/distill_log.jsonl`, cut back to `keep_lines` on resume."""
    return RewardLog(recipe.log_dir, keep_lines, name=LOG_NAME)


def export_folder(recipe: DistillRecipe) -> Path:
    """Where the student is exported as a transformer folder: `<checkpoint.dir>/../transformer`."""
    return Path(recipe.checkpoint.dir).parent / "transformer"
