"""Text to video: prompt(s) -> mp4, with the JAX core or the torch twin.

    python tools/sample.py --pipeline ByteDance/ContentV-8B --prompt "a cat on the sea" --size 432x768 --dtype bfloat16
    python tools/sample.py --pipeline sd3.5-large --prompt "a red fox" --frames 1 --size 1024x1024 --backend torch
    python tools/sample.py --tiny --transformer runs/tiny/final --prompt "a red cat" --frames 9 --size 64x64
    python tools/sample.py --pipeline ContentV-8B --lora runs/lora/adapter.safetensors:0.8 --prompt "a cat"
    python tools/sample.py --pipeline ContentV-8B --prompts-file vbench/all_dimension.txt --seeds 5 --out suite

Encoders (CLIP-L/CLIP-G/T5 + Wan VAE) come from `--pipeline` (a diffusers folder, or a Hugging Face Hub id such as
ByteDance/ContentV-8B, fetched into the Hub cache: HF_HOME and HF_HUB_OFFLINE apply, a local path that exists wins),
`--tiny` (random tiny ones, no downloads) or `--demo` (the CPU demo's: a tiny Wan VAE trained on the synthetic set +
word embeddings), and run in the chosen backend: `--backend jax` needs no torch (Flax text encoders, JAX Wan VAE),
except that SD3's 2D image VAE (an SD3/SD3.5 image pipeline) exists in torch only and decodes there.
The transformer is `--transformer` (any folder `load_transformer` reads: diffusers, our torch or our JAX format; or a
Hub id such as owner/name/transformer), else `PIPELINE/transformer`, else (with `--tiny` or `--demo`) a random tiny
model seeded by `--model-seed`. `--lora ADAPTER[:SCALE]` (repeatable; our adapter file or diffusers' SD3 LoRA file)
is merged into its weights as it loads, exactly as `tools/convert.py --lora` merges it into a checkpoint.
SD3/SD3.5 checkpoints run in image mode (`--frames 1`). Noise is drawn in numpy from `--seed` + prompt index, so both
backends and any batch size give the same video for the same weights; `--noise torch` draws it as the official
ContentV demo does (a torch CPU generator seeded with `--seed`, all prompts at once, in `--dtype`).

`--seeds N` samples a prompt suite (contentv_common.prompt_suite): every prompt x seed index 0..N-1 as
`OUT/{prompt}-{index}.mp4` (VBench's naming), index i drawn from seed `--seed + i` whatever the prompt, batch or
process, so each video is the one `--prompt PROMPT --seed SEED+i` gives. Several processes (JAX: jax.distributed as
in training, e.g. tools/launch_local.py; torch: torchrun) each sample a fixed disjoint share; files already there
are skipped, so a killed suite resumes where it stopped.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import get_args

import numpy as np

from contentv_common.backend import Backend, get
from contentv_common.checkpoint.formats import detect_format, open_checkpoint, write_torch
from contentv_common.checkpoint.hub import pipeline_folder, transformer_folder
from contentv_common.cli import run_cli
from contentv_common.config.model import ModelConfig, named_model_config
from contentv_common.config.recipe import AttentionChoice
from contentv_common.dtypes import COMPUTE_DTYPES
from contentv_common.errors import ConfigError
from contentv_common.lora.adapters import Lora, open_lora, parse_lora_spec
from contentv_common.model.flops import image_tokens
from contentv_common.prompt_suite import Pair, SamplingGroups, pending, sample_suite, share, suite_pairs
from contentv_common.sample_mesh import SampleMesh, check_sample_mesh, parse_mesh
from contentv_common.sampling import (
    SHIFT,
    ClipSettings,
    SchedulerSettings,
    latent_shape,
    read_scheduler_settings,
    sample_clips,
    uses_guidance,
)
from contentv_common.text.sd3_prompt import check_text_widths, read_text_configs
from contentv_common.tiny_models import random_weights
from contentv_common.vae.chunks import Tiling


def pipeline_scheduler(pipeline: Path | None) -> SchedulerSettings:
    """The pipeline's scheduler/scheduler_config.json settings (SD3.5: shift 3.0), else shift SHIFT; fields that would
    select a schedule not implemented here raise ConfigError naming the field."""
    path = None if pipeline is None else pipeline / "scheduler" / "scheduler_config.json"
    if path is None or not path.exists():
        return SchedulerSettings(shift=SHIFT)
    return read_scheduler_settings(path)


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--size must be HEIGHTxWIDTH in pixels (e.g. 432x768), got {text!r}")
    return int(match[1]), int(match[2])


def register_format(path: Path) -> None:
    """The JAX format's reader is contentv_jax's own: importing it registers it (the header reads need no more)."""
    if detect_format(path) == "jax":
        import contentv_jax  # noqa: F401


def open_loras(specs: list[tuple[Path, float]], path: Path) -> list[Lora]:
    """The adapters of `--lora`, read and checked against the checkpoint's keys and shapes (headers only)."""
    if not specs:
        return []
    register_format(path)
    shapes = open_checkpoint(path).shapes
    return [open_lora(adapter, scale, shapes) for adapter, scale in specs]


def random_tiny_checkpoint(folder: Path, seed: int, backend: str = "jax") -> Path:
    """A seeded random tiny transformer drawn in numpy (contentv_common.tiny_models) in our torch format: the very
    same weights whichever backend draws them and loads them."""
    cfg = named_model_config("tiny")
    weights = random_weights(get(backend).transformer_shapes(cfg), seed)
    return write_torch(folder / "transformer", cfg, iter(weights.items()))


def build_encoders(backend: Backend, args: argparse.Namespace):
    """The backend's encoders (`--tiny`, `--demo` or `--pipeline`), the same numpy interface in both."""
    name = "tiny" if args.tiny else "demo" if args.demo else args.pipeline
    return backend.encoders(name, args.encoder_seed, args.dtype, args.device, args.cache_dir)


def latent_decoder(
    encoders, pipeline: Path | None, device: str, tiling: Tiling | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """Normalised latents -> uint8 frames through the encoders' own VAE (`tiling`: in spatial tiles, JAX: spread over
    this process's devices); SD3's 2D image VAE (an image pipeline, for which the JAX encoders hold no VAE) exists in
    torch only, so there it decodes in torch."""
    if encoders.vae is not None:
        return partial(encoders.decode_latents, tiling=tiling)
    from contentv_torch_npu.device import resolve_device
    from contentv_torch_npu.encoders import decode_latents, load_pipeline_vae

    assert pipeline is not None  # tiny and demo encoders hold their VAE
    return partial(decode_latents, load_pipeline_vae(pipeline / "vae", resolve_device(device)))


def transformer_config(path: Path) -> ModelConfig:
    """The checkpoint's ModelConfig, from its config file alone."""
    register_format(path)
    return open_checkpoint(path).config


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("models")
    src.add_argument(
        "--pipeline", type=Path, help="diffusers pipeline folder or Hub id (ContentV-8B or SD3.5; a local path wins)"
    )
    src.add_argument("--tiny", action="store_true", help="random tiny encoders (and model, without --transformer)")
    src.add_argument("--demo", action="store_true", help="the CPU demo's encoders: trained tiny VAE + word embeddings")
    src.add_argument(
        "--transformer", type=Path, help="transformer checkpoint folder (diffusers, torch or jax format) or Hub id"
    )
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
    ap.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="a prompt suite: N videos per prompt, OUT/{prompt}-{index}.mp4 from seed --seed + index, spread over "
        "the processes, files already there skipped",
    )
    ap.add_argument("--negative-prompt", default="", help="the unconditional branch of guidance")
    ap.add_argument("--backend", choices=["jax", "torch"], default="jax")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=6.0, help="CFG scale; <= 1 disables guidance")
    ap.add_argument(
        "--shift", type=float, help=f"static flow-match shift (default: the pipeline's scheduler config, else {SHIFT})"
    )
    ap.add_argument("--frames", type=int, default=125, help="1 + 4k frames (1 for image models)")
    ap.add_argument("--size", type=parse_size, default=(432, 768), help="HEIGHTxWIDTH in pixels, multiples of 16")
    ap.add_argument("--seed", type=int, default=0, help="noise seed; prompt i (--seeds: index i) uses seed + i")
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
    ap.add_argument(
        "--mesh",
        type=parse_mesh,
        metavar="data=D,sequence=S,cfg=C",
        help="sample over every device of every process: D prompt groups x S ranks splitting the image tokens "
        "(Ulysses) x C=2 to put the uncond and cond rows on two device groups; default: each process alone on one "
        "device",
    )
    ap.add_argument(
        "--latents-out", type=Path, help="also write the final latents to this .npz: key latents, [prompts, C, F, H, W]"
    )
    ap.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32", help="transformer and text-encoder dtype")
    ap.add_argument("--device", default="auto", help="torch device: auto, npu, cuda, cpu")
    ap.add_argument("--cache-dir", type=Path, help="on-disk text-embedding cache")
    ap.add_argument(
        "--vae-tiling",
        action="store_true",
        help="decode in diffusers' default blended tiles (256 px, stride 192); JAX: one tile per local device at once",
    )
    ap.add_argument("--fps", type=float, default=24.0)
    ap.add_argument("--out", type=Path, default=Path("samples"), help="output folder for the mp4 files")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not args.prompts_file.is_file():
            raise FileNotFoundError(f"--prompts-file {args.prompts_file}: no such file")
        lines = [
            line.strip() for line in args.prompts_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()
        ]
        if not lines:
            raise ConfigError(f"--prompts-file {args.prompts_file}: no prompts in it (empty or blank lines only)")
        prompts += lines
    return prompts


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace, prompts: list[str]) -> list[Pair] | None:
    """Every check that needs no framework, cheap ones first; then Hub ids become their folders in the Hub cache
    (downloaded if need be: the transformer before the pipeline, which then skips its own transformer) and the
    checkpoint's header is read. The suite's pairs with `--seeds`, else None."""
    if not prompts:
        ap.error("give at least one --prompt or a --prompts-file")
    if (args.pipeline is not None) + args.tiny + args.demo != 1:
        ap.error("give exactly one of --pipeline FOLDER|HUB_ID (a diffusers pipeline), --tiny or --demo")
    if args.steps < 1 or args.batch_size < 1:
        ap.error("--steps and --batch-size must be >= 1")
    if args.latents_out is not None and args.seeds is not None:
        ap.error("--latents-out writes the latents of --prompt / --prompts-file runs; a --seeds suite writes videos")
    pairs = None
    if args.seeds is not None:
        try:
            pairs = suite_pairs(prompts, args.seeds)
        except ValueError as e:
            ap.error(str(e))
    try:
        latent_shape(16, args.frames, *args.size)
    except ValueError as e:
        ap.error(str(e))
    if args.transformer is not None:  # before any model loads: a bad checkpoint is one line naming its file
        args.transformer = transformer_folder(args.transformer)
        register_format(args.transformer)
        open_checkpoint(args.transformer)
    if args.pipeline is not None:
        args.pipeline = pipeline_folder(args.pipeline, transformer=args.transformer is None)
        if not args.pipeline.is_dir():
            ap.error(f"--pipeline {args.pipeline}: no such folder")
    return pairs


def join(ap: argparse.ArgumentParser, args: argparse.Namespace, backend: Backend, suite: bool) -> SamplingGroups:
    """Join the processes (before the backend's first framework call) and check what needs the framework; the data
    groups of the suite's shares, seen from this process."""
    try:
        groups = backend.join_sampling(args.device, args.mesh)
    except ValueError as e:
        ap.error(str(e))
    if not groups.together and groups.processes > 1 and not suite:
        ap.error(
            f"{groups.processes} processes would all write the same files: give --seeds N to spread a prompt suite, "
            "or --mesh to sample together"
        )
    try:
        backend.check_attention(args.attention)
    except ValueError as e:
        ap.error(f"--attention: {e}")
    return groups


def agreed(backend: Backend, shares: list[list[Pair]], todo: list[list[Pair]]) -> list[list[Pair]]:
    """Process 0's `todo` on every process of a mesh (each share's pairs left, as a flag per pair)."""
    left = {pair for pairs in todo for pair in pairs}
    flags = backend.broadcast(np.asarray([pair in left for pairs in shares for pair in pairs]))
    it = iter(flags.tolist())
    return [[pair for pair in pairs if next(it)] for pairs in shares]


def check_mesh(ap: argparse.ArgumentParser, args: argparse.Namespace, cfg: ModelConfig) -> None:
    """Exit 2 (one line) unless `--mesh` can sample this video and batch with this model (before any model loads)."""
    if args.mesh is None:
        return
    _, _, f, h, w = latent_shape(cfg.in_channels, args.frames, *args.size)
    try:
        tokens = image_tokens(cfg, f, h, w)
        check_sample_mesh(args.mesh, tokens, cfg.num_attention_heads, uses_guidance(args.guidance), args.batch_size)
    except ValueError as e:
        ap.error(str(e))


def report_suite(
    args: argparse.Namespace, pairs: list[Pair], groups: SamplingGroups, written: list[Path], skipped: int
) -> list[Path]:
    """Print what this process did of the suite; the files it wrote."""
    who = f"process {groups.process} of {groups.processes}"
    if groups.together:
        who += f" (data groups {groups.written} of {len(groups.owners)})"
    print(
        f"suite {args.out}: {who} wrote {len(written)}, skipped {skipped} already there (its share: "
        f"{len(written) + skipped} of {len(pairs)} videos = {len(pairs) // args.seeds} prompts x {args.seeds})"
    )
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    """Sample what the arguments ask for; the files this process wrote."""
    return run(argv)[0]


def run(argv: list[str] | None = None) -> tuple[list[Path], SamplingGroups]:
    """main's work; also the processes' data groups (which process this is: a suite's caller waits on the others)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    prompts = read_prompts(args)
    pairs = check_args(ap, args, prompts)
    backend = get(args.backend)
    groups = join(ap, args, backend, pairs is not None)
    mesh = args.mesh or SampleMesh()
    shares: list[list[Pair]] = []
    todo: list[list[Pair]] = []
    skipped = 0
    if pairs is not None:  # a mesh denoises every group's pairs together: every process checks every share's files
        shares = [share(pairs, g, len(groups.owners)) for g in groups.sampled]
        todo = [pending(mine, args.out) for mine in shares]
        if groups.together:  # one program over all processes: they must agree on the pairs left (process 0's view)
            todo = agreed(backend, shares, todo)
        done = zip(groups.sampled, shares, todo, strict=True)
        skipped = sum(len(mine) - len(left) for g, mine, left in done if g in groups.written)
        if not any(todo):  # a finished share loads no model
            return report_suite(args, pairs, groups, [], skipped), groups
    with tempfile.TemporaryDirectory() as tmp:
        path = args.transformer
        if path is None and args.pipeline is not None:
            path = args.pipeline / "transformer"
        elif path is None:
            path = random_tiny_checkpoint(Path(tmp), args.model_seed, args.backend)
        loras = open_loras(args.lora, path)  # before anything loads: a bad adapter is one line naming its file
        check_mesh(ap, args, transformer_config(path))
        if args.pipeline is not None:  # widths from the config files, before any weight is read
            cfg = transformer_config(path)
            widths = (cfg.joint_attention_dim, cfg.pooled_projection_dim)
            check_text_widths(read_text_configs(args.pipeline), args.pipeline, *widths)
        encoders = build_encoders(backend, args)
        model = backend.load_transformer(path, args.dtype, args.device, args.attention, mesh)
        if loras:
            backend.merge_loras(model, loras)
        decode = latent_decoder(encoders, args.pipeline, args.device, Tiling() if args.vae_tiling else None)
    cfg = model.cfg
    if (cfg.joint_attention_dim, cfg.pooled_projection_dim) != (encoders.text_dim, encoders.pooled_dim):
        ap.error(
            f"transformer expects text {cfg.joint_attention_dim} / pooled {cfg.pooled_projection_dim} wide, the "
            f"encoders give {encoders.text_dim} / {encoders.pooled_dim}"
        )
    if cfg.pos_embed == "sd3_2d" and args.frames != 1:
        ap.error(f"{path} is an image model (SD3 position table): use --frames 1")
    if cfg.pos_embed == "sd3_2d" and args.vae_tiling:
        ap.error("--vae-tiling: an SD3 image pipeline's 2D VAE decodes whole")
    try:
        schedule = pipeline_scheduler(args.pipeline)
    except ConfigError as e:
        ap.error(str(e))
    try:
        latent_shape(cfg.in_channels, args.frames, *args.size)
    except ValueError as e:
        ap.error(str(e))
    settings = ClipSettings(
        frames=args.frames,
        height=args.size[0],
        width=args.size[1],
        steps=args.steps,
        guidance=args.guidance,
        shift=args.shift if args.shift is not None else schedule.shift,
        shift_terminal=schedule.shift_terminal,
        seed=args.seed,
        noise=args.noise,
        dtype=args.dtype,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
        fps=args.fps,
    )
    progress = not args.no_progress
    if pairs is None:
        writer = groups.process == 0
        clips = sample_clips(
            backend, model, encoders, decode, prompts, args.out, settings, progress, mesh, writer, args.latents_out
        )
        return clips, groups
    write = (lambda g: groups.owners[g] == groups.process) if groups.together else (lambda g: True)
    written = sample_suite(backend, model, encoders, decode, todo, args.out, settings, progress, skipped, mesh, write)
    return report_suite(args, pairs, groups, written, skipped), groups


def cli(argv: list[str] | None = None) -> int:
    main(argv)
    return 0


def entry() -> None:
    """The `contentv-sample` command."""
    run_cli(cli)


if __name__ == "__main__":
    entry()
