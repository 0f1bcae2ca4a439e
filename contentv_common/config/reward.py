"""The reward fine-tuning recipe (ReFL / DRaFT-K reward backprop, or GRPO), read by both backends.

It reuses the training recipe's pieces (model, optimizer, flow-matching objective for the SFT term, data for the real
batches, checkpointing) and adds what a reward run needs: the reward model, how rollouts are sampled and the method's
knobs. Loaded from configs/recipes/reward_*.yaml with the same `base` / `key=value` override rules as training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from contentv_common.config.model import ModelConfig, named_model_config
from contentv_common.config.recipe import (
    AttentionChoice,
    BucketConfig,
    CheckpointConfig,
    DataConfig,
    DivergenceConfig,
    LoraConfig,
    MeshConfig,
    ObjectiveConfig,
    OptimizerConfig,
    image_tokens,
    load_recipe,
    read_with_base,
)
from contentv_common.errors import ConfigError
from contentv_common.reward.models import SIMPLE_REWARDS, Reward, simple_reward
from contentv_common.sampling import VAE_SPACE_FACTOR


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class RewardModelConfig:
    """Which reward: a built-in (`brightness`, `target_colour`, `object_area`: the size of the CPU demo's shapes), a
    CLIP preference model folder (`clip`, e.g. a local PickScore download) or a black-box scorer `module:factory` on
    uint8 frames (`black_box`, GRPO only); `kwargs` go to the built-in or the factory."""

    kind: Literal["brightness", "target_colour", "object_area", "clip", "black_box"]
    target: tuple[float, float, float] = (1.0, 0.0, 0.0)
    path: str | None = None
    black_box: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.kind != "clip" or self.path is not None, "path", "reward kind clip needs a CLIPModel folder")
        _check(self.kind != "black_box" or self.black_box is not None, "black_box", "needs 'module:factory'")
        if self.kind in SIMPLE_REWARDS:
            try:
                self.builtin()
            except (TypeError, ValueError) as e:
                raise ConfigError(f"kwargs: {e}") from None

    def builtin(self) -> Reward:
        """The built-in reward (`brightness`, `target_colour`, `object_area`; array-generic, either backend)."""
        return simple_reward(
            self.kind, **({"target": self.target} if self.kind == "target_colour" else {}), **self.kwargs
        )


@dataclass(frozen=True)
class RolloutConfig:
    """How videos are generated during training: prompts, pixel size, sampler steps/shift/guidance, held-out seeds,
    and which decoded frames the reward scores: the first (the causal VAE decodes it alone, whatever the video's
    length: the 8B recipes) or all of them (the mean over frames: a reward that must hold for the whole clip)."""

    prompts: tuple[str, ...]
    width: int = 64
    height: int = 64
    frames: int = 5
    batch_size: int = 2
    steps: int = 20
    shift: float = 3.0
    guidance: float = 1.0
    negative_prompt: str = ""
    eval_seeds: tuple[int, ...] = (10_000, 10_001)
    eval_interval: int = 10
    reward_frames: Literal["first", "all"] = "first"

    def __post_init__(self) -> None:
        _check(len(self.prompts) > 0, "prompts", "needs at least one prompt")
        _check(self.frames >= 1 and (self.frames - 1) % 4 == 0, "frames", f"must be 4k+1, got {self.frames}")
        for name in ("width", "height"):
            size = getattr(self, name)
            _check(size > 0 and size % 16 == 0, name, f"must be a positive multiple of 16, got {size}")
        _check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        _check(self.steps > 0, "steps", f"must be positive, got {self.steps}")
        _check(self.shift > 0, "shift", f"must be positive, got {self.shift}")
        _check(self.eval_interval > 0, "eval_interval", f"must be positive, got {self.eval_interval}")


@dataclass(frozen=True)
class ReflConfig:
    """Reward backprop: gradients through the last `grad_steps` sampler steps (each rematerialised), an SFT flow-
    matching term on real data and an anchor to a reference model (frozen copy, or EMA of the trained weights)."""

    grad_steps: int = 1
    reward_weight: float = 1.0
    sft_weight: float = 1.0
    anchor: Literal["none", "frozen", "ema"] = "frozen"
    anchor_weight: float = 0.1
    anchor_ema_decay: float = 0.99

    def __post_init__(self) -> None:
        _check(self.grad_steps >= 1, "grad_steps", f"must be >= 1, got {self.grad_steps}")
        for name in ("reward_weight", "sft_weight", "anchor_weight"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(0.0 < self.anchor_ema_decay < 1.0, "anchor_ema_decay", "must be in (0, 1)")


@dataclass(frozen=True)
class GrpoConfig:
    """GRPO over SDE sampling: `group_size` rollouts per prompt, group-normalised advantages, a clipped ratio, a KL
    to the frozen reference policy, and the SFT term. loss = `policy_weight` clipped-ratio term + `kl_weight` KL +
    `sft_weight` SFT: the reward enters through the first alone, so `policy_weight` 0 is the control run (KL and SFT
    alone, the rollouts' rewards unused).

    `train_steps` = n (None: all S sampler steps): the first n sampler steps are SDE steps with `noise_level` and are
    trained; the other S - n are the deterministic flow-match Euler steps (no noise, so no reward spread that the
    policy gradient could not credit). `noise_grid` = g: each explored step's noise is one draw per latent channel,
    frame and cell of a g x g grid over the latent's H x W, constant within the cell, and the log-probabilities and KL
    are those of the cell means: few dimensions for a group's reward spread to be credited to (the CPU demo uses it);
    g must divide the latent's height and width. None: one draw per latent element, as Flow-GRPO. `shared_start`:
    the rollouts of a group start from the same noise (DanceGRPO), so their rewards differ by the exploration alone,
    which is what the policy gradient credits (otherwise most of a group's spread comes from where each rollout
    started)."""

    group_size: int = 4
    noise_level: float = 0.7
    clip_range: float = 0.2
    policy_weight: float = 1.0
    kl_weight: float = 0.0
    sft_weight: float = 1.0
    updates_per_rollout: int = 1
    train_steps: int | None = None
    shared_start: bool = False
    noise_grid: int | None = None

    def __post_init__(self) -> None:
        _check(self.group_size >= 2, "group_size", f"needs >= 2 samples to normalise, got {self.group_size}")
        _check(self.noise_level > 0, "noise_level", f"must be positive (GRPO needs noise), got {self.noise_level}")
        _check(self.clip_range > 0, "clip_range", f"must be positive, got {self.clip_range}")
        for name in ("policy_weight", "kl_weight", "sft_weight"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(self.updates_per_rollout >= 1, "updates_per_rollout", "must be >= 1")
        _check(self.train_steps is None or self.train_steps >= 1, "train_steps", "must be >= 1")
        _check(self.noise_grid is None or self.noise_grid >= 1, "noise_grid", f"must be >= 1, got {self.noise_grid}")

    def explored_steps(self, sampler_steps: int) -> int:
        """The sampler steps that explore (SDE) and are trained: the first `train_steps` (at most all of them)."""
        return min(self.train_steps or sampler_steps, sampler_steps)

    def scores_rollouts(self) -> bool:
        """Whether the loss reads the rollouts' rewards. Not at `policy_weight` 0 (the control run): its rollouts stop
        after the explored steps (all that the KL and the ratios read) and are neither decoded nor scored, so it
        trains as it would with them, at a fraction of the cost, and logs no training reward."""
        return self.policy_weight > 0


@dataclass(frozen=True)
class RewardRecipe:
    """A reward fine-tuning run. `init_from` is the model to tune (any transformer checkpoint folder); `encoders` is
    "tiny", "demo" (the CPU demo's, as a training recipe's `data.encoders`) or a local diffusers pipeline folder (text
    encoders + Wan VAE); `data` gives the SFT real batches."""

    method: Literal["refl", "grpo"]
    model: str | ModelConfig
    reward: RewardModelConfig
    rollout: RolloutConfig
    checkpoint: CheckpointConfig
    steps: int
    data: DataConfig | None = None
    refl: ReflConfig = ReflConfig()
    grpo: GrpoConfig = GrpoConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    encoders: str = "tiny"
    init_from: str | None = None
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    attention: AttentionChoice = "auto"
    remat: Literal["none", "full", "dots", "dots_all"] = "none"
    seed: int = 0
    log_dir: str = "runs/reward"
    nan_skip_limit: int = 10
    divergence: DivergenceConfig = DivergenceConfig()
    mesh: MeshConfig = MeshConfig()
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        _check(self.steps > 0, "steps", f"must be positive, got {self.steps}")
        _check(self.nan_skip_limit >= 0, "nan_skip_limit", f"must be >= 0, got {self.nan_skip_limit}")
        if isinstance(self.model, str):
            try:
                named_model_config(self.model)
            except ConfigError as e:
                raise ConfigError(f"model: {e}") from None
        if self.method == "refl":
            _check(self.reward.kind != "black_box", "reward.kind", "black_box rewards are not differentiable: use grpo")
            _check(
                self.refl.grad_steps <= self.rollout.steps,
                "refl.grad_steps",
                f"{self.refl.grad_steps} exceeds rollout.steps {self.rollout.steps}",
            )
        _check(
            self.optimizer.ema_decay is None or self.method != "refl" or self.refl.anchor != "ema",
            "optimizer.ema_decay",
            "the EMA anchor (refl.anchor: ema) already is the EMA of the weights: set refl.anchor_ema_decay instead",
        )
        grid, r = self.grpo.noise_grid, self.rollout
        h, w = r.height // VAE_SPACE_FACTOR, r.width // VAE_SPACE_FACTOR
        _check(
            self.method != "grpo" or grid is None or (h % grid == 0 and w % grid == 0),
            "grpo.noise_grid",
            f"{grid} does not divide the {h} x {w} latent (rollout {r.height} x {r.width} pixels / {VAE_SPACE_FACTOR})",
        )
        sft = self.refl.sft_weight if self.method == "refl" else self.grpo.sft_weight
        _check(sft == 0 or self.data is not None, "data", "the SFT term (sft_weight > 0) needs a data section")
        why = "the SFT term reads its captions' embeddings from the cache: set data.text: cached"
        _check(self.data is None or self.data.text == "cached", "data.text", why)
        check_reward_on_mesh(self)

    @property
    def model_config(self) -> ModelConfig:
        return named_model_config(self.model) if isinstance(self.model, str) else self.model


def rollout_rows(recipe: RewardRecipe) -> int:
    """Rows of one rollout batch: prompts x samples per prompt (GRPO's groups)."""
    return recipe.rollout.batch_size * (recipe.grpo.group_size if recipe.method == "grpo" else 1)


def check_reward_on_mesh(recipe: RewardRecipe) -> None:
    """The run must fit its own mesh, checked when the recipe loads (as training's `check_buckets_on_mesh`): the
    rollout rows (and the SFT batch, `rollout.batch_size` real samples) split over data x fsdp, and the image tokens
    of the rollout and of every SFT bucket split over `sequence` (Ulysses; the text tokens and heads set no rule)."""
    mesh, patch = recipe.mesh, recipe.model_config.patch_size
    split = mesh.data * mesh.fsdp
    over = f"mesh data x fsdp = {mesh.data} x {mesh.fsdp} = {split}"
    r = recipe.rollout
    rows = rollout_rows(recipe)
    if recipe.method == "grpo":
        what = f"{rows} rollout rows (rollout.batch_size {r.batch_size} x grpo.group_size {recipe.grpo.group_size})"
        _check(rows % split == 0, "grpo.group_size", f"{what} do not split over {over}")
    else:
        _check(rows % split == 0, "rollout.batch_size", f"{rows} rollout rows do not split over {over}")
    tokens = image_tokens(BucketConfig(r.width, r.height, r.frames, rows), patch)
    _check(
        tokens % mesh.sequence == 0,
        "rollout",
        f"{r.width}x{r.height}x{r.frames} has {tokens} image tokens per sample, which do not split over mesh sequence "
        f"= {mesh.sequence}",
    )
    for i, b in enumerate(recipe.data.buckets if recipe.data is not None else ()):
        where = f"data.buckets[{i}] ({b.name})"
        _check(
            r.batch_size % split == 0,
            where,
            f"the SFT batch (rollout.batch_size {r.batch_size} real samples) does not split over {over}",
        )
        tokens = image_tokens(b, patch)
        _check(tokens % mesh.sequence == 0, where, f"{tokens} image tokens per sample do not split over mesh sequence "
               f"= {mesh.sequence}")  # fmt: skip


def is_reward_recipe(path: str | Path) -> bool:
    """True when a recipe file (after `base`) has a `method` key: tools/train.py dispatches on it."""
    return "method" in read_with_base(Path(path))


def load_reward_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> RewardRecipe:
    """Load a reward recipe YAML (following `base`), apply dotted overrides, validate; errors name file and key."""
    return load_recipe(path, overrides, RewardRecipe)
