"""Everything outside the transformer that turns data into model inputs and back: text encoders and the VAE.

`Encoders` is the one interface training, caching and sampling use, in numpy on both sides so the JAX core consumes
the same arrays as the torch twin: uint8 video frames <-> normalised latents, captions -> (text, pooled) embeddings.
Text goes through an optional on-disk embedding cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from contentv_common.data.embedding_cache import EmbeddingCache
from contentv_common.demo import DEMO_VAE, WordEmbeddingText, demo_text
from contentv_common.text.sd3_prompt import T5_MAX_SEQUENCE_LENGTH
from contentv_common.tiny_models import tiny_vae_weights
from contentv_common.vae.chunks import Tiling
from contentv_common.vae.config import tiny_vae_config
from contentv_torch_npu.loading import canonical_shapes
from contentv_torch_npu.text_encoders import TextEncoders, load_text_encoders, tiny_text_encoders
from contentv_torch_npu.vae import WanVAE, load_vae, save_vae


class SD3ImageVAE(torch.nn.Module):
    """SD3/SD3.5's 2D `AutoencoderKL` (through diffusers) behind WanVAE's interface, for image mode (1 frame)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae.eval()
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        frames = video.shape[2]
        if frames != 1:
            raise ValueError(f"the SD3 image VAE takes 1-frame videos, got {frames} frames")
        return self.vae.encode(video[:, :, 0].to(self.vae.dtype)).latent_dist.mean[:, :, None]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents[:, :, 0].to(self.vae.dtype)).sample[:, :, None].clamp(-1.0, 1.0)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.shift) * self.scaling

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling + self.shift


def _latent_channels(vae: WanVAE | SD3ImageVAE) -> int:
    return vae.latent_channels if isinstance(vae, SD3ImageVAE) else vae.cfg.z_dim


@torch.inference_mode()
def decode_latents(
    vae: WanVAE | SD3ImageVAE,
    latents: np.ndarray,
    tiling: Tiling | None = None,
    group: dist.ProcessGroup | None = None,
) -> np.ndarray:
    """Normalised latents [B, C, f, h, w] -> uint8 frames [B, 1 + 4 (f - 1), 8 h, 8 w, 3], one clip at a time.
    `tiling` (Wan VAE only) decodes blended spatial tiles, spread over the ranks of `group` (WanVAE.decode)."""
    latents = np.array(latents, np.float32)  # a writable copy for torch.from_numpy
    channels, device = _latent_channels(vae), next(vae.parameters()).device
    if latents.ndim != 5 or latents.shape[1] != channels:
        raise ValueError(f"latents must be [B, {channels}, f, h, w], got {latents.shape}")
    if tiling is not None and not isinstance(vae, WanVAE):
        raise ValueError("tiled decoding needs the Wan VAE (the SD3 image VAE decodes whole)")
    out = []
    for clip in latents:
        raw = vae.denormalize(torch.from_numpy(clip[None]).to(device))
        video = vae.decode(raw) if tiling is None else vae.decode(raw, tiling, group)
        video = ((video.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        out.append(video[0].permute(1, 2, 3, 0).cpu().numpy())
    return np.stack(out)


class Encoders:
    """Text encoders + VAE; numpy in, numpy out. See contentv_torch_npu/encoders.py's module docstring."""

    def __init__(
        self, text: TextEncoders | WordEmbeddingText, vae: WanVAE | SD3ImageVAE, cache: EmbeddingCache | None = None
    ):
        self.text = text
        self.vae = vae.eval()
        self.cache = cache
        self.latent_channels = _latent_channels(vae)
        self.text_dim = text.text_dim
        self.pooled_dim = text.pooled_dim

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.inference_mode()
    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [B, F, H, W, 3] -> normalised latents (VAE posterior mean) float32 [B, C, f, H // 8, W // 8]."""
        frames = np.asarray(frames)
        if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [B, F, H, W, 3], got {frames.dtype} {frames.shape}")
        out = []
        for clip in frames:
            video = torch.from_numpy(np.ascontiguousarray(clip)).to(self.device).permute(3, 0, 1, 2)[None]
            video = video.float() / 127.5 - 1.0
            out.append(self.vae.normalize(self.vae.encode(video)).float().cpu().numpy())
        return np.concatenate(out)

    def decode_latents(self, latents: np.ndarray, tiling: Tiling | None = None) -> np.ndarray:
        """Normalised latents [B, C, f, h, w] -> uint8 frames [B, 1 + 4 (f - 1), 8 h, 8 w, 3], one clip at a time;
        `tiling`: in spatial tiles on this rank's device (module `decode_latents` spreads them over a group)."""
        return decode_latents(self.vae, latents, tiling)

    def encode_text(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (text [B, L, D], pooled [B, P]) float32, through the embedding cache when there is one."""
        if self.cache is None:
            return self.text.encode(list(captions))
        return self.cache.encode(list(captions), self.text.encode)

    def save(self, folder: str | Path) -> Path:
        """Write the pipeline layout `load_encoders` reads (text_encoder*/, tokenizer*/, vae/); Wan VAE only."""
        if not isinstance(self.vae, WanVAE):
            raise TypeError(f"only a Wan VAE is written by Encoders.save, got {type(self.vae).__name__}")
        self.text.save(folder)
        save_vae(Path(folder) / "vae", self.vae)
        return Path(folder)


def _cache(cache_dir: str | Path | None, text: TextEncoders | WordEmbeddingText) -> EmbeddingCache | None:
    return None if cache_dir is None else EmbeddingCache(cache_dir, text.identity)


def tiny_vae(seed: int = 0) -> WanVAE:
    """The tiny encoders' random Wan VAE (contentv_common.tiny_models; the JAX twin's has the same weights)."""
    vae = WanVAE(tiny_vae_config())
    weights = tiny_vae_weights(canonical_shapes(vae), seed)
    vae.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    return vae


def tiny_encoders(
    seed: int = 0,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH,
) -> Encoders:
    """Random tiny Wan VAE + CLIP-L/CLIP-G/T5 matching configs/model/tiny.yaml (text 48, pooled 24, 16 channels)."""
    text = tiny_text_encoders(seed, max_sequence_length=max_sequence_length).to(device)
    return Encoders(text, tiny_vae(seed).to(device), _cache(cache_dir, text))


def demo_encoders(device: str | torch.device = "cpu", cache_dir: str | Path | None = None) -> Encoders:
    """The CPU demo's encoders: the tiny Wan VAE trained on the synthetic set (configs/demo_vae, made by
    tools/make_demo_vae.py) and the word-embedding text encoder (contentv_common/demo.py); tiny-model sizes."""
    text = demo_text()
    return Encoders(text, load_vae(DEMO_VAE, device=device), _cache(cache_dir, text))


def named_encoders(
    name: str, seed: int = 0, device: str | torch.device = "cpu", cache_dir: str | Path | None = None
) -> Encoders:
    """A recipe's `data.encoders`: "tiny" (random, seeded), "demo" (demo_encoders) or a local pipeline folder."""
    if name == "tiny":
        return tiny_encoders(seed, device=device, cache_dir=cache_dir)
    if name == "demo":
        return demo_encoders(device, cache_dir)
    return load_encoders(name, device=device, cache_dir=cache_dir)


def load_pipeline_vae(folder: Path, device: str | torch.device) -> WanVAE | SD3ImageVAE:
    """ContentV's `AutoencoderKLWan` through our VAE; SD3/SD3.5's 2D `AutoencoderKL` through diffusers."""
    config = folder / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{config}: missing; the pipeline folder needs a vae/ with a diffusers config.json")
    if json.loads(config.read_text()).get("_class_name") == "AutoencoderKL":
        from diffusers import AutoencoderKL

        return SD3ImageVAE(AutoencoderKL.from_pretrained(folder, local_files_only=True).to(device))
    return load_vae(folder, device=device)


def load_encoders(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH,
) -> Encoders:
    """Text encoders (in `dtype`) and VAE (float32, as ContentV runs it) of a local SD3.5/ContentV pipeline folder."""
    folder = Path(folder)
    text = load_text_encoders(folder, dtype=dtype, device=device, max_sequence_length=max_sequence_length)
    return Encoders(text, load_pipeline_vae(folder / "vae", device), _cache(cache_dir, text))
