"""Benchmark: save and restore a JAX train state with the trainer's own Checkpointer, against the disk's direct read.

    python tools/bench_train_state.py [--blocks 1] [--devices 8] [--dir /tmp/bench_train_state]

The state is the trainer's (contentv_jax.train: fp32 parameters, AdamW moments, EMA, counters) of SD3.5-Large's width
at `--blocks` blocks, sharded over `fsdp = devices` fake CPU devices. It is saved as a training checkpoint
(contentv_jax.checkpointing: orbax, then the integrity manifest), synced to the disk, then restored from a cold page
cache onto the same shardings (the manifest verified first), its files read with O_DIRECT just before and after
(contentv_common/checkpoint/disk_speed.py). Reported: each rate
over the disk's direct read, and the peak resident memory during each phase (sampled) over the state's bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from contentv_common.checkpoint.disk_speed import checkpoint_files, combined, direct_read, rss_bytes

ROOT = Path(__file__).resolve().parent.parent


class PeakRss:
    """The largest resident set size seen while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1, help="SD3.5-Large-width blocks (default 1)")
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices = fsdp degree (default 8)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_train_state"), help="checkpoint folder (replaced)")
    args = ap.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"

    import jax
    from make_sd35_checkpoint import sd35_config  # tools/, beside this script

    from contentv_common.config.model import to_dict
    from contentv_common.config.recipe import load_recipe
    from contentv_jax.checkpointing import Checkpointer
    from contentv_jax.sharding import make_mesh
    from contentv_jax.train import get_trainer

    shutil.rmtree(args.dir, ignore_errors=True)
    model = to_dict(sd35_config(args.blocks).replace(pos_embed="sincos_3d"))
    overrides = {"model": model, "mesh": {"fsdp": args.devices}, "checkpoint.dir": str(args.dir)}
    recipe = load_recipe(ROOT / "configs" / "recipes" / "tiny.yaml", overrides)
    trainer = get_trainer(recipe, make_mesh(recipe.mesh, jax.devices()[: args.devices]))
    state = trainer.checkpointed(trainer.init_state())
    jax.block_until_ready(state)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    ckpt = Checkpointer(recipe.checkpoint)
    with PeakRss() as save_rss:
        start = time.perf_counter()
        ckpt.save(1, state, {"next_index": 1})
        os.sync()
        save_s = time.perf_counter() - start
    ckpt.close()
    files = checkpoint_files(args.dir)
    file_bytes = sum(f.stat().st_size for f in files)
    del state
    before = direct_read(files)  # leaves the files out of the page cache
    ckpt = Checkpointer(recipe.checkpoint, writer=False)
    held = rss_bytes()  # the runtime, the compiled programs and what the save left behind
    with PeakRss() as restore_rss:
        start = time.perf_counter()
        state, _ = ckpt.restore(trainer.checkpointed(trainer.abstract_state()))
        jax.block_until_ready(state)
        restore_s = time.perf_counter() - start
    ckpt.close()
    disk = combined([before, direct_read(files)])
    gb = 1e9
    print(
        f"train state of {args.blocks} SD3.5-Large block(s) over {args.devices} devices: {state_bytes / 2**30:.2f} GiB "
        f"({file_bytes / 2**30:.2f} GiB of files); save {save_s:.1f} s = {file_bytes / save_s / gb:.2f} GB/s, peak RSS "
        f"{save_rss.peak / state_bytes:.2f}x the state; restore {restore_s:.1f} s = {file_bytes / restore_s / gb:.2f} "
        f"GB/s = {file_bytes / restore_s / gb / disk['gb_per_s']:.2f}x the disk's direct read "
        f"({disk['gb_per_s']:.2f} GB/s), peak RSS {restore_rss.peak / state_bytes:.2f}x "
        f"({held / state_bytes:.2f}x held before it); load average {os.getloadavg()[0]:.1f}"
    )
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
