"""Flow-matching training of the ContentV transformer in JAX, sharded over a (data, fsdp, sequence, tensor) mesh.

Read top to bottom: the train state, the jitted step (loss, grads, the divergence guard's skip, AdamW, EMA:
contentv_jax.optim), then `run`, the loop with checkpoints and resume. Randomness (noise, sigmas, text dropout) arrives
with each batch from contentv_jax.data, so the step itself is deterministic and equal on every mesh.

The loop never waits on the host between two steps: the step decides on the device whether it is applied (the guard's
window lives in the state), the next batches are prepared and placed in a background thread
(contentv_common.prefetch), and step k's metrics are read after step k+1 is dispatched (logged one step late). Only
checkpoints, evaluations and the last step wait for their step, since they need its state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from contentv_common.config.recipe import Recipe
from contentv_common.config.reward import RewardRecipe
from contentv_common.data.cache import LatentCache
from contentv_common.dtypes import DTYPES
from contentv_common.errors import ConfigError, TrainingStopped
from contentv_common.lora.training import write_adapter_file
from contentv_common.prefetch import Prefetcher
from contentv_common.reward.run import optimizer_updates
from contentv_common.text.online import TOKEN_KEYS, text_configs
from contentv_common.training.divergence import DivergenceGuard
from contentv_common.training.evaluation import (
    EVAL_CLIP,
    EvalPrompts,
    eval_batch,
    eval_clip_inputs,
    eval_prompts,
    eval_scorers,
    frame_strip,
    score_clips,
)
from contentv_common.training.metrics import MetricsWriter
from contentv_common.training.optim import learning_rate
from contentv_common.training.run_result import RunResult
from contentv_common.training.schedules import interpolate, velocity_target
from contentv_jax import lora, multihost, sharding
from contentv_jax.checkpointing import Checkpointer, abstract_like
from contentv_jax.data import make_loader
from contentv_jax.ops import attention_for
from contentv_jax.optim import guard_limits, guard_record, guarded_update, make_optimizer
from contentv_jax.text_encoders import abstract_text_encoders, load_text_encoders, tiny_text_encoders
from contentv_jax.transformer import Transformer


class Trainer:
    """The model's static part, the optimizer and the jitted functions for one recipe on one mesh. `pad_multiple`
    pads the joint sequence to a multiple of it in the attention (contentv_jax.ops.Attention; contentv-bench's
    `--pad-to`)."""

    def __init__(self, recipe: Recipe | RewardRecipe, mesh: Mesh, pad_multiple: int | None = None):
        self.recipe, self.mesh = recipe, mesh
        dtype = DTYPES[recipe.compute_dtype]
        # LoRA: the base in `lora.base_dtype`, frozen; only the adapters (float32) train (contentv_jax.lora)
        base_dtype = DTYPES[recipe.lora.base_dtype] if recipe.lora else jnp.float32

        def build_plain() -> Transformer:
            return Transformer(
                recipe.model_config,
                rngs=nnx.Rngs(recipe.seed),
                dtype=dtype,
                param_dtype=base_dtype,
                remat=recipe.remat,
                attention=attention_for(recipe.attention, mesh, pad_multiple=pad_multiple),
                constrain=sharding.ActivationSharding(mesh),
            )

        self.lora_plan = lora.plan_for(nnx.eval_shape(build_plain), recipe.lora) if recipe.lora else None

        def build() -> Transformer:
            model = build_plain()
            return lora.add_adapters(model, self.lora_plan) if self.lora_plan else model

        self._build, self._build_plain = build, build_plain
        self.graphdef, self._abstract_params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
        # fixed buffers (SD3's 2D position table) are computed, not stored in the train state; XLA drops the params
        self.buffers = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
        self.param_shardings = sharding.param_shardings(nnx.to_pure_dict(self._abstract_params), mesh)
        self.tx = make_optimizer(recipe.optimizer, schedule_steps(recipe))
        self._steps: dict[tuple, Callable] = {}
        self._init: tuple[Callable, Callable] | None = None
        self._eval: Callable | None = None
        # data.text online: the frozen text encoders (float32, as the cache encodes) sharded by TEXT_PARAM_AXES; their
        # parameters enter the step beside the batch, never the train state (no gradient, optimizer state, checkpoint)
        self.text_graphdef: nnx.GraphDef | None = None
        self._text_params: dict[str, Any] | None = None
        configs = text_configs(recipe.data.encoders) if online_text(recipe) else None
        if configs is not None:
            self.text_graphdef, self.abstract_text = abstract_text_encoders(configs, jnp.dtype(jnp.float32), mesh)

    # ---- state -------------------------------------------------------------------------------------------------

    def state_shardings(self, state: dict[str, Any]) -> dict[str, Any]:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        trained = self.trained(self.param_shardings)[0]
        out = {
            "step": replicated,
            "skipped": replicated,
            "guard": jax.tree.map(lambda _: replicated, state["guard"]),
            "params": self.param_shardings,
            "opt_state": sharding.like_params_shardings(state["opt_state"], trained, self.mesh),
        }
        for copy in ("ema", "anchor"):  # copies of the trained part: the EMA, a reward run's anchor
            if copy in state:
                out[copy] = trained
        return out

    def trained(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(trained, frozen) parts of a parameter tree: with LoRA the adapters and the base, else all and nothing.
        The optimizer state and the EMA cover the trained part only."""
        return lora.split_adapters(params) if self.lora_plan else (params, {})

    def join(self, trained: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
        return lora.join(trained, frozen) if self.lora_plan else trained

    def _state_from_params(self, params: dict[str, Any]) -> dict[str, Any]:
        trained = self.trained(params)[0]
        state = {
            "step": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32),
            "guard": jax.tree.map(jnp.asarray, DivergenceGuard(self.recipe.divergence, limit=0).window()),
            "params": params,
            "opt_state": self.tx.init(trained),
        }
        if self.recipe.optimizer.ema_decay is not None:
            state["ema"] = jax.tree.map(jnp.copy, trained)
        return state

    def with_guard(self, state: dict[str, Any], guard: DivergenceGuard) -> dict[str, Any]:
        """`state` with the device-side guard set to the host guard's window."""
        return {**state, "guard": jax.device_put(guard.window(), NamedSharding(self.mesh, PartitionSpec()))}

    @staticmethod
    def checkpointed(state: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint's orbax tree holds: all but the guard's window, which checkpoints keep with the counters
        in their JSON (`divergence`, as the torch twin's)."""
        return {k: v for k, v in state.items() if k != "guard"}

    def abstract_state(self) -> dict[str, Any]:
        """Shapes, dtypes and shardings of the train state (the restore target; nothing allocated)."""
        abstract = jax.eval_shape(self._state_from_params, nnx.to_pure_dict(self._abstract_params))
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.state_shardings(abstract)
        )

    def init_state(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A fresh, sharded train state: random init (on device, never whole on one host) or the given params.
        With LoRA, `params` may be the base alone (cast to `base_dtype`) and the adapters start new (seeded: the
        torch twin starts from the same values) unless `params` holds them."""
        if self._init is None:
            shardings = jax.tree.map(lambda x: x.sharding, self.abstract_state())

            def fresh() -> dict[str, Any]:
                _, p, _ = nnx.split(self._build(), nnx.Param, ...)
                return self._state_from_params(nnx.to_pure_dict(p))

            self._init = (
                multihost.jit_together(fresh, out_shardings=shardings),
                multihost.jit_together(self._state_from_params, out_shardings=shardings),
            )
        if self.lora_plan is not None:
            return self._init[1](self._with_adapters(params))
        if params is None:
            return self._init[0]()
        return self._init[1](jax.device_put(params, self.param_shardings))

    def _with_adapters(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """LoRA parameters on their shards: the base (random when None, cast to the base dtype) and the adapters
        (new unless given)."""
        adapters, base = lora.split_adapters(params or {})
        if params is None:
            fresh = jax.jit(lambda: nnx.to_pure_dict(nnx.split(self._build(), nnx.Param, ...)[1]),
                            out_shardings=self.param_shardings)  # fmt: skip
            base = lora.split_adapters(fresh())[1]
        if not adapters:
            adapters = lora.initial_tree(self.lora_plan, self.recipe.seed)
        _, abstract_base = lora.split_adapters(nnx.to_pure_dict(self._abstract_params))
        base = jax.tree.map(lambda x, a: x.astype(a.dtype), base, abstract_base)
        return jax.device_put(lora.join(adapters, base), self.param_shardings)

    def model(self, params: dict[str, Any]) -> Transformer:
        """The NNX model for a pure-dict parameter tree (for sampling or evaluation)."""
        state = jax.tree.map(lambda x: x, self._abstract_params)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state, self.buffers)

    def final_params(self, state: dict[str, Any]) -> dict[str, Any]:
        """The parameters a run delivers: the EMA of the trained part when kept, with the frozen part."""
        trained, frozen = self.trained(state["params"])
        return self.join(state.get("ema", trained), frozen)

    def plain_model(self, params: dict[str, Any]) -> Transformer:
        """A Transformer without adapters: with LoRA the adapters merged into the base (contentv_jax.lora.merged);
        else `model(params)`."""
        if self.lora_plan is None:
            return self.model(params)
        graphdef, abstract, _ = nnx.split(nnx.eval_shape(self._build_plain), nnx.Param, ...)
        nnx.replace_by_pure_dict(abstract, lora.merged(self.lora_plan, params))
        buffers = jax.jit(lambda: nnx.split(self._build_plain(), nnx.Param, ...)[2])()
        return nnx.merge(graphdef, abstract, buffers)

    def adapters(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        """The LoRA adapters a run delivers (EMA when kept) as canonical arrays for the adapter file
        (contentv_common.lora.adapters)."""
        return lora.canonical_adapters(self.lora_plan, multihost.to_host(self.trained(self.final_params(state))[0]))

    def text_params(self) -> dict[str, Any]:
        """The online text encoders' parameters on their shards (`data.encoders`: tiny or a pipeline folder), loaded
        once."""
        if self._text_params is None:
            name, mesh = self.recipe.data.encoders, self.mesh
            if name == "tiny":
                text = tiny_text_encoders(self.recipe.seed, mesh=mesh)
            else:
                text = load_text_encoders(name, mesh=mesh)
            self._text_params = nnx.to_pure_dict(nnx.split(text.model)[1])
        return self._text_params

    def prompt_rows(self, rows: int) -> NamedSharding:
        """Where the step's prompts are encoded: split over data x fsdp x sequence when the rows divide (the sequence
        ranks, which share their samples, each encode a share: the encoders run as plain FSDP over the axes their
        weights are split on), else over data x fsdp as the batch is."""
        axes = (*sharding.BATCH, "sequence")
        if rows % int(np.prod([self.mesh.shape[a] for a in axes])):
            axes = sharding.BATCH
        return NamedSharding(self.mesh, PartitionSpec(axes, None))

    def encoded(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` with text and pooled: online, its token ids through the text encoders (`batch["text_encoders"]`,
        their parameters), the outputs split over the batch as a cached batch's text is; else `batch` as it is."""
        if "text_encoders" not in batch:
            return batch
        rest = dict(batch)
        state = jax.tree.map(lambda x: x, self.abstract_text)
        nnx.replace_by_pure_dict(state, rest.pop("text_encoders"))
        ids = [jax.lax.with_sharding_constraint(rest.pop(k), self.prompt_rows(batch[k].shape[0])) for k in TOKEN_KEYS]
        text, pooled = nnx.merge(self.text_graphdef, state)(*ids)
        where = sharding.batch_shardings({"text": text.shape, "pooled": pooled.shape}, self.mesh)
        text = jax.lax.with_sharding_constraint(text, where["text"])
        return {**rest, "text": text, "pooled": jax.lax.with_sharding_constraint(pooled, where["pooled"])}

    # ---- the step ----------------------------------------------------------------------------------------------

    def per_sample_loss(self, params: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
        """Velocity MSE [B] at x_t = (1 - s) x0 + s noise, timestep 1000 s, unweighted."""
        model = self.model(params)
        x0, noise, sigmas = batch["latents"], batch["noise"], batch["sigmas"]
        pred = model(interpolate(x0, noise, sigmas), sigmas * 1000.0, batch["text"], batch["pooled"])
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - velocity_target(x0, noise)), axis=(1, 2, 3, 4))

    def loss(self, params: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
        """Weighted velocity MSE: the per-sample losses times their weights, averaged over the batch."""
        return jnp.mean(self.per_sample_loss(params, batch) * batch["weights"])

    def evaluate(self, params: dict[str, Any], cache: LatentCache, held_out: list[int]) -> dict[float, float]:
        """Validation loss per fixed timestep, averaged over the held-out samples
        (contentv_common.training.evaluation)."""
        if self._eval is None:
            self._eval = multihost.jit_together(self.per_sample_loss)
        timesteps = self.recipe.eval.timesteps
        rows = [self._eval(params, eval_batch(cache, i, timesteps, self.recipe.seed)) for i in held_out]
        mean = np.mean(jax.device_get(rows), axis=0)
        return {t: float(v) for t, v in zip(timesteps, mean, strict=True)}

    def step(self, state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        """One flow-matching update (`apply`); online text is encoded first (`encoded`), outside the gradient."""
        batch = self.encoded(batch)
        trained, frozen = self.trained(state["params"])
        loss, grads = jax.value_and_grad(lambda t: self.loss(self.join(t, frozen), batch))(trained)
        return self.apply(state, loss, grads)

    def apply(
        self, state: dict[str, Any], loss: jax.Array, grads: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        """The state after one update with `grads` of the trained part: a non-finite loss or gradient norm, or one above
        the divergence guard's limits (from the window in `state["guard"]`), leaves params, optimizer and EMA untouched
        (counted in skipped). Returns (state, {loss, grad_norm, ok}); keys it does not know (an anchor) pass through."""
        trained, frozen = self.trained(state["params"])
        limits = guard_limits(state["guard"], self.recipe.divergence.spike_factor)
        trained, opt_state, average, ok, grad_norm = guarded_update(
            self.tx, trained, state["opt_state"], grads, loss, limits, state.get("ema"), self.recipe.optimizer.ema_decay
        )
        new = {
            **state,
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~ok).astype(jnp.int32),
            "guard": guard_record(state["guard"], ok, loss, grad_norm),
            "params": self.join(trained, frozen),
            "opt_state": opt_state,
        }
        if average is not None:
            new["ema"] = average
        return new, {"loss": loss, "grad_norm": grad_norm, "ok": ok}

    def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host batch (this process's rows, from contentv_jax.data) -> global arrays sharded over the mesh.

        Each device takes its block out of the rows this process read (a batch without `global_size` is global).
        Online text: the token ids are placed so, and the text encoders' parameters join as `text_encoders`."""
        batch = dict(batch)
        size = int(batch.pop("global_size", len(batch["latents"])))
        first, _, count = multihost.batch_shards(self.mesh)
        offset = first * size // count  # the global row of this process's first row
        shapes = {k: (size, *v.shape[1:]) for k, v in batch.items()}
        shardings = sharding.batch_shardings(shapes, self.mesh)

        def make(name: str) -> jax.Array:
            rows = batch[name]

            def block(index: tuple[slice, ...]) -> np.ndarray:
                b = index[0].indices(size)
                return rows[(slice(b[0] - offset, b[1] - offset), *index[1:])]

            return jax.make_array_from_callback(shapes[name], shardings[name], block)

        placed: dict[str, Any] = {name: make(name) for name in batch}
        if self.text_graphdef is not None:
            placed["text_encoders"] = self.text_params()
        return placed

    def jitted_step(self, state: dict[str, Any], batch: dict[str, jax.Array]) -> Callable:
        """The compiled flow-matching step for this state layout and batch shape (one compile per bucket)."""
        key = step_layout(state, batch)
        if key not in self._steps:
            self._steps[key] = self.compile_step(self.step, state, batch)
        return self._steps[key]

    def compile_step(self, step: Callable, state: dict[str, Any], batch: dict[str, Any]) -> Callable:
        """`step(state, batch) -> (state, metrics)` jitted with the state donated and its shardings held in and out;
        `batch` is any tree of placed arrays (a reward step's frozen decoder and reward weights too)."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        state_sh = self.state_shardings(state)
        batch_sh = jax.tree.map(lambda v: v.sharding, batch)
        return multihost.jit_together(
            step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated), donate_argnums=0
        )


def online_text(recipe: Recipe | RewardRecipe) -> bool:
    """The recipe's training step encodes its captions (data.text: online)."""
    return isinstance(recipe, Recipe) and recipe.data.text == "online"


def step_layout(state: dict[str, Any], batch: Any) -> tuple:
    """What one compile of a step serves: the state's entries and the batch tree's paths and shapes."""
    flat = jax.tree_util.tree_flatten_with_path(batch)[0]
    return tuple(sorted(state)), tuple((jax.tree_util.keystr(path), v.shape) for path, v in flat)


def schedule_steps(recipe: Recipe | RewardRecipe) -> int | None:
    """The length of a cosine schedule: the run's optimizer updates (a GRPO step makes `updates_per_rollout`)."""
    if recipe.optimizer.decay != "cosine":
        return None
    return optimizer_updates(recipe) if isinstance(recipe, RewardRecipe) else recipe.steps


_TRAINERS: dict[tuple, Trainer] = {}


def get_trainer(recipe: Recipe, mesh: Mesh) -> Trainer:
    """A Trainer for this recipe and mesh, reused when only data, paths or run length differ (no recompiles
    between stages or resumed runs of the same shapes in one process)."""
    r = recipe
    text = (r.data.text, r.data.encoders) if online_text(r) else None
    key = (r.model_config, r.compute_dtype, r.remat, r.attention, r.optimizer, schedule_steps(r), r.seed, r.lora,
           r.divergence, mesh, text)  # fmt: skip
    if key not in _TRAINERS:
        _TRAINERS[key] = Trainer(recipe, mesh)
    return _TRAINERS[key]


def check_devices(recipe: Recipe) -> None:
    """ConfigError unless the recipe's mesh fits the devices (checked before any model or data work)."""
    n, have = int(np.prod(recipe.mesh.shape)), jax.device_count()
    if n > have or (jax.process_count() > 1 and n != have):
        mesh = "x".join(map(str, recipe.mesh.shape))
        raise ConfigError(f"mesh: {mesh} (data x fsdp x sequence x tensor) needs {n} devices, there are {have}")


def default_mesh(recipe: Recipe) -> Mesh:
    """The recipe's mesh; a single-host run with more devices than the mesh needs uses the first ones."""
    check_devices(recipe)
    n = int(np.prod(recipe.mesh.shape))
    devices = jax.devices()
    if jax.process_count() == 1 and n < len(devices):
        devices = devices[:n]
    return sharding.make_mesh(recipe.mesh, devices)


def run(
    recipe: Recipe,
    *,
    mesh: Mesh | None = None,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
) -> RunResult:
    """Train `recipe` (one stage) to `recipe.steps`, resuming from its checkpoint dir if it holds a checkpoint.

    `stop_after` ends the call early at that step (after checkpointing it), as an interruption would; a later call
    continues the same loss trajectory. `on_step` gets {step, loss, grad_norm, lr-free metrics, step_time}.
    The checkpoint dir's run lock is held from the start (before any model work) to the end.
    """
    multihost.initialize()
    ckpt = Checkpointer(recipe.checkpoint)
    try:
        return _train(recipe, get_trainer(recipe, mesh or default_mesh(recipe)), ckpt, progress, on_step, stop_after)
    finally:
        ckpt.close()


@dataclass
class _Dispatched:
    """A step handed to the devices whose metrics the loop has not read yet."""

    step: int
    metrics: dict[str, jax.Array]
    batch: int  # global batch size
    data_state: dict[str, Any]  # the loader's position after this step's batch


def _train(
    recipe: Recipe,
    trainer: Trainer,
    ckpt: Checkpointer,
    progress: bool,
    on_step: Callable[[dict[str, Any]], None] | None,
    stop_after: int | None,
) -> RunResult:
    data_state, guard_state = None, None
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(trainer.checkpointed(trainer.abstract_state()))
        guard_state = data_state.pop("divergence", None) or {"skipped": int(state["skipped"])}
    else:
        state = trainer.init_state(initial_params(recipe, trainer.mesh))
        if recipe.resume_from is not None:
            prev = Checkpointer(replace(recipe.checkpoint, dir=recipe.resume_from), writer=False)
            state = {**state, **prev.restore_weights(abstract_like(state))}
            prev.close()
    guard = DivergenceGuard(recipe.divergence, recipe.nan_skip_limit, guard_state)
    state = trainer.with_guard(state, guard)
    loader = make_loader(recipe, data_state, multihost.batch_shards(trainer.mesh))
    eval_cache = LatentCache(recipe.data.cache_dir, list(recipe.data.buckets)) if recipe.eval.interval else None
    held_out = eval_cache.hold_out(recipe.eval.samples, recipe.seed) if eval_cache else []
    prompts = None
    if eval_cache is not None and recipe.eval.prompts:
        prompts = eval_prompts(eval_cache, recipe.data.buckets, recipe.eval.prompts, recipe.seed)
    writer = MetricsWriter(recipe.log_dir, recipe.log_interval) if jax.process_index() == 0 else None
    decode, scorers = _eval_tools(recipe) if prompts is not None and writer is not None else (None, {})
    start = int(state["step"])
    end = recipe.steps if stop_after is None else min(stop_after, recipe.steps)
    losses, skipped = {}, []
    bar = tqdm(total=end - start, desc="train", disable=not progress)
    last_read = time.perf_counter()

    def finish(done: _Dispatched) -> None:
        """Read a dispatched step's metrics (waiting for it), count and log it; stop the run past the skip limit."""
        nonlocal last_read
        metrics = {k: v.item() for k, v in jax.device_get(done.metrics).items()}
        now = time.perf_counter()
        dt, last_read = now - last_read, now  # the time between two steps' ends: the loop's time per step
        step, loss, norm, ok = done.step, metrics["loss"], metrics["grad_norm"], bool(metrics["ok"])
        lr = learning_rate(recipe.optimizer, step - guard.skipped, recipe.steps)
        guard.record(step, loss, norm, ok)
        if ok:
            losses[step] = loss
        else:
            skipped.append(step)
            bar.write(f"step {step}: loss {loss} / grad norm {norm} non-finite or spiking, skipped")
        bar.set_postfix(loss=f"{loss:.4f}", step_s=f"{dt:.2f}")
        bar.update()
        record = {"step": step, "loss": loss, "grad_norm": norm, "lr": lr, "skipped": not ok}
        record.update(nan_skips=guard.skipped, step_time=dt, batch=done.batch)
        if writer is not None:
            writer.step(record)
        if on_step is not None:
            on_step(record)
        if guard.stopped:
            moved = ckpt.set_aside_from(guard.first_bad_step)
            aside = f" (set aside: {', '.join(p.name for p in moved)})" if moved else ""
            last = ckpt.latest_step()
            where = f"resume point: step {last} in {ckpt.dir}" if last is not None else (
                f"no checkpoint from before it in {ckpt.dir}")  # fmt: skip
            if writer is not None:
                writer.close()
            raise TrainingStopped(guard.stop_message(where + aside))

    source = ((batch, loader.get_state()) for batch in loader)  # the position after each batch, for checkpoints
    with bar, Prefetcher(source, lambda item: (trainer.device_batch(item[0]), item[1])) as batches:
        waiting: _Dispatched | None = None
        for step in range(start, end):
            batch, data_after = next(batches)
            state, metrics = trainer.jitted_step(state, batch)(state, batch)
            if waiting is not None:
                finish(waiting)  # step - 1's metrics, read while this step runs
            waiting = _Dispatched(step, metrics, int(batch["latents"].shape[0]), data_after)
            evaluate = bool(held_out) and (step + 1) % recipe.eval.interval == 0
            save = (step + 1) % recipe.checkpoint.interval == 0 or step + 1 == end
            if not (evaluate or save):
                continue
            finish(waiting)  # these need this step's state: the next step waits
            waiting = None
            if evaluate:
                evaluation = trainer.evaluate(state["params"], eval_cache, held_out)
                # every process; the prompts' clips, when there are some, stand in for the held-out sample's
                clip = _eval_clip(trainer, state["params"], eval_cache, held_out[0]) if prompts is None else None
                if writer is not None:
                    writer.evaluation(step + 1, evaluation, clip)
                if prompts is not None:
                    videos = _eval_samples(trainer, state["params"], prompts, decode)  # every process
                    if writer is not None and videos is not None:
                        writer.eval_samples(step + 1, score_clips(videos, prompts.prompts, scorers), videos)
            if save:
                data = {**data_after, "divergence": guard.state()}
                ckpt.save(step + 1, trainer.checkpointed(state), data, pin_before=guard.first_bad_step)
                if trainer.lora_plan is not None:
                    write_adapters(recipe, trainer, state)
    if writer is not None:
        writer.close()
    return RunResult(losses=losses, skipped_steps=skipped, final_step=end, state=state)


def write_adapters(recipe: Recipe, trainer: Trainer, state: dict[str, Any]) -> None:
    """The adapter file of the checkpoint just saved (EMA when kept), written by process 0."""
    adapters = trainer.adapters(state)  # every process takes part in gathering
    if jax.process_index() == 0:
        write_adapter_file(recipe.checkpoint.dir, adapters, recipe.lora)


def clip_latents(trainer: Trainer, params: dict[str, Any], inputs: dict[str, np.ndarray], rows: int = 1) -> np.ndarray:
    """The latents of the first `rows` in-loop clips (`eval_clip_inputs` or `EvalPrompts.inputs`: rows padded to a
    multiple of the data x fsdp shards), drawn by every process together with the sampler
    (contentv_jax.sampling.sample) on the training mesh, the model sharded as it trains."""
    from contentv_jax.reward.mesh import device_batch
    from contentv_jax.sampling import sample

    model = trainer.model(params)
    return sample(model, **device_batch(inputs, trainer.mesh), progress=False, **EVAL_CLIP)[:rows]


def _eval_tools(recipe: Recipe) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """Process 0's decoder of `eval.prompts`' clips (the VAE of the data's encoders: the demo's, the tiny random one
    of the recipe's seed or a pipeline folder's vae/) and their metrics' scorers (`eval_scorers`; CLIP's with
    `eval.clip`)."""
    from functools import partial

    from contentv_common.demo import DEMO_VAE
    from contentv_jax.encoders import tiny_vae
    from contentv_jax.sampling import decode_latents
    from contentv_jax.vae import load_vae

    name = recipe.data.encoders
    vae = tiny_vae(recipe.seed) if name == "tiny" else load_vae(DEMO_VAE if name == "demo" else Path(name) / "vae")
    clip = None
    if recipe.eval.clip is not None:
        from contentv_jax.reward.clip import ClipEmbeddings

        clip = ClipEmbeddings(recipe.eval.clip)
    return partial(decode_latents, vae), eval_scorers(recipe.eval.prompts, clip)


def _eval_samples(
    trainer: Trainer, params: dict[str, Any], prompts: EvalPrompts, decode: Callable[[np.ndarray], np.ndarray] | None
) -> np.ndarray | None:
    """The clips of `eval.prompts` (every process: `clip_latents`), decoded by process 0 into uint8 [N, F, H, W, 3]
    (None elsewhere)."""
    shards = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    latents = clip_latents(trainer, params, prompts.inputs(shards), len(prompts.prompts))
    return decode(latents) if decode is not None else None


def _eval_clip(trainer: Trainer, params: dict[str, Any], cache: LatentCache, index: int) -> np.ndarray | None:
    """A clip sampled for held-out sample `index`'s caption (every process: `clip_latents`) when the cache was built
    with the demo encoders (whose VAE is on disk), decoded into a frame strip by process 0 (None elsewhere, or
    without the demo encoders)."""
    if trainer.recipe.data.encoders != "demo":
        return None
    from contentv_common.demo import DEMO_VAE
    from contentv_jax.sampling import decode_latents
    from contentv_jax.vae import load_vae

    copies = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    latents = clip_latents(trainer, params, eval_clip_inputs(cache, index, trainer.recipe.seed, copies))
    return frame_strip(decode_latents(load_vae(DEMO_VAE), latents)[0]) if multihost.is_primary() else None


def initial_params(recipe: Recipe, mesh: Mesh | None = None) -> dict[str, Any] | None:
    """Pretrained weights from `init_from` (e.g. SD3.5-Large as the video model), or None for random init; with
    `mesh`, each parameter is read straight onto its shards. A LoRA base is read in `lora.base_dtype` (an 8B base in
    bf16 is 15 GiB: one device never holds it in fp32)."""
    if recipe.init_from is None:
        return None
    from contentv_jax.loading import load_transformer

    dtype = DTYPES[recipe.lora.base_dtype] if recipe.lora else jnp.float32
    model = load_transformer(Path(recipe.init_from), dtype=dtype, pos_embed=recipe.model_config.pos_embed, mesh=mesh)
    if model.cfg != recipe.model_config:
        raise ValueError(f"init_from {recipe.init_from}: model config {model.cfg} differs from the recipe's")
    return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
