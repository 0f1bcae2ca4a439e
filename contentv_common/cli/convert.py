"""Convert a transformer checkpoint between diffusers, torch (safetensors) and JAX (orbax) formats; export, import and
merge LoRA adapters.

    python tools/convert.py SRC DST --to jax|torch|diffusers [--dtype bfloat16] [--pos-embed sincos_3d]
    python tools/convert.py SRC DST --to torch --lora ADAPTER[:SCALE]     # merge adapters (repeatable) into weights
    python tools/convert.py ADAPTER DST --to diffusers-lora [--fold-alpha] # -> DST/pytorch_lora_weights.safetensors
    python tools/convert.py LORA DST.safetensors --to lora                 # diffusers SD3 LoRA -> our adapter file

SRC is a diffusers transformer folder (e.g. SD3.5-Large or ContentV-8B `transformer/`) or one of ours; its format is
detected from the files. Without --dtype (and --lora) every tensor is copied bit for bit. An adapter is our adapter
file (what LoRA training writes) or diffusers' SD3 LoRA file (or the folder holding `pytorch_lora_weights.safetensors`),
told apart by its contents. diffusers-lora carries alpha in diffusers' `lora_adapter_metadata` (diffusers >= 0.35);
--fold-alpha multiplies B by alpha / rank instead, for loaders that ignore that metadata.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from contentv_common.checkpoint.convert import DTYPES, convert
from contentv_common.checkpoint.formats import OUR_CONFIG, detect_format
from contentv_common.cli import run_cli
from contentv_common.config.recipe import LoraConfig
from contentv_common.errors import CheckpointError, ConfigError
from contentv_common.lora.adapters import DIFFUSERS_FILE, parse_lora_spec, read_adapter, save_adapters, save_diffusers

ADAPTER_TARGETS = ("diffusers-lora", "lora")


def import_backends(src: str, to: str) -> None:
    """The JAX format is contentv_jax's own: importing it registers the format's reader and writer."""
    if to == "jax" or detect_format(src) == "jax":
        import contentv_jax  # noqa: F401


def is_adapter(src: Path) -> bool:
    """A file, or a folder that holds diffusers' LoRA file and no checkpoint config."""
    if src.is_dir():
        return (
            (src / DIFFUSERS_FILE).is_file() and not (src / "config.json").exists() and not (src / OUR_CONFIG).exists()
        )
    return src.exists()


def convert_adapter(src: Path, dst: Path, to: str, fold_alpha: bool, overwrite: bool) -> Path:
    """Our adapter file or diffusers' SD3 LoRA file -> diffusers' (a folder or a .safetensors path) or ours."""
    adapters, rank, alpha = read_adapter(src)
    if to == "diffusers-lora":
        return save_diffusers(dst, adapters, rank, alpha, fold_alpha, overwrite)
    if dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: an adapter file is one .safetensors file; give DST with that suffix")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists (pass --overwrite to replace it)")
    save_adapters(dst, adapters, LoraConfig(rank=rank, alpha=alpha))
    return dst


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
    ap.add_argument("src", type=Path, help="source checkpoint folder or adapter file (format detected)")
    ap.add_argument("dst", type=Path, help="output folder (written atomically) or adapter file")
    ap.add_argument("--to", required=True, choices=["diffusers", "torch", "jax", *ADAPTER_TARGETS])
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep)")
    ap.add_argument("--pos-embed", choices=["sincos_3d", "sd3_2d"], help="override the position-embedding mode")
    ap.add_argument("--shard-size", default="5GB", type=parse_size, help="max safetensors shard size (e.g. 5GB)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    ap.add_argument(
        "--lora",
        action="append",
        default=[],
        type=parse_lora_spec,
        metavar="ADAPTER[:SCALE]",
        help="merge this adapter (ours or diffusers', scale default 1.0) into the weights; repeatable",
    )
    ap.add_argument("--fold-alpha", action="store_true", help="diffusers-lora: fold alpha / rank into B")
    args = ap.parse_args(argv)
    adapter_target = args.to in ADAPTER_TARGETS
    if adapter_target and (args.lora or args.dtype or args.pos_embed):
        ap.error(f"--to {args.to} converts an adapter file: --lora, --dtype and --pos-embed apply to checkpoints")
    if args.fold_alpha and args.to != "diffusers-lora":
        ap.error("--fold-alpha applies to --to diffusers-lora")
    try:
        if adapter_target:
            out = convert_adapter(args.src, args.dst, args.to, args.fold_alpha, args.overwrite)
        elif is_adapter(args.src):
            raise CheckpointError(
                f"{args.src}: a LoRA adapter, not a checkpoint folder: convert it with --to diffusers-lora or "
                "--to lora, or merge it into a checkpoint with --lora"
            )
        else:
            import_backends(args.src, args.to)
            out = convert(
                args.src,
                args.dst,
                args.to,
                args.dtype,
                args.pos_embed,
                args.shard_size,
                args.overwrite,
                loras=args.lora,
            )
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} {'file' if adapter_target else 'checkpoint'} to {out}")
    return 0


def entry() -> None:
    """The `contentv-convert` command."""
    run_cli(main)


if __name__ == "__main__":
    entry()
