"""SD3.5's three text encoders (CLIP-L, CLIP-G, T5-XXL) through `transformers`, combined exactly as diffusers'
`StableDiffusion3Pipeline.encode_prompt` combines them, so ContentV sees the text it was trained on.

Per prompt: penultimate hidden states of both CLIPs (77 tokens each) concatenated along features and zero-padded to
the T5 width, then T5's last hidden states (256 tokens) appended along the sequence -> [333, 4096]; the pooled vector
is the two CLIPs' projected pooled outputs side by side -> [2048]. The JAX side consumes the resulting numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from contentv_common.embedding_cache import folder_identity

CLIP_FOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
T5_FOLDERS = ("text_encoder_3", "tokenizer_3")
T5_MAX_SEQUENCE_LENGTH = 256


class TextEncoders:
    """CLIP-L + CLIP-G + T5 with their tokenizers; `encode` gives SD3.5's (prompt_embeds, pooled_prompt_embeds)."""

    def __init__(
        self,
        clips: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection],
        clip_tokenizers: tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase],
        t5: T5EncoderModel,
        t5_tokenizer: PreTrainedTokenizerBase,
        max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH,
        identity: str = "",
    ):
        clip_width = sum(m.config.hidden_size for m in clips)
        if clip_width > t5.config.d_model:
            raise ValueError(
                f"CLIP widths {[m.config.hidden_size for m in clips]} sum to {clip_width}, wider than T5 d_model "
                f"{t5.config.d_model}: SD3 zero-pads the CLIP features to the T5 width"
            )
        self.clips = tuple(m.eval() for m in clips)
        self.clip_tokenizers = clip_tokenizers
        self.t5 = t5.eval()
        self.t5_tokenizer = t5_tokenizer
        self.max_sequence_length = max_sequence_length
        self.identity = identity
        # diffusers uses the first CLIP tokenizer's length for both CLIPs
        self.clip_length = clip_tokenizers[0].model_max_length

    @property
    def text_dim(self) -> int:
        return self.t5.config.d_model

    @property
    def pooled_dim(self) -> int:
        return sum(m.config.projection_dim for m in self.clips)

    @property
    def sequence_length(self) -> int:
        return self.clip_length + self.max_sequence_length

    @property
    def device(self) -> torch.device:
        return self.t5.device

    def to(self, device: str | torch.device) -> TextEncoders:
        for m in (*self.clips, self.t5):
            m.to(device)
        return self

    def _tokens(self, tokenizer: PreTrainedTokenizerBase, prompts: list[str], length: int) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return ids.input_ids.to(self.device)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds [B, clip_length + max_sequence_length, text_dim], pooled [B, pooled_dim]), float32."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        hidden, pooled = [], []
        for model, tokenizer in zip(self.clips, self.clip_tokenizers, strict=True):
            out = model(self._tokens(tokenizer, prompts, self.clip_length), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(self.clips[0].dtype))
            pooled.append(out.text_embeds)
        t5 = self.t5(self._tokens(self.t5_tokenizer, prompts, self.max_sequence_length))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        prompt_embeds = torch.cat([clip, t5], dim=-2)
        pooled_embeds = torch.cat(pooled, dim=-1)
        return (
            prompt_embeds.float().cpu().numpy(),
            pooled_embeds.float().cpu().numpy(),
        )

    def save(self, folder: str | Path) -> Path:
        """Write the diffusers pipeline layout (text_encoder*/, tokenizer*/) that `load_text_encoders` reads."""
        folder = Path(folder)
        model_dirs, tok_dirs = zip(*CLIP_FOLDERS, T5_FOLDERS, strict=True)
        for model, sub in zip((*self.clips, self.t5), model_dirs, strict=True):
            model.save_pretrained(folder / sub)
        for tokenizer, sub in zip((*self.clip_tokenizers, self.t5_tokenizer), tok_dirs, strict=True):
            tokenizer.save_pretrained(folder / sub)
        return folder


def _subfolder(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: missing; an SD3.5/ContentV pipeline folder has text_encoder{{,_2,_3}}/ and tokenizer{{,_2,_3}}/"
        )
    return path


def load_text_encoders(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH,
) -> TextEncoders:
    """The three encoders and tokenizers of a local SD3.5/ContentV diffusers pipeline folder (no downloads)."""
    folder = Path(folder)
    subs = [name for pair in (*CLIP_FOLDERS, T5_FOLDERS) for name in pair]
    paths = {name: _subfolder(folder, name) for name in subs}
    clips = tuple(
        CLIPTextModelWithProjection.from_pretrained(paths[m], dtype=dtype, local_files_only=True)
        for m, _ in CLIP_FOLDERS
    )
    clip_tokenizers = tuple(AutoTokenizer.from_pretrained(paths[t], local_files_only=True) for _, t in CLIP_FOLDERS)
    t5 = T5EncoderModel.from_pretrained(paths[T5_FOLDERS[0]], dtype=dtype, local_files_only=True)
    t5_tokenizer = AutoTokenizer.from_pretrained(paths[T5_FOLDERS[1]], local_files_only=True)
    identity = folder_identity(paths.values(), extra=f"dtype={dtype};t5_length={max_sequence_length}")
    encoders = TextEncoders(clips, clip_tokenizers, t5, t5_tokenizer, max_sequence_length, identity)
    return encoders.to(device)


TINY_WORDS = ("a", "the", "cat", "dog", "video", "of", "on", "in", "red", "blue", "sky", "sea", "walking", "low")


def tiny_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer over every byte plus a few merges for TINY_WORDS: any text tokenizes."""
    from tokenizers.pre_tokenizers import ByteLevel

    pieces = ["<|startoftext|>", "<|endoftext|>"]
    for char in sorted(ByteLevel.alphabet()):
        pieces += [char, char + "</w>"]
    merges = []
    for word in TINY_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            pieces.append(symbols[0])
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=max_length)


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer over TINY_WORDS and single characters (other characters map to <unk>)."""
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in TINY_WORDS]
    vocab += [("\u2581" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_text_encoders(
    seed: int = 0,
    text_dim: int = 48,
    clip_widths: tuple[int, int] = (16, 24),
    pooled_dims: tuple[int, int] = (8, 16),
    max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH,
) -> TextEncoders:
    """Random tiny CLIP-L/CLIP-G/T5 (defaults match configs/model/tiny.yaml: text 48, pooled 24); no downloads."""
    clip_tokenizers = (tiny_clip_tokenizer(), tiny_clip_tokenizer())
    t5_tokenizer = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clips = tuple(
            CLIPTextModelWithProjection(
                CLIPTextConfig(
                    vocab_size=len(tok),
                    hidden_size=width,
                    intermediate_size=2 * width,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    max_position_embeddings=tok.model_max_length,
                    projection_dim=proj,
                    bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                )
            )
            for tok, width, proj in zip(clip_tokenizers, clip_widths, pooled_dims, strict=True)
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=text_dim,
                d_kv=8,
                d_ff=2 * text_dim,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
            )
        )
    configs = json.dumps([m.config.to_dict() for m in (*clips, t5)], sort_keys=True, default=str)
    identity = hashlib.sha256(f"tiny-text;seed={seed};t5_length={max_sequence_length};{configs}".encode()).hexdigest()
    identity = identity[:24]
    return TextEncoders(clips, clip_tokenizers, t5, t5_tokenizer, max_sequence_length, identity)
