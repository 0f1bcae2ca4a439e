"""Load a (full-size) transformer checkpoint with one backend in this fresh process and run one forward on CPU.

    python tools/smoke_full_size.py --backend torch SD3.5-Large/transformer
    python tools/smoke_full_size.py --backend jax SD3.5-Large/transformer --frames 2 --size 8x8 --text-tokens 7

Prints the parameter count and bytes, the load time and its read rate over the disk's direct read bandwidth measured
just before on the same files (contentv_common/checkpoint/disk_speed.py; the load then reads from a cold page cache),
the forward time at a few tokens, whether the output is finite, and the peak resident memory over the parameters' bytes
(the loaders aim at about 1x: the model once plus the tensors being read), then one markdown row for docs/scale.md. Only
the chosen framework is imported; exit status 1 if the output is not finite, 2 on a bad checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

from contentv_common.checkpoint.disk_speed import checkpoint_files, combined, direct_read
from contentv_common.checkpoint.formats import POS_TABLE, open_checkpoint
from contentv_common.cli import run_cli
from contentv_common.errors import CheckpointError, ConfigError

OTHER = {"jax": ("torch",), "torch": ("jax", "flax")}
PACKAGE = {"jax": "contentv_jax", "torch": "contentv_torch_npu"}
BYTES = {"bfloat16": 2, "float32": 4}
GIB = 2**30


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def inputs(cfg, frames: int, height: int, width: int, text_tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "hidden_states": rng.standard_normal((1, cfg.in_channels, frames, height, width), dtype=np.float32),
        "timestep": np.array([500.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((1, text_tokens, cfg.joint_attention_dim), dtype=np.float32),
        "pooled_projections": rng.standard_normal((1, cfg.pooled_projection_dim), dtype=np.float32),
    }


def load_torch(path: Path, dtype: str, pos_embed: str):
    import torch

    import contentv_torch_npu

    model = contentv_torch_npu.load_transformer(path, dtype=getattr(torch, dtype), pos_embed=pos_embed).eval()

    def forward(x: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return model(*(torch.from_numpy(v) for v in x.values())).float().numpy()

    return forward


def load_jax(path: Path, dtype: str, pos_embed: str):
    import jax
    import jax.numpy as jnp

    import contentv_jax

    model = contentv_jax.load_transformer(path, dtype=jnp.dtype(dtype), pos_embed=pos_embed)
    jax.block_until_ready(jax.tree.leaves(model))

    def forward(x: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(model(*(jnp.asarray(v) for v in x.values())), np.float32)

    return forward


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="transformer folder (diffusers, torch or jax format)")
    ap.add_argument("--backend", choices=sorted(OTHER), required=True)
    ap.add_argument("--dtype", choices=sorted(BYTES), default="bfloat16", help="parameter (and compute) dtype")
    ap.add_argument("--pos-embed", choices=["sincos_3d", "sd3_2d"], default="sincos_3d", help="default: ContentV's")
    ap.add_argument("--frames", type=int, default=2, help="latent frames")
    ap.add_argument("--size", default="8x8", help="latent HxW")
    ap.add_argument("--text-tokens", type=int, default=7)
    args = ap.parse_args(argv)
    if not re.fullmatch(r"\d+x\d+", args.size):
        ap.error(f"--size must be HxW (latent), got {args.size!r}")
    height, width = (int(v) for v in args.size.split("x"))
    try:
        source = open_checkpoint(args.checkpoint)
        cfg = source.config.replace(pos_embed=args.pos_embed)
        cfg.check_latent_shape((1, cfg.in_channels, args.frames, height, width))
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"smoke_full_size: error: {e}", file=sys.stderr)
        return 2
    dropped = POS_TABLE if cfg.pos_embed == "sincos_3d" else None  # SD3's 2D table is not loaded in video mode
    count = sum(int(np.prod(shape)) for key, shape in source.shapes.items() if key != dropped)
    param_bytes = count * BYTES[args.dtype]
    x = inputs(cfg, args.frames, height, width, args.text_tokens)
    if args.backend == "jax":  # XLA:CPU computes bf16 in f32 and would hoist the scanned blocks' weight casts out of
        # the loop: a float32 copy of the whole model (5.0 -> 1.1 GiB of temporaries at 6 blocks without that pass)
        flag = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    importlib.import_module(PACKAGE[args.backend])  # framework imports are not part of the load time
    rss_imports = peak_rss()
    files = checkpoint_files(args.checkpoint)
    file_bytes = sum(f.stat().st_size for f in files)
    before = direct_read(files)  # leaves the files out of the page cache: the load reads from the disk
    start = time.perf_counter()
    forward = (load_torch if args.backend == "torch" else load_jax)(args.checkpoint, args.dtype, args.pos_embed)
    load_s, rss_load = time.perf_counter() - start, peak_rss()
    disk = combined([before, direct_read(files)])
    start = time.perf_counter()
    out = forward(x)
    forward_s, rss_forward = time.perf_counter() - start, peak_rss()
    other = sorted({m.partition(".")[0] for m in sys.modules} & set(OTHER[args.backend]))
    finite = bool(np.isfinite(out).all())
    tokens = args.frames * height * width // cfg.patch_size**2
    print(f"{args.backend}: {count / 1e9:.2f}B parameters = {param_bytes / GIB:.2f} GiB in {args.dtype}")
    over = (rss_load - rss_imports) / param_bytes
    load_rate = file_bytes / load_s / 1e9
    print(f"load {load_s:.1f} s = {load_rate:.2f} GB/s = {load_rate / disk['gb_per_s']:.2f}x the disk's direct read "
          f"({disk['gb_per_s']:.2f} GB/s, {disk['min']:.2f}-{disk['max']:.2f} before / after; load average "
          f"{os.getloadavg()[0]:.1f})")  # fmt: skip
    print(f"peak RSS {rss_load / GIB:.2f} GiB = {rss_load / param_bytes:.2f}x the parameters "
          f"({over:.2f}x over the {rss_imports / GIB:.2f} GiB after imports)")  # fmt: skip
    print(f"forward ({tokens} image + {args.text_tokens} text tokens) {forward_s:.1f} s, finite={finite}, "
          f"peak RSS {rss_forward / GIB:.2f} GiB; other framework imported: {other or 'none'}")  # fmt: skip
    print(f"| {args.backend} | {count / 1e9:.2f}B, {param_bytes / GIB:.1f} GiB | {load_s:.0f} s, "
          f"{load_rate / disk['gb_per_s']:.2f}x disk ({disk['gb_per_s']:.2f} GB/s) | "
          f"{rss_load / param_bytes:.2f}x | {forward_s:.0f} s, {'finite' if finite else 'NOT finite'} | "
          f"{rss_forward / GIB:.1f} GiB |")  # fmt: skip
    return 0 if finite and not other else 1


if __name__ == "__main__":
    run_cli(main)
