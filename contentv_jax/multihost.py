"""Multi-process JAX: joining the run, who writes, which batch rows a process reads, barriers, failing fast.

Every process (one per TPU host or per GPU) runs the same `tools/train.py`. `initialize` joins them through
`jax.distributed`: from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID when set (by hand or by
tools/launch_local.py), else through JAX's own cluster detection (Cloud TPU VMs, SLURM, Open MPI, Kubernetes), and not
at all on a plain machine. Process 0 alone writes logs, the data cache and the config of exported weights; a
process that fails ends the whole run (an uncaught error exits at once; the distributed runtime's heartbeat catches
a process that vanished) instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

HEARTBEAT_S = int(os.environ.get("CONTENTV_HEARTBEAT_S", "30"))  # a process silent this long is dead: all stop
_barriers = itertools.count()


def detected_cluster() -> type | None:
    """The cluster environment `jax.distributed.initialize()` would detect by itself, or None on a plain machine."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # the private module moved: only explicit JAX_* variables are used then
        return None
    return next((c for c in ClusterEnv._cluster_types if not c.opt_in_only_method and c.is_env_present()), None)


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)


def initialize() -> bool:
    """Join the multi-process run if this is one (before any other JAX call); True when joined.

    JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a cluster environment filling them in)
    overrides detection; a detected cluster of one process is left alone (nothing to join, and JAX would restrict a
    SLURM GPU task to one device).
    """
    if jax.distributed.is_initialized():
        return True
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        env = os.environ["JAX_COORDINATOR_ADDRESS"], _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID")
    else:
        cluster = detected_cluster()
        if cluster is None or cluster.get_process_count() < 2:
            return False
        env = ()  # JAX detects all of it
    jax.distributed.initialize(*env, heartbeat_timeout_seconds=HEARTBEAT_S)
    sys.excepthook = _exit_at_once
    return True


def to_host(tree: Any) -> Any:
    """Whole numpy copies of (small) arrays. Arrays sharded over several processes are gathered, so every process
    calls it; arrays this process holds whole (a model on its own devices) are copied without any collective."""
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def is_primary() -> bool:
    """Whether this process writes the run's shared files (logs, cache, exported config): process 0."""
    return jax.process_index() == 0


def barrier(name: str, timeout_s: float = 24 * 3600) -> None:
    """All processes wait here for each other (through the coordination service: no devices, any duration)."""
    if jax.process_count() == 1:
        return
    from jax._src.distributed import global_state

    global_state.client.wait_at_barrier(f"contentv:{name}:{next(_barriers)}", int(timeout_s * 1000))


def jit_together(fun: Callable, **jit_kwargs: Any) -> Any:
    """`jax.jit(fun, **jit_kwargs)`; with several processes, each new input layout is compiled ahead and no process
    runs it before every process has compiled it. The CPU collectives (gloo) connect the processes on a program's
    first run and give up after 30 s: a process that compiles longer than another must not time it out."""
    jitted = jax.jit(fun, **jit_kwargs)
    return jitted if jax.process_count() == 1 else _CompiledTogether(jitted)


class _CompiledTogether:
    """A jitted function run through its ahead-of-time compiles, one per input layout, each behind a barrier."""

    def __init__(self, jitted: Any) -> None:
        self.lower = jitted.lower
        self._compiled: dict[Any, Callable] = {}

    def __call__(self, *args: Any) -> Any:
        leaves, tree = jax.tree.flatten(args)
        key = (
            tree,
            *((getattr(x, "shape", None), getattr(x, "dtype", None), getattr(x, "sharding", None)) for x in leaves),
        )
        if key not in self._compiled:
            self._compiled[key] = self.lower(*args).compile()
            barrier("compiled")
        return self._compiled[key](*args)


def _exit_at_once(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """sys.excepthook of a multi-process run: print the error, end this process now (status 1). On a normal exit
    jax.distributed waits minutes in its shutdown barrier for the other processes, which would be waiting for this
    one in a collective; a process gone ends the others (closed connections, then the heartbeat)."""
    print(f"process {jax.process_index()} of {jax.process_count()} failed:", file=sys.stderr)
    traceback.print_exception(kind, error, tb)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def batch_shards(mesh: Mesh) -> tuple[int, int, int]:
    """(first, stop, count): the global batch is split into `count` = data x fsdp row blocks; this process's devices
    hold blocks first..stop-1 (all of them when the batch is split within processes, a share when across)."""
    owners = np.vectorize(lambda d: d.process_index)(mesh.devices)  # mesh axes (data, fsdp, sequence, tensor)
    count = owners.shape[0] * owners.shape[1]
    mine = np.flatnonzero((owners.reshape(count, -1) == jax.process_index()).any(axis=1))
    if mine.size == 0 or mine[-1] - mine[0] + 1 != mine.size:
        raise ValueError(
            f"process {jax.process_index()}: its devices hold batch blocks {mine.tolist()} of {count}, not one "
            "contiguous range: order the mesh devices by process"
        )
    return int(mine[0]), int(mine[-1]) + 1, count


def export_model(folder: str | Path, model: nnx.Module) -> Path:
    """Write `model` in our JAX layout (contentv_jax.loading.save_jax's: config + orbax `params/`) from all
    processes together, each writing only its own shards; the folder appears complete, once, by a rename."""
    import orbax.checkpoint as ocp

    from contentv_common.checkpoint.formats import write_our_config

    folder = Path(folder).resolve()
    staging = folder.with_name(f".{folder.name}.export")
    params = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var[...]  # sharded params stay sharded; process-local buffers are saved as numpy by process 0
        params[".".join(str(p) for p in path)] = value if not value.is_fully_addressable else np.asarray(value)
    if is_primary():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_our_config(staging, model.cfg)
    barrier("export-staging")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(staging / "params", params)
    barrier("export-written")
    if is_primary():
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    barrier("export-renamed")
    return folder
