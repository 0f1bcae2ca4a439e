"""The CLIP preference scorer's config and parameter table, and its checkpoint folder (framework-free).

The scorer (PickScore / HPS style) is a `transformers` CLIPModel: vision and text towers, their projections and the
logit scale. A local CLIPModel folder (`config.json` + `model.safetensors`, optional `preprocessor_config.json` and
tokenizer files) is read through `CLIP_TABLE`; canonical names are the torch twin's state_dict keys, JAX paths follow
from the rule kinds. The patch embedding is a bias-free conv kept in torch layout on both sides (a `TENSOR`): the JAX
tower applies it as a matmul over patches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from contentv_common.checkpoint.formats import TensorSource, stream_source
from contentv_common.checkpoint.param_table import Kind, ParamTable, Rule
from contentv_common.checkpoint.safetensors_io import weight_files
from contentv_common.errors import CheckpointError, ConfigError

Activation = Literal["quick_gelu", "gelu"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipTowerConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: Activation
    layer_norm_eps: float


@dataclass(frozen=True)
class ClipConfig:
    """What the scorer needs from a CLIPModel config.json (+ preprocessor_config.json)."""

    text: ClipTowerConfig
    vision: ClipTowerConfig
    vocab_size: int
    max_position_embeddings: int
    eos_token_id: int
    image_size: int
    patch_size: int
    projection_dim: int
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _get(raw: dict[str, Any], key: str, where: str, kind: type) -> Any:
    if key not in raw:
        raise ConfigError(f"{where}: {key}: required key is missing")
    value = raw[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{where}: {key}: must be {kind.__name__}, got {value!r}")
    return value


def _tower(raw: dict[str, Any], where: str) -> ClipTowerConfig:
    act = _get(raw, "hidden_act", where, str)
    if act not in ("quick_gelu", "gelu"):
        raise ConfigError(f"{where}: hidden_act: must be 'quick_gelu' or 'gelu', got {act!r}")
    tower = ClipTowerConfig(
        hidden_size=_get(raw, "hidden_size", where, int),
        intermediate_size=_get(raw, "intermediate_size", where, int),
        num_hidden_layers=_get(raw, "num_hidden_layers", where, int),
        num_attention_heads=_get(raw, "num_attention_heads", where, int),
        hidden_act=act,
        layer_norm_eps=_get(raw, "layer_norm_eps", where, float),
    )
    if tower.hidden_size % tower.num_attention_heads:
        raise ConfigError(f"{where}: hidden_size {tower.hidden_size} not divisible by num_attention_heads")
    return tower


def read_clip_config(folder: str | Path) -> ClipConfig:
    """ClipConfig from a transformers CLIPModel folder; image mean/std from preprocessor_config.json when present."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json (expected a transformers CLIPModel folder)")
    raw = json.loads(path.read_text())
    where = str(path)
    text = _get(raw, "text_config", where, dict)
    vision = _get(raw, "vision_config", where, dict)
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    pre = folder / "preprocessor_config.json"
    if pre.exists():
        pre_raw = json.loads(pre.read_text())
        mean = tuple(float(v) for v in pre_raw.get("image_mean", mean))  # type: ignore[assignment]  # checked below
        std = tuple(float(v) for v in pre_raw.get("image_std", std))  # type: ignore[assignment]
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"{pre}: image_mean / image_std must have 3 values")
    cfg = ClipConfig(
        text=_tower(text, f"{where}: text_config"),
        vision=_tower(vision, f"{where}: vision_config"),
        vocab_size=_get(text, "vocab_size", f"{where}: text_config", int),
        max_position_embeddings=_get(text, "max_position_embeddings", f"{where}: text_config", int),
        eos_token_id=_get(text, "eos_token_id", f"{where}: text_config", int),
        image_size=_get(vision, "image_size", f"{where}: vision_config", int),
        patch_size=_get(vision, "patch_size", f"{where}: vision_config", int),
        projection_dim=_get(raw, "projection_dim", where, int),
        image_mean=mean,
        image_std=std,
    )
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"{where}: vision_config.patch_size {cfg.patch_size} does not divide image_size")
    if vision.get("num_channels", 3) != 3:
        raise ConfigError(f"{where}: vision_config.num_channels must be 3 (RGB)")
    return cfg


def _layer_rules(hf: str, ours: str) -> tuple[Rule, ...]:
    layer, mine = f"{hf}.encoder.layers.{{i}}", f"{ours}.layers.{{i}}"
    return (
        Rule(f"{layer}.self_attn.q_proj", f"{mine}.attn.q_proj", Kind.LINEAR),
        Rule(f"{layer}.self_attn.k_proj", f"{mine}.attn.k_proj", Kind.LINEAR),
        Rule(f"{layer}.self_attn.v_proj", f"{mine}.attn.v_proj", Kind.LINEAR),
        Rule(f"{layer}.self_attn.out_proj", f"{mine}.attn.out_proj", Kind.LINEAR),
        Rule(f"{layer}.layer_norm1", f"{mine}.norm1", Kind.LAYER_NORM),
        Rule(f"{layer}.layer_norm2", f"{mine}.norm2", Kind.LAYER_NORM),
        Rule(f"{layer}.mlp.fc1", f"{mine}.mlp.fc1", Kind.LINEAR),
        Rule(f"{layer}.mlp.fc2", f"{mine}.mlp.fc2", Kind.LINEAR),
    )


CLIP_TABLE = ParamTable(
    "clip",
    (
        Rule("text_model.embeddings.token_embedding", "text.token_embedding", Kind.EMBEDDING),
        Rule("text_model.embeddings.position_embedding", "text.position_embedding", Kind.EMBEDDING),
        *_layer_rules("text_model", "text"),
        Rule("text_model.final_layer_norm", "text.final_norm", Kind.LAYER_NORM),
        Rule("vision_model.embeddings.class_embedding", "vision.class_embedding", Kind.TENSOR),
        Rule("vision_model.embeddings.patch_embedding.weight", "vision.patch_embedding", Kind.TENSOR),
        Rule("vision_model.embeddings.position_embedding", "vision.position_embedding", Kind.EMBEDDING),
        Rule("vision_model.pre_layrnorm", "vision.pre_norm", Kind.LAYER_NORM),
        *_layer_rules("vision_model", "vision"),
        Rule("vision_model.post_layernorm", "vision.post_norm", Kind.LAYER_NORM),
        Rule("text_projection", "text_projection", Kind.LINEAR_NO_BIAS),
        Rule("visual_projection", "visual_projection", Kind.LINEAR_NO_BIAS),
        Rule("logit_scale", "logit_scale", Kind.TENSOR),
    ),
)

# Index buffers older transformers versions saved; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("embeddings.position_ids",)


def open_clip_source(folder: str | Path) -> TensorSource:
    """A CLIPModel folder as a stream of (canonical name, torch-layout array); unknown keys are errors."""
    folder = Path(folder)
    cfg = read_clip_config(folder)
    return stream_source(folder, cfg, weight_files(folder, "model"), CLIP_TABLE, ignored_suffixes=_IGNORED_SUFFIXES)


def load_clip_tokenizer(folder: str | Path):
    """The scorer's own tokenizer (transformers CLIPTokenizer files in the folder); framework-free."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot load the CLIP tokenizer ({e})") from None


def tokenize(tokenizer, prompts: list[str] | tuple[str, ...], max_length: int) -> np.ndarray:
    """int32 ids [B, max_length]: padded on the right and truncated, as CLIP's text tower expects."""
    out = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return np.asarray(out["input_ids"], dtype=np.int32)
