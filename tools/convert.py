"""Convert a transformer checkpoint between diffusers, torch (safetensors) and JAX (orbax) formats.

    python tools/convert.py SRC DST --to jax|torch|diffusers [--dtype bfloat16] [--pos-embed sincos_3d]

SRC is a diffusers transformer folder (e.g. SD3.5-Large or ContentV-8B `transformer/`) or one of ours; its format is
detected from the files. Without --dtype every tensor is copied bit for bit.
"""

from __future__ import annotations

import argparse
import sys

from contentv_common.checkpoint import detect_format
from contentv_common.cli import run_cli
from contentv_common.config import ConfigError
from contentv_common.convert import DTYPES, convert
from contentv_common.safetensors_io import CheckpointError


def import_backends(src: str, to: str) -> None:
    """The JAX format is contentv_jax's own: importing it registers the format's reader and writer."""
    if to == "jax" or detect_format(src) == "jax":
        import contentv_jax  # noqa: F401


def parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    try:
        for unit, factor in units.items():
            if text.upper().endswith(unit):
                return int(float(text[: -len(unit)]) * factor)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB or 500MB, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="source checkpoint folder (format detected)")
    ap.add_argument("dst", help="output folder (written atomically)")
    ap.add_argument("--to", required=True, choices=["diffusers", "torch", "jax"])
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep)")
    ap.add_argument("--pos-embed", choices=["sincos_3d", "sd3_2d"], help="override the position-embedding mode")
    ap.add_argument("--shard-size", default="5GB", type=parse_size, help="max safetensors shard size (e.g. 5GB)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = ap.parse_args(argv)
    try:
        import_backends(args.src, args.to)
        out = convert(args.src, args.dst, args.to, args.dtype, args.pos_embed, args.shard_size, args.overwrite)
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
