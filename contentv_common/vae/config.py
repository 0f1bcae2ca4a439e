"""The Wan2.1 causal 3D VAE: its config and its layer layout, framework-free (imports neither jax nor torch).

Both backends build their modules from `encoder_layers` / `decoder_blocks` and the parameter table (vae_table.py) is
generated from the same description, so the three can never disagree about which layers exist.

The config is read from a diffusers `AutoencoderKLWan` config.json. Only the Wan2.1 architecture is supported: the
Wan2.2 residual variant (`is_residual`), patchified inputs (`patch_size`) and a separate decoder width are rejected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

from contentv_common.config.model import from_dict
from contentv_common.errors import ConfigError

# diffusers AutoencoderKLWan defaults = the released Wan2.1 VAE statistics (per latent channel).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

VAE_CLASS = "AutoencoderKLWan"
RGB = 3


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class VAEConfig:
    """Sizes of the Wan2.1 VAE (diffusers `AutoencoderKLWan` names, `temperal` spelling included) and its latent stats.

    `dropout` is kept for config round-trips only: the VAE always runs frozen, where dropout is the identity.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self) -> None:
        for name in ("base_dim", "z_dim", "num_res_blocks"):
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _check(len(self.dim_mult) >= 1 and all(m > 0 for m in self.dim_mult), "dim_mult", "must be positive ints")
        _check(
            len(self.temperal_downsample) == len(self.dim_mult) - 1,
            "temperal_downsample",
            f"needs one entry per downsampling stage (len(dim_mult) - 1 = {len(self.dim_mult) - 1}), "
            f"got {len(self.temperal_downsample)}",
        )
        for name in ("latents_mean", "latents_std"):
            n = len(getattr(self, name))
            _check(n == self.z_dim, name, f"needs z_dim = {self.z_dim} values, got {n}")
        _check(all(s > 0 for s in self.latents_std), "latents_std", "values must be positive")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _check(
            not self.attn_scales,
            "attn_scales",
            f"attention inside the down blocks is not supported (Wan2.1 has none; diffusers cannot run it), "
            f"got {list(self.attn_scales)}",
        )

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def latent_frames(self, frames: int) -> int:
        """Causal time compression: frame 0 alone, then one latent frame per `temporal_factor` frames."""
        return 1 + (frames - 1) // self.temporal_factor

    def check_video_shape(self, shape: tuple[int, ...], noise_shape: tuple[int, ...] | None = None) -> None:
        """Raise a ValueError naming the axis if a `[B, 3, F, H, W]` video (or its sampling noise) cannot be encoded."""
        if len(shape) != 5 or shape[1] != RGB:
            raise ValueError(f"video must be [B, 3, F, H, W], got shape {tuple(shape)}")
        b, _, f, h, w = shape
        s = self.spatial_factor
        for name, size in (("H", h), ("W", w)):
            if size % s:
                raise ValueError(f"video {name}={size} is not divisible by the VAE's {s}x downsampling")
        latent = (b, self.z_dim, self.latent_frames(f), h // s, w // s)
        if noise_shape is not None and tuple(noise_shape) != latent:
            raise ValueError(f"noise shape {tuple(noise_shape)} != latent shape {latent}")

    def check_latent_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 5 or shape[1] != self.z_dim:
            raise ValueError(f"latents must be [B, {self.z_dim}, f, h, w], got shape {tuple(shape)}")

    def replace(self, **changes: Any) -> VAEConfig:
        return dataclasses.replace(self, **changes)


def tiny_vae_config() -> VAEConfig:
    """A tiny random-weight VAE for tests: Wan2.1's strides (4x time, 8x space) and 16 latent channels, 8 wide."""
    return VAEConfig(base_dim=8, num_res_blocks=1)


# diffusers AutoencoderKLWan keys that must keep their Wan2.1 value (other values are other architectures).
_FIXED = {"is_residual": False, "in_channels": RGB, "out_channels": RGB, "patch_size": None, "decoder_base_dim": None}


def config_from_diffusers(raw: dict[str, Any], where: str = "config.json") -> VAEConfig:
    """VAEConfig from a diffusers `AutoencoderKLWan` config.json; errors name the file and the key."""
    cls = raw.get("_class_name", VAE_CLASS)
    if cls != VAE_CLASS:
        raise ConfigError(f"{where}: _class_name {cls!r} is not {VAE_CLASS}")
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    values = {}
    for key, value in raw.items():
        if key.startswith("_") or key in ("scale_factor_temporal", "scale_factor_spatial"):
            continue
        if key in fields:
            values[key] = value
        elif key in _FIXED:
            ok = value == _FIXED[key] or (key == "decoder_base_dim" and value == raw.get("base_dim", 96))
            if not ok:
                raise ConfigError(
                    f"{where}: {key}: only the Wan2.1 VAE is supported ({key}={_FIXED[key]!r}), got {value!r}"
                )
        else:
            raise ConfigError(f"{where}: {key}: unsupported VAE config key")
    try:
        cfg = from_dict(VAEConfig, values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    for key, derived in (("scale_factor_temporal", cfg.temporal_factor), ("scale_factor_spatial", cfg.spatial_factor)):
        if raw.get(key) is not None and raw[key] != derived:
            raise ConfigError(f"{where}: {key}: {raw[key]} contradicts the architecture's factor {derived}")
    return cfg


def config_to_diffusers(cfg: VAEConfig) -> dict[str, Any]:
    """A diffusers `AutoencoderKLWan` config.json for `cfg`."""
    out: dict[str, Any] = {"_class_name": VAE_CLASS}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out | {k: v for k, v in _FIXED.items()}


# ----- layer layout (shared by both backends and the parameter table) -----

EncoderKind = Literal["residual", "downsample2d", "downsample3d"]
UpsampleMode = Literal["upsample2d", "upsample3d"]


@dataclass(frozen=True)
class EncoderLayer:
    """One entry of the encoder's flat `down_blocks` list."""

    kind: EncoderKind
    in_dim: int
    out_dim: int


@dataclass(frozen=True)
class UpBlock:
    """One decoder stage: `num_res_blocks + 1` residual blocks, then an optional upsampler that halves the width."""

    in_dim: int
    out_dim: int
    upsample: UpsampleMode | None


def encoder_layers(cfg: VAEConfig) -> tuple[EncoderLayer, ...]:
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    layers = []
    last = len(cfg.dim_mult) - 1
    for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
        for _ in range(cfg.num_res_blocks):
            layers.append(EncoderLayer("residual", in_dim, out_dim))
            in_dim = out_dim
        if i != last:
            kind: EncoderKind = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
            layers.append(EncoderLayer(kind, out_dim, out_dim))
    return tuple(layers)


def mid_dim(cfg: VAEConfig) -> int:
    """Width of the encoder's and the decoder's middle blocks."""
    return cfg.base_dim * cfg.dim_mult[-1]


def decoder_blocks(cfg: VAEConfig) -> tuple[UpBlock, ...]:
    dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
    temporal = tuple(reversed(cfg.temperal_downsample))
    last = len(cfg.dim_mult) - 1
    blocks = []
    for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
        upsample: UpsampleMode | None = None if i == last else ("upsample3d" if temporal[i] else "upsample2d")
        blocks.append(UpBlock(in_dim if i == 0 else in_dim // 2, out_dim, upsample))
    return tuple(blocks)
