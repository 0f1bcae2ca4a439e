"""On-disk cache of text embeddings, so a prompt goes through the (large) text encoders once per encoder.

One safetensors file per (encoder, prompt): `<root>/<encoder id>/<hash[:2]>/<hash>.safetensors` holding
`prompt_embeds` [L, D] and `pooled_prompt_embeds` [P] (float32), with the prompt and encoder id in its metadata.
The encoder id hashes the encoder folder's configs, tokenizer files and weight file names/sizes plus the settings
that change the output (dtype, T5 length), so a different encoder never reads another's entries. Files are written
to a temporary name and renamed, so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

log = logging.getLogger(__name__)

EMBEDS, POOLED = "prompt_embeds", "pooled_prompt_embeds"
_SMALL_FILE = 1 << 24  # files up to 16 MiB (configs, tokenizers) are hashed by content, larger ones by name and size


def folder_identity(folders: Iterable[str | Path], extra: str = "") -> str:
    """A stable id of encoder folders: small files by content, weight files by relative name and size."""
    digest = hashlib.sha256(extra.encode())
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: encoder folder does not exist")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            size = path.stat().st_size
            digest.update(f"{path.relative_to(folder.parent)}:{size}\n".encode())
            if size <= _SMALL_FILE:
                digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def _prompt_hash(encoder_id: str, prompt: str) -> str:
    return hashlib.sha256(f"{encoder_id}\0{prompt}".encode()).hexdigest()


class EmbeddingCache:
    """Prompt -> (prompt_embeds [L, D], pooled [P]) for one encoder, stored under `root`."""

    def __init__(self, root: str | Path, encoder_id: str):
        if not encoder_id:
            raise ValueError("encoder_id must be non-empty (it separates the entries of different encoders)")
        self.root = Path(root)
        self.encoder_id = encoder_id

    def path(self, prompt: str) -> Path:
        h = _prompt_hash(self.encoder_id, prompt)
        return self.root / self.encoder_id / h[:2] / f"{h}.safetensors"

    def get(self, prompt: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The cached arrays of `prompt`, or None on a miss (an unreadable entry is a miss and gets rewritten)."""
        path = self.path(prompt)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="np") as f:
                stored = (f.metadata() or {}).get("prompt")
                arrays = {k: f.get_tensor(k) for k in f.keys()}
            if stored != prompt or set(arrays) != {EMBEDS, POOLED}:
                raise ValueError("entry does not hold this prompt's embeddings")
        except (SafetensorError, ValueError, OSError) as e:
            log.warning("%s: ignoring unreadable embedding cache entry (%s)", path, e)
            return None
        return arrays[EMBEDS], arrays[POOLED]

    def put(self, prompt: str, prompt_embeds: np.ndarray, pooled: np.ndarray) -> Path:
        """Store one prompt's arrays atomically (temporary file in the same folder, then rename)."""
        path = self.path(prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            EMBEDS: np.ascontiguousarray(prompt_embeds, dtype=np.float32),
            POOLED: np.ascontiguousarray(pooled, dtype=np.float32),
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"prompt": prompt, "encoder": self.encoder_id})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def encode(
        self, prompts: Sequence[str], encode_fn: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of `prompts` [B, L, D], [B, P]: hits from disk, misses through `encode_fn` in one batch."""
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        misses = []
        for p in dict.fromkeys(prompts):
            hit = self.get(p)
            if hit is None:
                misses.append(p)
            else:
                found[p] = hit
        if misses:
            embeds, pooled = encode_fn(misses)
            for i, p in enumerate(misses):
                self.put(p, embeds[i], pooled[i])
                found[p] = (np.asarray(embeds[i], np.float32), np.asarray(pooled[i], np.float32))
        return np.stack([found[p][0] for p in prompts]), np.stack([found[p][1] for p in prompts])
