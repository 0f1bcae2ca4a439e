"""The distillation recipe (DMD2: a few-step student of a flow-matching teacher), read by both backends.

A recipe with a `distill:` section (configs/recipes/distill_*.yaml) is one: `init_from` is the teacher, which the
student and the fake score start from; `distill` holds the method's knobs (student steps and shift, the real score's
guidance, the two time-scale ratio, loss weights); `data` the prompts the student learns to draw; `optimizer` and
`fake_optimizer` train the student and the fake score. Loaded with the training recipe's `base` / `key=value` rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contentv_common.config.model import ModelConfig, named_model_config
from contentv_common.config.recipe import CheckpointConfig, OptimizerConfig, load_recipe, read_with_base
from contentv_common.errors import ConfigError


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class DmdConfig:
    """DMD2's knobs. The student samples in `steps` steps at the flow-match schedule's sigmas with `shift` (what
    `contentv-sample --steps K --shift S` uses); the DMD loss and the fake score's flow-matching loss draw their noise
    level uniformly in [`min_sigma`, `max_sigma`], then shifted by `shift`. The real score is the frozen teacher with
    classifier-free `guidance`; the fake score takes `fake_updates` updates per student update (two time-scale)."""

    steps: int = 4
    shift: float = 3.0
    guidance: float = 6.0
    fake_updates: int = 5
    dmd_weight: float = 1.0
    gan_weight: float = 0.0
    min_sigma: float = 0.02
    max_sigma: float = 0.98

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _check(self.shift > 0, "shift", f"must be positive, got {self.shift}")
        _check(self.guidance >= 1, "guidance", f"must be >= 1 (1: no classifier-free guidance), got {self.guidance}")
        _check(self.fake_updates >= 1, "fake_updates", f"must be >= 1, got {self.fake_updates}")
        _check(self.dmd_weight > 0, "dmd_weight", f"must be positive, got {self.dmd_weight}")
        _check(self.gan_weight >= 0, "gan_weight", f"must be >= 0, got {self.gan_weight}")
        _check(self.gan_weight == 0, "gan_weight", "the GAN term is not implemented yet: set gan_weight: 0")
        _check(
            0.0 < self.min_sigma < self.max_sigma < 1.0,
            "min_sigma",
            f"needs 0 < min_sigma < max_sigma < 1, got {self.min_sigma} and {self.max_sigma}",
        )


@dataclass(frozen=True)
class PromptData:
    """What the student draws during training: its prompts (cycled at random), the negative prompt of the real
    score's guidance, the pixel size and frame count of the clips, and the clips per update."""

    prompts: tuple[str, ...]
    negative_prompt: str = ""
    width: int = 64
    height: int = 64
    frames: int = 5
    batch_size: int = 2

    def __post_init__(self) -> None:
        _check(len(self.prompts) > 0, "prompts", "needs at least one prompt")
        for name in ("width", "height"):
            size = getattr(self, name)
            _check(size > 0 and size % 16 == 0, name, f"must be a positive multiple of 16, got {size}")
        _check(self.frames >= 1 and (self.frames - 1) % 4 == 0, "frames", f"must be 4k+1, got {self.frames}")
        _check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class DistillRecipe:
    """A distillation run of `steps` student updates. `init_from` (the teacher: a transformer folder) is required;
    `encoders` is "tiny", "demo" or a local diffusers pipeline folder, as a reward recipe's. An update whose loss or
    gradient norm is not finite is skipped (student and fake score alike); more than `nan_skip_limit` stop the run."""

    distill: DmdConfig
    model: str | ModelConfig
    init_from: str
    data: PromptData
    checkpoint: CheckpointConfig
    steps: int
    optimizer: OptimizerConfig = OptimizerConfig()
    fake_optimizer: OptimizerConfig = OptimizerConfig()
    encoders: str = "tiny"
    seed: int = 0
    log_dir: str = "runs/distill"
    nan_skip_limit: int = 10

    def __post_init__(self) -> None:
        _check(self.steps > 0, "steps", f"must be positive, got {self.steps}")
        _check(self.nan_skip_limit >= 0, "nan_skip_limit", f"must be >= 0, got {self.nan_skip_limit}")
        _check(bool(self.init_from), "init_from", "needs the teacher's transformer folder")
        if isinstance(self.model, str):
            try:
                named_model_config(self.model)
            except ConfigError as e:
                raise ConfigError(f"model: {e}") from None

    @property
    def model_config(self) -> ModelConfig:
        return named_model_config(self.model) if isinstance(self.model, str) else self.model

    @property
    def fake_steps(self) -> int:
        """The fake score's updates over the run (its learning-rate schedule's length)."""
        return self.steps * self.distill.fake_updates


def is_distill_recipe(path: str | Path) -> bool:
    """True when a recipe file (after `base`) has a `distill` section: tools/train.py dispatches on it."""
    return "distill" in read_with_base(Path(path))


def load_distill_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> DistillRecipe:
    """Load a distillation recipe YAML (following `base`), apply dotted overrides, validate; errors name file
    and key."""
    return load_recipe(path, overrides, DistillRecipe)
