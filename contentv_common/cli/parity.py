"""Per-layer parity between backends (jax, torch, diffusers) on the same weights and the same random inputs.

    python tools/parity.py --tiny                                 # random tiny model, all three backends
    python tools/parity.py --checkpoint PATH/transformer --frames 3 --size 32x32 --backends jax,torch

Prints a table of relative error (||other - ref|| / ||ref||, float64) per layer against the first backend, and the
first layer that exceeds --tol. Runs in float32 with JAX matmul precision "highest" and torch TF32 off.
Exit status 1 if any layer exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from contentv_common.backend import get
from contentv_common.checkpoint.formats import open_checkpoint
from contentv_common.cli import run_cli
from contentv_common.config.model import named_model_config
from contentv_common.errors import CheckpointError, ConfigError

BACKENDS = ("jax", "torch", "diffusers")
NEEDS = {"jax": ("jax", "flax"), "torch": ("torch",), "diffusers": ("torch", "diffusers")}


def trace_backend(name: str, path: Path, pos_embed: str | None, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every layer's output in our backend `name` (contentv_common.backend.Backend.trace_layers)."""
    return get(name).trace_layers(path, pos_embed, inputs)


def trace_diffusers(path: Path, pos_embed: str | None, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    from contentv_torch_npu.reference import load_diffusers, reference_forward

    model, cfg = load_diffusers(path)
    cfg = cfg if pos_embed is None else cfg.replace(pos_embed=pos_embed)
    trace: dict[str, torch.Tensor] = {}
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    reference_forward(model, cfg, **tensors, trace=trace)
    return {k: v.numpy() for k, v in trace.items()}


TRACERS: dict[str, Callable[[Path, str | None, dict[str, np.ndarray]], dict[str, np.ndarray]]] = {
    "jax": partial(trace_backend, "jax"),
    "torch": partial(trace_backend, "torch"),
    "diffusers": trace_diffusers,
}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(b)), 1e-30)


def random_inputs(cfg, batch: int, frames: int, height: int, width: int, text_tokens: int, seed: int):
    rng = np.random.default_rng(seed)
    return {
        "hidden_states": rng.standard_normal((batch, cfg.in_channels, frames, height, width), dtype=np.float32),
        "timestep": rng.uniform(0, 1000, batch).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, text_tokens, cfg.joint_attention_dim), dtype=np.float32),
        "pooled_projections": rng.standard_normal((batch, cfg.pooled_projection_dim), dtype=np.float32),
    }


def write_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random tiny SD3 transformer saved by diffusers itself (`save_pretrained`), image-mode config."""
    import torch

    from contentv_torch_npu.reference import build_diffusers

    torch.manual_seed(seed)
    cfg = named_model_config("tiny").replace(pos_embed="sd3_2d")
    build_diffusers(cfg).save_pretrained(folder)
    return folder


def compare(traces: dict[str, dict[str, np.ndarray]], tol: float) -> tuple[list[str], str | None]:
    """Table lines and the first layer whose error exceeds `tol` (None if all pass)."""
    names = list(traces)
    ref = traces[names[0]]
    lines = [f"{'layer':<22}" + "".join(f"{n + ' vs ' + names[0]:>22}" for n in names[1:])]
    first_bad = None
    for layer in ref:
        errs = [rel_err(traces[n][layer], ref[layer]) for n in names[1:]]
        flag = "  <-- exceeds tol" if any(e > tol for e in errs) else ""
        if flag and first_bad is None:
            first_bad = layer
        lines.append(f"{layer:<22}" + "".join(f"{e:>22.3e}" for e in errs) + flag)
    return lines, first_bad


def run_traces(args: argparse.Namespace, backends: list[str], height: int, width: int):
    """Write or open the checkpoint, draw the inputs, and trace every backend on them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or write_tiny_checkpoint(Path(tmp) / "tiny")
        pos_embed = "sincos_3d" if args.tiny and args.pos_embed is None else args.pos_embed
        cfg = open_checkpoint(path).config
        cfg = cfg if pos_embed is None else cfg.replace(pos_embed=pos_embed)
        frames = 1 if cfg.pos_embed == "sd3_2d" else args.frames
        inputs = random_inputs(cfg, args.batch, frames, height, width, args.text_tokens, args.seed)
        traces = {b: TRACERS[b](path, pos_embed, inputs) for b in backends}
    return traces, cfg, inputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="transformer folder (diffusers, torch or jax format)")
    src.add_argument("--tiny", action="store_true", help="random tiny model written by diffusers (no downloads)")
    ap.add_argument("--backends", default="jax,torch,diffusers", help="comma list; the first is the reference")
    ap.add_argument("--pos-embed", choices=["sincos_3d", "sd3_2d"], help="override the checkpoint's mode")
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--size", default="16x16", help="latent HxW")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args(argv)
    backends = args.backends.split(",")
    for b in backends:
        if b not in BACKENDS:
            ap.error(f"unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
    if len(backends) < 2:
        ap.error("need at least two backends to compare")
    size = args.size.lower().split("x")
    if len(size) != 2 or not all(v.isdigit() and int(v) > 0 for v in size):
        ap.error(f"--size must be HxW latent pixels (e.g. 16x16), got {args.size!r}")
    height, width = (int(v) for v in size)
    for name in ("frames", "batch", "text_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for module in sorted({m for b in backends for m in NEEDS[b]}):
        importlib.import_module(module)  # a missing framework ends here (one line, see run_cli), before any tracing
    try:
        traces, cfg, inputs = run_traces(args, backends, height, width)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"parity: error: {e}", file=sys.stderr)
        return 2
    print(f"parity: {cfg.pos_embed}, latents {inputs['hidden_states'].shape}, float32, reference = {backends[0]}")
    lines, first_bad = compare(traces, args.tol)
    print("\n".join(lines))
    if first_bad is None:
        print(f"all layers within tol {args.tol:g}")
        return 0
    print(f"first layer exceeding tol {args.tol:g}: {first_bad}")
    return 1


def entry() -> None:
    """The `contentv-parity` command."""
    run_cli(main)


if __name__ == "__main__":
    entry()
