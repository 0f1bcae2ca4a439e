"""The torch twin as a `contentv_common.backend.Backend` (the JAX core's is contentv_jax/backend.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contentv_common.checkpoint.formats import detect_format
from contentv_common.config.distill import DistillRecipe
from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import BucketConfig, Recipe
from contentv_common.config.reward import RewardRecipe
from contentv_common.errors import ConfigError
from contentv_common.lora.adapters import Lora
from contentv_common.plan.report import StepPlan, format_table, gib
from contentv_common.prompt_suite import SamplingGroups
from contentv_common.sample_mesh import SampleMesh, check_mesh_devices
from contentv_common.training.run_result import RunResult
from contentv_torch_npu.device import resolve_device
from contentv_torch_npu.encoders import Encoders


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _read_jax_init(recipe: Recipe | RewardRecipe | DistillRecipe) -> None:
    """A JAX-format `init_from` (e.g. the tiny demo's export) is read through contentv_jax's reader, registered by
    importing it."""
    if recipe.init_from and Path(recipe.init_from).is_dir() and detect_format(recipe.init_from) == "jax":
        import contentv_jax  # noqa: F401


class TorchBackend:
    name = "torch"

    def check_devices(self, recipe: Recipe | RewardRecipe) -> bool:
        """The torchrun world (WORLD_SIZE) against the recipe's mesh; rank 0 is the main process."""
        from contentv_torch_npu.distributed import check_mesh

        try:
            check_mesh(recipe.mesh, int(os.environ.get("WORLD_SIZE", "1")), recipe.model_config)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return _rank() == 0

    def processes(self) -> tuple[int, int]:
        return _rank(), int(os.environ.get("WORLD_SIZE", "1"))

    def data_device(self) -> str:
        """The rank's accelerator (LOCAL_RANK of npu, cuda), else the CPU."""
        from contentv_torch_npu.device import local_device

        return str(local_device(resolve_device("auto"), int(os.environ.get("LOCAL_RANK", "0"))))

    def barrier(self, name: str) -> None:
        """No process group exists outside a run: ranks that must wait poll for what rank 0 writes instead."""

    def join_sampling(self, device: str, mesh: SampleMesh | None = None) -> SamplingGroups:
        """Without a mesh torchrun's RANK of WORLD_SIZE, each its own group and no process group (the ranks exchange
        nothing); with one, the mesh's process groups over the world."""
        from contentv_torch_npu.device import local_device

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if mesh is None:
            local_device(resolve_device(device), int(os.environ.get("LOCAL_RANK", "0")))
            return SamplingGroups(_rank(), world, tuple(range(world)))
        from contentv_torch_npu.sampling import topology

        check_mesh_devices(mesh, world)
        topo = topology(device, mesh)  # the process groups; rank (d * cfg + c) * sequence + s
        return SamplingGroups(topo.rank, world, tuple(g * mesh.cfg * mesh.sequence for g in range(mesh.data)), True)

    def broadcast(self, flags: np.ndarray) -> np.ndarray:
        import torch.distributed as dist

        if not dist.is_initialized():
            return flags
        box = [flags]
        dist.broadcast_object_list(box, src=0)
        return np.asarray(box[0])

    def encoders(
        self,
        name: str | Path,
        seed: int = 0,
        dtype: str | None = None,
        device: str = "cpu",
        cache_dir: Path | None = None,
    ) -> Encoders:
        from contentv_torch_npu import encoders

        where = resolve_device(device)
        if name == "tiny":
            return encoders.tiny_encoders(seed, device=where, cache_dir=cache_dir)
        if name == "demo":
            return encoders.demo_encoders(where, cache_dir=cache_dir)
        text_dtype = getattr(torch, dtype or "float32")
        return encoders.load_encoders(name, dtype=text_dtype, device=where, cache_dir=cache_dir)

    def train(self, recipe: Recipe, progress: bool, on_step: Callable[[dict[str, Any]], None] | None) -> RunResult:
        from contentv_torch_npu.train import run

        _read_jax_init(recipe)
        return run(recipe, progress=progress, on_step=on_step)

    def reward_tune(self, recipe: RewardRecipe, progress: bool) -> dict[str, Any]:
        from contentv_torch_npu.reward.run import run

        _read_jax_init(recipe)
        return run(recipe, progress=progress)

    def distill(self, recipe: DistillRecipe, progress: bool) -> dict[str, Any]:
        from contentv_torch_npu.distill.run import run

        _read_jax_init(recipe)
        return run(recipe, progress=progress, device=str(resolve_device("auto")))

    def export(self, recipe: Recipe) -> Path:
        """Rank 0 writes the folder; the other ranks only get its path."""
        from contentv_torch_npu.checkpointing import export_weights, latest_checkpoint

        out = Path(recipe.checkpoint.dir).parent / "transformer"
        if _rank() != 0:
            return out
        step = latest_checkpoint(recipe.checkpoint.dir)
        if step is None:
            raise FileNotFoundError(f"{recipe.checkpoint.dir}: no checkpoint to export")
        return export_weights(step, out, "ema" if (step / "ema").is_dir() else "model", recipe.lora)

    def transformer_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        from contentv_torch_npu.loading import canonical_shapes
        from contentv_torch_npu.transformer import Transformer

        with torch.device("meta"):
            return canonical_shapes(Transformer(cfg))

    def check_attention(self, choice: str) -> None:
        if choice != "auto":
            raise ValueError(f"{choice} is a JAX kernel: use it with --backend jax")

    def load_transformer(
        self, path: Path, dtype: str, device: str, attention: str = "auto", mesh: SampleMesh | None = None
    ) -> Any:
        from contentv_torch_npu.loading import load_transformer

        if mesh is not None and mesh.devices > 1:
            from contentv_torch_npu.sampling import load_sampling_transformer

            return load_sampling_transformer(path, getattr(torch, dtype), device, mesh)
        return load_transformer(path, dtype=getattr(torch, dtype), device=resolve_device(device)).eval()

    def merge_loras(self, model: Any, loras: list[Lora]) -> None:
        from contentv_torch_npu.lora import merge_adapters

        merge_adapters(model, loras)

    def sample(self, model, noise, text, pooled, neg_text, neg_pooled, **settings: Any) -> np.ndarray:
        from contentv_torch_npu.sampling import sample

        return sample(model, noise, text, pooled, neg_text, neg_pooled, **settings)

    def clip_embeddings(self, folder: Path, device: str = "cpu") -> Any:
        from contentv_torch_npu.reward.clip import ClipEmbeddings

        return ClipEmbeddings(folder, resolve_device(device))

    def trace_layers(self, path: Path, pos_embed: str | None, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from contentv_torch_npu.loading import load_transformer
        from contentv_torch_npu.ops import ops_for

        torch.backends.cuda.matmul.allow_tf32 = False
        model = load_transformer(path, pos_embed=pos_embed).eval()
        ops = ops_for(model.ops, "cpu")
        with torch.no_grad():
            x, context, temb_act = model.embed(*(torch.from_numpy(v) for v in inputs.values()))
            out = {"patch_embed": x, "conditioning": temb_act, "context_embedder": context}
            for i, block in enumerate(model.blocks):
                x, context = block(x, context, temb_act, ops)
                out[f"blocks.{i}.x"] = x
                if context is not None:
                    out[f"blocks.{i}.context"] = context
            out["output"] = model.head(x, temb_act, inputs["hidden_states"].shape)
        return {k: v.numpy() for k, v in out.items()}

    def plan(self, recipe: Recipe | RewardRecipe, hbm: int, **options: Any) -> tuple[list[StepPlan], dict[str, Any]]:
        """contentv_torch_npu.memory_plan's estimate on the recipe's own mesh (no target, no reward recipes)."""
        if isinstance(recipe, RewardRecipe):
            raise ConfigError(
                f"{options['recipe_path']}: reward recipes are planned by the JAX backend (--backend jax)"
            )
        if options["previous"]:
            raise ConfigError("--reuse: the torch estimate has no compiled program to reuse (--backend jax)")
        if options["chips"] is not None:
            raise ConfigError("--chips picks chips of a --target (--backend jax); the torch world is the recipe's mesh")
        if "decode" in options["kinds"]:
            raise ConfigError("--kinds decode: the VAE decode is planned by the JAX backend (--backend jax)")
        try:
            from contentv_torch_npu.memory_plan import plan_recipe
        except ImportError as e:
            raise ConfigError(f"--backend torch: the torch planner is not available ({e})") from None
        plans, state = plan_recipe(recipe, hbm)
        print(format_table(plans, hbm), flush=True)
        print("state per device (GiB): " + ", ".join(f"{k} {gib(v)}" for k, v in state.items()))
        return plans, {"state_bytes": state}

    def plan_job(
        self, cfg: ModelConfig, bucket: BucketConfig, mesh: SampleMesh, hbm: int, **options: Any
    ) -> tuple[list[StepPlan], dict[str, Any]]:
        """contentv_torch_npu.memory_plan.plan_sample_job as rank 0 of the mesh's ranks (official encoders only)."""
        if options["encoders"] != "official":
            raise ConfigError("--encoders: the torch estimate counts the official encoders' weights (drop --encoders)")
        try:
            from contentv_torch_npu.memory_plan import plan_sample_job
        except ImportError as e:
            raise ConfigError(f"--backend torch: the torch planner is not available ({e})") from None
        plans, resident = plan_sample_job(cfg, bucket, mesh, hbm, options["text_tokens"])
        print(format_table(plans, hbm), flush=True)
        return plans, {"devices": mesh.devices, "resident_bytes": resident}


BACKEND = TorchBackend()
