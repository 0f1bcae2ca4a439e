"""The tiny CLIP tokenizer of the reward tests (transformers only, no torch), shared by the parity and fresh tests."""

from __future__ import annotations

import string


def tiny_clip_tokenizer():
    """A CLIPTokenizer over a 58-entry vocabulary (letters, word-final letters, a few merges, 2 specials)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)
