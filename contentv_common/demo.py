"""The CPU demo's encoders, framework-free parts: where its trained tiny VAE lives, and its text encoder, a fixed
random vector per word laid out as SD3.5's text tokens (numpy only).

The tiny random CLIP/T5 encoders give each caption a distinct embedding, but a random function of its characters,
so a few minutes of training on CPU cannot tell "red" from "blue" in it. The CPU demo uses this instead: every word
has a fixed standard-normal vector seeded by its bytes, so "a red circle moving right" and "a red square moving up"
share their "red" (and their "a") exactly. Tokens sit where SD3.5 puts them (CLIP positions with the CLIP width,
zero-padded, then T5 positions: 77 + 256 by default, 8 + 8 for the demo's 5-word captions); the pooled vector is the
normalised sum of per-word pooled vectors, a bag of words the transformer's adaLN conditioning reads linearly. It
understands nothing beyond its vocabulary of words seen.
"""

from __future__ import annotations

import hashlib

import numpy as np

from contentv_common.config.model import CONFIG_DIR

DEMO_VAE = CONFIG_DIR / "demo_vae"  # a diffusers AutoencoderKLWan folder, made by tools/make_demo_vae.py
CLIP_TOKENS, T5_TOKENS = 77, 256
# The demo's captions have 5 words: 8 CLIP + 8 T5 positions hold them (SD3.5's order, its padding cut short), so
# most of a CPU step goes to the 48 image tokens, not to 320 padding tokens.
DEMO_CLIP_TOKENS, DEMO_T5_TOKENS = 8, 8


def demo_identity() -> str:
    """A fingerprint of the demo encoders (the VAE's weights and config, the text encoder's layout), so a latent
    cache built with an older demo VAE is rebuilt, not reused."""
    digest = hashlib.sha256(demo_text().identity.encode())
    for path in sorted(DEMO_VAE.glob("*.safetensors")) + [DEMO_VAE / "config.json"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _word_vector(kind: str, word: str, width: int) -> np.ndarray:
    return np.random.default_rng(list(f"{kind}:{word}".encode())).standard_normal(width).astype(np.float32)


def demo_text() -> WordEmbeddingText:
    """The CPU demo's text encoder."""
    return WordEmbeddingText(clip_tokens=DEMO_CLIP_TOKENS, t5_tokens=DEMO_T5_TOKENS)


class WordEmbeddingText:
    """`encode(captions) -> (text [B, clip_tokens + t5_tokens, text_dim], pooled [B, pooled_dim])`, float32 (333
    tokens by default, as SD3.5); "" encodes to zeros."""

    def __init__(
        self,
        text_dim: int = 48,
        pooled_dim: int = 24,
        clip_width: int = 40,
        clip_tokens: int = CLIP_TOKENS,
        t5_tokens: int = T5_TOKENS,
    ):
        self.text_dim, self.pooled_dim, self.clip_width = text_dim, pooled_dim, clip_width
        self.clip_tokens, self.max_sequence_length = clip_tokens, t5_tokens
        key = f"demo-words;{text_dim};{pooled_dim};{clip_width};{t5_tokens}" + (
            "" if clip_tokens == CLIP_TOKENS else f";clip{clip_tokens}"
        )
        self.identity = hashlib.sha256(key.encode()).hexdigest()[:24]

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        clip = self.clip_tokens
        text = np.zeros((len(captions), clip + self.max_sequence_length, self.text_dim), np.float32)
        pooled = np.zeros((len(captions), self.pooled_dim), np.float32)
        for i, caption in enumerate(captions):
            words = caption.lower().split()[: min(clip - 2, self.max_sequence_length)]
            for j, word in enumerate(words):
                text[i, 1 + j, : self.clip_width] = _word_vector("clip", word, self.clip_width)  # after CLIP's BOS
                text[i, clip + j] = _word_vector("t5", word, self.text_dim)
                pooled[i] += _word_vector("pooled", word, self.pooled_dim)
            if words:
                pooled[i] /= np.sqrt(len(words))
        return text, pooled

    def save(self, folder: object) -> None:
        raise TypeError("the demo's word-embedding text encoder has no weights to save; it is rebuilt from its code")
