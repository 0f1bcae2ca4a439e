"""SD3.5's text encoders on disk, framework-free: configs, parameter tables and streamed checkpoint sources.

The diffusers pipeline layout keeps each encoder as a transformers folder (`config.json` + `model*.safetensors`, sharded
with an index or not, fp32/fp16/bf16): `text_encoder` (CLIP-L, `CLIPTextModelWithProjection`, quick-GELU),
`text_encoder_2` (OpenCLIP bigG in the same class, GELU) and `text_encoder_3` (T5 v1.1 XXL, `T5EncoderModel`). Their
weights are read through `CLIP_TEXT_TABLE` (the text half of the reward scorer's CLIP table, so one CLIP text tower
serves both) and `T5_TABLE`, as a `TensorSource` whose tensors stream shard by shard and whose slices each device
reads for itself, exactly as the transformer's. `SD35_TEXT_CONFIGS` are the full-size encoders (for planning).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contentv_common.checkpoint.formats import TensorSource, check_keys, stream_source
from contentv_common.checkpoint.param_table import Kind, ParamTable, Rule
from contentv_common.checkpoint.safetensors_io import AtomicFolder, tensor_index, weight_files, write_sharded
from contentv_common.errors import CheckpointError, ConfigError
from contentv_common.reward.clip_table import CLIP_TABLE, ClipTowerConfig, _get, _tower

# Index buffers older transformers versions saved; recomputed, never loaded.
_CLIP_IGNORED = ("embeddings.position_ids",)
# T5's input embedding is tied to `shared`; some writers store it under this name too (or only under it).
_T5_TIED = "encoder.embed_tokens.weight"
_T5_SHARED = "shared.weight"


@dataclass(frozen=True)
class ClipTextConfig:
    """What the CLIP text tower with projection needs from a `CLIPTextModelWithProjection` config.json."""

    text: ClipTowerConfig
    vocab_size: int
    max_position_embeddings: int
    eos_token_id: int  # 2 in legacy configs (SD3.5's): then end-of-text is the largest id, as transformers reads it
    projection_dim: int


@dataclass(frozen=True)
class T5EncoderConfig:
    """What the T5 v1.1 encoder needs from a `T5EncoderModel` config.json (gated-GELU feed-forward only)."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


def _read_json(folder: Path) -> tuple[dict[str, Any], str]:
    path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: text encoder folder not found")
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json (expected a transformers text encoder folder)")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None


def clip_text_config(raw: dict[str, Any], where: str) -> ClipTextConfig:
    """ClipTextConfig from a `CLIPTextModelWithProjection` config dict (`where` names it in errors)."""
    return ClipTextConfig(
        text=_tower(raw, where),
        vocab_size=_get(raw, "vocab_size", where, int),
        max_position_embeddings=_get(raw, "max_position_embeddings", where, int),
        eos_token_id=_get(raw, "eos_token_id", where, int),
        projection_dim=_get(raw, "projection_dim", where, int),
    )


def t5_encoder_config(raw: dict[str, Any], where: str) -> T5EncoderConfig:
    """T5EncoderConfig from a `T5EncoderModel` config dict; anything but gated-GELU (T5 v1.1) is a ConfigError."""
    proj = raw.get("feed_forward_proj", "relu")
    if proj != "gated-gelu":
        raise ConfigError(f"{where}: feed_forward_proj: only T5 v1.1's 'gated-gelu' is supported, got {proj!r}")
    optional = {
        key: _get(raw, key, where, type(default))
        for key, default in (
            ("relative_attention_num_buckets", 32),
            ("relative_attention_max_distance", 128),
            ("layer_norm_epsilon", 1e-6),
        )
        if key in raw
    }
    cfg = T5EncoderConfig(
        **{k: _get(raw, k, where, int) for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")},
        **optional,
    )
    exact = cfg.relative_attention_num_buckets // 4  # positions below this distance get a bucket each
    if exact < 1 or cfg.relative_attention_max_distance <= exact:
        raise ConfigError(f"{where}: relative_attention_num_buckets / max_distance: not a bucketing T5 can use")
    return cfg


def read_clip_text_config(folder: str | Path) -> ClipTextConfig:
    raw, where = _read_json(Path(folder))
    return clip_text_config(raw, where)


def read_t5_config(folder: str | Path) -> T5EncoderConfig:
    raw, where = _read_json(Path(folder))
    return t5_encoder_config(raw, where)


CLIP_TEXT_TABLE = ParamTable(
    "clip_text", tuple(r for r in CLIP_TABLE.rules if r.diffusers.startswith(("text_model.", "text_projection")))
)

_T5_BLOCK, _OURS = "encoder.block.{i}.layer", "layers.{i}"
_T5_FF = ("wi_0", "wi_1", "wo")
_T5_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"  # the first layer's, shared by all
T5_TABLE = ParamTable(
    "t5",
    (
        Rule("shared", "shared", Kind.EMBEDDING),
        Rule(_T5_BIAS, "relative_attention_bias", Kind.EMBEDDING),
        *(Rule(f"{_T5_BLOCK}.0.SelfAttention.{p}", f"{_OURS}.attn.{p}", Kind.LINEAR_NO_BIAS) for p in "qkvo"),
        Rule(f"{_T5_BLOCK}.0.layer_norm", f"{_OURS}.attn_norm", Kind.RMS_NORM),
        *(Rule(f"{_T5_BLOCK}.1.DenseReluDense.{p}", f"{_OURS}.ff.{p}", Kind.LINEAR_NO_BIAS) for p in _T5_FF),
        Rule(f"{_T5_BLOCK}.1.layer_norm", f"{_OURS}.ff_norm", Kind.RMS_NORM),
        Rule("encoder.final_layer_norm", "final_norm", Kind.RMS_NORM),
    ),
)


def clip_text_shapes(cfg: ClipTextConfig) -> dict[str, tuple[int, ...]]:
    """transformers key -> shape of every `CLIPTextModelWithProjection` weight."""
    d, ff = cfg.text.hidden_size, cfg.text.intermediate_size
    out = {
        "text_model.embeddings.token_embedding.weight": (cfg.vocab_size, d),
        "text_model.embeddings.position_embedding.weight": (cfg.max_position_embeddings, d),
        "text_model.final_layer_norm.weight": (d,),
        "text_model.final_layer_norm.bias": (d,),
        "text_projection.weight": (cfg.projection_dim, d),
    }
    for i in range(cfg.text.num_hidden_layers):
        layer = f"text_model.encoder.layers.{i}"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out |= {f"{layer}.self_attn.{p}.weight": (d, d), f"{layer}.self_attn.{p}.bias": (d,)}
        for n in ("layer_norm1", "layer_norm2"):
            out |= {f"{layer}.{n}.weight": (d,), f"{layer}.{n}.bias": (d,)}
        out |= {f"{layer}.mlp.fc1.weight": (ff, d), f"{layer}.mlp.fc1.bias": (ff,)}
        out |= {f"{layer}.mlp.fc2.weight": (d, ff), f"{layer}.mlp.fc2.bias": (d,)}
    return out


def t5_shapes(cfg: T5EncoderConfig) -> dict[str, tuple[int, ...]]:
    """transformers key -> shape of every `T5EncoderModel` weight (the tied embedding once, as `shared.weight`)."""
    d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
    out = {
        _T5_SHARED: (cfg.vocab_size, d),
        f"{_T5_BIAS}.weight": (cfg.relative_attention_num_buckets, cfg.num_heads),
        "encoder.final_layer_norm.weight": (d,),
    }
    for i in range(cfg.num_layers):
        block = f"encoder.block.{i}.layer"
        out |= {f"{block}.0.SelfAttention.{p}.weight": (inner, d) for p in "qkv"}
        out |= {f"{block}.0.SelfAttention.o.weight": (d, inner), f"{block}.0.layer_norm.weight": (d,)}
        out |= {f"{block}.1.DenseReluDense.{p}.weight": (ff, d) for p in ("wi_0", "wi_1")}
        out |= {f"{block}.1.DenseReluDense.wo.weight": (d, ff), f"{block}.1.layer_norm.weight": (d,)}
    return out


def open_clip_text_source(folder: str | Path) -> TensorSource:
    """A `CLIPTextModelWithProjection` folder as a stream of (canonical name, torch-layout array); headers only now."""
    folder = Path(folder)
    cfg = read_clip_text_config(folder)
    return stream_source(folder, cfg, weight_files(folder, "model"), CLIP_TEXT_TABLE, ignored_suffixes=_CLIP_IGNORED)


def open_t5_source(folder: str | Path) -> TensorSource:
    """A `T5EncoderModel` folder as a stream of (canonical name, torch-layout array); the tied input embedding is read
    from `shared.weight`, or from `encoder.embed_tokens.weight` when only that name is stored."""
    folder = Path(folder)
    cfg = read_t5_config(folder)
    files = weight_files(folder, "model")
    keys = tensor_index(files)
    renamed = {_T5_TIED: _T5_SHARED} if _T5_SHARED not in keys else {}
    ignored = (_T5_TIED,) if _T5_SHARED in keys else ()
    return stream_source(folder, cfg, files, T5_TABLE, ignored_suffixes=ignored, renamed=renamed)


def check_text_source(source: TensorSource) -> None:
    """CheckpointError naming the folder and every missing, unexpected or wrong-shape key, from the config and the
    safetensors headers alone (before any weight is read or any model built)."""
    if isinstance(source.config, T5EncoderConfig):
        shapes, table = t5_shapes(source.config), T5_TABLE
    else:
        shapes, table = clip_text_shapes(source.config), CLIP_TEXT_TABLE
    check_keys(source, {table.from_diffusers(k).canonical: v for k, v in shapes.items()}, table)


def write_text_encoder(
    folder: str | Path,
    raw_config: dict[str, Any],
    tensors: Iterator[tuple[str, np.ndarray]],
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """A transformers text encoder folder (config.json + model safetensors, sharded with an index when large) from
    (transformers key, array) pairs, written atomically."""
    with AtomicFolder(folder, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(raw_config, indent=2))
        write_sharded(tensors, tmp, "model", max_shard_bytes, metadata={"format": "pt"})
    return Path(folder)


def t5_relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """int32 [length, length]: T5's bidirectional relative-position bucket of (query i, key j), computed in float32
    as transformers' `T5Attention._relative_position_bucket` computes it (so boundary positions land alike)."""
    position = np.arange(length)
    relative = position[None, :] - position[:, None]  # key - query
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative)
    with np.errstate(divide="ignore"):
        scaled = np.log(distance.astype(np.float32) / np.float32(exact)) / np.float32(math.log(max_distance / exact))
    large = exact + np.where(distance >= exact, scaled * np.float32(half - exact), 0).astype(np.int64)
    large = np.minimum(large, half - 1)
    buckets = (relative > 0) * half + np.where(distance < exact, distance, large)
    return buckets.astype(np.int32)


def _clip(hidden: int, layers: int, heads: int, act: str, projection: int) -> ClipTextConfig:
    tower = ClipTowerConfig(hidden, 4 * hidden, layers, heads, act, 1e-5)  # type: ignore[arg-type]
    return ClipTextConfig(tower, 49408, 77, 2, projection)


# The full-size encoders of the official SD3.5-Large / ContentV-8B folders (their config.json values).
SD35_TEXT_CONFIGS = (
    _clip(768, 12, 12, "quick_gelu", 768),  # text_encoder: CLIP-L/14
    _clip(1280, 32, 20, "gelu", 1280),  # text_encoder_2: OpenCLIP bigG/14
    T5EncoderConfig(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
)
