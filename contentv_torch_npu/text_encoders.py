"""SD3.5's three text encoders (CLIP-L, CLIP-G, T5-XXL) through `transformers`, combined exactly as diffusers'
`StableDiffusion3Pipeline.encode_prompt` combines them, so ContentV sees the text it was trained on.

Tokenization, which hidden state, and the layout (CLIP features concatenated and zero-padded to the T5 width, T5's
tokens appended; the pooled vectors side by side) are contentv_common.text.sd3_prompt's, shared with the JAX twin
(contentv_jax.text_encoders). Weights, widths, keys and shapes are checked from the folder's headers first, so bad
input is one error naming the file and key before transformers reads anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from contentv_common.data.embedding_cache import folder_identity
from contentv_common.text.sd3_prompt import (
    CLIP_FOLDERS,
    CLIP_HIDDEN_STATE,
    T5_FOLDERS,
    T5_MAX_SEQUENCE_LENGTH,
    PromptTokenizers,
    load_tokenizers,
    open_text_sources,
    subfolders,
)
from contentv_common.tiny_models import tiny_text


class TextEncoders:
    """CLIP-L + CLIP-G + T5 with their tokenizers; `encode` gives SD3.5's (prompt_embeds, pooled_prompt_embeds)."""

    def __init__(
        self,
        clips: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection],
        t5: T5EncoderModel,
        tokenizers: PromptTokenizers,
        identity: str = "",
    ):
        clip_width = sum(m.config.hidden_size for m in clips)
        if clip_width > t5.config.d_model:
            raise ValueError(
                f"CLIP widths {[m.config.hidden_size for m in clips]} sum to {clip_width}, wider than T5 d_model "
                f"{t5.config.d_model}: SD3 zero-pads the CLIP features to the T5 width"
            )
        self.clips = tuple(m.eval() for m in clips)
        self.t5 = t5.eval()
        self.tokenizers = tokenizers
        self.identity = identity
        self.max_sequence_length = tokenizers.max_sequence_length
        self.clip_length = tokenizers.clip_length

    @property
    def text_dim(self) -> int:
        return self.t5.config.d_model

    @property
    def pooled_dim(self) -> int:
        return sum(m.config.projection_dim for m in self.clips)

    @property
    def sequence_length(self) -> int:
        return self.tokenizers.sequence_length

    @property
    def device(self) -> torch.device:
        return self.t5.device

    def to(self, device: str | torch.device) -> TextEncoders:
        for m in (*self.clips, self.t5):
            m.to(device)
        return self

    def encode_ids(
        self, clip_l_ids: torch.Tensor, clip_g_ids: torch.Tensor, t5_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (`tokenizers.tokenize`'s, long, on the encoders' device) -> (prompt_embeds [B, clip_length +
        max_sequence_length, text_dim], pooled [B, pooled_dim]) float32 tensors there."""
        hidden, pooled = [], []
        for model, ids in zip(self.clips, (clip_l_ids, clip_g_ids), strict=True):
            out = model(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[CLIP_HIDDEN_STATE].to(self.clips[0].dtype))
            pooled.append(out.text_embeds)
        t5 = self.t5(t5_ids)[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2).float(), torch.cat(pooled, dim=-1).float()

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds [B, clip_length + max_sequence_length, text_dim], pooled [B, pooled_dim]), float32."""
        ids = (torch.from_numpy(a).long().to(self.device) for a in self.tokenizers.tokenize(prompts))
        prompt_embeds, pooled_embeds = self.encode_ids(*ids)
        return prompt_embeds.cpu().numpy(), pooled_embeds.cpu().numpy()

    def save(self, folder: str | Path) -> Path:
        """Write the diffusers pipeline layout (text_encoder*/, tokenizer*/) that `load_text_encoders` reads."""
        folder = Path(folder)
        names = [m for m, _ in CLIP_FOLDERS] + [T5_FOLDERS[0]]
        for model, sub in zip((*self.clips, self.t5), names, strict=True):
            model.save_pretrained(folder / sub)
        self.tokenizers.save(folder)
        return folder


def load_text_encoders(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH,
) -> TextEncoders:
    """The three encoders and tokenizers of a local SD3.5/ContentV pipeline folder (no downloads)."""
    folder = Path(folder)
    open_text_sources(folder)  # every folder, width, key and shape, from configs and headers
    tokenizers = load_tokenizers(folder, max_sequence_length)
    paths = subfolders(folder)
    clips = tuple(
        CLIPTextModelWithProjection.from_pretrained(paths[m], dtype=dtype, local_files_only=True)
        for m, _ in CLIP_FOLDERS
    )
    t5 = T5EncoderModel.from_pretrained(paths[T5_FOLDERS[0]], dtype=dtype, local_files_only=True)
    identity = folder_identity(paths.values(), extra=f"dtype={dtype};t5_length={max_sequence_length}")
    return TextEncoders(clips, t5, tokenizers, identity).to(device)


def _with_weights(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    if isinstance(model, T5EncoderModel):
        state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied
    model.load_state_dict(state, strict=True)
    return model


def tiny_text_encoders(seed: int = 0, max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH) -> TextEncoders:
    """The random tiny CLIP-L/CLIP-G/T5 of contentv_common.tiny_models (defaults match configs/model/tiny.yaml: text
    48, pooled 24): the JAX twin's tiny encoders load the very same weights."""
    tiny = tiny_text(seed, max_sequence_length=max_sequence_length)
    raw_l, raw_g, raw_t5 = tiny.raw_configs
    clips = tuple(
        _with_weights(CLIPTextModelWithProjection(CLIPTextConfig(**raw)), w)
        for raw, w in zip((raw_l, raw_g), tiny.weights[:2], strict=True)
    )
    t5 = _with_weights(T5EncoderModel(T5Config(**raw_t5)), tiny.weights[2])
    return TextEncoders(clips, t5, tiny.tokenizers, tiny.identity)
