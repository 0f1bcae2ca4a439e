"""Random tiny models drawn in numpy, so either backend alone builds the very same weights (no downloads, no torch).

`random_weights` fills any set of named shapes from a seed; `tiny_text` gives random tiny CLIP-L/CLIP-G/T5 in the
official pipeline layout (transformers config dicts, weights under transformers' names, byte-level CLIP and unigram
T5 tokenizers over a few words): the tiny encoders of both backends load these, so they give the same embeddings.
CLIP-L keeps SD3.5's legacy `eos_token_id` 2 and quick-GELU, CLIP-G the real end-of-text id and GELU, so both
pooling rules and both activations are exercised.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from contentv_common.text.encoder_table import clip_text_config, clip_text_shapes, t5_encoder_config, t5_shapes
from contentv_common.text.sd3_prompt import T5_MAX_SEQUENCE_LENGTH, PromptTokenizers, TextConfigs

TINY_WORDS = ("a", "the", "cat", "dog", "video", "of", "on", "in", "red", "blue", "sky", "sea", "walking", "low")
# Changes whenever the tiny draw changes, so embedding caches of older tiny encoders are never reused.
_TINY_TEXT_VERSION = "numpy-1"


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int | Sequence[int]) -> dict[str, np.ndarray]:
    """fp32 weights that keep activations O(1): fan-in scaled matrices, norms near 1, small biases (none zero);
    drawn in sorted name order, so the same names and shapes give the same weights whoever asks."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name == "logit_scale":
            value = np.full(shape, np.log(20.0))
        elif len(shape) >= 2:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif "norm" in name or name.endswith("gamma"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        out[name] = value.astype(np.float32)
    return out


def tiny_vae_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """The tiny encoders' Wan VAE (canonical name -> fp32 array), drawn as torch initialises a fresh one: conv weights
    and biases uniform in +-1/sqrt(fan-in), RMS-norm gammas one. `shapes` come from either backend's model (the same
    canonical names and shapes), so both draw the same weights."""
    rng = np.random.default_rng([seed, 3])  # streams 0-2 are the text encoders'
    out = {}
    for name in sorted(shapes):
        if name.endswith("gamma"):
            out[name] = np.ones(shapes[name], np.float32)
            continue
        weight = shapes[name.removesuffix("bias") + "weight"] if name.endswith("bias") else shapes[name]
        bound = 1.0 / np.sqrt(np.prod(weight[1:]))
        out[name] = rng.uniform(-bound, bound, shapes[name]).astype(np.float32)
    return out


def tiny_clip_tokenizer(max_length: int = 77):
    """A byte-level BPE CLIP tokenizer over every byte plus a few merges for TINY_WORDS: any text tokenizes."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    pieces = ["<|startoftext|>", "<|endoftext|>"]
    for char in sorted(ByteLevel.alphabet()):
        pieces += [char, char + "</w>"]
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            pieces.append(symbols[0])
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    unique_merges = list(dict.fromkeys(merges))  # pairs, which the tokenizers backend takes (its hint says strings)
    return CLIPTokenizer(vocab=vocab, merges=unique_merges, model_max_length=max_length)  # type: ignore[arg-type]


def tiny_t5_tokenizer():
    """A unigram T5 tokenizer over TINY_WORDS and single characters (other characters map to <unk>)."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in TINY_WORDS]
    vocab += [("\u2581" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


@dataclass
class TinyText:
    """Random tiny SD3.5 text encoders: per folder (text_encoder, _2, _3) a transformers config dict and weights under
    transformers' names, their parsed configs, the tokenizers and an identity for embedding caches."""

    raw_configs: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
    configs: TextConfigs
    weights: tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]
    tokenizers: PromptTokenizers
    identity: str


def _clip_raw(tokenizer, width: int, projection: int, act: str, legacy_eos: bool) -> dict[str, Any]:
    return {
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": tokenizer.model_max_length,
        "projection_dim": projection,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": 2 if legacy_eos else tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_text(
    seed: int = 0,
    text_dim: int = 48,
    clip_widths: tuple[int, int] = (16, 24),
    pooled_dims: tuple[int, int] = (8, 16),
    max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH,
) -> TinyText:
    """Tiny CLIP-L/CLIP-G/T5 (defaults match configs/model/tiny.yaml: text 48, pooled 24) drawn from `seed`."""
    clip_tokenizers = (tiny_clip_tokenizer(), tiny_clip_tokenizer())
    t5_tokenizer = tiny_t5_tokenizer()
    raw = (
        _clip_raw(clip_tokenizers[0], clip_widths[0], pooled_dims[0], "quick_gelu", legacy_eos=True),
        _clip_raw(clip_tokenizers[1], clip_widths[1], pooled_dims[1], "gelu", legacy_eos=False),
        {
            "architectures": ["T5EncoderModel"],
            "model_type": "t5",
            "vocab_size": len(t5_tokenizer),
            "d_model": text_dim,
            "d_kv": 8,
            "d_ff": 2 * text_dim,
            "num_layers": 2,
            "num_heads": 2,
            "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 32,
            "layer_norm_epsilon": 1e-6,
            "feed_forward_proj": "gated-gelu",
            "dropout_rate": 0.0,
            "pad_token_id": t5_tokenizer.pad_token_id,
            "eos_token_id": t5_tokenizer.eos_token_id,
        },
    )
    configs = (
        clip_text_config(raw[0], "tiny CLIP-L"),
        clip_text_config(raw[1], "tiny CLIP-G"),
        t5_encoder_config(raw[2], "tiny T5"),
    )
    shapes = (clip_text_shapes(configs[0]), clip_text_shapes(configs[1]), t5_shapes(configs[2]))
    weights = tuple(random_weights(s, [seed, i]) for i, s in enumerate(shapes))
    key = f"tiny-text;{_TINY_TEXT_VERSION};seed={seed};t5_length={max_sequence_length};" + json.dumps(raw)
    identity = hashlib.sha256(key.encode()).hexdigest()[:24]
    tokenizers = PromptTokenizers(clip_tokenizers, t5_tokenizer, max_sequence_length)
    return TinyText(raw, configs, weights, tokenizers, identity)  # type: ignore[arg-type]
