"""Text encoded in the training step (recipe `data.text: online`): the loader turns each row's caption (the empty
caption "" where the step's text dropout drops it, which encodes to the cached path's empty prompt) into SD3.5's token
ids; the step encodes them with the frozen text encoders of `data.encoders`, so the cache holds latents only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from contentv_common.errors import ConfigError
from contentv_common.text.encoder_table import SD35_TEXT_CONFIGS
from contentv_common.text.sd3_prompt import PromptTokenizers, TextConfigs, load_tokenizers, read_text_configs
from contentv_common.tiny_models import tiny_text

TOKEN_KEYS = ("clip_l_ids", "clip_g_ids", "t5_ids")  # the batch's int32 ids [B, N] for CLIP-L, CLIP-G, T5


def text_configs(name: str) -> TextConfigs | None:
    """The text encoders of an `encoders` name (a recipe's data.encoders): a pipeline folder's configs when the folder
    is here, else the official full-size SD3.5 ones; the tiny encoders' for "tiny"; None for the demo's word
    embeddings (no model)."""
    if name == "demo":
        return None
    if name == "tiny":
        return tiny_text().configs
    return read_text_configs(name) if Path(name).is_dir() else SD35_TEXT_CONFIGS


def step_tokenizers(encoders: str, seed: int) -> PromptTokenizers:
    """The tokenizers of a recipe's `data.encoders` ("tiny" or a pipeline folder; the demo's have no model)."""
    if encoders == "demo":
        raise ConfigError("data.text: online needs text encoders; the demo's word embeddings are cached only")
    return tiny_text(seed).tokenizers if encoders == "tiny" else load_tokenizers(encoders)


def captions_kept(captions: list[str], keep: np.ndarray) -> list[str]:
    """The captions with the dropped ones (keep False) replaced by "" (text dropout, online)."""
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


def tokenized(batch: dict[str, Any], tokenizers: PromptTokenizers) -> dict[str, Any]:
    """`batch` with its `captions` replaced by their token ids (TOKEN_KEYS)."""
    out = dict(batch)
    ids = tokenizers.tokenize(list(out.pop("captions")))
    return {**out, **dict(zip(TOKEN_KEYS, ids, strict=True))}
