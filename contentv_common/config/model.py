"""Typed, frozen configuration shared by both backends (imports neither jax nor torch).

Configs are frozen dataclasses built from YAML with `yaml.safe_load`. Unknown keys, wrong types and impossible values
raise `ConfigError`, whose message names the file and the dotted key that is wrong.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from contentv_common.errors import ConfigError

T = TypeVar("T")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """The MMDiT transformer (diffusers `SD3Transformer2DModel` sizes) plus how positions are embedded.

    `pos_embed="sincos_3d"` is ContentV (per-frame patching + fixed 3D sin-cos); `"sd3_2d"` is SD3's cropped 2D table
    (image mode, 1-frame input).
    """

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    hidden_size: int
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 2048
    qk_norm: Literal["rms_norm"] | None = "rms_norm"
    pos_embed: Literal["sincos_3d", "sd3_2d"] = "sincos_3d"
    pos_embed_max_size: int = 192
    sample_size: int = 128
    spatial_interpolation_scale: float = 0.5
    temporal_interpolation_scale: float = 1.0
    norm_eps: float = 1e-6
    mlp_ratio: int = 4
    timestep_channels: int = 256

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool):
                _check(value > 0, f.name, f"must be positive, got {value}")
        _check(
            self.num_attention_heads * self.attention_head_dim == self.hidden_size,
            "hidden_size",
            f"num_attention_heads x attention_head_dim = {self.num_attention_heads} x {self.attention_head_dim} "
            f"= {self.num_attention_heads * self.attention_head_dim} != hidden_size {self.hidden_size}",
        )
        _check(
            self.sample_size % self.patch_size == 0,
            "patch_size",
            f"patch_size {self.patch_size} does not divide the latent size sample_size={self.sample_size}",
        )
        _check(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        _check(self.timestep_channels % 2 == 0, "timestep_channels", "must be even")
        if self.pos_embed == "sincos_3d":
            _check(
                self.hidden_size % 16 == 0,
                "hidden_size",
                f"sincos_3d needs hidden_size divisible by 16 (1/4 temporal, 3/4 spatial), got {self.hidden_size}",
            )
        else:
            _check(self.hidden_size % 4 == 0, "hidden_size", "sd3_2d needs hidden_size divisible by 4")
            _check(
                self.pos_embed_max_size * self.patch_size >= self.sample_size,
                "pos_embed_max_size",
                f"{self.pos_embed_max_size} patches cannot cover sample_size {self.sample_size}",
            )

    def check_latent_shape(self, shape: tuple[int, ...]) -> None:
        """Raise a ValueError naming the axis if `[B, C, F, H, W]` latents cannot go through this model."""
        if len(shape) != 5:
            raise ValueError(f"hidden_states must be [B, C, F, H, W], got shape {tuple(shape)}")
        _, c, f, h, w = shape
        if c != self.in_channels:
            raise ValueError(f"hidden_states has {c} channels, model in_channels is {self.in_channels}")
        for name, size in (("H", h), ("W", w)):
            if size % self.patch_size:
                raise ValueError(f"hidden_states {name}={size} is not divisible by patch_size {self.patch_size}")
        if self.pos_embed == "sd3_2d":
            if f != 1:
                raise ValueError(f"pos_embed sd3_2d is image mode and takes 1 frame, got F={f}")
            for name, size in (("H", h), ("W", w)):
                if size // self.patch_size > self.pos_embed_max_size:
                    raise ValueError(
                        f"hidden_states {name}={size} exceeds pos_embed_max_size {self.pos_embed_max_size} patches"
                    )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert YAML lists to tuples; errors name `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            _check(type(None) in args, key, "must not be null")
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        _check(value in args, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), key, f"must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        _check(len(value) == len(args), key, f"must have {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        _check(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return {k: _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        _check(
            isinstance(value, tp) and not (tp is int and isinstance(value, bool)),
            key,
            f"must be {tp.__name__}, got {type(value).__name__} {value!r}",
        )
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def from_dict(cls: type[T], data: Any, key: str = "") -> T:
    """Build the dataclass `cls` from a mapping; unknown or missing keys and wrong types raise ConfigError."""
    prefix = f"{key}." if key else ""
    _check(isinstance(data, dict), key or "<root>", f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls))}
    unknown = sorted(set(data) - set(fields))
    _check(not unknown, prefix + str(unknown[0]) if unknown else "", f"unknown key (known: {sorted(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


def load_yaml(path: str | Path, cls: type[T]) -> T:
    """Load `cls` from a YAML file; a bad key raises ConfigError naming the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return from_dict(cls, data if data is not None else {})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config (tuples become lists) for YAML/JSON output."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def load_model_config(path: str | Path) -> ModelConfig:
    return load_yaml(path, ModelConfig)


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def named_model_config(name: str) -> ModelConfig:
    """A model size from configs/model/ by name (`tiny`, `contentv-8b`, `sd3.5-large`) or a YAML path."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"model config {name!r} not found (known: {known})")
    return load_model_config(path)
