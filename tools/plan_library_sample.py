"""Memory of the README's Python snippet sampling on one device, compiled ahead of time: the model as
`contentv_jax.load_transformer` builds it (the library's default attention, "auto", resolved for the target), weights
and compute in `--dtype`, and one step of the sampler (the cond/uncond pair of each prompt in one forward, guidance,
Euler update), lowered with abstract inputs on the first device of `--target` and compiled. Nothing is allocated; no
TPU needed (libtpu compiles for a topology's chips).

    python tools/plan_library_sample.py --target tpu:v5p:2x2x1 --size 768x432x125
    python tools/plan_library_sample.py --target tpu:v5p:2x2x1 --attention xla   # the library's default before

`--model` names configs/model/ (contentv-8b: 38 blocks); `--blocks N` keeps the first N for quick checks.
"""

from __future__ import annotations

import argparse
import dataclasses

from contentv_common.cli.plan import ask_for_devices, parse_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="tpu:v5p:2x2x1", help="tpu:<libtpu topology> or cpu:<devices>")
    parser.add_argument("--model", default="contentv-8b")
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--size", default="768x432x125", help="WIDTHxHEIGHTxFRAMES of the video")
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", help="weights' and compute dtype")
    parser.add_argument("--compute-dtype", default=None, help="compute dtype when other than --dtype")
    parser.add_argument("--attention", default=None, help="auto|xla|cudnn|splash (default: the library's)")
    parser.add_argument("--hbm-gb", type=float, default=95.74, help="one device's memory in GB (v5p: 95.74)")
    args = parser.parse_args()
    target = parse_target(args.target, 1)
    ask_for_devices(target)

    import jax.numpy as jnp

    from contentv_common.config.model import named_model_config
    from contentv_common.config.recipe import BucketConfig, MeshConfig
    from contentv_jax.backend import plan_devices
    from contentv_jax.loading import abstract_transformer
    from contentv_jax.memory_plan import plan_library_sample
    from contentv_jax.ops import Attention
    from contentv_jax.sharding import make_mesh

    cfg = named_model_config(args.model).replace(pos_embed="sincos_3d")
    if args.blocks is not None:
        cfg = dataclasses.replace(cfg, num_layers=args.blocks)
    mesh = make_mesh(MeshConfig(), plan_devices(target.platform, target.topology, target.total)[:1])
    width, height, frames = (int(s) for s in args.size.split("x"))
    bucket = BucketConfig(width, height, frames, args.prompts)
    dtype, compute = jnp.dtype(args.dtype), jnp.dtype(args.compute_dtype or args.dtype)
    attention = None if args.attention is None else Attention(args.attention, mesh)
    model = abstract_transformer(cfg, mesh, dtype=compute, param_dtype=dtype, attention=attention)
    kernel = model.last_block.attn.attention.resolved().kind
    plan = plan_library_sample(model, mesh, bucket, int(args.hbm_gb * 1e9))
    gib = 2**30
    print(
        f"{args.model} ({cfg.num_layers} blocks, {dtype} weights, {compute} compute) sampling step, {bucket.name}, "
        f"{plan.tokens:,} tokens, batch {plan.batch} (CFG pair), attention {args.attention or 'default'} -> {kernel}, "
        f"on the first device of {args.target}: "
        f"arguments {plan.argument_bytes / gib:.2f} GiB, temporaries {plan.temp_bytes / gib:.2f} GiB, "
        f"output {plan.output_bytes / gib:.2f} GiB, peak {plan.peak_bytes / gib:.2f} GiB per device, "
        f"compiled in {plan.compile_s:.0f} s, fits {plan.fits}"
    )


if __name__ == "__main__":
    main()
