"""Tiny fp32 and bf16 checkpoints in the official layouts, written with numpy and the project's writers only.

Transformer and VAE: diffusers folders (`config.json` + `diffusion_pytorch_model-0000i-of-0000n.safetensors` + index);
the CLIP scorer: a transformers CLIPModel folder (`model-*.safetensors` + index, tokenizer, preprocessor config).
Shards are small, so every folder is sharded with an index. The bf16 folder holds the fp32 weights rounded to bf16, so
a bf16 load must reproduce the fp32 forward within bf16 rounding. Shapes come from whichever backend the caller has
(see `canonical_shapes`), so the same weights are written whether torch, JAX or both are installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from contentv_common.checkpoint.formats import write_diffusers
from contentv_common.checkpoint.safetensors_io import AtomicFolder, write_sharded
from contentv_common.config.model import ModelConfig, named_model_config
from contentv_common.reward.clip_table import CLIP_TABLE, ClipConfig, ClipTowerConfig
from contentv_common.tiny_models import random_weights
from contentv_common.vae.checkpoint import write_vae_diffusers
from contentv_common.vae.config import VAEConfig, tiny_vae_config

SHARD_BYTES = 32 * 2**10  # 2-7 shards per folder
VAE_SHARD_BYTES = 512 * 2**10
DTYPES = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, layer_norm_eps=1e-5)
CLIP = ClipConfig(
    text=ClipTowerConfig(hidden_act="quick_gelu", **TOWER),
    vision=ClipTowerConfig(hidden_act="gelu", **TOWER),
    vocab_size=58,
    max_position_embeddings=16,
    eos_token_id=1,
    image_size=32,
    patch_size=8,
    projection_dim=16,
    image_mean=(0.45, 0.46, 0.41),
    image_std=(0.27, 0.26, 0.28),
)


def transformer_config() -> ModelConfig:
    """The tiny model in SD3's image mode, as `tools/sample.py --tiny` and the official SD3.5 folders use it."""
    return named_model_config("tiny").replace(pos_embed="sd3_2d")


def vae_config() -> VAEConfig:
    return tiny_vae_config()


def canonical_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Canonical name -> shape of the three tiny models, from torch (meta device) or else JAX (abstract)."""
    try:
        import torch
    except ModuleNotFoundError:
        return _jax_shapes()
    from contentv_torch_npu import Transformer, WanVAE
    from contentv_torch_npu.loading import canonical_shapes as shapes
    from contentv_torch_npu.reward.clip import ClipScorer

    with torch.device("meta"):
        models = {"transformer": Transformer(transformer_config()), "vae": WanVAE(vae_config())}
        models["clip"] = ClipScorer(CLIP)
    return {kind: shapes(model) for kind, model in models.items()}


def _jax_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    from flax import nnx

    from contentv_common.vae.table import vae_table
    from contentv_jax.loading import abstract_transformer
    from contentv_jax.loading import canonical_shapes as shapes
    from contentv_jax.reward.clip import ClipScorer
    from contentv_jax.vae import WanVAE

    vae = nnx.eval_shape(lambda: WanVAE(vae_config(), rngs=nnx.Rngs(0)))
    clip = nnx.eval_shape(lambda: ClipScorer(CLIP, rngs=nnx.Rngs(0)))
    return {
        "transformer": shapes(abstract_transformer(transformer_config())),
        "vae": shapes(vae, vae_table(vae_config())),
        "clip": shapes(clip, CLIP_TABLE),
    }


def _cast(weights: dict[str, np.ndarray], precision: str):
    return ((name, array.astype(DTYPES[precision])) for name, array in weights.items())


def write_clip(folder: Path, weights: dict[str, np.ndarray], precision: str) -> Path:
    """A transformers CLIPModel folder: config.json, sharded model safetensors, tokenizer and preprocessor config."""
    from tests.tiny_clip import tiny_clip_tokenizer

    def tower(t: ClipTowerConfig) -> dict:
        return {k: getattr(t, k) for k in (*TOWER, "hidden_act")}

    config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": CLIP.projection_dim,
        "text_config": dict(tower(CLIP.text), vocab_size=CLIP.vocab_size, bos_token_id=0, pad_token_id=1,
                            max_position_embeddings=CLIP.max_position_embeddings, eos_token_id=CLIP.eos_token_id),
        "vision_config": dict(tower(CLIP.vision), image_size=CLIP.image_size, patch_size=CLIP.patch_size,
                              num_channels=3),
    }  # fmt: skip
    with AtomicFolder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": list(CLIP.image_mean), "image_std": list(CLIP.image_std)})
        )
        renamed = ((CLIP_TABLE.from_canonical(k).diffusers, v) for k, v in _cast(weights, precision))
        write_sharded(renamed, tmp, "model", SHARD_BYTES, metadata={"format": "pt"})
        tiny_clip_tokenizer().save_pretrained(tmp)
    return folder


def write_all(root: Path, shapes: dict[str, dict[str, tuple[int, ...]]], seed: int = 0) -> Path:
    """`root/{transformer,vae,clip}_{fp32,bf16}` and `root/transformer_fp16`: the same random weights in each."""
    weights = {kind: random_weights(s, seed + i) for i, (kind, s) in enumerate(sorted(shapes.items()))}
    for precision in DTYPES:
        write_diffusers(
            root / f"transformer_{precision}",
            transformer_config(),
            _cast(weights["transformer"], precision),
            max_shard_bytes=SHARD_BYTES,
        )
        if precision == "fp16":
            continue  # fp16 is checked on the transformer only
        write_vae_diffusers(
            root / f"vae_{precision}", vae_config(), _cast(weights["vae"], precision), max_shard_bytes=VAE_SHARD_BYTES
        )
        write_clip(root / f"clip_{precision}", weights["clip"], precision)
    return root
