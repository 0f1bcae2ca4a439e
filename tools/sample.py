"""Text to video: prompt(s) -> mp4, with the JAX core or the torch twin.

    python tools/sample.py --pipeline ContentV-8B --prompt "a cat on the sea" --size 432x768 --dtype bfloat16
    python tools/sample.py --pipeline sd3.5-large --prompt "a red fox" --frames 1 --size 1024x1024 --backend torch
    python tools/sample.py --tiny --transformer runs/tiny/final --prompt "a red cat" --frames 9 --size 64x64
    python tools/sample.py --pipeline ContentV-8B --lora runs/lora/adapter.safetensors:0.8 --prompt "a cat"

Encoders (CLIP-L/CLIP-G/T5 + Wan VAE) come from `--pipeline` (a local diffusers folder), `--tiny` (random tiny
ones, no downloads) or `--demo` (the CPU demo's: a tiny Wan VAE trained on the synthetic set + word embeddings), and
run in the chosen backend: `--backend jax` needs no torch (Flax text encoders, JAX Wan VAE), except that SD3's 2D
image VAE (an SD3/SD3.5 image pipeline) exists in torch only and decodes there.
The transformer is `--transformer` (any folder `load_transformer` reads: diffusers, our torch or our JAX format), else
`PIPELINE/transformer`, else (with `--tiny` or `--demo`) a random tiny model seeded by `--model-seed`. `--lora
ADAPTER[:SCALE]` (repeatable; our adapter file or diffusers' SD3 LoRA file) is merged into its weights as it loads,
exactly as `tools/convert.py --lora` merges it into a checkpoint.
SD3/SD3.5 checkpoints run in image mode (`--frames 1`). Noise is drawn in numpy from `--seed` + prompt index, so both
backends and any batch size give the same video for the same weights; `--noise torch` draws it as the official
ContentV demo does (a torch CPU generator seeded with `--seed`, all prompts at once, in `--dtype`).
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import numpy as np

from contentv_common.checkpoint.formats import detect_format, open_checkpoint, write_torch
from contentv_common.checkpoint.param_table import TRANSFORMER_TABLE, inverse_perm
from contentv_common.cli import run_cli
from contentv_common.config.model import ModelConfig, named_model_config
from contentv_common.config.recipe import AttentionChoice
from contentv_common.data.video_io import write_video
from contentv_common.dtypes import COMPUTE_DTYPES
from contentv_common.errors import ConfigError
from contentv_common.lora.adapters import Lora, adapted, merged_weight, open_lora, parse_lora_spec
from contentv_common.sampling import SchedulerSettings, draw_noise, latent_shape, read_scheduler_settings
from contentv_common.text.sd3_prompt import check_text_widths, read_text_configs
from contentv_common.tiny_models import random_weights

if TYPE_CHECKING:
    from contentv_jax.encoders import Encoders

SHIFT = 3.0  # SD3.5-Large's scheduler shift


def pipeline_scheduler(pipeline: Path | None) -> SchedulerSettings:
    """The pipeline's scheduler/scheduler_config.json settings (SD3.5: shift 3.0), else shift SHIFT; fields that would
    select a schedule not implemented here raise ConfigError naming the field."""
    path = None if pipeline is None else pipeline / "scheduler" / "scheduler_config.json"
    if path is None or not path.exists():
        return SchedulerSettings(shift=SHIFT)
    return read_scheduler_settings(path)


def initial_noise(kind: str, seed: int, shape: tuple[int, ...], count: int, dtype: str) -> np.ndarray:
    """Noise [count, C, f, h, w] of all prompts: "numpy" draws prompt i from seed + i (any batch size, either backend,
    the same video); "torch" draws all at once from a torch CPU generator seeded with `seed` in `dtype`, exactly as
    the official ContentV demo (diffusers' pipeline with a prompt list) does."""
    if kind == "numpy":
        return np.concatenate([draw_noise(seed + i, shape) for i in range(count)])
    import torch

    from contentv_torch_npu.sampling import official_noise

    return official_noise(seed, (count, *shape[1:]), getattr(torch, dtype))


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--size must be HEIGHTxWIDTH in pixels (e.g. 432x768), got {text!r}")
    return int(match[1]), int(match[2])


def slug(prompt: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length] or "prompt"


def load_model(backend: str, path: Path, dtype: str, device: str, attention: str = "auto"):
    """The transformer of `backend` from a checkpoint folder, with its ModelConfig at `.cfg`."""
    if backend == "jax":
        import jax.numpy as jnp

        import contentv_jax
        from contentv_jax.ops import attention_for

        return contentv_jax.load_transformer(path, dtype=jnp.dtype(dtype), attention=attention_for(attention))
    import torch

    import contentv_torch_npu
    from contentv_torch_npu.device import resolve_device

    model = contentv_torch_npu.load_transformer(path, dtype=getattr(torch, dtype), device=resolve_device(device))
    return model.eval()


def open_loras(specs: list[tuple[Path, float]], path: Path) -> list[Lora]:
    """The adapters of `--lora`, read and checked against the checkpoint's keys and shapes (headers only)."""
    if not specs:
        return []
    if detect_format(path) == "jax":
        import contentv_jax  # noqa: F401  (registers the JAX format's reader)
    shapes = open_checkpoint(path).shapes
    return [open_lora(adapter, scale, shapes) for adapter, scale in specs]


def merge_loras(backend: str, model, loras: list[Lora]) -> None:
    """Add the adapters to the loaded weights in place, in float32 on the host and cast back once per weight: with
    --dtype the checkpoint's dtype, the very weights `tools/convert.py --lora` writes."""
    if not loras:
        return
    if backend == "torch":
        import torch

        with torch.no_grad():
            for name, weight in model.state_dict().items():
                if adapted(name, loras):
                    weight.copy_(torch.from_numpy(merged_weight(name, weight.float().cpu().numpy(), loras)))
        return
    import jax
    from flax import nnx

    from contentv_jax.loading import slots

    items = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        leaf_slots = slots(".".join(map(str, path)), tuple(var.shape), TRANSFORMER_TABLE, model.cfg.num_layers)
        if not any(adapted(s.param.canonical, loras) for s in leaf_slots):
            continue
        value = np.array(jax.device_get(var[...]), np.float32)
        for s in leaf_slots:
            if adapted(s.param.canonical, loras):
                where = () if s.layer is None else (s.layer,)
                torch_layout = np.transpose(value[where], inverse_perm(s.param.jax_perm))
                value[where] = np.transpose(merged_weight(s.param.canonical, torch_layout, loras), s.param.jax_perm)
        items.append((path, var.replace(jax.device_put(value.astype(var.dtype), var[...].sharding))))
    nnx.update(model, nnx.from_flat_state(items))


def transformer_shapes(cfg: ModelConfig, backend: str) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of the transformer's weights, from `backend`'s abstract model (both give the same)."""
    if backend == "jax":
        from contentv_jax.loading import abstract_transformer, canonical_shapes

        return canonical_shapes(abstract_transformer(cfg))
    import torch

    from contentv_torch_npu import Transformer
    from contentv_torch_npu.loading import canonical_shapes

    with torch.device("meta"):
        return canonical_shapes(Transformer(cfg))


def random_tiny_checkpoint(folder: Path, seed: int, backend: str = "jax") -> Path:
    """A seeded random tiny transformer drawn in numpy (contentv_common.tiny_models) in our torch format: the very
    same weights whichever backend draws them and loads them."""
    cfg = named_model_config("tiny")
    weights = random_weights(transformer_shapes(cfg, backend), seed)
    return write_torch(folder / "transformer", cfg, iter(weights.items()))


def sampler(backend: str):
    if backend == "jax":
        from contentv_jax.sampling import sample
    else:
        from contentv_torch_npu.sampling import sample
    return sample


def build_encoders(args: argparse.Namespace) -> Encoders:
    """The chosen backend's encoders (`--tiny`, `--demo` or `--pipeline`), the same numpy interface in both."""
    if args.backend == "jax":
        import jax.numpy as jnp

        from contentv_jax import encoders

        if args.tiny:
            return encoders.tiny_encoders(args.encoder_seed, cache_dir=args.cache_dir)
        if args.demo:
            return encoders.demo_encoders(cache_dir=args.cache_dir)
        return encoders.load_encoders(args.pipeline, dtype=jnp.dtype(args.dtype), cache_dir=args.cache_dir)
    import torch

    from contentv_torch_npu import encoders as torch_encoders
    from contentv_torch_npu.device import resolve_device

    device = resolve_device(args.device)
    if args.tiny:
        return torch_encoders.tiny_encoders(args.encoder_seed, device=device, cache_dir=args.cache_dir)
    if args.demo:
        return torch_encoders.demo_encoders(device, cache_dir=args.cache_dir)
    dtype = getattr(torch, args.dtype)
    return torch_encoders.load_encoders(args.pipeline, dtype=dtype, device=device, cache_dir=args.cache_dir)


def latent_decoder(encoders: Encoders, pipeline: Path | None, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """Normalised latents -> uint8 frames through the encoders' own VAE; SD3's 2D image VAE (an image pipeline, for
    which the JAX encoders hold no VAE) exists in torch only, so there it decodes in torch."""
    if encoders.vae is not None:
        return encoders.decode_latents
    from contentv_torch_npu.device import resolve_device
    from contentv_torch_npu.encoders import decode_latents, load_pipeline_vae

    return partial(decode_latents, load_pipeline_vae(pipeline / "vae", resolve_device(device)))


def transformer_config(path: Path) -> ModelConfig:
    """The checkpoint's ModelConfig, from its config file alone."""
    if detect_format(path) == "jax":
        import contentv_jax  # noqa: F401  (registers the JAX format's reader)
    return open_checkpoint(path).config


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("models")
    src.add_argument("--pipeline", type=Path, help="local diffusers pipeline folder (ContentV-8B or SD3.5)")
    src.add_argument("--tiny", action="store_true", help="random tiny encoders (and model, without --transformer)")
    src.add_argument("--demo", action="store_true", help="the CPU demo's encoders: trained tiny VAE + word embeddings")
    src.add_argument("--transformer", type=Path, help="transformer checkpoint folder (diffusers, torch or jax format)")
    src.add_argument("--model-seed", type=int, default=0, help="seed of the random tiny transformer")
    src.add_argument(
        "--lora",
        action="append",
        default=[],
        type=parse_lora_spec,
        metavar="ADAPTER[:SCALE]",
        help="merge this LoRA adapter (ours or diffusers', scale default 1.0) into the transformer; repeatable",
    )
    src.add_argument("--encoder-seed", type=int, default=0, help="seed of the random tiny encoders")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompts-file", type=Path, help="text file with one prompt per line")
    ap.add_argument("--negative-prompt", default="", help="the unconditional branch of guidance")
    ap.add_argument("--backend", choices=["jax", "torch"], default="jax")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=6.0, help="CFG scale; <= 1 disables guidance")
    ap.add_argument(
        "--shift", type=float, help=f"static flow-match shift (default: the pipeline's scheduler config, else {SHIFT})"
    )
    ap.add_argument("--frames", type=int, default=125, help="1 + 4k frames (1 for image models)")
    ap.add_argument("--size", type=parse_size, default=(432, 768), help="HEIGHTxWIDTH in pixels, multiples of 16")
    ap.add_argument("--seed", type=int, default=0, help="noise seed; prompt i uses seed + i (numpy noise)")
    ap.add_argument(
        "--noise",
        choices=("numpy", "torch"),
        default="numpy",
        help="numpy: the same video in both backends; torch: the official ContentV demo's latents for --seed",
    )
    ap.add_argument("--batch-size", type=int, default=1, help="prompts denoised together")
    ap.add_argument(
        "--attention",
        choices=get_args(AttentionChoice),
        default="auto",
        help="JAX attention kernel: auto = cuDNN flash on GPU, splash on TPU, XLA on CPU",
    )
    ap.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32", help="transformer and text-encoder dtype")
    ap.add_argument("--device", default="auto", help="torch device: auto, npu, cuda, cpu")
    ap.add_argument("--cache-dir", type=Path, help="on-disk text-embedding cache")
    ap.add_argument("--fps", type=float, default=24.0)
    ap.add_argument("--out", type=Path, default=Path("samples"), help="output folder for the mp4 files")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not args.prompts_file.is_file():
            raise FileNotFoundError(f"--prompts-file {args.prompts_file}: no such file")
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    return prompts


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace, prompts: list[str]) -> None:
    if not prompts:
        ap.error("give at least one --prompt or a --prompts-file")
    if (args.pipeline is not None) + args.tiny + args.demo != 1:
        ap.error("give exactly one of --pipeline FOLDER (a local diffusers pipeline), --tiny or --demo")
    if args.steps < 1 or args.batch_size < 1:
        ap.error("--steps and --batch-size must be >= 1")
    if args.attention != "auto" and args.backend != "jax":
        ap.error("--attention chooses the JAX kernel: use it with --backend jax")
    if args.backend == "jax":
        import jax

        from contentv_jax.ops import resolve_attention

        try:
            resolve_attention(args.attention, jax.default_backend())
        except ValueError as e:
            ap.error(f"--attention: {e}")
    try:
        latent_shape(16, args.frames, *args.size)
    except ValueError as e:
        ap.error(str(e))
    if args.pipeline is not None and not args.pipeline.is_dir():
        ap.error(f"--pipeline {args.pipeline}: no such folder")
    if args.transformer is not None:  # before any model loads: a bad checkpoint is one line naming its file
        if detect_format(args.transformer) == "jax":
            import contentv_jax  # noqa: F401  (registers the JAX format's reader)
        open_checkpoint(args.transformer)


def main(argv: list[str] | None = None) -> list[Path]:
    ap = build_parser()
    args = ap.parse_args(argv)
    prompts = read_prompts(args)
    check_args(ap, args, prompts)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.transformer
        if path is None and args.pipeline is not None:
            path = args.pipeline / "transformer"
        elif path is None:
            path = random_tiny_checkpoint(Path(tmp), args.model_seed, args.backend)
        loras = open_loras(args.lora, path)  # before anything loads: a bad adapter is one line naming its file
        if args.pipeline is not None:  # widths from the config files, before any weight is read
            cfg = transformer_config(path)
            widths = (cfg.joint_attention_dim, cfg.pooled_projection_dim)
            check_text_widths(read_text_configs(args.pipeline), args.pipeline, *widths)
        encoders = build_encoders(args)
        model = load_model(args.backend, path, args.dtype, args.device, args.attention)
        merge_loras(args.backend, model, loras)
        decode = latent_decoder(encoders, args.pipeline, args.device)
    cfg = model.cfg
    if (cfg.joint_attention_dim, cfg.pooled_projection_dim) != (encoders.text_dim, encoders.pooled_dim):
        ap.error(
            f"transformer expects text {cfg.joint_attention_dim} / pooled {cfg.pooled_projection_dim} wide, the "
            f"encoders give {encoders.text_dim} / {encoders.pooled_dim}"
        )
    if cfg.pos_embed == "sd3_2d" and args.frames != 1:
        ap.error(f"{path} is an image model (SD3 position table): use --frames 1")
    height, width = args.size
    try:
        schedule = pipeline_scheduler(args.pipeline)
    except ConfigError as e:
        ap.error(str(e))
    shift = args.shift if args.shift is not None else schedule.shift
    try:
        shape = latent_shape(cfg.in_channels, args.frames, height, width)
    except ValueError as e:
        ap.error(str(e))

    guided = args.guidance > 1.0
    text, pooled = encoders.encode_text(prompts + [args.negative_prompt] * guided)  # one batch through the encoders
    neg_text, neg_pooled = (text[-1:], pooled[-1:]) if guided else (None, None)
    text, pooled = text[: len(prompts)], pooled[: len(prompts)]
    sample = sampler(args.backend)
    noise = initial_noise(args.noise, args.seed, shape, len(prompts), args.dtype)
    written = []
    for start in range(0, len(prompts), args.batch_size):
        idx = list(range(start, min(start + args.batch_size, len(prompts))))
        negs = (np.repeat(neg_text, len(idx), 0), np.repeat(neg_pooled, len(idx), 0)) if guided else (None, None)
        latents = sample(
            model,
            noise[idx],
            text[idx],
            pooled[idx],
            *negs,
            steps=args.steps,
            guidance=args.guidance,
            shift=shift,
            shift_terminal=schedule.shift_terminal,
            progress=not args.no_progress,
        )
        for i, video in zip(idx, decode(latents), strict=True):
            out = write_video(args.out / f"{i:03d}-{slug(prompts[i])}.mp4", video, fps=args.fps)
            print(f"wrote {out} ({video.shape[0]} frames, {video.shape[1]}x{video.shape[2]})")
            written.append(out)
    return written


def cli(argv: list[str] | None = None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    run_cli(cli)
