"""Write a random transformer checkpoint with exactly SD3.5-Large's keys and shapes (diffusers layout).

    python tools/make_sd35_checkpoint.py OUT [--blocks N] [--dtype bfloat16] [--shard-size 5GB] [--seed 0]

OUT gets `config.json` and `diffusion_pytorch_model-0000k-of-0000n.safetensors` with their index, as the official
`stabilityai/stable-diffusion-3.5-large` `transformer/` folder: 38 blocks, 8.1B parameters, about 16 GB in bf16.
`--blocks` keeps fewer blocks (same width) for measurements on small machines. Tensors are generated and written
piece by piece straight into their shard file, so memory stays small whatever the size.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from contentv_common.checkpoint.formats import config_from_diffusers, config_to_diffusers
from contentv_common.checkpoint.param_table import TRANSFORMER_TABLE
from contentv_common.checkpoint.safetensors_io import AtomicFolder
from contentv_common.config.model import ModelConfig

# the official SD3.5-Large transformer config.json
SD35_LARGE = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 2432,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 38,
    "num_layers": 38,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
DTYPES = {"bfloat16": (ml_dtypes.bfloat16, "BF16"), "float16": (np.float16, "F16"), "float32": (np.float32, "F32")}
PREFIX = "diffusion_pytorch_model"


def sd35_config(blocks: int = 38) -> ModelConfig:
    return config_from_diffusers({**SD35_LARGE, "num_layers": blocks}, "SD3.5-Large config")


def diffusers_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """diffusers key -> torch-layout shape of every tensor, blocks in order (from the abstract JAX model, the same
    shapes every loader checks against; SD3's 2D position table is added by shape, not computed)."""
    from contentv_common.checkpoint.formats import POS_TABLE
    from contentv_jax.loading import abstract_transformer, canonical_shapes

    shapes = canonical_shapes(abstract_transformer(cfg.replace(pos_embed="sincos_3d")))
    if cfg.pos_embed == "sd3_2d":
        shapes[POS_TABLE] = (1, cfg.pos_embed_max_size**2, cfg.hidden_size)

    def order(name: str) -> tuple[int, str]:
        parts = name.split(".")
        return (int(parts[1]) if parts[0] == "blocks" else -1, name)

    return {TRANSFORMER_TABLE.from_canonical(k).diffusers: shapes[k] for k in sorted(shapes, key=order)}


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def write_safetensors(
    file: Path, shapes: dict[str, tuple[int, ...]], dtype: str, make: Callable[[str], Iterator[np.ndarray]]
) -> None:
    """A safetensors file written piece by piece: the header first (all shapes are known), then each tensor's bytes
    as `make(key)` produces them (row blocks in order)."""
    np_dtype, st_dtype = DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        size = int(np.prod(shape)) * itemsize
        header[key] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape in shapes.items():
            written = 0
            for piece in make(key):
                piece = np.ascontiguousarray(piece, dtype=np_dtype)
                f.write(memoryview(piece.reshape(-1).view(np.uint8)))
                written += piece.size
            if written != int(np.prod(shape)):
                raise ValueError(f"{key}: generated {written} values, header says {shape}")


def random_tensors(
    shapes: dict[str, tuple[int, ...]], dtype: str, seed: int, piece_values: int = 2**22
) -> Callable[[str], Iterator[np.ndarray]]:
    """N(0, 0.02^2) values in row blocks of about `piece_values`, one generator per key (any shard layout gives the
    same tensors); memory stays at one block."""
    index = {key: i for i, key in enumerate(shapes)}

    def make(key: str) -> Iterator[np.ndarray]:
        shape = shapes[key]
        rng = np.random.default_rng([seed, index[key]])
        flat = int(np.prod(shape))
        for start in range(0, flat, piece_values):
            n = min(piece_values, flat - start)
            yield (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(DTYPES[dtype][0])

    return make


def write_random_checkpoint(
    out: str | Path, cfg: ModelConfig, dtype: str = "bfloat16", max_shard_bytes: int = 5 * 2**30, seed: int = 0
) -> Iterator[str]:
    """Write the folder; yields each shard's name as it is finished (for progress)."""
    shapes = diffusers_shapes(cfg)
    itemsize = np.dtype(DTYPES[dtype][0]).itemsize
    sizes = {k: int(np.prod(s)) * itemsize for k, s in shapes.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    make = random_tensors(shapes, dtype, seed)
    with AtomicFolder(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_diffusers(cfg), indent=2))
        weight_map = {}
        for n, keys in enumerate(shards, start=1):
            name = f"{PREFIX}-{n:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / name, {k: shapes[k] for k in keys}, dtype, make)
            weight_map.update({k: name for k in keys})
            yield name
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (tmp / f"{PREFIX}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def parse_size(text: str) -> int:
    for unit, factor in {"KB": 2**10, "MB": 2**20, "GB": 2**30}.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder (written atomically; must not exist or be empty)")
    ap.add_argument("--blocks", type=int, default=38, help="number of blocks (default 38, SD3.5-Large)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--shard-size", type=parse_size, default=5 * 2**30, help="max shard size (default 5GB)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.blocks < 1:
        print(f"make_sd35_checkpoint: error: --blocks must be >= 1, got {args.blocks}", file=sys.stderr)
        return 2
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        print(f"make_sd35_checkpoint: error: {args.out}: output folder exists and is not empty", file=sys.stderr)
        return 2
    cfg = sd35_config(args.blocks)
    for name in write_random_checkpoint(args.out, cfg, args.dtype, args.shard_size, args.seed):
        print(f"wrote {name}", flush=True)
    print(f"wrote SD3.5-Large-shaped checkpoint ({args.blocks} blocks, {args.dtype}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
