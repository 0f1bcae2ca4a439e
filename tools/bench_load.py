"""Benchmark: load a transformer checkpoint onto a mesh of fake CPU devices: speed against the disk, peak host memory.

    python tools/bench_load.py CKPT [--devices 8] [--dtype bfloat16] [--pos-embed sincos_3d] [--save-to DIR]

First the disk's direct read bandwidth on the checkpoint's own files (contentv_common/checkpoint/disk_speed.py:
O_DIRECT, page cache dropped), then the load from a cold page cache: the model is sharded over `fsdp = devices`
(contentv_jax.sharding rules) as it is read. The report gives the load's read rate over the disk's (1.0x is the disk's
speed) and the peak resident memory of this process (ru_maxrss) over the model's bytes. Every device is this host's
memory here, so the ideal is 1.0x plus the runtime's own baseline: a loader that held a whole extra copy would show 2x.
`--save-to` also saves the loaded model in our JAX format (orbax, from the shards), then loads that folder back (cold,
onto the same mesh), and reports both against the disk the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from contentv_common.checkpoint.disk_speed import checkpoint_files, combined, direct_read, rss_bytes


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="transformer checkpoint folder (diffusers, torch or jax format)")
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices = fsdp degree (default 8)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="parameter dtype")
    ap.add_argument("--pos-embed", choices=["sincos_3d", "sd3_2d"], default="sincos_3d")
    ap.add_argument("--save-to", help="also save the loaded model here (our JAX format) and measure")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.devices < 1:
        print(f"bench_load: error: --devices must be >= 1, got {args.devices}", file=sys.stderr)
        return 2
    if not Path(args.ckpt).is_dir():
        print(f"bench_load: error: {args.ckpt}: checkpoint folder not found", file=sys.stderr)
        return 2
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import contentv_jax
    from contentv_common.config.recipe import MeshConfig
    from contentv_common.errors import CheckpointError
    from contentv_jax.sharding import make_mesh

    mesh = make_mesh(MeshConfig(fsdp=args.devices), jax.devices()[: args.devices])
    jnp.zeros(()).block_until_ready()  # the runtime's own memory belongs to the baseline
    files = checkpoint_files(Path(args.ckpt))
    file_bytes = sum(f.stat().st_size for f in files)
    before = direct_read(files)  # leaves the files out of the page cache: the load reads from the disk
    baseline = rss_bytes()
    t0 = time.perf_counter()
    try:
        model = contentv_jax.load_transformer(args.ckpt, jnp.dtype(args.dtype), args.pos_embed, mesh=mesh)
    except CheckpointError as e:
        print(f"bench_load: error: {e}", file=sys.stderr)
        return 2
    leaves = [v[...] for _, v in nnx.to_flat_state(nnx.state(model))]
    jax.block_until_ready(leaves)
    load_s = time.perf_counter() - t0
    disk = combined([before, direct_read(files)])
    model_bytes = sum(x.nbytes for x in leaves)
    device_bytes = max(sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == d)
                       for d in mesh.devices.flat)  # fmt: skip
    result = {
        "checkpoint": str(args.ckpt),
        "blocks": model.cfg.num_layers,
        "devices": args.devices,
        "dtype": args.dtype,
        "params": sum(x.size for x in leaves),
        "model_bytes": model_bytes,
        "max_device_bytes": device_bytes,
        "baseline_rss_bytes": baseline,
        "load_peak_rss_bytes": peak_rss_bytes(),
        "load_s": round(load_s, 1),
        "file_bytes": file_bytes,
        "disk_direct_gb_per_s": round(disk["gb_per_s"], 3),
        "disk_direct_range_gb_per_s": [round(disk["min"], 3), round(disk["max"], 3)],
        "load_gb_per_s": round(rate(file_bytes, load_s), 3),
        "load_over_disk": round(rate(file_bytes, load_s) / disk["gb_per_s"], 3),
        "load_average": os.getloadavg()[0],
    }
    result["load_peak_over_model"] = round(result["load_peak_rss_bytes"] / model_bytes, 3)
    result["load_peak_minus_baseline_over_model"] = round((result["load_peak_rss_bytes"] - baseline) / model_bytes, 3)
    if args.save_to:
        t0 = time.perf_counter()
        contentv_jax.save_jax(args.save_to, model, overwrite=True)
        os.sync()  # the bytes on the disk, not in the page cache
        save_s = time.perf_counter() - t0
        saved = checkpoint_files(Path(args.save_to))
        saved_bytes = sum(f.stat().st_size for f in saved)
        result["save_s"] = round(save_s, 1)
        result["save_peak_rss_bytes"] = peak_rss_bytes()
        result["save_peak_over_model"] = round(result["save_peak_rss_bytes"] / model_bytes, 3)
        result["saved_bytes"] = saved_bytes
        result["save_gb_per_s"] = round(rate(saved_bytes, save_s), 3)
        del model, leaves
        saved_before = direct_read(saved)
        t0 = time.perf_counter()
        restored = contentv_jax.load_transformer(args.save_to, jnp.dtype(args.dtype), args.pos_embed, mesh=mesh)
        jax.block_until_ready([v[...] for _, v in nnx.to_flat_state(nnx.state(restored))])
        restore_s = time.perf_counter() - t0
        saved_disk = combined([saved_before, direct_read(saved)])
        result["restore_s"] = round(restore_s, 1)
        result["restore_disk_direct_gb_per_s"] = round(saved_disk["gb_per_s"], 3)
        result["restore_gb_per_s"] = round(rate(saved_bytes, restore_s), 3)
        result["restore_over_disk"] = round(rate(saved_bytes, restore_s) / saved_disk["gb_per_s"], 3)
        result["restore_peak_over_model"] = round(peak_rss_bytes() / model_bytes, 3)
    gib = 2**30
    print(
        f"{result['blocks']} blocks, {result['params'] / 1e9:.2f}B params, {args.dtype} over {args.devices} devices: "
        f"model {model_bytes / gib:.2f} GiB ({device_bytes / gib:.2f} GiB on the fullest device), "
        f"peak RSS {result['load_peak_rss_bytes'] / gib:.2f} GiB = {result['load_peak_over_model']}x the model "
        f"(baseline {baseline / gib:.2f} GiB; {result['load_peak_minus_baseline_over_model']}x above it), "
        f"load {result['load_s']} s = {result['load_gb_per_s']} GB/s, {result['load_over_disk']}x the disk's direct "
        f"read ({result['disk_direct_gb_per_s']} GB/s, {disk['min']:.2f}-{disk['max']:.2f} before / after); "
        f"load average {result['load_average']:.1f}"
    )
    if args.save_to:
        r = result
        print(
            f"save (orbax) {r['save_s']} s = {r['save_gb_per_s']} GB/s, peak {r['save_peak_over_model']}x; restore "
            f"{r['restore_s']} s = {r['restore_gb_per_s']} GB/s, {r['restore_over_disk']}x the disk's direct read "
            f"({r['restore_disk_direct_gb_per_s']} GB/s), peak {r['restore_peak_over_model']}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
