"""What LoRA training shares between the backends: the adapters' starting values and where a run writes them.

New adapters are drawn in numpy so the JAX core and the torch twin start identical, as peft initialises them: A
kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B zeros, so a new adapter leaves the model unchanged
while A's gradient is zero and B's is not. Each module draws from its own generator seeded by (seed, crc32 of its
canonical name): the values do not depend on which other modules are adapted.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from contentv_common.config.recipe import LoraConfig
from contentv_common.lora.adapters import lora_keys, save_adapters


def initial_adapters(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int) -> dict[str, np.ndarray]:
    """Canonical adapter arrays (torch layout, float32) for modules of weight shape `shapes[m]` = (out, in)."""
    out = {}
    for module, (d_out, d_in) in sorted(shapes.items()):
        rng = np.random.default_rng([seed, zlib.crc32(module.encode())])
        bound = 1.0 / np.sqrt(d_in)
        a_key, b_key = lora_keys(module)
        out[a_key] = rng.uniform(-bound, bound, (rank, d_in)).astype(np.float32)
        out[b_key] = np.zeros((d_out, rank), np.float32)
    return out


def adapter_file(checkpoint_dir: str | Path) -> Path:
    """Where a LoRA run (training or reward tuning, either backend) keeps the adapters of its latest checkpoint."""
    return Path(checkpoint_dir) / "lora.safetensors"


def write_adapter_file(checkpoint_dir: str | Path, adapters: Mapping[str, np.ndarray], lora: LoraConfig) -> Path:
    """`save_adapters` to `adapter_file(checkpoint_dir)`, replaced atomically (a reader never sees half a file)."""
    path = adapter_file(checkpoint_dir)
    tmp = path.with_name(path.name + ".tmp")
    save_adapters(tmp, adapters, lora)
    tmp.replace(path)
    return path
