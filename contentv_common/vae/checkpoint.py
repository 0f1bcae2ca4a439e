"""Wan2.1 VAE checkpoints on disk: a diffusers `vae/` folder (config.json + safetensors, sharded or not).

Read as a `TensorSource` (the same streaming interface as the transformer) through the VAE parameter table, so key
and shape errors read the same as everywhere else; written back in the same diffusers layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from contentv_common.checkpoint.formats import TensorSource, stream_source
from contentv_common.checkpoint.safetensors_io import AtomicFolder, weight_files, write_sharded
from contentv_common.errors import CheckpointError, ConfigError
from contentv_common.vae.config import VAEConfig, config_from_diffusers, config_to_diffusers
from contentv_common.vae.table import vae_table

WEIGHTS_PREFIX = "diffusion_pytorch_model"


def read_vae_config(path: str | Path) -> VAEConfig:
    """The VAEConfig of a diffusers `vae/` folder."""
    path = Path(path)
    file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: VAE folder not found")
    if not file.exists():
        hint = "; this is a pipeline folder, pass its vae/ subfolder" if (path / "vae" / "config.json").exists() else ""
        raise CheckpointError(f"{path}: no config.json{hint}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON: {e}") from None
    return config_from_diffusers(raw, str(file))


def open_vae_source(path: str | Path) -> TensorSource:
    """Open a diffusers VAE folder for streaming (canonical names, torch layout) without reading tensor data."""
    path = Path(path)
    cfg = read_vae_config(path)
    return stream_source(path, cfg, weight_files(path, WEIGHTS_PREFIX), vae_table(cfg))


def write_vae_diffusers(
    folder: str | Path,
    cfg: VAEConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write canonical (torch-layout) tensors as a diffusers `AutoencoderKLWan` folder, atomically."""
    table = vae_table(cfg)
    with AtomicFolder(folder, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_diffusers(cfg), indent=2))
        renamed = ((table.from_canonical(k).diffusers, v) for k, v in tensors)
        write_sharded(renamed, tmp, WEIGHTS_PREFIX, max_shard_bytes, metadata={"format": "pt"})
    return Path(folder)
