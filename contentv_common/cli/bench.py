"""Benchmark the transformer's training step and sampling step: our JAX model, our torch twin, diffusers' SD3 reference.

    python tools/bench.py --mode train --tokens 8192,33093 --blocks 4           # ContentV-8B width, 4 blocks
    python tools/bench.py --mode sample --tokens 41805 --cfg-batch              # all 38 blocks, CFG batch of 2
    python tools/bench.py --tiny --mode train,sample --out /tmp/bench.json      # CPU smoke run

Every (backend, mode, token count) runs in its own subprocess, so each peak-memory figure is its own and JAX's GPU
preallocation never starves torch. A step is timed after `--warmup` calls (compilation included there), each call
device-synchronised (JAX: block_until_ready; torch: contentv_torch_npu.device.synchronize); the table shows medians.
Model FLOPs come from contentv_common/model/flops.py (training = 3x forward, recompute not counted); MFU divides
TFLOP/s by a matmul peak measured in the same run: bf16 8192^3 on an accelerator, fp32 1024^3 on the CPU (labelled as
such). The floor of a step is its linear FLOPs at that matmul peak plus its attention FLOPs at the rate of torch SDPA
alone on the same tokens, also measured in the run; `/floor` is step time over floor. The JAX model's own attention
kernel (cuDNN on GPU, with its padding) is timed alone too (`jax_attention` in the JSON), so a JAX gap can be told from
its kernel.

Training times the trainers' own step, as a run compiles and calls it: JAX `contentv_jax.train.Trainer`'s jitted step
(state donated) on a state from `init_state`, torch `contentv_torch_npu.train.train_step` on `build_model`'s model, on
a one-bucket recipe with the recipe defaults (fp32 master weights, `--dtype` compute, weighted velocity MSE, gradient
norm, clipping and the divergence guard's check, AdamW). Sampling: weights in `--dtype`, one forward (batch 2 with
--cfg-batch). The diffusers reference runs the same video tokens as a
1-frame image whose patch grid has the same token count, with SDPA attention.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from contentv_common.cli import run_cli
from contentv_common.config.model import ModelConfig, named_model_config
from contentv_common.config.recipe import AttentionChoice, BucketConfig, CheckpointConfig, DataConfig, Recipe, Remat
from contentv_common.dtypes import COMPUTE_DTYPES
from contentv_common.model.flops import image_tokens, transformer_flops
from contentv_common.sampling import VAE_SPACE_FACTOR, VAE_TIME_FACTOR

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("jax", "torch", "diffusers")
MODES = ("train", "sample")
# Patch grids (rows, cols) of real ContentV frame sizes: 256x448, 480x832, 432x768, 720x1280 pixels (16 px a token).
GRIDS = ((16, 28), (30, 52), (27, 48), (45, 80))
TINY_GRIDS = ((2, 4), (4, 4), (4, 8))
DEFAULT_TOKENS = (4096, 8192, 16384, 33093, 41805)
TINY_TOKENS = (40,)
FLOP_FORMULA = (
    "per block and forward: 24*d^2*N (q/k/v/out + MLP of both streams) + 4*N^2*d (attention), N = image + text "
    "tokens; plus adaLN, embedders and final layer counted exactly (contentv_common/model/flops.py); training = 3x "
    "forward, "
    "recompute not counted"
)


@dataclass(frozen=True)
class Case:
    """One measurement, passed to its worker subprocess as JSON."""

    backend: str  # jax | torch | diffusers | peak
    mode: Literal["train", "sample"]
    model: str
    blocks: int
    frames: int
    height: int  # latent pixels
    width: int
    text_tokens: int
    batch: int
    dtype: Literal["float32", "bfloat16"]
    warmup: int
    repeats: int
    attention: AttentionChoice | None = None  # JAX: auto, xla, cudnn or splash (contentv_jax.ops.resolve_attention)
    remat: Remat = "none"
    compile: bool = False  # torch.compile (torch twin and reference)
    pad_to: int = 0  # JAX: pad the joint sequence to a multiple of this, masking the padding (0 = off)

    def config(self) -> ModelConfig:
        return named_model_config(self.model).replace(num_layers=self.blocks)

    def latent_shape(self) -> tuple[int, int, int, int, int]:
        cfg = self.config()
        return (self.batch, cfg.in_channels, self.frames, self.height, self.width)


def latent_for_tokens(target: int, text_tokens: int, grids: tuple[tuple[int, int], ...], patch: int) -> tuple[int, ...]:
    """(frames, height, width) of a latent whose video + text tokens are nearest `target` (ties: the larger frame)."""
    if target <= text_tokens:
        raise ValueError(f"--tokens {target} must exceed the {text_tokens} text tokens")
    best: tuple[tuple[int, int], tuple[int, int, int]] | None = None
    for rows, cols in grids:
        per_frame = rows * cols
        for frames in {max(1, (target - text_tokens) // per_frame), (target - text_tokens) // per_frame + 1}:
            miss = abs(frames * per_frame + text_tokens - target)
            key = (miss, -per_frame)
            if best is None or key < best[0]:
                best = (key, (frames, rows * patch, cols * patch))
    assert best is not None  # grids is never empty
    return best[1]


def image_grid(tokens: int) -> tuple[int, int]:
    """The most nearly square (rows, cols) patch grid with exactly `tokens` patches (the reference's 1-frame image)."""
    rows = max(r for r in range(1, math.isqrt(tokens) + 1) if tokens % r == 0)
    return rows, tokens // rows


def _inputs(case: Case) -> dict[str, np.ndarray]:
    cfg, rng = case.config(), np.random.default_rng(0)
    b = case.batch
    return {
        "hidden_states": rng.standard_normal(case.latent_shape(), dtype=np.float32),
        "timestep": rng.uniform(0, 1000, b).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((b, case.text_tokens, cfg.joint_attention_dim), dtype=np.float32),
        "pooled_projections": rng.standard_normal((b, cfg.pooled_projection_dim), dtype=np.float32),
        "target": rng.standard_normal(case.latent_shape(), dtype=np.float32),
    }


def train_recipe(case: Case) -> Recipe:
    """The one-bucket recipe whose training step a train case times: the case's model, dtype, kernel and remat on one
    device, the recipe defaults otherwise (AdamW, gradient clipping; nothing is read or written)."""
    frames = 1 + VAE_TIME_FACTOR * (case.frames - 1)
    bucket = BucketConfig(case.width * VAE_SPACE_FACTOR, case.height * VAE_SPACE_FACTOR, frames, case.batch)
    return Recipe(
        model=case.config(),
        data=DataConfig(manifest="-", cache_dir="-", buckets=(bucket,)),
        checkpoint=CheckpointConfig(dir="-"),
        steps=case.warmup + case.repeats,
        compute_dtype=case.dtype,
        attention=case.attention or "auto",
        remat=case.remat,
    )


def train_batch(case: Case) -> dict[str, np.ndarray]:
    """A training step's inputs as the trainers take them: clean latents, noise, noise levels, weights, text."""
    data = _inputs(case)
    return {
        "latents": data["hidden_states"],
        "noise": data["target"],
        "sigmas": data["timestep"] / 1000.0,
        "weights": np.ones(case.batch, np.float32),
        "text": data["encoder_hidden_states"],
        "pooled": data["pooled_projections"],
    }


def time_calls(call: Callable[[], Any], sync: Callable[[Any], None], warmup: int, repeats: int) -> list[float]:
    """Seconds per call after `warmup` calls; each call waits for the device before the clock stops."""
    for _ in range(warmup):
        sync(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - start)
    return times


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# --- JAX -------------------------------------------------------------------------------------------------------------


def jax_attention_impl(case: Case) -> str:
    """The kernel `case.attention` means here: `auto` is cuDNN flash on GPU, splash on TPU, XLA on CPU."""
    import jax

    from contentv_jax.ops import resolve_attention

    return resolve_attention(case.attention or "auto", jax.default_backend())


def jax_model_attention(case: Case):
    """The attention module the JAX model runs for a case (resolved kernel and padding)."""
    from contentv_jax.ops import Attention

    return Attention(jax_attention_impl(case), pad_multiple=case.pad_to or None)


def jax_model(case: Case):
    """Our JAX transformer of a sampling case: weights in the compute dtype, attention kernel, padding, remat."""
    import jax.numpy as jnp
    from flax import nnx

    from contentv_jax.transformer import Transformer

    compute = jnp.dtype(case.dtype)
    return Transformer(
        case.config(),
        rngs=nnx.Rngs(0),
        dtype=compute,
        param_dtype=compute,
        attention=jax_model_attention(case),
        remat=case.remat,
    )


def run_jax(case: Case) -> dict[str, Any]:
    """Training: `contentv_jax.train.Trainer`'s jitted step (state donated) on a state from `init_state`, exactly as
    a run compiles it. Sampling: one forward of the model."""
    import jax

    if case.mode == "train":
        from contentv_jax.train import Trainer, default_mesh

        recipe = train_recipe(case)
        trainer = Trainer(recipe, default_mesh(recipe), pad_multiple=case.pad_to or None)
        batch = trainer.device_batch(train_batch(case))
        state = {"state": trainer.init_state()}
        step: Any = trainer.jitted_step(state["state"], batch)  # a jax.jit function
        compiled = step.lower(state["state"], batch).compile()

        def call():
            state["state"], metrics = compiled(state["state"], batch)
            return metrics["loss"]

    else:
        import jax.numpy as jnp
        from flax import nnx

        graphdef, params, *rest = nnx.split(jax_model(case), nnx.Param, ...)
        data = {k: jnp.asarray(v) for k, v in _inputs(case).items()}
        args = tuple(data[k] for k in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"))
        compiled = jax.jit(lambda params, args: nnx.merge(graphdef, params, *rest)(*args)).lower(params, args).compile()

        def call():
            return compiled(params, args)

    times = time_calls(call, jax.block_until_ready, case.warmup, case.repeats)
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak, source = stats["peak_bytes_in_use"], "measured"
    else:  # the CPU client keeps no allocator statistics: XLA's own size of the step instead
        m = compiled.memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        source = "xla-estimate"
    name = cpu_name() if device.platform == "cpu" else device.device_kind
    return {
        "step_s": times,
        "peak_memory_bytes": int(peak),
        "peak_memory_source": source,
        "device": name,
        "attention": jax_attention_impl(case),
    }


# --- torch (our twin and the diffusers reference) --------------------------------------------------------------------


def run_torch(case: Case) -> dict[str, Any]:
    """Our twin: training times `contentv_torch_npu.train.train_step` on the model `build_model` gives a run (fp32
    masters, `--dtype` autocast inside), with the run's AdamW; sampling one forward. The diffusers reference: its own
    forward (autocast to `--dtype` when training fp32 masters), MSE on the velocity and torch's AdamW."""
    from contentv_torch_npu import device as device_mod

    dev = device_mod.resolve_device("auto")
    if case.backend == "torch" and case.mode == "train":
        call = _twin_train_step(case, dev)
    else:
        call = _forward_call(case, dev)
    runtime = device_mod.accelerator(dev)
    if runtime is not None:
        runtime.reset_peak_memory_stats(dev)
    times = time_calls(call, lambda _: device_mod.synchronize(dev), case.warmup, case.repeats)
    if runtime is None:
        peak, source, name = None, None, cpu_name()
    else:
        peak, source, name = int(runtime.max_memory_allocated(dev)), "measured", runtime.get_device_name(dev)
    return {"step_s": times, "peak_memory_bytes": peak, "peak_memory_source": source, "device": name}


def _twin_train_step(case: Case, dev) -> Callable[[], Any]:
    """The torch twin's training step as a run takes it (contentv_torch_npu.train), on one device."""
    import torch

    from contentv_torch_npu.distributed import Topology
    from contentv_torch_npu.optim import make_optimizer
    from contentv_torch_npu.train import StepInputs, build_model, train_step

    recipe = train_recipe(case)
    model = build_model(recipe, Topology(device=dev)).train()
    optimizer = make_optimizer(model, recipe.optimizer)
    inputs = StepInputs(**{k: torch.from_numpy(v).to(dev) for k, v in train_batch(case).items()})
    run: Any = torch.compile(model) if case.compile else model
    lr, clip = recipe.optimizer.lr, recipe.optimizer.grad_clip
    return lambda: train_step(run, optimizer, inputs, lr=lr, grad_clip=clip)[0]


def _forward_call(case: Case, dev) -> Callable[[], Any]:
    """Sampling (both) and the diffusers reference's training step."""
    import torch
    import torch.nn.functional as F

    compute = getattr(torch, case.dtype)
    train = case.mode == "train"
    param_dtype = torch.float32 if train else compute
    cfg = case.config()
    data = {k: torch.from_numpy(v).to(dev) for k, v in _inputs(case).items()}
    x = data["hidden_states"]
    if case.backend == "torch":
        from contentv_torch_npu.transformer import Transformer

        with dev:
            model = Transformer(cfg, compute_dtype=compute)
        autocast: Callable[[], Any] = contextlib.nullcontext  # the twin autocasts itself
    else:
        from contentv_torch_npu.reference import build_diffusers

        rows, cols = image_grid(image_tokens(cfg, case.frames, case.height, case.width))
        with dev:
            model = build_diffusers(cfg.replace(pos_embed_max_size=max(rows, cols)))
        x = x.reshape(  # the same latent values laid out as one image with as many patches
            case.batch, cfg.in_channels, rows * cfg.patch_size, cols * cfg.patch_size
        )
        autocast = (
            partial(torch.autocast, dev.type, dtype=compute) if param_dtype != compute else contextlib.nullcontext
        )
    model = model.to(device=dev, dtype=param_dtype).train(train)
    target = data["target"].reshape(x.shape)
    run = torch.compile(model) if case.compile else model

    def forward():
        with autocast():
            if case.backend == "torch":
                return run(
                    x, data["timestep"], data["encoder_hidden_states"], data["pooled_projections"].to(param_dtype)
                )
            return run(
                x.to(param_dtype),
                data["encoder_hidden_states"].to(param_dtype),
                data["pooled_projections"].to(param_dtype),
                data["timestep"],
                return_dict=False,
            )[0]

    if train:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def call():
            loss = F.mse_loss(forward().float(), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

    else:

        def call():
            with torch.inference_mode():
                return forward()

    return call


def run_peak(case: Case) -> dict[str, Any]:
    """Matmul throughput: bf16 8192^3 on an accelerator, fp32 1024^3 on the CPU (not a bf16 peak there)."""
    import torch

    from contentv_torch_npu import device as device_mod

    dev = device_mod.resolve_device("auto")
    n, dtype = (1024, torch.float32) if dev.type == "cpu" else (8192, torch.bfloat16)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(dev, dtype) for _ in range(2))
    times = time_calls(lambda: a @ b, lambda _: device_mod.synchronize(dev), case.warmup, case.repeats)
    runtime = device_mod.accelerator(dev)
    name = cpu_name() if runtime is None else runtime.get_device_name(dev)
    what = f"{str(dtype).removeprefix('torch.')} matmul {n}^3" + (
        " (CPU, fp32: not a bf16 peak)" if runtime is None else ""
    )
    tflops = 2 * n**3 / statistics.median(times) / 1e12
    return {"step_s": times, "what": what, "tflops": tflops, "device": name}


def run_attention(case: Case) -> dict[str, Any]:
    """The joint attention alone (torch SDPA, [B, heads, N, d], `--dtype`): its rate sets the step's floor.

    Training times forward + backward and counts it as 3x the forward FLOPs, as the model count does.
    """
    import torch
    import torch.nn.functional as F

    from contentv_torch_npu import device as device_mod

    dev = device_mod.resolve_device("auto")
    cfg = case.config()
    n = image_tokens(cfg, case.frames, case.height, case.width) + case.text_tokens
    shape = (case.batch, cfg.num_attention_heads, n, cfg.attention_head_dim)
    gen = torch.Generator(device="cpu").manual_seed(0)
    train = case.mode == "train"
    q, k, v = (
        torch.randn(shape, generator=gen).to(dev, getattr(torch, case.dtype)).requires_grad_(train) for _ in "qkv"
    )

    def call():
        if not train:
            with torch.inference_mode():
                return F.scaled_dot_product_attention(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v)
        out.backward(out)
        return out

    times = time_calls(call, lambda _: device_mod.synchronize(dev), case.warmup, case.repeats)
    flops = 4.0 * case.batch * n * n * cfg.hidden_size * (3 if train else 1)
    return {"step_s": times, "tflops": flops / statistics.median(times) / 1e12}


def run_jax_attention(case: Case) -> dict[str, Any]:
    """The JAX model's attention kernel alone (`contentv_jax.ops.Attention` as the model resolves it, with its
    padding), [B, N, heads, d] in `--dtype`: the rate behind the JAX rows, beside torch SDPA's."""
    import jax
    import jax.numpy as jnp

    cfg = case.config()
    n = image_tokens(cfg, case.frames, case.height, case.width) + case.text_tokens
    shape = (case.batch, n, cfg.num_attention_heads, cfg.attention_head_dim)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, shape, jnp.dtype(case.dtype)) for key in keys)
    local = jax_model_attention(case).local
    if case.mode == "train":

        def fwd_bwd(q, k, v):
            out, vjp = jax.vjp(local, q, k, v)
            return vjp(out)

        compiled = jax.jit(fwd_bwd).lower(q, k, v).compile()
    else:
        compiled = jax.jit(local).lower(q, k, v).compile()
    times = time_calls(lambda: compiled(q, k, v), jax.block_until_ready, case.warmup, case.repeats)
    flops = 4.0 * case.batch * n * n * cfg.hidden_size * (3 if case.mode == "train" else 1)
    return {"step_s": times, "tflops": flops / statistics.median(times) / 1e12, "kernel": jax_attention_impl(case)}


@dataclass(frozen=True)
class Runner:
    """What `run_case` times for a `Case.backend`, and which options apply to it. `jax_options`: a JAX step, which
    takes --attention, --remat and --pad-to, reports the kernel "auto" chose and gets its attention kernel timed alone
    as well; the others take --compile."""

    run: Callable[[Case], dict[str, Any]]
    jax_options: bool = False


RUNNERS = {
    "jax": Runner(run_jax, jax_options=True),
    "torch": Runner(run_torch),
    "diffusers": Runner(run_torch),
    "peak": Runner(run_peak),
    "attention": Runner(run_attention),
    "jax_attention": Runner(run_jax_attention),
}


def run_case(case: Case, timeout: float, in_process: bool = False) -> dict[str, Any]:
    """Run one case in a fresh Python process; errors (OOM, unsupported kernel) become a result with the message.

    `in_process` runs it here instead (CPU smoke runs; on a GPU JAX's preallocation would starve torch).
    """
    if in_process:
        try:
            return {"status": "ok", **RUNNERS[case.backend].run(case)}
        except Exception as e:  # the same contract as a failed subprocess: report and go on
            return {"status": "error", "error": f"{type(e).__name__}: {e}"}
    with tempfile.TemporaryDirectory() as tmp:
        case_file, out_file = Path(tmp, "case.json"), Path(tmp, "result.json")
        case_file.write_text(json.dumps(asdict(case)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", __spec__.name, "--worker", str(case_file), "--worker-out", str(out_file)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out_file.exists():
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return {"status": "error", "error": " | ".join(lines[-3:]) or f"exit status {proc.returncode}"}
        return {"status": "ok", **json.loads(out_file.read_text())}


def worker(case_file: Path, out_file: Path) -> None:
    case = Case(**json.loads(case_file.read_text()))
    result = RUNNERS[case.backend].run(case)
    tmp = out_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out_file)


# --- the run ---------------------------------------------------------------------------------------------------------


def summarise(
    case: Case, result: dict[str, Any], peak_tflops: float | None, attention_tflops: float | None
) -> dict[str, Any]:
    """One JSON row: the case, its median step time, model TFLOP/s, MFU and the floor.

    The floor is the step at the measured rates: linear FLOPs at the matmul peak plus attention FLOPs at the
    attention rate measured for the same tokens (`vs_floor` = step / floor; 1.0 would be perfect).
    """
    cfg = case.config()
    video = image_tokens(cfg, case.frames, case.height, case.width)
    count = transformer_flops(cfg, video, case.text_tokens, case.batch)
    flops = count.step(case.mode)
    scale = flops / count.forward
    floor = None
    if peak_tflops and attention_tflops:
        floor = scale * (count.linear / peak_tflops + count.attention / attention_tflops) / 1e12
    row = {
        "backend": case.backend,
        "mode": case.mode,
        "status": result["status"],
        "model": case.model,
        "blocks": case.blocks,
        "batch": case.batch,
        "dtype": case.dtype,
        "latent_shape": list(case.latent_shape()),
        "image_tokens": video,
        "text_tokens": case.text_tokens,
        "tokens": video + case.text_tokens,
        "options": {"attention": case.attention, "remat": case.remat, "compile": case.compile, "pad_to": case.pad_to},
        "flops_per_step": flops,
        "step_s_median": None,
        "step_s": None,
        "tflops": None,
        "mfu": None,
        "attention_tflops": attention_tflops,
        "floor_s": floor,
        "vs_floor": None,
        "peak_memory_bytes": None,
        "peak_memory_source": None,
        "device": None,
        "error": result.get("error"),
    }
    jax_options = RUNNERS[case.backend].jax_options
    if not jax_options:
        row["options"] = {"compile": case.compile}
    if result["status"] == "ok":
        median = statistics.median(result["step_s"])
        tflops = flops / median / 1e12
        row.update(
            step_s_median=median,
            step_s=result["step_s"],
            tflops=tflops,
            mfu=tflops / peak_tflops if peak_tflops else None,
            vs_floor=median / floor if floor else None,
            peak_memory_bytes=result["peak_memory_bytes"],
            peak_memory_source=result["peak_memory_source"],
            device=result["device"],
        )
        if jax_options:
            row["options"]["attention"] = result["attention"]  # what "auto" resolved to
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table; `vs ref` is the diffusers reference's step time over this row's (higher is faster)."""
    ref = {(r["mode"], r["tokens"]): r["step_s_median"] for r in rows if r["backend"] == "diffusers"}
    head: tuple[str, ...] = (
        "backend",
        "mode",
        "blocks",
        "tokens",
        "latent",
        "step ms",
        "TFLOP/s",
        "MFU",
        "vs ref",
        "/floor",
    )
    head += ("peak GiB", "options")
    lines = []
    for r in rows:
        t, base = r["step_s_median"], ref.get((r["mode"], r["tokens"]))
        opts = ",".join(f"{k}={v}" for k, v in r["options"].items() if v not in (None, False, 0, "none"))
        mem = r["peak_memory_bytes"]
        lines.append(
            (
                r["backend"],
                r["mode"],
                str(r["blocks"]),
                str(r["tokens"]),
                "x".join(map(str, r["latent_shape"])),
                f"{t * 1e3:.1f}" if t else r["status"],
                f"{r['tflops']:.3g}" if r["tflops"] else "-",
                f"{r['mfu']:.1%}" if r["mfu"] else "-",
                f"{base / t:.2f}x" if t and base else "-",
                f"{r['vs_floor']:.2f}" if r["vs_floor"] else "-",
                f"{mem / 2**30:.3g}" + ("*" if r["peak_memory_source"] == "xla-estimate" else "") if mem else "-",
                opts or "-",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    legend = "* XLA's compiled size of the step (no allocator statistics on this device)"
    table = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines]
    return "\n".join(table + ([legend] if any(r["peak_memory_source"] == "xla-estimate" for r in rows) else []))


def build_cases(args: argparse.Namespace) -> list[Case]:
    model = "tiny" if args.tiny else args.model
    cfg = named_model_config(model)
    grids = TINY_GRIDS if args.tiny else GRIDS
    text = args.text_tokens if args.text_tokens is not None else (7 if args.tiny else 333)
    tokens = args.tokens or (TINY_TOKENS if args.tiny else DEFAULT_TOKENS)
    cases = []
    for mode in args.mode:
        blocks = args.blocks or (cfg.num_layers if args.tiny or mode == "sample" else 4)
        batch = 2 if mode == "sample" and args.cfg_batch else 1
        for target in tokens:
            frames, height, width = latent_for_tokens(target, text, grids, cfg.patch_size)
            for backend in args.backends:
                jax_options = RUNNERS[backend].jax_options
                cases.append(
                    Case(
                        backend=backend,
                        mode=mode,
                        model=model,
                        blocks=blocks,
                        frames=frames,
                        height=height,
                        width=width,
                        text_tokens=text,
                        batch=batch,
                        dtype=args.dtype,
                        warmup=args.warmup,
                        repeats=args.repeats,
                        attention=args.attention if jax_options else None,
                        remat=args.remat if jax_options else "none",
                        compile=args.compile and not jax_options,
                        pad_to=args.pad_to if jax_options else 0,
                    )
                )
    return cases


def _csv(kind: Callable[[str], Any], allowed: tuple | None = None) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        values = tuple(kind(v) for v in text.split(",") if v)
        bad = [v for v in values if allowed and v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {allowed or kind.__name__}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", type=_csv(str, BACKENDS), default=BACKENDS, help="comma list of jax,torch,diffusers")
    p.add_argument("--mode", type=_csv(str, MODES), default=("train",), help="train, sample or train,sample")
    p.add_argument("--tokens", type=_csv(int), default=None, help="target joint token counts (video + text)")
    p.add_argument("--text-tokens", type=int, default=None, help="text tokens (default 333; 7 with --tiny)")
    p.add_argument("--blocks", type=int, default=None, help="blocks (default: 4 for train, all for sample)")
    p.add_argument("--model", default="contentv-8b", help="model config name or YAML path")
    p.add_argument("--tiny", action="store_true", help="CPU-sized smoke run with configs/model/tiny.yaml")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="bfloat16", help="compute dtype")
    p.add_argument("--cfg-batch", action="store_true", help="sampling: batch the CFG pair (batch 2)")
    p.add_argument(
        "--attention", default="auto", choices=("auto", "xla", "cudnn", "splash"), help="JAX attention kernel"
    )
    p.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_all"), help="JAX remat policy")
    p.add_argument("--pad-to", type=int, default=0, help="JAX: pad the joint sequence to a multiple (e.g. 128)")
    p.add_argument("--compile", action="store_true", help="torch.compile the torch twin and the reference")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--case-timeout", type=float, default=1800.0, help="seconds per case before it is abandoned")
    p.add_argument("--in-process", action="store_true", help="run cases in this process (CPU smoke runs only)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("warmup", "repeats", "blocks", "text_tokens", "pad_to"):
        value = getattr(args, name)
        if value is not None and value < (1 if name in ("repeats", "blocks", "text_tokens") else 0):
            p.error(f"--{name.replace('_', '-')} {value} is out of range")
    if args.tokens is not None and min(args.tokens) < 1:
        p.error(f"--tokens must be positive, got {args.tokens}")
    if not args.worker:
        named_model_config("tiny" if args.tiny else args.model)  # ConfigError naming the model, before any case
        if args.out is not None and (args.out.is_dir() or any(d.is_file() for d in args.out.parents)):
            p.error(f"--out {args.out}: not a writable file path")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.worker_out)
        return 0
    cases = build_cases(args)
    peak_case = replace(cases[0], backend="peak", warmup=5, repeats=20)
    peak = run_case(peak_case, args.case_timeout, args.in_process)
    peak_tflops = peak.get("tflops") if peak["status"] == "ok" else None
    attention: dict[tuple, dict[str, Any]] = {}  # (runner, shape) -> the attention kernel's rate alone

    def attention_rate(runner: str, case: Case) -> float | None:
        key = (runner, case.mode, case.batch, case.frames, case.height, case.width)
        if key not in attention:
            attention_case = replace(case, backend=runner, warmup=max(case.warmup, 1))
            attention[key] = run_case(attention_case, args.case_timeout, args.in_process)
            attention[key].update(mode=case.mode, latent_shape=list(case.latent_shape()))
        return attention[key].get("tflops")

    rows = []
    for i, case in enumerate(cases, 1):
        rate = attention_rate("attention", case)
        if RUNNERS[case.backend].jax_options:
            attention_rate("jax_attention", case)
        print(f"[{i}/{len(cases)}] {case.backend} {case.mode} {case.latent_shape()} ...", file=sys.stderr, flush=True)
        rows.append(summarise(case, run_case(case, args.case_timeout, args.in_process), peak_tflops, rate))
    others = sorted({r["device"] for r in rows if r["device"] and r["device"] != peak.get("device")})
    warnings = [f"MFU is against the peak of {peak.get('device')}, but rows ran on {d}" for d in others]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "tools/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": peak.get("device"),
        "peak": {"what": peak.get("what"), "tflops": peak_tflops, "error": peak.get("error")},
        "flop_formula": FLOP_FORMULA,
        "warnings": warnings,
        "attention": [r for (runner, *_), r in attention.items() if runner == "attention"],
        "jax_attention": [r for (runner, *_), r in attention.items() if runner == "jax_attention"],
        "results": rows,
    }
    peak_text = f"{peak_tflops:.3g} TFLOP/s ({peak['what']})" if peak_tflops else f"failed: {peak.get('error')}"
    print(f"device: {report['device']}\nmatmul peak: {peak_text}\n{format_table(rows)}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(args.out)
    return 0 if peak_tflops and all(r["status"] == "ok" for r in rows) else 1


def entry() -> None:
    """The `contentv-bench` command."""
    run_cli(main)


if __name__ == "__main__":
    entry()
