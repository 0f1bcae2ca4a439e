"""Several JAX processes on one machine (jax.distributed, gloo CPU collectives): 2 processes x 4 simulated devices train
a 38-head model on 333 text tokens (tests/narrow_model.py, the tiny encoders) like 1 process x 8 devices on meshes
(2,2,2,1) and (1,2,2,2) (sequence x tensor 4: heads padded to 40); the data cache, checkpoints and exported weights
cross process counts; logs are written once; a process that fails ends the run with its error, one that hangs by the
heartbeat; one that compiles longer than the others does not time out their collectives.

The 1-process runs happen in this test process (8 devices, tests/conftest.py); the 2-process runs are
`tools/train.py` subprocesses, through tools/launch_local.py or by hand with the JAX_* variables.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from contentv_common.config.recipe import load_recipe, parse_override
from contentv_common.data.buckets import BucketBatchSampler
from contentv_common.data.cache import LatentCache, read_index
from contentv_common.data.prepare import prepare_data
from contentv_common.data.synthetic import make_synthetic_set
from contentv_common.training.demo import DEMO_PROMPTS
from contentv_jax import multihost
from contentv_jax.checkpointing import Checkpointer
from contentv_jax.data import StepBatches
from contentv_jax.loading import load_transformer
from contentv_jax.train import default_mesh, get_trainer, run
from tests.cache_edit import rewrite_records
from tests.narrow_model import NARROW
from tools.launch_local import free_port, process_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # every test here starts several processes

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "recipes" / "tiny.yaml"
MODEL = NARROW | {"joint_attention_dim": 48, "pooled_projection_dim": 24}  # the tiny encoders' widths
# the failure tests' model: one small block (the model plays no part in how a failure spreads; compiles are CI time)
SMALL = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 32}
BUCKETS = [{"width": 64, "height": 64, "frames": 9, "batch_size": 4}]  # 48 image tokens
MESHES = {
    (2, 2, 2, 1): ["mesh.data=2", "mesh.fsdp=2", "mesh.sequence=2"],
    (1, 2, 2, 2): ["mesh.fsdp=2", "mesh.sequence=2", "mesh.tensor=2"],
}
TIMEOUT_S = 600
NOISE = ("Gloo", "TPU", "libtpu", "InitGoogle", "Source Location", "common_lib", "@     0x")  # and C++ stacks


def train_args(
    root: Path, name: str, cache: Path, mesh: tuple[int, ...], steps: int = 4, model: dict | None = None
) -> list[str]:
    """tools/train.py overrides: one small bucket, the tiny encoders (333 text tokens), the 38-head model (or
    `model`), checkpoints every 2 steps."""
    return [
        f"data.manifest={root / 'set' / 'manifest.jsonl'}",
        f"data.cache_dir={cache}",
        "data.encoders=tiny",
        f"checkpoint.dir={root / name / 'ckpt'}",
        f"log_dir={root / name / 'logs'}",
        f"steps={steps}",
        "checkpoint.interval=2",
        f"data.buckets={json.dumps(BUCKETS)}",
        f"model={json.dumps(MODEL | (model or {}))}",
        *MESHES[mesh],
    ]


def env() -> dict[str, str]:
    """The subprocess environment: this checkout first, float32 matmuls as in this process."""
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_PLATFORMS="cpu")


def quiet(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if not any(n in line for n in NOISE))[-4000:]


def launch_two(args: list[str], sample: bool = False) -> None:
    """tools/train.py as 2 processes x 4 devices through tools/launch_local.py; fails the test with the output."""
    cmd = [sys.executable, "tools/launch_local.py", "--processes", "2", "--devices-per-process", "4"]
    cmd += ["--timeout", str(TIMEOUT_S), "--", "tools/train.py", "--config", str(TINY), "--no-progress"]
    cmd += ["--sample-prompt", DEMO_PROMPTS[0] if sample else ""]  # one clip is enough to see who samples
    done = subprocess.run(cmd + args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=TIMEOUT_S + 60)
    assert done.returncode == 0, quiet(done.stdout + done.stderr)


def run_one(args: list[str]) -> dict[int, float]:
    """The same training in this process (8 devices); step -> loss."""
    recipe = load_recipe(TINY, dict(parse_override(a) for a in args))
    prepare_data(recipe, progress=False)
    return run(recipe, progress=False).losses


def logged_losses(root: Path, name: str) -> dict[int, float]:
    lines = (root / name / "logs" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"metrics.jsonl has steps {steps}: written by more than one process"
    return {r["step"]: r["loss"] for r in records}


def final_state(root: Path, name: str, mesh: tuple[int, ...]) -> dict:
    """The last checkpoint of a run, restored in this process (whatever process count saved it)."""
    recipe = load_recipe(TINY, dict(parse_override(a) for a in train_args(root, name, root / "cache1", mesh)))
    ckpt = Checkpointer(recipe.checkpoint, writer=False)
    trainer = get_trainer(recipe, default_mesh(recipe))
    state, _ = ckpt.restore(trainer.checkpointed(trainer.abstract_state()))
    ckpt.close()
    return jax.device_get(state)


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def assert_same_run(losses: dict[int, float], reference: dict[int, float], state: dict, ref_state: dict, rel_err):
    assert sorted(losses) and all(abs(losses[k] - reference[k]) <= 1e-6 * abs(reference[k]) for k in losses), (
        losses,
        reference,
    )
    for name in ("params", "ema", "opt_state"):
        assert rel_err(flat(state[name]), flat(ref_state[name])) < 1e-6, name
    assert int(state["step"]) == int(ref_state["step"])


def keep_step(src: Path, dst: Path, step: int) -> None:
    """A copy of checkpoint folder `src` holding only `step` (as if the run had been stopped there)."""
    shutil.copytree(src, dst)
    for d in dst.iterdir():
        if d.name.isdigit() and int(d.name) != step:
            shutil.rmtree(d)


def test_cluster_detection_is_jaxs_own(monkeypatch):
    """SLURM variables are detected as JAX detects them; a one-task job (or a plain machine) is not joined."""
    for name in [k for k in os.environ if k.startswith(("SLURM_", "JAX_COORDINATOR", "OMPI_", "KUBERNETES_"))]:
        monkeypatch.delenv(name)
    assert multihost.detected_cluster() is None
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    for name, value in {**slurm, "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    assert multihost.detected_cluster().__name__ == "SlurmCluster"
    assert multihost.initialize() is False and not jax.distributed.is_initialized()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 process x 8 devices, mesh (2,2,2,1), 4 steps: cache1 built here, checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("multi")
    make_synthetic_set(root / "set", num_videos=8, num_images=0, frames=12, fps=8, progress=False)
    losses = run_one(train_args(root, "one", root / "cache1", (2, 2, 2, 1)))
    assert sorted(losses) == [0, 1, 2, 3]
    return root, losses, final_state(root, "one", (2, 2, 2, 1))


def test_each_process_reads_only_its_rows(reference, monkeypatch):
    """The two halves of batch k, as processes 0 and 1 of a data x fsdp = 4 mesh read them, read only their own
    cache rows and together equal the whole batch, random inputs included."""
    root, _, _ = reference
    recipe = load_recipe(TINY, dict(parse_override(a) for a in train_args(root, "rows", root / "cache1", (2, 2, 2, 1))))
    read, sample = [], LatentCache.sample
    monkeypatch.setattr(LatentCache, "sample", lambda self, i: read.append(i) or sample(self, i))
    whole = StepBatches(recipe)(5)
    halves = []
    for first, stop in [(0, 2), (2, 4)]:
        read.clear()
        batches = StepBatches(recipe, (first, stop, 4))
        halves.append(batches(5))
        assert read == batches.sampler.batch(5)[first:stop]
        assert int(halves[-1]["global_size"]) == 4
    for name, value in whole.items():
        if name != "global_size":
            np.testing.assert_array_equal(np.concatenate([h[name] for h in halves]), value, err_msg=name)


def test_two_processes_train_like_one(reference, rel_err):
    """Mesh (2,2,2,1) over 2 processes: same losses, same final state; its processes build cache2 together (equal
    to the 1-process cache within float32 rounding); process 0 writes the logs once; the weights are exported once,
    complete; the demo clip is sampled."""
    root, ref_losses, ref_state = reference
    launch_two(train_args(root, "two", root / "cache2", (2, 2, 2, 1)), sample=True)
    assert_same_run(logged_losses(root, "two"), ref_losses, final_state(root, "two", (2, 2, 2, 1)), ref_state, rel_err)
    assert read_index(root / "cache2").samples == read_index(root / "cache1").samples
    one, two = (LatentCache(root / name, list(load_recipe(TINY).data.buckets)) for name in ("cache1", "cache2"))
    assert rel_err(one.empty_text, two.empty_text) < 1e-6
    for i in range(len(one)):
        a, b = one.sample(i), two.sample(i)
        # the encoders run on each process's devices, 8 here and 4 there: the text encoders' weights are sharded over
        # them (their contractions sum in other orders: up to 1.6e-6 seen) and XLA:CPU convs split sums by threads
        errors = {k: rel_err(a[k], b[k]) for k in a}
        assert all(e < 1e-5 for e in errors.values()), (i, errors)
    assert not list((root / "cache2").glob(".build-*"))  # no build folder left
    logs = root / "two" / "logs"
    assert len(list((logs / "tensorboard").iterdir())) == 1
    samples = root / "two" / "samples"  # the demo prompt's clip, written by process 0 alone
    assert (logs / "loss.png").is_file() and len(list(samples.glob("*.mp4"))) == 1
    exported = load_transformer(root / "two" / "transformer")
    params = nnx.to_pure_dict(nnx.state(exported, nnx.Param))
    assert rel_err(flat(params), flat(ref_state["ema"])) < 1e-6
    assert sorted(p.name for p in (root / "two").iterdir()) == ["ckpt", "logs", "samples", "transformer"]


def test_checkpoints_cross_process_counts(reference, rel_err):
    """Step 2 saved by 1 process resumes in 2 on mesh (1,2,2,2); step 2 saved by 2 processes resumes in 1: both
    continue the reference trajectory (steps 2 and 3, final state)."""
    root, ref_losses, ref_state = reference
    if not (root / "two" / "ckpt").is_dir():
        launch_two(train_args(root, "two", root / "cache2", (2, 2, 2, 1)))
    keep_step(root / "one" / "ckpt", root / "one_to_two" / "ckpt", 2)
    launch_two([*train_args(root, "one_to_two", root / "cache1", (1, 2, 2, 2)), "checkpoint.keep=1"])
    assert sorted(d.name for d in (root / "one_to_two" / "ckpt").iterdir() if d.name.isdigit()) == ["4"]  # 2 deleted
    state = final_state(root, "one_to_two", (1, 2, 2, 2))
    assert_same_run(logged_losses(root, "one_to_two"), ref_losses, state, ref_state, rel_err)
    assert sorted(logged_losses(root, "one_to_two")) == [2, 3]

    keep_step(root / "two" / "ckpt", root / "two_to_one" / "ckpt", 2)
    losses = run_one(train_args(root, "two_to_one", root / "cache2", (1, 2, 2, 2)))
    assert sorted(losses) == [2, 3]
    assert_same_run(losses, ref_losses, final_state(root, "two_to_one", (1, 2, 2, 2)), ref_state, rel_err)


def test_a_failing_process_ends_the_run(reference):
    """Started by hand (the JAX_* variables, no launcher): process 1 cannot read one of its rows of batch 0; it
    exits with that error and process 0, waiting for it in a collective, exits non-zero soon after (no hang)."""
    root, _, _ = reference
    cache = root / "crash_cache"
    shutil.copytree(root / "cache1", cache)
    recipe = load_recipe(TINY, dict(parse_override(a) for a in train_args(root, "crash", cache, (2, 2, 2, 1))))
    ids = BucketBatchSampler(LatentCache(cache, list(recipe.data.buckets)).bucket_ids, [4], recipe.seed).batch(0)
    rewrite_records(cache, lambda i, record: b"not a safetensors record" if i == ids[3] else record)  # process 1's row
    bad = f"sample {ids[3]} ("  # as the read error names it
    args = train_args(root, "crash", cache, (2, 2, 2, 1), steps=50, model=SMALL)
    port = free_port()
    procs = []
    for i in range(2):
        e = env() | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_NUM_PROCESSES": "2"}
        e |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_PROCESS_ID": str(i)}
        cmd = [sys.executable, "tools/train.py", "--config", str(TINY), "--no-progress", "--sample-prompt", "", *args]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    try:
        out1, _ = procs[1].communicate(timeout=TIMEOUT_S)
        failed_at = time.monotonic()
        out0, _ = procs[0].communicate(timeout=90)
        waited = time.monotonic() - failed_at
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode != 0 and bad in out1, quiet(out1)
    assert procs[0].returncode != 0, quiet(out0)
    assert waited < 60, waited
    assert bad not in out0  # process 0 never read process 1's rows


JOIN_AND_WAIT = """
import time
from contentv_jax import multihost
assert multihost.initialize()
print("joined", flush=True)
time.sleep(600)
"""


def test_a_process_that_stops_answering_ends_the_run_by_the_heartbeat():
    """Process 1 is frozen (SIGSTOP: its connections stay open, as a host that hangs or vanishes from the network):
    process 0 ends, non-zero, once the heartbeat (CONTENTV_HEARTBEAT_S, 30 s by default, 4 s here) misses it."""
    if "CONTENTV_HEARTBEAT_S" not in os.environ:
        assert multihost.HEARTBEAT_S == 30
    port = free_port()
    procs = []
    for i in range(2):
        e = process_env(i, 2, port, 1) | {"CONTENTV_HEARTBEAT_S": "4", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-c", JOIN_AND_WAIT]
        procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for p in procs:
            assert "joined" in p.stdout.readline()
        procs[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        out0, _ = procs[0].communicate(timeout=TIMEOUT_S)
        waited = time.monotonic() - stopped_at
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode != 0 and "stopped sending heartbeats" in out0, quiet(out0)
    assert 4 <= waited < 25, waited  # the heartbeat, and the variable's 4 s rather than the default 30 s


SLOW_COMPILE = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from contentv_jax import multihost
assert multihost.initialize()
mesh = Mesh(np.array(jax.devices()), ("d",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), np.ones(2, np.float32))

def total(a):
    if jax.process_index() == 1:
        time.sleep(35)  # while tracing: process 1 compiles 35 s longer than process 0
    return jnp.sum(a)

jit = multihost.jit_together if sys.argv[1] == "together" else jax.jit
print("sum", float(jit(total, out_shardings=NamedSharding(mesh, P()))(x)), flush=True)
"""


def test_a_process_that_compiles_longer_does_not_time_out_the_collectives():
    """Process 1 takes 35 s longer to compile a program with a cross-process sum: the gloo collectives, which give
    up connecting after 30 s, still run it, since no process runs a program before all have compiled it."""
    cmd = [sys.executable, "tools/launch_local.py", "--processes", "2", "--devices-per-process", "2"]
    cmd += ["--timeout", "300", "--", sys.executable, "-c", SLOW_COMPILE, "together"]
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, quiet(done.stdout + done.stderr)
    assert done.stdout.count("sum 4.0") == 2, quiet(done.stdout)
