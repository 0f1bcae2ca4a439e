"""The training recipe: one framework-neutral schema read by the JAX trainer and the torch twin.

A recipe is a YAML file (configs/recipes/*.yaml) loaded into frozen dataclasses with `contentv_common.config.model`, so
an unknown key, a wrong type or an impossible value raises `ConfigError` naming the file and the dotted key. A recipe
may name a `base` recipe whose keys it overrides (stage files share one base), and command-line `key=value` overrides
use the same dotted keys. `stages` runs several stages in one go, each resuming from the previous stage's checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from contentv_common.config.model import ModelConfig, from_dict, named_model_config
from contentv_common.errors import ConfigError
from contentv_common.vae.config import VAEConfig

T = TypeVar("T")

# The attention kernel: auto = cuDNN flash on GPU, Pallas splash on TPU, XLA on CPU (contentv_jax.ops)
AttentionChoice = Literal["auto", "xla", "cudnn", "splash"]
Remat = Literal["none", "full", "dots", "dots_all"]

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class BucketConfig:
    """One bucket: pixel size and frame count (4k+1 for the causal VAE; 1 = image) with its own batch size."""

    width: int
    height: int
    frames: int
    batch_size: int

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            size = getattr(self, name)
            _check(
                size > 0 and size % 16 == 0, name, f"must be a positive multiple of 16 (VAE 8 x patch 2), got {size}"
            )
        _check(self.frames >= 1 and (self.frames - 1) % 4 == 0, "frames", f"must be 4k+1, got {self.frames}")
        _check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


@dataclass(frozen=True)
class DataConfig:
    """Where the videos are listed (manifest), where the latent/text cache goes, and how clips are cut and batched."""

    manifest: str
    cache_dir: str
    buckets: tuple[BucketConfig, ...]
    encoders: str = "tiny"  # "tiny" (random tiny VAE + text encoders), "demo" or a local diffusers pipeline folder
    fps: float = 24.0
    text_dropout: float = 0.1
    # "cached": the cache holds each caption's text embeddings; "online": latents only, the loader tokenizes the
    # captions and the training step encodes them with the encoders' text encoders (frozen, sharded like the model)
    text: Literal["cached", "online"] = "cached"
    num_threads: int = 2
    prefetch: int = 2
    cache_dtype: Literal["bfloat16", "float32"] = "float32"  # the cached latents and text; readers get float32
    chunk_size: int = 64  # manifest entries per cache file: the unit of work a process takes and a build resumes at

    def __post_init__(self) -> None:
        _check(len(self.buckets) > 0, "buckets", "needs at least one bucket")
        _check(self.chunk_size > 0, "chunk_size", f"must be positive, got {self.chunk_size}")
        _check(self.fps > 0, "fps", f"must be positive, got {self.fps}")
        _check(0.0 <= self.text_dropout <= 1.0, "text_dropout", f"must be in [0, 1], got {self.text_dropout}")
        _check(self.text in ("cached", "online"), "text", f"must be cached or online, got {self.text!r}")
        why = "online needs text encoders in the step; the demo's word embeddings (encoders: demo) are cached only"
        _check(self.text == "cached" or self.encoders != "demo", "text", why)
        names = [b.name for b in self.buckets]
        dup = sorted({n for n in names if names.count(n) > 1})
        _check(not dup, "buckets", f"duplicate bucket {dup}")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Flow matching: logit-normal sigma sampling, the shift (none / static / by token count) and loss weighting."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift_mode: Literal["none", "static", "tokens"] = "tokens"
    shift: float = 1.0
    base_tokens: int = 1024
    weighting: Literal["uniform", "cosmap", "logit_normal"] = "uniform"

    def __post_init__(self) -> None:
        _check(self.logit_std > 0, "logit_std", f"must be positive, got {self.logit_std}")
        _check(self.shift > 0, "shift", f"must be positive, got {self.shift}")
        _check(self.base_tokens > 0, "base_tokens", f"must be positive, got {self.base_tokens}")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up, then constant or cosine decay; global-norm clipping; optional EMA of the weights."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = 1.0
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        for i, b in enumerate(self.betas):
            _check(0.0 <= b < 1.0, f"betas[{i}]", f"must be in [0, 1), got {b}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", f"must be positive, got {self.grad_clip}")
        _check(
            self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
            "ema_decay",
            f"must be in (0, 1), got {self.ema_decay}",
        )


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes for the axes (data, fsdp, sequence, tensor); their product is the device count.

    The train state (weights, optimizer moments, EMA) is sharded over fsdp x sequence (ZeRO-3) and replicated over
    `data` (hybrid sharding: its all-gathers stay inside one data group); `shard_data: true` shards it over `data`
    too, for the least memory per device at the cost of all-gathers across data groups."""

    data: int = 1
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1
    shard_data: bool = False

    def __post_init__(self) -> None:
        for name in ("data", "fsdp", "sequence", "tensor"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.data, self.fsdp, self.sequence, self.tensor)


# Canonical module-name patterns (fnmatch) LoRA adapts by default: the attention and MLP projections of every block
LORA_DEFAULT_TARGETS: tuple[str, ...] = (
    "blocks.*.attn.to_q",
    "blocks.*.attn.to_k",
    "blocks.*.attn.to_v",
    "blocks.*.attn.to_out",
    "blocks.*.attn.add_q",
    "blocks.*.attn.add_k",
    "blocks.*.attn.add_v",
    "blocks.*.attn.add_out",
    "blocks.*.ff.fc1",
    "blocks.*.ff.fc2",
    "blocks.*.ff_context.fc1",
    "blocks.*.ff_context.fc2",
)


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: W x + (alpha / rank) B A x on the linear modules whose canonical name matches a `targets`
    pattern; the base weights stay frozen (stored in `base_dtype`), only A and B train (in float32)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_DEFAULT_TARGETS
    base_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
        _check(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        _check(len(self.targets) > 0, "targets", "needs at least one canonical module-name pattern")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str
    interval: int = 100
    keep: int = 2

    def __post_init__(self) -> None:
        _check(self.interval > 0, "interval", f"must be positive, got {self.interval}")
        _check(self.keep > 0, "keep", f"must be positive, got {self.keep}")


@dataclass(frozen=True)
class DivergenceConfig:
    """Skip a step whose loss or gradient norm exceeds `spike_factor` x the median of the last `window` good steps
    (None: only non-finite steps are skipped); skipped steps count towards `nan_skip_limit`."""

    spike_factor: float | None = None
    window: int = 20

    def __post_init__(self) -> None:
        _check(
            self.spike_factor is None or self.spike_factor > 1, "spike_factor", f"must be > 1, got {self.spike_factor}"
        )
        _check(self.window > 0, "window", f"must be positive, got {self.window}")


@dataclass(frozen=True)
class EvalConfig:
    """In-loop validation every `interval` steps (0: off): the flow-matching loss at the fixed `timesteps` (0-1000) on
    `samples` cached samples held out of training, and with demo encoders a sampled clip, to TensorBoard.

    `prompts`: also sample each prompt (noise seed: the recipe's seed + its index, as `tools/sample.py --prompts-file`
    draws it; the first video bucket's size; EVAL_CLIP's sampler settings) on the training mesh, decode the clips and
    log their metrics (contentv_common.eval: temporal_flickering; caption_colour / caption_direction when every prompt
    is a synthetic-set caption; clip_score / clip_consistency with `clip`, a local CLIPModel folder) and the clips,
    which then stand in for the held-out sample's clip. The prompts' text embeddings are encoded by the data's
    encoders beside the latent cache (once, by the process that builds it)."""

    interval: int = 0
    timesteps: tuple[float, ...] = (100.0, 500.0, 900.0)
    samples: int = 4
    prompts: tuple[str, ...] = ()
    clip: str | None = None

    def __post_init__(self) -> None:
        _check(self.interval >= 0, "interval", f"must be >= 0 (0: off), got {self.interval}")
        _check(all(0 <= t <= 1000 for t in self.timesteps), "timesteps", f"must be in [0, 1000], got {self.timesteps}")
        _check(self.samples >= 1, "samples", f"must be >= 1, got {self.samples}")
        _check(not self.prompts or self.interval > 0, "prompts", "sampled every eval.interval steps: set interval > 0")
        _check(all(p.strip() for p in self.prompts), "prompts", f"must not be empty strings, got {list(self.prompts)}")
        _check(len(set(self.prompts)) == len(self.prompts), "prompts", f"must be unique, got {list(self.prompts)}")
        if self.clip is not None:
            _check(bool(self.prompts), "clip", "scores the clips of eval.prompts: give prompts too")
            config = Path(self.clip) / "config.json"
            _check(config.is_file(), "clip", f"{config}: missing (a local transformers CLIPModel folder)")


@dataclass(frozen=True)
class StageConfig:
    """One stage of a multi-stage run: dotted-key overrides of the recipe; it starts from the previous stage."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A training run. `model` is a configs/model name or an inline ModelConfig; `init_from` a weights folder
    (diffusers/our format, e.g. SD3.5-Large turned video with pos_embed sincos_3d); `resume_from` the checkpoint dir
    of a previous stage (weights and EMA are taken, optimizer and data start fresh)."""

    model: str | ModelConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    steps: int
    objective: ObjectiveConfig = ObjectiveConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    remat: Remat = "none"
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    attention: AttentionChoice = "auto"
    seed: int = 0
    nan_skip_limit: int = 10
    divergence: DivergenceConfig = DivergenceConfig()
    log_dir: str = "runs/train"
    log_interval: int = 1
    init_from: str | None = None
    resume_from: str | None = None
    stages: tuple[StageConfig, ...] = ()
    eval: EvalConfig = EvalConfig()
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        _check(self.steps > 0, "steps", f"must be positive, got {self.steps}")
        _check(self.nan_skip_limit >= 0, "nan_skip_limit", f"must be >= 0, got {self.nan_skip_limit}")
        _check(self.log_interval > 0, "log_interval", f"must be positive, got {self.log_interval}")
        if isinstance(self.model, str):
            try:
                named_model_config(self.model)
            except ConfigError as e:
                raise ConfigError(f"model: {e}") from None
        names = [s.name for s in self.stages]
        _check(len(set(names)) == len(names), "stages", f"stage names must be unique, got {names}")
        check_buckets_on_mesh(self.data.buckets, self.mesh, self.model_config.patch_size)
        no_video = not any(b.frames > 1 for b in self.data.buckets)
        why = "sampled at the first video bucket's size, and data.buckets has no video bucket (frames > 1)"
        _check(not (self.eval.prompts and no_video), "eval.prompts", why)
        why = "held-out samples are evaluated from cached text: set data.text: cached to evaluate in the loop"
        _check(not (self.eval.interval and self.data.text == "online"), "eval.interval", why)
        if self.lora is not None and self.lora.base_dtype == "bfloat16":
            _check(self.compute_dtype == "bfloat16", "lora.base_dtype", "bfloat16 needs compute_dtype: bfloat16")

    @property
    def model_config(self) -> ModelConfig:
        return named_model_config(self.model) if isinstance(self.model, str) else self.model

    def stage_recipes(self) -> list[tuple[str, Recipe]]:
        """The runs to do in order: this recipe alone, or one per stage (own checkpoint dir, resuming the previous)."""
        if not self.stages:
            return [("main", self)]
        base = recipe_to_dict(self)
        base.pop("stages")
        runs, previous = [], self.resume_from
        for i, stage in enumerate(self.stages):
            data = apply_overrides(base, stage.overrides, f"stages[{i}].overrides")
            data["checkpoint"] = {**data["checkpoint"], "dir": str(Path(self.checkpoint.dir) / stage.name)}
            data["log_dir"] = str(Path(data.get("log_dir", self.log_dir)) / stage.name)
            data["resume_from"] = previous
            runs.append((stage.name, from_dict(Recipe, data)))
            previous = data["checkpoint"]["dir"]
        return runs


_WAN_VAE = VAEConfig()


def image_tokens(bucket: BucketConfig, patch_size: int) -> int:
    """Video tokens of one sample of `bucket` through the Wan VAE: latent frames x rows x columns per patch."""
    s = _WAN_VAE.spatial_factor * patch_size
    return _WAN_VAE.latent_frames(bucket.frames) * (bucket.height // s) * (bucket.width // s)


def check_buckets_on_mesh(buckets: tuple[BucketConfig, ...], mesh: MeshConfig, patch_size: int) -> None:
    """Every bucket must run on the recipe's own mesh, so a bad recipe fails when it loads, not at its first batch:
    its batch splits evenly over the batch axes (data x fsdp), and its image tokens split evenly over `sequence`
    (the sequence-parallel rule of contentv_common.model.sequence_split: the 333 text tokens stay whole and the 38
    heads are padded inside the attention, so they set no rule here)."""
    split = mesh.data * mesh.fsdp
    for i, b in enumerate(buckets):
        where = f"data.buckets[{i}] ({b.name})"
        _check(
            b.batch_size % split == 0,
            where,
            f"batch_size {b.batch_size} does not split over mesh data x fsdp = {mesh.data} x {mesh.fsdp} = {split}",
        )
        tokens = image_tokens(b, patch_size)
        _check(
            tokens % mesh.sequence == 0,
            where,
            f"{tokens} image tokens per sample do not split over mesh sequence = {mesh.sequence}",
        )


def check_device_count(mesh: MeshConfig, devices: int) -> None:
    """The mesh must use exactly the devices the run has (callers that know the count: the CLIs, the planner)."""
    n = mesh.data * mesh.fsdp * mesh.sequence * mesh.tensor
    _check(
        n == devices,
        "mesh",
        f"data x fsdp x sequence x tensor = {' x '.join(map(str, mesh.shape))} = {n} devices, but the target has "
        f"{devices}",
    )


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain nested dict of a recipe (tuples become lists) that `from_dict(Recipe, ...)` reads back."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(recipe))


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", value parsed as YAML, so numbers, null, lists work; also `3e-4`)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str) and _FLOAT.fullmatch(parsed.strip()):
        parsed = float(parsed)
    return key.strip(), parsed


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], where: str = "override") -> dict[str, Any]:
    """A deep copy of `data` with each dotted key set; a path through a non-mapping is an error naming the key."""
    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            _check(isinstance(child, dict), f"{where}: {'.'.join(parts[: i + 1])}", "is not a mapping")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return out


def read_with_base(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: base recipes form a cycle")
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found" if not path.exists() else f"{path}: not a file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: must be a recipe file name")
    parent = read_with_base(path.parent / base, (*seen, path))
    return _merge(parent, data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_recipe(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    cls: type[T] = Recipe,  # type: ignore[assignment]
) -> T:
    """Load a recipe YAML (following `base`) as `cls` (Recipe, or RewardRecipe), apply dotted `overrides`, validate;
    errors name the file and key."""
    path = Path(path)
    data = apply_overrides(read_with_base(path), overrides or {})
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
