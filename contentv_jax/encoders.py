"""Everything outside the transformer that turns data into model inputs and back, in JAX: text encoders and the VAE
(mirrors contentv_torch_npu/encoders.py; the same numpy interface, so training's cache, sampling and reward runs take
either backend's `Encoders`).

uint8 video frames <-> normalised latents through the JAX Wan VAE; captions -> (text, pooled) through SD3.5's text
encoders in Flax (contentv_jax.text_encoders), the demo's word embeddings (numpy) or the tiny random ones, with an
optional on-disk embedding cache. The tiny encoders draw their weights in numpy (contentv_common.tiny_models), so the
torch twin's tiny encoders are the very same functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contentv_common.checkpoint.formats import memory_source
from contentv_common.config.recipe import MeshConfig
from contentv_common.data.embedding_cache import EmbeddingCache
from contentv_common.demo import DEMO_VAE, WordEmbeddingText, demo_text
from contentv_common.errors import CheckpointError
from contentv_common.text.sd3_prompt import T5_MAX_SEQUENCE_LENGTH
from contentv_common.tiny_models import tiny_vae_weights
from contentv_common.vae.chunks import Tiling
from contentv_common.vae.config import tiny_vae_config
from contentv_common.vae.table import vae_table
from contentv_jax import sharding
from contentv_jax.loading import canonical_shapes, fill_from_source
from contentv_jax.sampling import decode_latents
from contentv_jax.text_encoders import TextEncoders, load_text_encoders, tiny_text_encoders
from contentv_jax.vae import WanVAE, load_vae, save_vae

IMAGE_VAE = "AutoencoderKL"  # SD3/SD3.5's 2D image VAE: no JAX twin (the torch twin runs it through diffusers)


def local_mesh() -> Mesh:
    """This process's devices as one mesh whose batch axes (data x fsdp) span them all: where the data step encodes
    its clips (one per device at a time) and captions (T5-XXL's weights split over the devices, TEXT_PARAM_AXES)."""
    return sharding.make_mesh(MeshConfig(fsdp=jax.local_device_count()), jax.local_devices())


class Encoders:
    """Text encoders + Wan VAE; numpy in, numpy out. `vae` is None for an image pipeline (SD3's 2D VAE): text only.
    On `mesh` (local_mesh) the VAE is replicated and clips are encoded one per device side by side."""

    def __init__(
        self,
        text: TextEncoders | WordEmbeddingText,
        vae: WanVAE | None,
        cache: EmbeddingCache | None = None,
        vae_folder: Path | None = None,
        latent_channels: int | None = None,
        mesh: Mesh | None = None,
    ):
        if vae is not None and mesh is not None:
            graphdef, state = nnx.split(vae)
            vae = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
        self.text, self.vae, self.cache, self.vae_folder, self.mesh = text, vae, cache, vae_folder, mesh
        self.latent_channels = vae.cfg.z_dim if vae is not None else latent_channels
        self.text_dim = text.text_dim
        self.pooled_dim = text.pooled_dim

    def wan_vae(self) -> WanVAE:
        if self.vae is None:
            raise CheckpointError(
                f"{self.vae_folder}: SD3's 2D image VAE ({IMAGE_VAE}) has no JAX twin; its latents are encoded and "
                "decoded by the torch backend (--backend torch, or tools/sample.py with torch installed)"
            )
        return self.vae

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [B, F, H, W, 3] -> normalised latents (VAE posterior mean) float32 [B, C, f, H // 8, W // 8]."""
        frames = np.asarray(frames)
        if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [B, F, H, W, 3], got {frames.dtype} {frames.shape}")
        vae = self.wan_vae()
        n = 1 if self.mesh is None else self.mesh.size
        out = []
        for start in range(0, len(frames), n):  # the last group is filled with black clips: idle devices otherwise
            group = frames[start : start + n]
            video = self._place(np.pad(group, [(0, n - len(group))] + [(0, 0)] * 4).transpose(0, 4, 1, 2, 3))
            out.append(np.asarray(vae.normalize(vae.encode(video.astype(jnp.float32) / 127.5 - 1.0)))[: len(group)])
        return np.concatenate(out).astype(np.float32)

    def _place(self, clips: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(clips)
        return jax.device_put(clips, NamedSharding(self.mesh, PartitionSpec(sharding.BATCH)))

    def decode_latents(self, latents: np.ndarray, tiling: Tiling | None = None) -> np.ndarray:
        """Normalised latents [B, C, f, h, w] -> uint8 frames [B, 1 + 4 (f - 1), 8 h, 8 w, 3], one clip at a time;
        `tiling`: in spatial tiles, one per local device at a time (sampling.decode_latents)."""
        return decode_latents(self.wan_vae(), latents, tiling)

    def encode_text(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (text [B, L, D], pooled [B, P]) float32, through the embedding cache when there is one."""
        if self.cache is None:
            return self.text.encode(list(captions))
        return self.cache.encode(list(captions), self.text.encode)

    def save(self, folder: str | Path) -> Path:
        """Write the pipeline layout `load_encoders` reads (text_encoder*/, tokenizer*/, vae/)."""
        self.text.save(folder)
        save_vae(Path(folder) / "vae", self.wan_vae())
        return Path(folder)


def _cache(cache_dir: str | Path | None, text: TextEncoders | WordEmbeddingText) -> EmbeddingCache | None:
    return None if cache_dir is None else EmbeddingCache(cache_dir, text.identity)


def tiny_vae(seed: int = 0) -> WanVAE:
    """The tiny encoders' random Wan VAE (contentv_common.tiny_models; the torch twin's has the same weights)."""
    cfg = tiny_vae_config()
    abstract = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
    table = vae_table(cfg)
    weights = tiny_vae_weights(canonical_shapes(abstract, table), seed)
    source = memory_source(Path(f"<tiny vae seed {seed}>"), cfg, weights, table, from_diffusers=False)
    return fill_from_source(abstract, source, table)


def tiny_encoders(
    seed: int = 0,
    cache_dir: str | Path | None = None,
    max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH,
    mesh: Mesh | None = None,
) -> Encoders:
    """Random tiny Wan VAE + CLIP-L/CLIP-G/T5 matching configs/model/tiny.yaml (text 48, pooled 24, 16 channels)."""
    text = tiny_text_encoders(seed, max_sequence_length, mesh)
    return Encoders(text, tiny_vae(seed), _cache(cache_dir, text), mesh=mesh)


def demo_encoders(cache_dir: str | Path | None = None, mesh: Mesh | None = None) -> Encoders:
    """The CPU demo's encoders: the tiny Wan VAE trained on the synthetic set (configs/demo_vae) and the
    word-embedding text encoder (contentv_common/demo.py), the torch twin's very functions."""
    text = demo_text()
    return Encoders(text, load_vae(DEMO_VAE), _cache(cache_dir, text), mesh=mesh)


def load_encoders(
    folder: str | Path,
    dtype: jnp.dtype | None = None,
    mesh: Mesh | None = None,
    cache_dir: str | Path | None = None,
    max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH,
) -> Encoders:
    """Text encoders (in `dtype`, default float32, sharded on `mesh`) and Wan VAE (float32, as ContentV runs it) of a
    local SD3.5/ContentV pipeline folder; an image pipeline's 2D VAE is left to the torch backend (`vae` None)."""
    folder = Path(folder)
    vae_config = folder / "vae" / "config.json"
    if not vae_config.exists():
        raise FileNotFoundError(f"{vae_config}: missing; the pipeline folder needs a vae/ with a diffusers config.json")
    raw = json.loads(vae_config.read_text())
    image_vae = raw.get("_class_name") == IMAGE_VAE
    vae = None if image_vae else load_vae(folder / "vae")  # read first: its errors before the big text weights
    text = load_text_encoders(folder, dtype, mesh, max_sequence_length=max_sequence_length)
    return Encoders(text, vae, _cache(cache_dir, text), folder / "vae", raw.get("latent_channels"), mesh)


def named_encoders(name: str, seed: int = 0, cache_dir: str | Path | None = None) -> Encoders:
    """A recipe's `data.encoders`: "tiny" (random, seeded), "demo" (demo_encoders) or a local pipeline folder."""
    if name == "tiny":
        return tiny_encoders(seed, cache_dir=cache_dir)
    if name == "demo":
        return demo_encoders(cache_dir)
    return load_encoders(name, cache_dir=cache_dir)
