"""CLIP metrics of a clip, given a local CLIP model (a transformers CLIPModel folder, read by the reward scorer's
loader) that a backend runs: `Backend.clip_embeddings(folder, device)`.

`clip_score`: the mean over frames of the cosine similarity between the frame's and the prompt's CLIP embeddings
(raw cosine, no logit scale). `clip_consistency`: the mean cosine similarity of consecutive frames' embeddings; a
still clip scores 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

CHUNK = 16  # frames embedded at once: bounds the preprocessing's float copy of a long, large clip


class ClipEmbeddings(Protocol):
    """What a backend's CLIP gives: unit-length embeddings, float32 numpy."""

    def image_embeddings(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [N, H, W, 3] -> [N, D]."""
        ...

    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """prompts -> [B, D]."""
        ...


def frame_embeddings(clip: ClipEmbeddings, video: np.ndarray) -> np.ndarray:
    """Every frame's unit CLIP embedding [F, D] (float64), embedded `CHUNK` frames at a time."""
    parts = [clip.image_embeddings(video[i : i + CHUNK]) for i in range(0, len(video), CHUNK)]
    return np.concatenate(parts).astype(np.float64)


def clip_score(clip: ClipEmbeddings, video: np.ndarray, prompt: str) -> float:
    """Mean over frames of cos(frame, prompt)."""
    text = clip.text_embeddings([prompt])[0].astype(np.float64)
    return float((frame_embeddings(clip, video) @ text).mean())


def clip_consistency(clip: ClipEmbeddings, video: np.ndarray) -> float:
    """Mean over consecutive frame pairs of cos(frame t, frame t + 1); needs 2 frames or more."""
    if len(video) < 2:
        raise ValueError(f"CLIP consistency needs 2 frames or more, got {len(video)}")
    emb = frame_embeddings(clip, video)
    return float((emb[1:] * emb[:-1]).sum(-1).mean())
