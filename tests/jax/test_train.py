"""JAX flow-matching training: mesh equivalence, exact resume, loss falls, NaN skip, stage hand-over."""

import shutil
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import pytest

from contentv_common.config.recipe import MeshConfig, load_recipe
from contentv_common.data.build import build_cache
from contentv_common.data.synthetic import make_synthetic_set
from contentv_common.errors import CheckpointError, TrainingStopped
from contentv_jax.checkpointing import Checkpointer
from contentv_jax.sharding import make_mesh
from contentv_jax.train import Trainer, default_mesh, get_trainer, run
from tests.cache_edit import nan_latents
from tests.full_disk import cli_args, train_on_a_full_disk
from tests.narrow_model import NARROW
from tests.stand_in_encoders import StandInEncoders

TINY = Path(__file__).resolve().parents[2] / "tests" / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def cached_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    manifest = make_synthetic_set(root / "set", num_videos=24, num_images=2, frames=12, fps=8, progress=False)
    recipe = tiny_recipe(root, "cache")
    buckets, chunk_size = list(recipe.data.buckets), recipe.data.chunk_size  # the settings the CLI tests check
    index = build_cache(
        manifest, root / "cache", StandInEncoders, buckets, 8, "fake", chunk_size=chunk_size, progress=False
    )
    assert index.skip_counts == {"no_bucket": 2}  # the images: these tests use one video bucket (one compile)
    return root


def tiny_overrides(root: Path, name: str) -> dict:
    """The test set and its cache (built with the stand-in encoders), and this run's own folders."""
    return {
        "data.manifest": str(root / "set" / "manifest.jsonl"),
        "data.cache_dir": str(root / "cache"),
        "data.encoders": "fake",
        "checkpoint.dir": str(root / name / "ckpt"),
        "log_dir": str(root / name / "logs"),
        "data.buckets": [{"width": 64, "height": 64, "frames": 9, "batch_size": 8}],
    }


def tiny_recipe(root: Path, name: str, **overrides):
    return load_recipe(TINY, tiny_overrides(root, name) | overrides)


def _batch(rng, b=8):
    return {
        "latents": rng.standard_normal((b, 16, 3, 8, 8), dtype=np.float32),
        "noise": rng.standard_normal((b, 16, 3, 8, 8), dtype=np.float32),
        "sigmas": rng.uniform(0.05, 0.95, b).astype(np.float32),
        "weights": np.ones(b, np.float32),
        "text": rng.standard_normal((b, 333, 48), dtype=np.float32),
        "pooled": rng.standard_normal((b, 24), dtype=np.float32),
    }


def _one_step(recipe, mesh_shape, params=None):
    """(initial params, state after one step on host, loss, live state, compiled step's HLO text) on a mesh of that
    shape: one compile, whose program is also inspected."""
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    trainer = get_trainer(recipe, mesh)
    state = trainer.init_state(params)
    initial = jax.device_get(state["params"])
    batch = trainer.device_batch(_batch(np.random.default_rng(0)))
    compiled = trainer.jitted_step(state, batch).lower(state, batch).compile()
    state, metrics = compiled(state, batch)
    return initial, jax.device_get(state), float(metrics["loss"]), state, compiled.as_text()


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _update(state, initial) -> dict[str, np.ndarray]:
    """What one step changed: the weight and EMA updates and AdamW's moments (mu ~ g, nu ~ g^2), each flattened."""
    moments = {"mu": [], "nu": []}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"]):
        names = [getattr(key, "name", None) for key in path]
        for name in moments.keys() & set(names):
            moments[name].append(leaf)
    out = {"params": _flat(state["params"]) - _flat(initial), "ema": _flat(state["ema"]) - _flat(initial)}
    return out | {name: _flat(leaves) for name, leaves in moments.items()}


@pytest.mark.slow
def test_step_is_the_same_on_every_mesh(cached_set, rel_err):
    """One AdamW step from the same weights on every mesh layout: the same loss, weight update, EMA update and AdamW
    moments (the gradient and its square). No warm-up, so the first update moves the weights (a warm-up from rate 0
    would compare the initial weights with themselves); a large epsilon and no weight decay make the update about
    -lr g / eps, so it carries the gradient (with a small epsilon it is -lr sign(g), which hides gradient errors and
    turns rounding in near-zero gradients into whole steps)."""
    narrow = NARROW | {"num_layers": 1, "joint_attention_dim": 48, "pooled_projection_dim": 24}  # the cache's widths
    adamw = {
        "optimizer.warmup_steps": 0,
        "optimizer.eps": 10.0,
        "optimizer.lr": 10.0,
        "optimizer.weight_decay": 0.0,
        "optimizer.ema_decay": 0.5,
    }  # EMA update 0.5 x the weights': well above their float32 rounding
    recipe = tiny_recipe(cached_set, "mesh", model=narrow, **adamw)
    assert recipe.compute_dtype == "float32" and recipe.optimizer.warmup_steps == 0
    params, ref_state, ref_loss, _, _ = _one_step(recipe, (1, 1, 1, 1))
    assert np.isfinite(ref_loss)
    ref = _update(ref_state, params)
    # the update is far above float32 rounding of the weights (~1e-7 relative): a step that moved nothing fails here
    assert np.linalg.norm(ref["params"]) > 1e-3 * np.linalg.norm(_flat(params)), np.linalg.norm(ref["params"])
    assert np.linalg.norm(ref["ema"]) > 1e-3 * np.linalg.norm(_flat(params))
    assert ref["mu"].size == ref["nu"].size == ref["params"].size and np.all(ref["nu"] >= 0) and ref["nu"].max() > 0
    for shape in [(2, 4, 1, 1), (2, 2, 2, 1), (1, 1, 4, 2)]:  # every axis; 38 heads padded to 40 on the last
        _, state, loss, live, hlo = _one_step(recipe, shape, params)
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), shape
        got = _update(state, params)
        for name, value in ref.items():
            assert rel_err(got[name], value) < 1e-5, (shape, name, rel_err(got[name], value))
        mu = jax.tree.leaves(live["opt_state"])
        kernel = live["params"]["last_block"]["ff"]["fc1"]["kernel"]  # the only block
        if shape[1] > 1:  # FSDP really shards the weights and the Adam moments, over fsdp x sequence (ZeRO-3)
            assert "fsdp" in str(kernel.sharding.spec)
            assert any("fsdp" in str(getattr(m.sharding, "spec", "")) for m in mu)
            assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // (shape[1] * shape[2])
        if shape[2] > 1:  # the sequence axis splits image tokens and re-splits attention by heads: Ulysses
            assert "all-to-all" in hlo


@pytest.mark.slow
def test_resume_continues_the_exact_loss_trajectory(cached_set, monkeypatch):
    events = []
    compiled = Trainer.jitted_step

    def jitted_step(self, state, batch):
        step = compiled(self, state, batch)
        return lambda *args: events.append("dispatch") or step(*args)

    monkeypatch.setattr(Trainer, "jitted_step", jitted_step)
    full_recipe = tiny_recipe(cached_set, "full", steps=6, **{"checkpoint.interval": 3})
    full = run(full_recipe, progress=False, on_step=lambda r: events.append(r["step"]))
    monkeypatch.undo()
    # the host never sits between two steps: step k is read once step k + 1 is dispatched, except before a checkpoint
    assert events == ["dispatch", "dispatch", 0, "dispatch", 1, 2, "dispatch", "dispatch", 3, "dispatch", 4, 5]
    split_recipe = tiny_recipe(cached_set, "split", steps=6, **{"checkpoint.interval": 3})
    first = run(split_recipe, progress=False, stop_after=3)
    assert sorted(first.losses) == [0, 1, 2]
    second = run(split_recipe, progress=False)
    assert sorted(second.losses) == [3, 4, 5]
    assert [full.losses[k] for k in range(6)] == [{**first.losses, **second.losses}[k] for k in range(6)]
    for a, b in zip(jax.tree.leaves(full.state["params"]), jax.tree.leaves(second.state["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the next stage starts from these weights and EMA
    stage2 = tiny_recipe(cached_set, "stage2", resume_from=str(cached_set / "full" / "ckpt"))
    trainer = get_trainer(stage2, default_mesh(stage2))
    weights = Checkpointer(replace(stage2.checkpoint, dir=stage2.resume_from)).restore_weights(trainer.abstract_state())
    for a, b in zip(jax.tree.leaves(weights["ema"]), jax.tree.leaves(full.state["ema"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_loss_falls_on_the_synthetic_set(cached_set):
    result = run(tiny_recipe(cached_set, "learn", steps=80), progress=False)
    losses = [result.losses[k] for k in sorted(result.losses)]
    assert len(losses) == 80 and not result.skipped_steps
    early, late = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"loss first 10 steps {early:.4f}, last 10 steps {late:.4f}")
    assert late < 0.8 * early


@pytest.mark.slow
def test_nan_steps_are_skipped_then_the_run_stops(cached_set):
    recipe = tiny_recipe(cached_set, "nan", steps=10, nan_skip_limit=2, **{"checkpoint.interval": 1})
    run(recipe, progress=False, stop_after=2)
    bad = cached_set / "nan_cache"
    shutil.copytree(cached_set / "cache", bad)
    nan_latents(bad)
    bad = {"data.cache_dir": str(bad), "checkpoint.interval": 1}
    bad_recipe = tiny_recipe(cached_set, "nan", steps=10, nan_skip_limit=3, **bad)
    seen = []
    run(bad_recipe, progress=False, on_step=seen.append, stop_after=4)  # steps 2 and 3 skipped, then checkpointed
    ckpt = Checkpointer(recipe.checkpoint, writer=False)
    assert ckpt.restore_data()["divergence"]["skipped"] == 2
    ckpt.close()
    with pytest.raises(
        TrainingStopped, match=r"4 skipped steps .*nan_skip_limit=3.*first at step 2; resume point: step 1"
    ):
        run(bad_recipe, progress=False, on_step=seen.append)  # a restart counts on from 2
    assert [s["skipped"] for s in seen] == [True, True, True, True]
    ckpt = Checkpointer(recipe.checkpoint, writer=False)
    assert ckpt.latest_step() == 1  # kept past `keep` as the resume point; 2 and 3 went with `keep`
    assert sorted(p.name for p in ckpt.dir.glob(".diverged.*")) == [".diverged.4", ".diverged.5"]
    ckpt.close()


def test_init_from_an_sd3_image_checkpoint_starts_the_video_model(cached_set, tmp_path):
    """Stage 1 starts from SD3.5's diffusers folder: its weights, switched to 3D sin-cos positions, seed the state."""
    import torch

    from contentv_common.config.model import named_model_config, to_dict
    from contentv_jax.train import initial_params
    from contentv_torch_npu.reference import build_diffusers

    torch.manual_seed(0)
    sd3 = build_diffusers(named_model_config("tiny").replace(pos_embed="sd3_2d"))
    sd3.save_pretrained(tmp_path / "sd3")
    recipe = tiny_recipe(cached_set, "init", init_from=str(tmp_path / "sd3"))
    trainer = get_trainer(recipe, default_mesh(recipe))
    state = trainer.init_state(initial_params(recipe))
    kernel = np.asarray(state["params"]["last_block"]["attn"]["to_k"]["kernel"])  # block 1 of 2
    np.testing.assert_array_equal(kernel.T, sd3.state_dict()["transformer_blocks.1.attn.to_k.weight"].numpy())
    assert "pos_table" not in state["params"]["patch_embed"]
    deeper = to_dict(named_model_config("tiny").replace(num_layers=3))
    wider = tiny_recipe(cached_set, "init2", init_from=str(tmp_path / "sd3"), model=deeper)
    with pytest.raises(ValueError, match="init_from .*differs from the recipe"):
        initial_params(wider)


def _damage(path, how):
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:-9])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 16] = bytes(b ^ 0x5A for b in data[len(data) // 2 : len(data) // 2 + 16])
        path.write_bytes(bytes(data))
    else:
        path.unlink()


def _same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_damaged_or_unfinished_checkpoints_fall_back_and_resume_exactly(cached_set, capsys, monkeypatch):
    """Every file kind of an orbax step (tensor data, array and item metadata, the JSON item) truncated, flipped or
    deleted: the step is skipped with a warning naming the file. A save killed before its commit marker and a
    damaged newest step both resume from the step before and end identical to an uninterrupted run."""
    straight = run(tiny_recipe(cached_set, "straight6", steps=6, **{"checkpoint.interval": 2}), progress=False)
    first = tiny_recipe(cached_set, "damage", steps=4, **{"checkpoint.interval": 2})
    run(first, progress=False)
    step4 = cached_set / "damage" / "ckpt" / "4"
    data_file = max(step4.glob("state/ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    for part in [
        data_file,
        step4 / "state" / "_METADATA",
        step4 / "state" / "manifest.ocdbt",
        step4 / "data" / "metadata",
    ]:
        for how in ("truncate", "flip", "delete"):
            copy = cached_set / "copies" / f"{part.name}-{how}"
            shutil.copytree(step4.parent, copy)
            _damage(copy / "4" / part.relative_to(step4), how)
            ckpt = Checkpointer(replace(first.checkpoint, dir=str(copy)))
            assert ckpt.latest_step() == 2, (part, how)
            ckpt.close()
            assert f"skipping checkpoint step 4: {copy / '4' / part.relative_to(step4)}" in capsys.readouterr().err
            assert (copy / ".damaged.4").is_dir()
    _damage(data_file, "flip")
    (step4.parent / "6.orbax-checkpoint-tmp-123").mkdir()  # a killed save's temporary folder
    resumed = run(tiny_recipe(cached_set, "damage", steps=6, **{"checkpoint.interval": 2}), progress=False)
    assert sorted(resumed.losses) == [2, 3, 4, 5] and not (step4.parent / "6.orbax-checkpoint-tmp-123").exists()
    _same_params(resumed.state, straight.state)

    from contentv_common.checkpoint import integrity

    write = integrity.write_manifest

    class Killed(BaseException):
        pass

    def killed_at_4(folder):
        if folder.name == "4":
            raise Killed  # the process dies between orbax's rename and the commit marker
        return write(folder)

    monkeypatch.setattr(integrity, "write_manifest", killed_at_4)
    killed = tiny_recipe(cached_set, "killed", steps=6, **{"checkpoint.interval": 2})
    with pytest.raises(Killed):
        run(killed, progress=False)
    monkeypatch.setattr(integrity, "write_manifest", write)
    resumed = run(killed, progress=False)
    assert "4/checksums.json: missing" in capsys.readouterr().err and sorted(resumed.losses) == [2, 3, 4, 5]
    _same_params(resumed.state, straight.state)


def test_missing_ema_is_an_error(cached_set):
    recipe = tiny_recipe(cached_set, "no_ema", steps=4)
    trainer = get_trainer(recipe, default_mesh(recipe))
    state = trainer.init_state()
    ckpt = Checkpointer(recipe.checkpoint)
    ckpt.save(1, {k: v for k, v in trainer.checkpointed(state).items() if k != "ema"}, {"next_index": 1})
    ckpt.close()
    with pytest.raises(
        CheckpointError, match=r"no_ema/ckpt/1: does not restore into this run's state: .*differ at ema$"
    ):
        run(recipe, progress=False)


@pytest.mark.slow
def test_a_failed_save_ends_the_run_with_status_1(cached_set):
    """tools/train.py on a full disk (no file may grow past 16 kB: the logs fit, orbax's files of step 1 do not): exit
    status 1, no hang, the last line naming the step and the error (orbax logs its writer threads' errors before it),
    no step folder. Checkpointer.save waits for orbax's writers and raises; the CLI leaves with os._exit."""
    args = ["--config", str(TINY), *cli_args(tiny_overrides(cached_set, "full_disk")), "--backend", "jax"]
    proc = train_on_a_full_disk([*args, "steps=2", "checkpoint.interval=1"], max_file_bytes=16 * 1024)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train: stopped: ") and "saving step 1 failed" in last and "File too large" in last, last
    ckpt = Checkpointer(tiny_recipe(cached_set, "full_disk").checkpoint, writer=False)
    assert ckpt.latest_step() is None
    ckpt.close()


@pytest.mark.slow
def test_spiking_steps_are_skipped(cached_set):
    """With divergence.spike_factor, a step whose loss or gradient norm is above factor x the median of the last
    `window` applied steps is skipped, exactly as the host-side rule says."""
    spikes = {"divergence.spike_factor": 1.05, "divergence.window": 3, "nan_skip_limit": 100}
    recipe = tiny_recipe(cached_set, "spike", steps=12, **spikes)
    seen = []
    result = run(recipe, progress=False, on_step=seen.append)
    losses, norms, expected = [], [], []
    for r in seen:
        full = len(losses) >= 3
        bad = full and (r["loss"] > 1.05 * sorted(losses[-3:])[1] or r["grad_norm"] > 1.05 * sorted(norms[-3:])[1])
        expected.append(bad)
        if not bad:
            losses.append(r["loss"])
            norms.append(r["grad_norm"])
    assert [r["skipped"] for r in seen] == expected and any(expected), expected
    assert result.skipped_steps == [r["step"] for r in seen if r["skipped"]]
