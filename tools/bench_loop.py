"""Benchmark the training loop against its step alone: how much the loop adds to the compiled step.

    python tools/bench_loop.py --backend jax                      # the CPU demo (configs/recipes/tiny.yaml)
    python tools/bench_loop.py --backend torch --shape stage      # a narrow model at stage 1's shapes
    python tools/bench_loop.py --backend jax --steps 60 key=value ...

In one process, `--rounds` times: `run` trains the recipe for `--steps` steps (one checkpoint, at the end) and the
records' `step_time` after `--warmup` steps give the loop's time per step; then the same step program (JAX: the same
compiled function; torch: `train_step` with the loop's device-side guard and rate) runs as many times back to back on
batches taken from the same loader and placed on the device beforehand, in chunks of `--chunk` steps waited for at
their end: the step alone. The ratio is what the loop costs beyond the step (1.0 is ideal). Both are reported as
medians over all rounds and as 10th percentiles (on a machine shared with other work the low percentile is the less
disturbed estimate; the rounds alternate so that drifting load hits both alike).

`--shape stage` trains the narrow 38-head model (38 heads x 8, 2 blocks) on stage 1's first bucket (256x256, 33
frames: 2,304 image + 333 text tokens, batch 1, remat full as the stage recipes) with the random tiny encoders;
`--shape demo` the demo recipe as it is. Data and cache go to `--work` (reused when current).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from contentv_common.cli import run_cli
from contentv_common.config.recipe import Recipe, load_recipe, parse_override

ROOT = Path(__file__).resolve().parent.parent

TINY = ROOT / "configs" / "recipes" / "tiny.yaml"
# tests/narrow_model.py's model with the tiny encoders' text widths
NARROW = {
    "num_layers": 2,
    "num_attention_heads": 38,
    "attention_head_dim": 8,
    "hidden_size": 304,
    "joint_attention_dim": 48,
    "pooled_projection_dim": 24,
    "sample_size": 32,
    "pos_embed_max_size": 32,
}


def bench_recipe(shape: str, work: Path, steps: int, overrides: dict[str, Any]) -> Recipe:
    base: dict[str, Any] = {"steps": steps, "checkpoint.interval": steps, "checkpoint.keep": 1}
    if shape == "stage":
        base |= {
            "model": NARROW,
            "data.manifest": str(work / "stage" / "synthetic" / "manifest.jsonl"),
            "data.cache_dir": str(work / "stage" / "cache"),
            "data.encoders": "tiny",
            "data.buckets": [{"width": 256, "height": 256, "frames": 33, "batch_size": 1}],
            "remat": "full",  # as the stage recipes (configs/recipes/contentv_base.yaml)
        }
    else:
        base |= {
            "data.manifest": str(work / "demo" / "synthetic" / "manifest.jsonl"),
            "data.cache_dir": str(work / "demo" / "cache"),
        }
    return load_recipe(TINY, base | overrides)


def prepare(recipe: Recipe, shape: str) -> None:
    """The synthetic set (stage: eight 256x256 clips of 33 frames) and its cache, as contentv-train makes them."""
    from contentv_common.data.prepare import prepare_data
    from contentv_common.data.synthetic import make_synthetic_set

    manifest = Path(recipe.data.manifest)
    if shape == "stage" and not manifest.exists():
        make_synthetic_set(manifest.parent, num_videos=8, sizes=((256, 256),), frames=33, progress=False)
    prepare_data(recipe, progress=False)


def loop_times(recipe: Recipe, backend: str) -> tuple[list[float], Any]:
    """`step_time` of every step of a run (JAX: also the final state, reused by the step alone)."""
    seen: list[dict[str, Any]] = []
    if backend == "jax":
        from contentv_jax.train import run

        result = run(recipe, progress=False, on_step=seen.append)
        return [r["step_time"] for r in seen], result.state
    from contentv_torch_npu.train import run

    run(recipe, device="cpu", progress=False, on_step=seen.append)
    return [r["step_time"] for r in seen], None


def jax_step_alone(recipe: Recipe, state: Any, batches: int, repeats: int, chunk: int) -> list[float]:
    import jax

    from contentv_jax.data import make_loader
    from contentv_jax.train import default_mesh, get_trainer

    trainer = get_trainer(recipe, default_mesh(recipe))  # the loop's Trainer: the same compiled programs
    loader = make_loader(recipe)
    staged = [trainer.device_batch(next(loader)) for _ in range(batches)]
    jax.block_until_ready(staged)
    for batch in staged:  # every bucket's program compiled (the loop compiled them already: a cache hit)
        state, _ = trainer.jitted_step(state, batch)(state, batch)
    jax.block_until_ready(state)
    times = []
    for first in range(0, repeats, chunk):
        start = time.perf_counter()
        for i in range(first, first + chunk):
            batch = staged[i % batches]
            state, _ = trainer.jitted_step(state, batch)(state, batch)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / chunk)
    return times


def torch_step_alone(recipe: Recipe, batches: int, repeats: int, chunk: int) -> list[float]:
    import torch

    from contentv_common.training.divergence import DivergenceGuard
    from contentv_torch_npu.data import make_loader, open_cache
    from contentv_torch_npu.device import synchronize
    from contentv_torch_npu.distributed import Topology
    from contentv_torch_npu.optim import DeviceSchedule, guard_limits, guard_record, make_optimizer
    from contentv_torch_npu.train import StepInputs, build_model, step_inputs, train_step

    topo = Topology()
    cache = open_cache(recipe.data, None, build=False)
    loader = iter(make_loader(cache, recipe.data, recipe.seed, 0, 0, 1))
    empty = (cache.empty_text, cache.empty_pooled)
    staged = [StepInputs(*vars(step_inputs(recipe, next(loader), empty)).values()) for _ in range(batches)]
    model = build_model(recipe, topo)
    optimizer = make_optimizer(model, recipe.optimizer)
    decay = recipe.optimizer.ema_decay
    ema = {n: p.detach().clone() for n, p in model.named_parameters()} if decay else None
    schedule = DeviceSchedule(recipe.optimizer, recipe.steps, 0, topo.device)
    window = {k: torch.from_numpy(v) for k, v in DivergenceGuard(recipe.divergence, 0).window().items()}

    def step(inputs: StepInputs) -> None:
        nonlocal window
        limits = guard_limits(window, recipe.divergence.spike_factor)
        loss, norm, ok = train_step(
            model, optimizer, inputs, lr=schedule.rate(), grad_clip=recipe.optimizer.grad_clip, ema=ema,
            ema_decay=decay, limits=limits,
        )  # fmt: skip
        schedule.advance(ok)
        window = guard_record(window, ok, loss, norm)

    for inputs in staged:
        step(inputs)
    synchronize(topo.device)
    times = []
    for first in range(0, repeats, chunk):
        start = time.perf_counter()
        for i in range(first, first + chunk):
            step(staged[i % batches])
        synchronize(topo.device)
        times.append((time.perf_counter() - start) / chunk)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["jax", "torch"], default="jax")
    ap.add_argument("--shape", choices=["demo", "stage"], default="demo")
    ap.add_argument("--steps", type=int, default=40, help="loop steps per round (default 40)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps of each round left out (compiles)")
    ap.add_argument("--rounds", type=int, default=10, help="loop + step-alone rounds; the median ratio is reported")
    ap.add_argument("--chunk", type=int, default=4, help="steps alone timed together (back to back)")
    ap.add_argument("--batches", type=int, default=8, help="pre-staged batches for the step alone (default 8)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_loop", help="data and cache folder")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("overrides", nargs="*", help="recipe key=value")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup + 1:
        ap.error(f"--steps ({args.steps}) must exceed --warmup + 1 ({args.warmup + 1})")
    overrides = dict(parse_override(o) for o in args.overrides)
    loop, alone, runs = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        for r in range(args.rounds):
            run_dirs = {"checkpoint.dir": f"{tmp}/{r}/ckpt", "log_dir": f"{tmp}/{r}/logs"}
            recipe = bench_recipe(args.shape, args.work, args.steps, {**run_dirs, **overrides})
            if r == 0:
                prepare(recipe, args.shape)
            start = time.perf_counter()
            times, state = loop_times(recipe, args.backend)
            runs.append(time.perf_counter() - start)
            steady = times[args.warmup : -1]  # the last step waits for the checkpoint's save
            loop += steady
            if args.backend == "jax":
                alone += jax_step_alone(recipe, state, args.batches, len(steady), args.chunk)
            else:
                alone += torch_step_alone(recipe, args.batches, len(steady), args.chunk)
            print(f"round {r}: loop {statistics.median(steady) * 1e3:.1f} ms per step (median), step alone "
                  f"{statistics.median(alone[-len(steady) // args.chunk :]) * 1e3:.1f} ms; run {runs[-1]:.1f} s; "
                  f"load {os.getloadavg()[0]:.1f}")  # fmt: skip

    def tenth(xs: list[float]) -> float:
        return statistics.quantiles(xs, n=10)[0]

    result = {
        "backend": args.backend,
        "shape": args.shape,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "loop_median_s": statistics.median(loop),
        "alone_median_s": statistics.median(alone),
        "loop_p10_s": tenth(loop),
        "alone_p10_s": tenth(alone),
        "first_run_s": runs[0],
        "load_average": os.getloadavg()[0],
    }
    result["median_ratio"] = round(result["loop_median_s"] / result["alone_median_s"], 3)
    result["p10_ratio"] = round(result["loop_p10_s"] / result["alone_p10_s"], 3)
    print(
        f"{args.backend}, {args.shape}: loop {result['loop_median_s'] * 1e3:.1f} ms per step, step alone "
        f"{result['alone_median_s'] * 1e3:.1f} ms: {result['median_ratio']}x (medians of {len(loop)} steps / "
        f"{len(alone)} chunks of {args.chunk}); 10th percentiles {result['loop_p10_s'] * 1e3:.1f} / "
        f"{result['alone_p10_s'] * 1e3:.1f} ms: {result['p10_ratio']}x; load average {result['load_average']:.1f}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
