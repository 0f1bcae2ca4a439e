"""The JAX core as a `contentv_common.backend.Backend` (the torch twin's is contentv_torch_npu/backend.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from contentv_common.config.distill import DistillRecipe
from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import BucketConfig, Recipe, check_device_count
from contentv_common.config.reward import RewardRecipe
from contentv_common.errors import ConfigError
from contentv_common.lora.adapters import Lora
from contentv_common.plan.report import StepPlan, format_table, gib
from contentv_common.prompt_suite import SamplingGroups
from contentv_common.sample_mesh import SampleMesh, check_mesh_devices
from contentv_common.training.run_result import RunResult
from contentv_jax import multihost
from contentv_jax.encoders import Encoders


class JaxBackend:
    name = "jax"

    def check_devices(self, recipe: Recipe | RewardRecipe) -> bool:
        multihost.initialize()  # before any other JAX call
        if isinstance(recipe, RewardRecipe):
            from contentv_jax.reward.mesh import reward_mesh

            reward_mesh(recipe)
        else:
            from contentv_jax.train import check_devices

            check_devices(recipe)
        return multihost.is_primary()

    def processes(self) -> tuple[int, int]:
        multihost.initialize()  # before any other JAX call
        return jax.process_index(), jax.process_count()

    def data_device(self) -> str:
        """Every local device of the process ("local": contentv_jax.encoders.local_mesh) runs the encoders."""
        return "local"

    def barrier(self, name: str) -> None:
        multihost.barrier(name)

    def join_sampling(self, device: str, mesh: SampleMesh | None = None) -> SamplingGroups:
        multihost.initialize()  # before any other JAX call
        process, processes = jax.process_index(), jax.process_count()
        if mesh is None:
            return SamplingGroups(process, processes, tuple(range(processes)))
        from contentv_jax.sampling import device_mesh

        check_mesh_devices(mesh, jax.device_count())
        grid = device_mesh(mesh).devices  # (data x cfg, 1, sequence, 1): group g's first device is [g * cfg, 0, 0, 0]
        owners = tuple(grid[g * mesh.cfg, 0, 0, 0].process_index for g in range(mesh.data))
        return SamplingGroups(process, processes, owners, True)

    def broadcast(self, flags: np.ndarray) -> np.ndarray:
        if jax.process_count() == 1:
            return flags
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(flags))

    def encoders(
        self,
        name: str | Path,
        seed: int = 0,
        dtype: str | None = None,
        device: str = "cpu",
        cache_dir: Path | None = None,
    ) -> Encoders:
        from contentv_jax import encoders

        mesh = encoders.local_mesh() if device == "local" else None  # else the default device
        if name == "tiny":
            return encoders.tiny_encoders(seed, cache_dir=cache_dir, mesh=mesh)
        if name == "demo":
            return encoders.demo_encoders(cache_dir, mesh)
        jdtype = None if dtype is None else jnp.dtype(dtype)
        return encoders.load_encoders(name, dtype=jdtype, mesh=mesh, cache_dir=cache_dir)

    def train(self, recipe: Recipe, progress: bool, on_step: Callable[[dict[str, Any]], None] | None) -> RunResult:
        from contentv_jax.train import run

        return run(recipe, progress=progress, on_step=on_step)

    def reward_tune(self, recipe: RewardRecipe, progress: bool) -> dict[str, Any]:
        from contentv_jax.reward.run import run

        return run(recipe, progress=progress)

    def distill(self, recipe: DistillRecipe, progress: bool) -> dict[str, Any]:
        from contentv_jax.distill.run import run

        return run(recipe, progress=progress)

    def export(self, recipe: Recipe) -> Path:
        """Every process restores its shards and writes them (contentv_jax.multihost.export_model)."""
        from contentv_jax.checkpointing import Checkpointer
        from contentv_jax.train import default_mesh, get_trainer

        trainer = get_trainer(recipe, default_mesh(recipe))
        ckpt = Checkpointer(recipe.checkpoint, writer=False)
        state, _ = ckpt.restore(trainer.checkpointed(trainer.abstract_state()))
        ckpt.close()
        out = Path(recipe.checkpoint.dir).parent / "transformer"
        return multihost.export_model(out, trainer.plain_model(trainer.final_params(state)))

    def transformer_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        from contentv_jax.loading import abstract_transformer, canonical_shapes

        return canonical_shapes(abstract_transformer(cfg))

    def check_attention(self, choice: str) -> None:
        from contentv_jax.ops import resolve_attention

        resolve_attention(choice, jax.default_backend())

    def load_transformer(
        self, path: Path, dtype: str, device: str, attention: str = "auto", mesh: SampleMesh | None = None
    ) -> Any:
        from contentv_jax.sampling import load_sampling_transformer

        return load_sampling_transformer(path, jnp.dtype(dtype), attention, mesh or SampleMesh())

    def merge_loras(self, model: Any, loras: list[Lora]) -> None:
        from contentv_jax.lora import merge_adapters

        merge_adapters(model, loras)

    def sample(self, model, noise, text, pooled, neg_text, neg_pooled, **settings: Any) -> np.ndarray:
        from contentv_jax.sampling import sample

        return sample(model, noise, text, pooled, neg_text, neg_pooled, **settings)

    def clip_embeddings(self, folder: Path, device: str = "cpu") -> Any:
        from contentv_jax.reward.clip import ClipEmbeddings

        return ClipEmbeddings(folder)

    def trace_layers(self, path: Path, pos_embed: str | None, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from contentv_jax.loading import load_transformer

        jax.config.update("jax_default_matmul_precision", "highest")
        model = load_transformer(path, pos_embed=pos_embed)
        x, context, temb_act = model.embed(*inputs.values())
        out = {"patch_embed": x, "conditioning": temb_act, "context_embedder": context}
        for i in range(model.cfg.num_layers):
            x, context = model.block(i)(x, context, temb_act)
            out[f"blocks.{i}.x"] = x
            if context is not None:
                out[f"blocks.{i}.context"] = context
        out["output"] = model.head(x, temb_act, inputs["hidden_states"].shape)
        return {k: np.asarray(v) for k, v in out.items()}

    def plan(self, recipe: Recipe | RewardRecipe, hbm: int, **options: Any) -> tuple[list[StepPlan], dict[str, Any]]:
        """Compiles every step on the target's devices (`target`: contentv_common.cli.plan.Target, its fake CPU
        devices already asked for), with abstract inputs sharded over the recipe's mesh; a step whose lowered program
        `previous` (a plan document, or None) compiled on the same target and compiler keeps its figures."""
        from contentv_jax.memory_plan import compiler_versions, plan_recipe, replicated_params, reusable, state_bytes
        from contentv_jax.sharding import make_mesh

        target = options["target"]
        if target is None:
            raise ConfigError("--target is required with --backend jax (e.g. tpu:v5p:4x4x4 or cpu:8)")
        try:
            check_device_count(recipe.mesh, target.count)
        except ConfigError as e:
            raise ConfigError(f"{options['recipe_path']}: {e} ({target.where})") from None
        devices = plan_devices(target.platform, target.topology, target.total)[: target.count]
        mesh = make_mesh(recipe.mesh, devices)
        print(format_table([], hbm).splitlines()[0], flush=True)
        on_plan = lambda p: print(format_table([p], hbm).splitlines()[-1], flush=True)  # noqa: E731
        meta = {"target": target.text, "devices": len(devices), "device_kind": devices[0].device_kind}
        meta["compiler"] = compiler_versions()
        known = reusable(options["previous"], devices[0].device_kind)
        try:
            if isinstance(recipe, RewardRecipe):
                from contentv_jax.reward.plan import plan_reward
                from contentv_jax.reward.plan import state_bytes as reward_state_bytes

                plan = plan_reward(recipe, mesh, hbm, text_tokens=options["text_tokens"], known=known)
                on_plan(plan)
                state = reward_state_bytes(recipe, mesh)
                print("state per device (GiB): " + ", ".join(f"{k} {gib(v)}" for k, v in state.items()))
                return [plan], {**meta, "method": recipe.method, "state_bytes": state}
            plans = plan_recipe(
                recipe,
                mesh,
                hbm,
                kinds=options["kinds"],
                buckets=options["buckets"],
                text_tokens=options["text_tokens"],
                on_plan=on_plan,
                known=known,
            )
        except ValueError as e:  # a shape the mesh cannot split (contentv_jax.sharding names the dimension and axis)
            raise ConfigError(f"{options['recipe_path']}: {e}") from None
        state = state_bytes(recipe, mesh)
        print("state per device (GiB): " + ", ".join(f"{k} {gib(v)}" for k, v in state.items()))
        replicated, unsplit = replicated_params(recipe, mesh)
        total = sum(r["bytes"] for r in replicated)
        print(f"{len(replicated)} parameters left whole on every device ({gib(total)} GiB), largest:")
        for r in replicated[:5]:
            print(f"  {r['name']} {tuple(r['shape'])}")
        print(f"{len(unsplit)} parameter dimensions a rule splits but the mesh does not divide:")
        for line in unsplit[:5]:
            print(f"  {line}")
        meta["state_bytes"] = state
        return plans, {**meta, "replicated_params": replicated, "replicated_bytes": total, "unsplit_params": unsplit}

    def plan_job(
        self, cfg: ModelConfig, bucket: BucketConfig, mesh: SampleMesh, hbm: int, **options: Any
    ) -> tuple[list[StepPlan], dict[str, Any]]:
        """contentv_jax.memory_plan.plan_sample_job on the target's devices, each step printed as it is planned."""
        from contentv_jax.memory_plan import compiler_versions, plan_sample_job, reusable

        target = options["target"]
        if target is None:
            raise ConfigError("--target is required with --backend jax (e.g. tpu:v5p:2x2x2 or cpu:8)")
        devices = plan_devices(target.platform, target.topology, target.total)[: target.count]
        print(format_table([], hbm).splitlines()[0], flush=True)
        on_plan = lambda p: print(format_table([p], hbm).splitlines()[-1], flush=True)  # noqa: E731
        meta = {"target": target.text, "devices": len(devices), "device_kind": devices[0].device_kind}
        meta["compiler"] = compiler_versions()
        known = reusable(options["previous"], devices[0].device_kind)
        plans, resident = plan_sample_job(
            cfg,
            options["encoders"],
            bucket,
            mesh,
            devices,
            hbm,
            text_tokens=options["text_tokens"],
            known=known,
            on_plan=on_plan,
        )
        return plans, {**meta, "resident_bytes": resident}


def plan_devices(platform: str, topology: str | None, count: int) -> list[Any]:
    """A plan target's devices: `count` fake CPU devices (XLA_FLAGS must have asked for them before jax was
    imported) or a libtpu topology's (compiling only)."""
    if platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise ConfigError(f"--target cpu:{count}: jax has only {len(devices)} CPU devices (jax imported before?)")
        return devices[:count]
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: other processes may hold libtpu
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # libtpu missing or an unknown topology name
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"--target tpu:{topology}: no TPU topology ({first}); libtpu comes with `pip install .[tpu]`"
        ) from None


BACKEND = JaxBackend()
