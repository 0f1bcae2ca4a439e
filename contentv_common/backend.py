"""What a backend gives the CLIs: one `Protocol`, met by `contentv_jax.backend` and `contentv_torch_npu.backend`.

The CLIs (contentv_common.cli) pick an implementation with `get(name)` and never branch on the backend's name: a new
backend is a package with a `backend` module whose `BACKEND` satisfies this protocol, plus a line in `BACKENDS`.
`get` imports the backend lazily, so this module (and every CLI that only parses its flags) needs neither framework.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from contentv_common.config.distill import DistillRecipe
    from contentv_common.config.model import ModelConfig
    from contentv_common.config.recipe import BucketConfig, Recipe
    from contentv_common.config.reward import RewardRecipe
    from contentv_common.eval.clip import ClipEmbeddings
    from contentv_common.lora.adapters import Lora
    from contentv_common.plan.report import StepPlan
    from contentv_common.prompt_suite import SamplingGroups
    from contentv_common.sample_mesh import SampleMesh
    from contentv_common.training.run_result import RunResult

# name -> the module that holds its `BACKEND`
BACKENDS = {"jax": "contentv_jax.backend", "torch": "contentv_torch_npu.backend"}


class Backend(Protocol):
    """One framework's model, training, reward tuning, sampling, export and devices, as the CLIs use them.

    Models and encoders are the backend's own objects; the CLIs only hand them back to it (or use the numpy methods
    every backend's encoders share: `encode_text`, `encode_video`, `decode_latents`, `text_dim`, `pooled_dim`, `vae`).
    """

    name: str

    def check_devices(self, recipe: Recipe | RewardRecipe) -> bool:
        """Join a multi-process run (before any other framework call), then ConfigError unless the recipe's mesh
        fits the devices (JAX) or the launcher's world (torch); returns whether this is the main process."""
        ...

    def processes(self) -> tuple[int, int]:
        """(this process's index, the process count) of the launch (JAX: joins jax.distributed first; torch:
        torchrun's RANK and WORLD_SIZE), for work the processes share before training (the data step)."""
        ...

    def data_device(self) -> str:
        """Where this process's encoders run in the data step (`encoders`' device)."""
        ...

    def barrier(self, name: str) -> None:
        """Wait for every process of the run (a no-op where processes share no group before training starts)."""
        ...

    def join_sampling(self, device: str, mesh: SampleMesh | None = None) -> SamplingGroups:
        """Join a multi-process sampling run if this is one (JAX: jax.distributed, before any other JAX call; torch:
        torchrun's ranks, each made current on its LOCAL_RANK accelerator); the data groups a prompt suite's shares
        go to (contentv_common.prompt_suite.share). Without a sampling mesh each process is its own group; with one
        (ValueError unless it uses every device of every process), group g is data index g of the mesh, written by
        the first process holding it."""
        ...

    def broadcast(self, flags: np.ndarray) -> np.ndarray:
        """Process 0's copy of a small bool array, on every process of a sampling mesh (after `join_sampling` with a
        mesh): what the processes decide together must not rest on what each one sees of a shared file system."""
        ...

    def encoders(
        self,
        name: str | Path,
        seed: int = 0,
        dtype: str | None = None,
        device: str = "cpu",
        cache_dir: Path | None = None,
    ) -> Any:
        """VAE + text encoders: "tiny" (random, seeded), "demo" (the CPU demo's) or a pipeline folder (a Path, or a
        recipe's `data.encoders` string), text encoders in `dtype`, on `device` where the backend places them."""
        ...

    def train(self, recipe: Recipe, progress: bool, on_step: Callable[[dict[str, Any]], None] | None) -> RunResult:
        """Train one stage, resuming from its checkpoint dir; `on_step` gets each step's metrics (main process)."""
        ...

    def reward_tune(self, recipe: RewardRecipe, progress: bool) -> dict[str, Any]:
        """Reward fine-tuning (ReFL or GRPO) to the recipe's steps; the last step's record."""
        ...

    def distill(self, recipe: DistillRecipe, progress: bool) -> dict[str, Any]:
        """DMD2 distillation to the recipe's steps in one process, resuming from its checkpoint dir; the student
        exported as a transformer folder at `<checkpoint.dir>/../transformer`. Returns the last step's record."""
        ...

    def export(self, recipe: Recipe) -> Path:
        """The last checkpoint's weights (EMA when kept; a LoRA run's adapters merged) as a transformer folder in
        `<checkpoint.dir>/../transformer`. Every process calls it; the backend decides which of them write."""
        ...

    def transformer_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Canonical name -> shape of the transformer's weights, from an abstract model (nothing allocated)."""
        ...

    def check_attention(self, choice: str) -> None:
        """ValueError unless the attention kernel `choice` ("auto", "xla", "cudnn", "splash") runs here."""
        ...

    def load_transformer(
        self, path: Path, dtype: str, device: str, attention: str = "auto", mesh: SampleMesh | None = None
    ) -> Any:
        """The transformer of a checkpoint folder for inference, with its ModelConfig at `.cfg`; with `mesh`, laid
        out over the sampling mesh's devices (`sample(..., mesh=mesh)` then runs on them)."""
        ...

    def merge_loras(self, model: Any, loras: list[Lora]) -> None:
        """Add the adapters to the loaded weights in place, in float32 on the host, cast back once per weight: the
        very weights `contentv-convert --lora` writes."""
        ...

    def sample(
        self,
        model: Any,
        noise: np.ndarray,
        text: np.ndarray,
        pooled: np.ndarray,
        neg_text: np.ndarray | None,
        neg_pooled: np.ndarray | None,
        **settings: Any,
    ) -> np.ndarray:
        """Denoise `noise` (numpy latents) with the flow-matching sampler; `settings`: steps, guidance, shift,
        shift_terminal, progress, mesh (the model's `load_transformer` mesh)."""
        ...

    def clip_embeddings(self, folder: Path, device: str = "cpu") -> ClipEmbeddings:
        """The CLIP model of a local transformers CLIPModel folder (the reward scorer's loader) as unit image and text
        embeddings, numpy in and out, for the evaluation's CLIP metrics."""
        ...

    def trace_layers(self, path: Path, pos_embed: str | None, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every layer's output of the checkpoint's transformer on `inputs`, in float32 at full matmul precision."""
        ...

    def plan(self, recipe: Recipe | RewardRecipe, hbm: int, **options: Any) -> tuple[list[StepPlan], dict[str, Any]]:
        """Ahead-of-time memory plan of the recipe's steps against `hbm` bytes per device (contentv-plan's options)."""
        ...

    def plan_job(
        self, cfg: ModelConfig, bucket: BucketConfig, mesh: SampleMesh, hbm: int, **options: Any
    ) -> tuple[list[StepPlan], dict[str, Any]]:
        """Memory plan of tools/sample.py's job (text, one sampling step, decode) for one video of `bucket` on `mesh`;
        the meta has "resident_bytes", the weights kept loaded on the first device (contentv-plan's options)."""
        ...


def get(name: str) -> Backend:
    """The backend called `name` ("jax" or "torch"), imported now: ValueError for an unknown name; a backend whose
    framework is not installed raises ModuleNotFoundError, which run_cli turns into the extra to install."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name]).BACKEND
