"""Ahead-of-time memory plan of a recipe's steps (the method of MaxText's train_compile.py): the real train step and
sampling step are lowered with abstract inputs (`jax.ShapeDtypeStruct` carrying the recipe's shardings) on any mesh,
real or not (TPU topologies from libtpu, fake CPU devices), and compiled; XLA's memory analysis gives the bytes per
device. Nothing is allocated, so a 64-chip TPU plan runs on a laptop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import BucketConfig, MeshConfig, Recipe, image_tokens
from contentv_common.demo import DEMO_VAE
from contentv_common.dtypes import DTYPES
from contentv_common.model.flops import text_encoder_flops, transformer_flops, vae_encode_flops
from contentv_common.plan.report import DEFAULT_KINDS, StepPlan, peak_bytes
from contentv_common.sample_mesh import SampleMesh
from contentv_common.sampling import latent_shape
from contentv_common.text.online import TOKEN_KEYS, text_configs
from contentv_common.text.sd3_prompt import T5_MAX_SEQUENCE_LENGTH, TextConfigs
from contentv_common.vae.checkpoint import open_vae_source
from contentv_common.vae.chunks import Tiling, tile_plan
from contentv_common.vae.config import RGB, VAEConfig, tiny_vae_config
from contentv_jax import sharding
from contentv_jax.ops import attention_for
from contentv_jax.sampling import denoise_step
from contentv_jax.sharding import ActivationSharding, make_mesh
from contentv_jax.text_encoders import planned_encode
from contentv_jax.train import Trainer, get_trainer
from contentv_jax.vae import WanVAE, _decode_chunk, _encode_chunk

CLIP_TOKENS = 77  # SD3.5's CLIP tokenizers' model_max_length
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _abstract(shape: tuple[int, ...], dtype: Any, sharding_: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def _bytes_in(message: str, label: str) -> int:
    """'<label> 12.5G' or '<label> (12.5G)' in a compiler out-of-memory message, in bytes (0 when absent)."""
    m = re.search(rf"{label}\W*\(?([\d.]+)([KMGT]?)i?B?\)?", message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0


def argument_bytes(*args: Any) -> int:
    """Bytes of one device's shards of abstract (or real) arguments."""
    leaves = [a for a in jax.tree.leaves(args) if hasattr(a, "sharding") and hasattr(a, "dtype")]
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in leaves)


def program_hash(lowered: jax.stages.Lowered) -> str:
    """sha256 of a lowered step's StableHLO (shapes, shardings, every op; no source locations): two lowerings of one
    program on one mesh compile to the same figures with the same compiler."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def compiler_versions() -> dict[str, str]:
    """What compiles a plan: jax, jaxlib and libtpu (absent: "") versions. A plan's figures are reused only under
    the same ones."""
    versions = {"jax": jax.__version__, "jaxlib": jaxlib.version.__version__}
    try:
        versions["libtpu"] = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        versions["libtpu"] = ""
    return versions


def compile_plan(
    kind: str,
    bucket: str,
    tokens: int,
    batch: int,
    flops: float,
    lower: Callable,
    args: int,
    hbm: int,
    known: Mapping[str, StepPlan] | None = None,
) -> StepPlan:
    """Lower one step and compile it to read its per-device bytes, or take them from `known` (program hash -> plan of
    a fitting step on the same target and compiler) when the lowered program is one of those. When the compiler
    refuses the program for lack of memory (XLA:TPU checks against the chip's own HBM), the plan does not fit: its
    temporaries are the figure the compiler reported and its arguments `args`, the bytes of the inputs' shards."""
    t0 = time.perf_counter()
    program = ""
    try:
        lowered = lower()
        program = program_hash(lowered)
        old = (known or {}).get(program)
        if old is not None:
            again = {"kind": kind, "bucket": bucket, "tokens": tokens, "batch": batch, "flops": flops}
            return dataclasses.replace(old, **again, fits=old.peak_bytes <= hbm, reused=True)
        m = lowered.compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        temp = _bytes_in(str(e), "HLO temporaries")
        peak = max(args + temp, hbm + 1)
        seconds = time.perf_counter() - t0
        return StepPlan(kind, bucket, tokens, batch, args, temp, 0, 0, peak, seconds, flops, False, program)
    compile_s = time.perf_counter() - t0
    arg, temp, out, alias = (
        int(m.argument_size_in_bytes),
        int(m.temp_size_in_bytes),
        int(m.output_size_in_bytes),
        int(m.alias_size_in_bytes),
    )
    peak = peak_bytes(arg, temp, out, alias)
    return StepPlan(kind, bucket, tokens, batch, arg, temp, out, alias, peak, compile_s, flops, peak <= hbm, program)


def reusable(previous: Sequence[dict[str, Any]], device_kind: str) -> dict[str, StepPlan]:
    """The steps of previous plan documents (`tools/plan.py --json`) whose figures a new plan may take for the same
    program: those that fit, compiled for the same kind of chip by the same compiler versions (the program hash holds
    the device count and every sharding, so a one-device step of one plan serves the one-device step of another)."""
    fields = {f.name for f in dataclasses.fields(StepPlan)}
    known = {}
    for doc in previous:
        if (doc.get("device_kind"), doc.get("compiler")) != (device_kind, compiler_versions()):
            continue
        steps = [StepPlan(**{k: v for k, v in s.items() if k in fields}) for s in doc.get("steps", [])]
        known |= {s.program: s for s in steps if s.program and s.fits}
    return known


def _train_batch(trainer: Trainer, b: BucketConfig, text_tokens: int) -> dict[str, Any]:
    """The abstract batch the data loader feeds the train step for bucket `b` (float32, as the cache holds it; online
    text: int32 token ids and the text encoders' parameters instead of text and pooled)."""
    cfg = trainer.recipe.model_config
    latent = latent_shape(cfg.in_channels, b.frames, b.height, b.width, b.batch_size)
    shapes = {
        "latents": latent,
        "noise": latent,
        "sigmas": (b.batch_size,),
        "weights": (b.batch_size,),
        "text": (b.batch_size, text_tokens, cfg.joint_attention_dim),
        "pooled": (b.batch_size, cfg.pooled_projection_dim),
    }
    if trainer.text_graphdef is not None:  # online text: token ids in, the encoders' parameters beside them
        del shapes["text"], shapes["pooled"]
        clip, t5 = text_split(text_tokens)
        ids = dict(zip(TOKEN_KEYS, ((b.batch_size, n) for n in (clip, clip, t5)), strict=True))
        where = sharding.batch_shardings(ids, trainer.mesh)
        tokens: dict[str, Any] = {k: _abstract(s, jnp.int32, where[k]) for k, s in ids.items()}
        shardings = sharding.batch_shardings(shapes, trainer.mesh)
        batch = {k: _abstract(s, jnp.float32, shardings[k]) for k, s in shapes.items()}
        return {**batch, **tokens, "text_encoders": nnx.to_pure_dict(trainer.abstract_text)}
    shardings = sharding.batch_shardings(shapes, trainer.mesh)
    return {k: _abstract(s, jnp.float32, shardings[k]) for k, s in shapes.items()}


def text_split(text_tokens: int) -> tuple[int, int]:
    """(CLIP, T5) token counts of SD3.5's `text_tokens` (77 CLIP, the rest T5)."""
    return CLIP_TOKENS, text_tokens - CLIP_TOKENS


def plan_train(
    trainer: Trainer, b: BucketConfig, text_tokens: int, hbm: int, known: Mapping[str, StepPlan]
) -> StepPlan:
    """The jitted train step of the trainer (state donated) for one bucket; with online text its FLOPs count the text
    encoders' forward too."""
    state, batch = trainer.abstract_state(), _train_batch(trainer, b, text_tokens)
    cfg = trainer.recipe.model_config
    tokens = image_tokens(b, cfg.patch_size)
    flops = transformer_flops(cfg, tokens, text_tokens, b.batch_size).step("train")
    configs = text_configs(trainer.recipe.data.encoders) if trainer.text_graphdef is not None else None
    if configs is not None:
        flops += text_encoder_flops(configs, *text_split(text_tokens), b.batch_size)
    step = trainer.jitted_step(state, batch)
    lower = lambda: step.lower(state, batch)  # noqa: E731
    args = argument_bytes(state, batch)
    return compile_plan("train", b.name, tokens + text_tokens, b.batch_size, flops, lower, args, hbm, known)


def plan_sample(
    trainer: Trainer, b: BucketConfig, text_tokens: int, hbm: int, known: Mapping[str, StepPlan]
) -> StepPlan:
    """One sampler step (the cond/uncond pair batched in one forward, guidance, Euler update) at bucket `b` with one
    prompt per training sample, the weights in the compute dtype, sharded as in training."""
    dtype = DTYPES[trainer.recipe.compute_dtype]
    params = jax.tree.map(lambda a: _abstract(a.shape, dtype, a.sharding), trainer.abstract_state()["params"])
    graphdef, state = nnx.split(trainer.model(params))
    return _plan_denoise(graphdef, state, trainer.recipe.model_config, trainer.mesh, b, text_tokens, hbm, known)


def placed_as_loaded(model: nnx.Module, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """An abstract model (contentv_jax.loading.abstract_transformer) split, each leaf carrying the sharding
    load_transformer gives it on `mesh`."""
    from contentv_jax.loading import model_shardings

    shardings = model_shardings(model, mesh)
    graphdef, state = nnx.split(model)
    flat = [
        (p, v.replace(_abstract(tuple(v.shape), v.dtype, shardings[".".join(map(str, p))])))
        for p, v in nnx.to_flat_state(state)
    ]
    return graphdef, nnx.from_flat_state(flat)


def plan_library_sample(model: nnx.Module, mesh: Mesh, b: BucketConfig, hbm: int, text_tokens: int = 333) -> StepPlan:
    """The sampler step of an abstract model built as users build it (contentv_jax.loading.abstract_transformer,
    load_transformer's model: the library's default attention), its weights placed as load_transformer places them
    on `mesh`; `b.batch_size` prompts, so the forward runs the cond/uncond pair of each."""
    graphdef, state = placed_as_loaded(model, mesh)
    return _plan_denoise(graphdef, state, model.cfg, mesh, b, text_tokens, hbm, {})


def sample_step_inputs(
    cfg: ModelConfig, mesh: Mesh, b: BucketConfig, text_tokens: int, on_mesh: bool = False
) -> list[jax.ShapeDtypeStruct]:
    """Abstract (x, timestep, dt, text, pooled, guidance) of contentv_jax.sampling's guided step: `b.batch_size`
    prompts, their cond/uncond pairs batched, inputs split over the mesh's batch axes; `on_mesh`: placed as the
    sampler places them on a sampling mesh (the latents whole on every device, the pair's rows over `data`)."""
    pair = 2 * b.batch_size
    shapes = {
        "x": latent_shape(cfg.in_channels, b.frames, b.height, b.width, b.batch_size),
        "text": (pair, text_tokens, cfg.joint_attention_dim),
        "pooled": (pair, cfg.pooled_projection_dim),
    }
    whole = NamedSharding(mesh, PartitionSpec())
    if on_mesh:
        sh = {
            "x": whole,
            "text": NamedSharding(mesh, PartitionSpec("data")),
            "pooled": NamedSharding(mesh, PartitionSpec("data")),
        }
    else:
        sh = sharding.batch_shardings(shapes, mesh)
    x, text, pooled = (_abstract(shapes[k], jnp.float32, sh[k]) for k in ("x", "text", "pooled"))
    scalar = _abstract((), jnp.float32, whole)
    return [x, scalar, scalar, text, pooled, scalar]


def _plan_denoise(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cfg: ModelConfig,
    mesh: Mesh,
    b: BucketConfig,
    text_tokens: int,
    hbm: int,
    known: Mapping[str, StepPlan],
    layout: SampleMesh | None = None,
) -> StepPlan:
    """The guided step on `mesh`; with `layout`, as contentv_jax.sampling runs it on a sampling mesh (the latents
    whole on every device, the pair's rows over `data` in the layout's order), else as training's in-loop sampler."""
    inputs = sample_step_inputs(cfg, mesh, b, text_tokens, layout is not None)
    x, _, _, text, pooled, _ = inputs
    tokens, pair = image_tokens(b, cfg.patch_size), 2 * b.batch_size
    flops = transformer_flops(cfg, tokens, text_tokens, pair).step("sample")

    def lower():
        step = denoise_step(graphdef, True) if layout is None else denoise_step(graphdef, True, layout, mesh)
        return step.lower(state, *inputs)

    args = argument_bytes(state, x, text, pooled)
    return compile_plan("sample", b.name, tokens + text_tokens, pair, flops, lower, args, hbm, known)


def plan_text(
    recipe: Recipe, mesh: Mesh, hbm: int, configs: TextConfigs, batch: int, known: Mapping[str, StepPlan]
) -> StepPlan:
    """Encoding `batch` prompts (77 CLIP + 256 T5 tokens) with the recipe's text encoders, weights in the compute
    dtype sharded by contentv_jax.sharding.TEXT_PARAM_AXES (T5 over fsdp and tensor), prompts over data x fsdp."""
    return _text_step(configs, DTYPES[recipe.compute_dtype], mesh, hbm, batch, known)[0]


def _text_step(
    configs: TextConfigs, dtype: Any, mesh: Mesh, hbm: int, batch: int, known: Mapping[str, StepPlan]
) -> tuple[StepPlan, int]:
    """plan_text's step, and the per-device bytes of the encoders' weights."""
    clip, t5 = CLIP_TOKENS, T5_MAX_SEQUENCE_LENGTH
    lowered, args = planned_encode(configs, dtype, mesh, batch, (clip, t5))
    flops = text_encoder_flops(configs, clip, t5, batch)
    lower, arg_bytes = lambda: lowered, argument_bytes(*args)
    plan = compile_plan("text", "prompts", clip + t5, batch, flops, lower, arg_bytes, hbm, known)
    return plan, argument_bytes(args[0])


def vae_config(name: str) -> VAEConfig:
    """The Wan VAE of an `encoders` name: a pipeline folder's `vae/` when the folder is here, else the released
    Wan2.1 one (diffusers' defaults); the tiny or the demo VAE's for "tiny" / "demo"."""
    if name in ("tiny", "demo"):
        return tiny_vae_config() if name == "tiny" else open_vae_source(DEMO_VAE).config
    return open_vae_source(Path(name) / "vae").config if Path(name, "vae").is_dir() else VAEConfig()


def plan_decode(recipe: Recipe, mesh: Mesh, hbm: int, b: BucketConfig, known: Mapping[str, StepPlan]) -> list[StepPlan]:
    """The Wan VAE decode of one clip at bucket `b`, fp32 as the samplers load it: the program of a latent frame
    after the first (it holds the causal history and makes 4 frames; the first makes one), as `WanVAE.decode` runs
    it: "decode", the whole frame on one device (planned on a one-device mesh only: it is the same program whatever
    the mesh); "decode-tiles", one round of diffusers' default tiles (the largest shape), one tile per device of
    `mesh`, the weights replicated. The decoded frames the loop keeps are not counted."""
    cfg = vae_config(recipe.data.encoders)
    devices = list(np.asarray(mesh.devices).reshape(-1))
    kinds = (["decode"] if len(devices) == 1 else []) + ["decode-tiles"]
    return [p for kind in kinds if (p := _decode_step(cfg, devices, kind, hbm, b, known)) is not None]


def _decode_step(
    cfg: VAEConfig, devices: list, kind: str, hbm: int, b: BucketConfig, known: Mapping[str, StepPlan]
) -> StepPlan | None:
    """plan_decode's "decode" or "decode-tiles" step on `devices` (None: tiles asked for a clip that needs none)."""
    s = cfg.spatial_factor
    th, tw = b.height // s, b.width // s
    if kind == "decode-tiles":
        tiles = tile_plan(th, tw, Tiling(), s)
        if tiles is None:
            return None
        th, tw = tiles.rows[0][1] - tiles.rows[0][0], tiles.cols[0][1] - tiles.cols[0][0]
    tile_mesh = Mesh(devices, ("tiles",))
    n = tile_mesh.size
    split = NamedSharding(tile_mesh, PartitionSpec("tiles"))
    whole = NamedSharding(tile_mesh, PartitionSpec())
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
    vae = nnx.merge(graphdef, jax.tree.map(lambda a: _abstract(a.shape, a.dtype, whole), state))
    z = _abstract((n, 1, th, tw, cfg.z_dim), jnp.float32, split)
    _, history = _decode_chunk.eval_shape(vae, z, None)
    history = [_abstract(a.shape, a.dtype, split) for a in history]
    lower = lambda: _decode_chunk.lower(vae, z, history)  # noqa: E731
    args = argument_bytes(nnx.state(vae), z, history)
    return compile_plan(kind, b.name, th * tw, n, 0.0, lower, args, hbm, known)


def plan_encode(recipe: Recipe, mesh: Mesh, hbm: int, b: BucketConfig, known: Mapping[str, StepPlan]) -> StepPlan:
    """The Wan VAE encode of one clip at bucket `b` (the cache builder's), fp32 as the encoders load it, on the first
    device of `mesh`: the program of a chunk after the first (`temporal_factor` frames after the causal history; the
    first chunk is one frame), whole frames. FLOPs: that chunk's (contentv_common.model.flops.vae_encode_flops)."""
    cfg = vae_config(recipe.data.encoders)
    one = Mesh(np.asarray(mesh.devices).reshape(-1)[:1], ("one",))
    whole = NamedSharding(one, PartitionSpec())
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda a: _abstract(a.shape, a.dtype, whole), state)
    t = cfg.temporal_factor
    first = _abstract((1, 1, b.height, b.width, RGB), jnp.float32, whole)
    _, history = _encode_chunk.eval_shape(graphdef, state, first, None)
    history = [_abstract(a.shape, a.dtype, whole) for a in history]
    x = _abstract((1, t, b.height, b.width, RGB), jnp.float32, whole)
    lower = lambda: _encode_chunk.lower(graphdef, state, x, history)  # noqa: E731
    flops = vae_encode_flops(cfg, 1 + t, b.height, b.width) - vae_encode_flops(cfg, 1, b.height, b.width)
    args = argument_bytes(state, x, history)
    tokens = b.height * b.width // cfg.spatial_factor**2  # latent pixels of a frame
    return compile_plan("encode", b.name, tokens, 1, flops, lower, args, hbm, known)


def plan_sample_job(
    cfg: ModelConfig,
    encoders: str,
    b: BucketConfig,
    layout: SampleMesh,
    devices: Sequence[Any],
    hbm: int,
    *,
    dtype: Any = jnp.bfloat16,
    text_tokens: int = 333,
    known: Mapping[str, StepPlan] | None = None,
    on_plan: Callable[[StepPlan], None] | None = None,
) -> tuple[list[StepPlan], dict[str, int]]:
    """`tools/sample.py --mesh LAYOUT --dtype bfloat16` making one video of bucket `b` from one prompt and its
    negative, step by step as it runs: "text", the pair through the encoders (`encoders`: text_configs / vae_config),
    whole on the first device, where sample.py loads them; "sample", one guided step of contentv_jax.sampling on
    the mesh (attention "auto" resolved for the devices, the weights placed as load_sampling_transformer places
    them); "decode", the whole frame on one device, or with more than one device "decode-tiles", one tile per device
    of the first process (sample.py's `--vae-tiling`: process 0 decodes on its local devices). Returns the steps and
    the per-device bytes of the weights sample.py keeps loaded throughout on the first device: "transformer", "text"
    and "vae"."""
    from contentv_jax.loading import abstract_transformer

    known = known or {}
    mesh = make_mesh(layout.config, devices)
    model = abstract_transformer(
        cfg,
        mesh,
        dtype=dtype,
        param_dtype=dtype,
        attention=attention_for("auto", mesh),
        constrain=ActivationSharding(mesh),
    )
    graphdef, state = placed_as_loaded(model, mesh)
    vae = vae_config(encoders)
    vae_state = nnx.state(nnx.eval_shape(lambda: WanVAE(vae, rngs=nnx.Rngs(0))))
    resident = {"transformer": argument_bytes(state), "vae": sum(_nbytes(a) for a in jax.tree.leaves(vae_state))}
    plans = []
    configs = text_configs(encoders)
    if configs is not None:
        first = make_mesh(MeshConfig(), devices[:1])
        plan, resident["text"] = _text_step(configs, dtype, first, hbm, 2, known)
        plans.append(plan)
        if on_plan is not None:
            on_plan(plan)
    plans.append(_plan_denoise(graphdef, state, cfg, mesh, b, text_tokens, hbm, known, layout))
    if on_plan is not None:
        on_plan(plans[-1])
    host = [d for d in devices if d.process_index == devices[0].process_index]
    decode = _decode_step(vae, host, "decode" if len(devices) == 1 else "decode-tiles", hbm, b, known)
    if decode is None:  # a clip within one tile decodes whole
        decode = _decode_step(vae, devices[:1], "decode", hbm, b, known)
    assert decode is not None
    plans.append(decode)
    if on_plan is not None:
        on_plan(decode)
    return plans, resident


def largest_bucket(recipe: Recipe) -> BucketConfig:
    """The bucket with the most tokens per sample (ties: the larger batch)."""
    p = recipe.model_config.patch_size
    return max(recipe.data.buckets, key=lambda b: (image_tokens(b, p), b.batch_size))


def plan_recipe(
    recipe: Recipe,
    mesh: Mesh,
    hbm_bytes: int,
    *,
    kinds: Sequence[str] = DEFAULT_KINDS,
    buckets: Sequence[str] | None = None,
    text_tokens: int = 333,
    on_plan: Callable[[StepPlan], None] | None = None,
    known: Mapping[str, StepPlan] | None = None,
) -> list[StepPlan]:
    """Train step per bucket, then the sampling step at the largest bucket (both limited by `buckets` names), then
    the text encoders on the largest bucket's batch of prompts, then the VAE decode of one clip at that bucket; steps
    whose program is in `known` are not compiled again (compile_plan)."""
    known = known or {}
    trainer = get_trainer(recipe, mesh)
    wanted = [b for b in recipe.data.buckets if buckets is None or b.name in buckets]
    todo: list[tuple[Callable, BucketConfig]] = []
    if "train" in kinds:
        todo += [(plan_train, b) for b in wanted]
    big = largest_bucket(recipe)
    if "sample" in kinds and (buckets is None or big.name in buckets):
        todo.append((plan_sample, big))
    plans = []
    for fn, b in todo:
        plans.append(fn(trainer, b, text_tokens, hbm_bytes, known))
        if on_plan is not None:
            on_plan(plans[-1])
    configs = text_configs(recipe.data.encoders)
    if "text" in kinds and configs is not None:
        plans.append(plan_text(recipe, mesh, hbm_bytes, configs, big.batch_size, known))
        if on_plan is not None:
            on_plan(plans[-1])
    if "encode" in kinds and (buckets is None or big.name in buckets):
        plans.append(plan_encode(recipe, mesh, hbm_bytes, big, known))
        if on_plan is not None:
            on_plan(plans[-1])
    if "decode" in kinds and (buckets is None or big.name in buckets):
        for plan in plan_decode(recipe, mesh, hbm_bytes, big, known):
            plans.append(plan)
            if on_plan is not None:
                on_plan(plan)
    return plans


def state_bytes(recipe: Recipe, mesh: Mesh) -> dict[str, int]:
    """Per-device bytes of the train state a run keeps between steps: params, opt_state (AdamW), ema (when kept), and
    with online text the text encoders' weights."""
    trainer = get_trainer(recipe, mesh)
    state = trainer.abstract_state()
    out = {k: argument_bytes(state[k]) for k in ("params", "opt_state", "ema") if k in state}
    if trainer.text_graphdef is not None:
        out["text_encoders"] = argument_bytes(nnx.to_pure_dict(trainer.abstract_text))
    return out


def replicated_params(recipe: Recipe, mesh: Mesh) -> tuple[list[dict[str, Any]], list[str]]:
    """Parameters left whole on every device (name, shape, bytes; largest first), and the "path: dim not split over
    axis" lines of those a sharding rule asks to split but the mesh axis does not divide."""
    params = get_trainer(recipe, mesh).abstract_state()["params"]
    whole = [
        {"name": ".".join(str(getattr(k, "key", k)) for k in path), "shape": list(a.shape), "bytes": _nbytes(a)}
        for path, a in jax.tree_util.tree_flatten_with_path(params)[0]
        if all(axis is None for axis in a.sharding.spec)
    ]
    return sorted(whole, key=lambda r: -r["bytes"]), sharding.unsplit_params(params, mesh)


def _nbytes(a: jax.ShapeDtypeStruct) -> int:
    return int(np.prod(a.shape)) * a.dtype.itemsize
