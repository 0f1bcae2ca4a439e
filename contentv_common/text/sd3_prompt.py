"""SD3.5's prompt encoding, the parts that are not framework math, shared by both backends' text encoders.

diffusers' `StableDiffusion3Pipeline.encode_prompt`, which ContentV was trained with, per prompt:
- tokens: both CLIP tokenizers pad/truncate to the first CLIP tokenizer's `model_max_length` (77), T5's to
  `max_sequence_length` (256); no attention mask reaches any encoder (padding is attended, as in diffusers);
- CLIP-L and CLIP-G give their penultimate hidden states (`CLIP_HIDDEN_STATE`) and their projected pooled outputs;
- layout: the two CLIPs' features concatenated (768 + 1280) and zero-padded to the T5 width (4096), T5's last hidden
  states appended along the sequence -> `[77 + 256, 4096]`; the pooled vectors side by side -> `[768 + 1280]`.
Tokenizers are transformers' `tokenizers`-backed classes (no torch); ids come out as int32 numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contentv_common.checkpoint.formats import TensorSource
from contentv_common.errors import CheckpointError, ConfigError
from contentv_common.text.encoder_table import (
    ClipTextConfig,
    T5EncoderConfig,
    check_text_source,
    open_clip_text_source,
    open_t5_source,
    read_clip_text_config,
    read_t5_config,
)

CLIP_FOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
T5_FOLDERS = ("text_encoder_3", "tokenizer_3")
T5_MAX_SEQUENCE_LENGTH = 256
CLIP_HIDDEN_STATE = -2  # diffusers' default (clip_skip None): the penultimate layer's output, before the final norm

TextConfigs = tuple[ClipTextConfig, ClipTextConfig, T5EncoderConfig]


def subfolders(folder: str | Path) -> dict[str, Path]:
    """The six encoder and tokenizer folders of a pipeline folder; a missing one is a FileNotFoundError naming it."""
    folder = Path(folder)
    out = {}
    for name in (*(n for pair in CLIP_FOLDERS for n in pair), *T5_FOLDERS):
        path = folder / name
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path}: missing; an SD3.5/ContentV pipeline folder has text_encoder{{,_2,_3}}/ and "
                "tokenizer{,_2,_3}/"
            )
        out[name] = path
    return out


def read_text_configs(folder: str | Path) -> TextConfigs:
    """(CLIP-L, CLIP-G, T5) configs of a pipeline folder, read from their config.json files alone."""
    paths = subfolders(folder)
    clips = tuple(read_clip_text_config(paths[m]) for m, _ in CLIP_FOLDERS)
    return (*clips, read_t5_config(paths[T5_FOLDERS[0]]))  # type: ignore[return-value]


def check_text_widths(
    configs: TextConfigs, folder: str | Path, text_dim: int | None = None, pooled_dim: int | None = None
) -> None:
    """ConfigError naming the config file and key unless the CLIP features fit the T5 width (SD3 zero-pads them) and,
    when given, the T5 width and pooled width are the transformer's text width and pooled width."""
    folder = Path(folder)
    clip_l, clip_g, t5 = configs
    t5_file = folder / T5_FOLDERS[0] / "config.json"
    clip_width = clip_l.text.hidden_size + clip_g.text.hidden_size
    if clip_width > t5.d_model:
        raise ConfigError(
            f"{t5_file}: d_model {t5.d_model} is narrower than the CLIP widths "
            f"{clip_l.text.hidden_size} + {clip_g.text.hidden_size} it must hold (SD3 zero-pads them to the T5 width)"
        )
    if text_dim is not None and t5.d_model != text_dim:
        raise ConfigError(
            f"{t5_file}: d_model {t5.d_model} is not the transformer's text width (joint_attention_dim {text_dim})"
        )
    pooled = clip_l.projection_dim + clip_g.projection_dim
    if pooled_dim is not None and pooled != pooled_dim:
        raise ConfigError(
            f"{folder / CLIP_FOLDERS[0][0] / 'config.json'} + {CLIP_FOLDERS[1][0]}/config.json: projection_dim "
            f"{clip_l.projection_dim} + {clip_g.projection_dim} is not the transformer's pooled_projection_dim "
            f"{pooled_dim}"
        )


def open_text_sources(folder: str | Path) -> tuple[TensorSource, TensorSource, TensorSource]:
    """The three encoders of a pipeline folder opened for streaming (CLIP-L, CLIP-G, T5), every width, key and shape
    checked from configs and safetensors headers before any weight is read: bad input is one error naming the file."""
    paths = subfolders(folder)
    clips = tuple(open_clip_text_source(paths[m]) for m, _ in CLIP_FOLDERS)
    sources = (*clips, open_t5_source(paths[T5_FOLDERS[0]]))
    check_text_widths(tuple(s.config for s in sources), folder)  # type: ignore[arg-type]
    for source in sources:
        check_text_source(source)
    return sources  # type: ignore[return-value]


def load_tokenizer(folder: str | Path):
    """A transformers tokenizer (tokenizers-backed) from a local folder; an unreadable one is a CheckpointError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({first})") from None


def check_prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    return list(prompts)


def token_ids(tokenizer, prompts: list[str], length: int) -> np.ndarray:
    """int32 ids [B, length], padded on the right and truncated (as diffusers tokenizes for every encoder)."""
    out = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return np.asarray(out["input_ids"], np.int32)


@dataclass
class PromptTokenizers:
    """The three tokenizers of a pipeline; `tokenize(prompts)` gives the ids (CLIP-L, CLIP-G, T5) encode_prompt uses."""

    clips: tuple  # two transformers tokenizers
    t5: object
    max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH

    @property
    def clip_length(self) -> int:
        return int(self.clips[0].model_max_length)  # diffusers uses the first CLIP tokenizer's length for both

    @property
    def sequence_length(self) -> int:
        return self.clip_length + self.max_sequence_length

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        prompts = check_prompts(prompts)
        clip_l, clip_g = (token_ids(t, prompts, self.clip_length) for t in self.clips)
        return clip_l, clip_g, token_ids(self.t5, prompts, self.max_sequence_length)

    def save(self, folder: str | Path) -> None:
        names = [t for _, t in CLIP_FOLDERS] + [T5_FOLDERS[1]]
        for tokenizer, name in zip((*self.clips, self.t5), names, strict=True):
            tokenizer.save_pretrained(Path(folder) / name)


def load_tokenizers(folder: str | Path, max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH) -> PromptTokenizers:
    paths = subfolders(folder)
    clips = tuple(load_tokenizer(paths[t]) for _, t in CLIP_FOLDERS)
    return PromptTokenizers(clips, load_tokenizer(paths[T5_FOLDERS[1]]), max_sequence_length)
