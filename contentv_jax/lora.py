"""LoRA in the JAX core: adapted linear modules, the adapters' place in the parameter tree, merging.

`add_adapters` replaces the targeted `nnx.Linear` modules of a Transformer by `LoraLinear` modules that keep the base
`kernel` and `bias` (same paths, so loading and sharding of the base are unchanged) and add `lora_a` [in, rank] and
`lora_b` [rank, out] (the transposes of the canonical torch-layout A and B). The blocks 0..L-2 are stacked under
`lax.scan`, so an adapter on `blocks.*.attn.to_q` is one stacked [L-1, in, rank] leaf; a per-layer `lora_scale`
(alpha / rank, or 0 on a stacked layer the targets leave out) keeps untargeted layers unchanged and their adapters'
gradients zero. The last, context-pre-only block (`last_block`) has its own unstacked adapters and never the text
output projections (`add_out`, `ff_context`), which it lacks. Adapters are `LoraParam`s: the only trainable leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh

from contentv_common.checkpoint.param_table import TRANSFORMER_TABLE, inverse_perm
from contentv_common.config.recipe import LoraConfig
from contentv_common.lora.adapters import Lora, adapted, lora_keys, merged_weight, target_modules
from contentv_common.lora.training import initial_adapters

ADAPTER_LEAVES = ("lora_a", "lora_b")


class LoraParam(nnx.Param):
    """A LoRA matrix: in a LoRA run the only parameters that train (always float32)."""


class LoraScale(nnx.Variable):
    """alpha / rank per layer (0 where a stacked layer is not adapted); fixed, never trained."""


class LoraLinear(nnx.Module):
    """`x W + b + scale (x A) B`: a frozen linear layer (kernel [in, out], bias) plus a low-rank update."""

    def __init__(self, base: nnx.Linear, lora_a: jax.Array, lora_b: jax.Array, scale: jax.Array):
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        self.lora_a, self.lora_b = LoraParam(lora_a), LoraParam(lora_b)
        self.lora_scale = LoraScale(scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias, a, b = promote_dtype(
            (x, self.kernel[...], self.bias[...], self.lora_a[...], self.lora_b[...]), dtype=self.dtype
        )
        y = x @ kernel + bias
        return y + self.lora_scale[...].astype(y.dtype) * ((x @ a) @ b)


@dataclass(frozen=True)
class Site:
    """Where a canonical module lives in the JAX model: its module path and, for the stacked blocks, its layer."""

    path: str
    layer: int | None


@dataclass(frozen=True)
class LoraPlan:
    """The adapted modules of one model under one LoraConfig, and their places in the JAX parameter tree."""

    lora: LoraConfig
    shapes: dict[str, tuple[int, int]]  # canonical module -> torch-layout weight shape (out, in)
    sites: dict[str, Site]
    stacked_layers: int  # L - 1, the length of the stacked blocks' layer axis

    @property
    def modules(self) -> list[str]:
        return sorted(self.shapes)

    def paths(self) -> dict[str, list[str]]:
        """JAX module path -> the canonical modules it holds (one, or several layers of the stacked blocks)."""
        out: dict[str, list[str]] = {}
        for m in self.modules:
            out.setdefault(self.sites[m].path, []).append(m)
        return out


def make_plan(canonical_shapes: dict[str, tuple[int, ...]], num_layers: int, lora: LoraConfig) -> LoraPlan:
    """The plan for a model given its canonical parameter shapes (contentv_jax.loading.canonical_shapes)."""
    from contentv_jax.loading import model_path

    modules = target_modules(canonical_shapes, lora)
    sites, shapes = {}, {}
    for m in modules:
        path, layer = model_path(TRANSFORMER_TABLE.from_canonical(f"{m}.weight"), num_layers)
        sites[m] = Site(path.removesuffix(".kernel"), layer)
        shapes[m] = tuple(canonical_shapes[f"{m}.weight"])
    return LoraPlan(lora, shapes, sites, num_layers - 1)


def plan_for(model: nnx.Module, lora: LoraConfig) -> LoraPlan:
    """The plan for a (possibly abstract) plain Transformer."""
    from contentv_jax.loading import canonical_shapes

    return make_plan(canonical_shapes(model), model.cfg.num_layers, lora)


def _module(root: nnx.Module, path: str) -> nnx.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _scales(plan: LoraPlan, path: str, modules: list[str]) -> np.ndarray:
    if plan.sites[modules[0]].layer is None:
        return np.asarray(plan.lora.scale, np.float32)
    scale = np.zeros(plan.stacked_layers, np.float32)
    for m in modules:
        scale[plan.sites[m].layer] = plan.lora.scale
    return scale


def add_adapters(model: nnx.Module, plan: LoraPlan) -> nnx.Module:
    """Replace the plan's linear modules of `model` by LoraLinear modules with zero adapters (in place)."""
    r = plan.lora.rank
    for path, modules in plan.paths().items():
        parent, _, name = path.rpartition(".")
        holder = _module(model, parent) if parent else model
        base = getattr(holder, name)
        *lead, d_in, d_out = base.kernel.shape
        a = jnp.zeros((*lead, d_in, r), jnp.float32)
        b = jnp.zeros((*lead, r, d_out), jnp.float32)
        setattr(holder, name, LoraLinear(base, a, b, jnp.asarray(_scales(plan, path, modules))))
    return model


def is_adapter(path: tuple) -> bool:
    return path[-1] in ADAPTER_LEAVES


def split_adapters(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapters, base) of a pure-dict parameter tree; `join` puts them back together."""
    flat = flatten_dict(params)
    adapters = {k: v for k, v in flat.items() if is_adapter(k)}
    base = {k: v for k, v in flat.items() if not is_adapter(k)}
    return unflatten_dict(adapters), unflatten_dict(base)


def join(adapters: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    return unflatten_dict({**flatten_dict(base), **flatten_dict(adapters)})


def adapter_tree(plan: LoraPlan, canonical: dict[str, np.ndarray]) -> dict[str, Any]:
    """Canonical adapters (torch layout [rank, in] / [out, rank]) as the pure-dict adapter leaves of the model."""
    flat = {}
    for path, modules in plan.paths().items():
        key = tuple(path.split("."))
        site = plan.sites[modules[0]]
        d_out, d_in = plan.shapes[modules[0]]
        r = plan.lora.rank
        if site.layer is None:
            a_key, b_key = lora_keys(modules[0])
            a, b = canonical[a_key].T, canonical[b_key].T
        else:
            a = np.zeros((plan.stacked_layers, d_in, r), np.float32)
            b = np.zeros((plan.stacked_layers, r, d_out), np.float32)
            for m in modules:
                a_key, b_key = lora_keys(m)
                a[plan.sites[m].layer], b[plan.sites[m].layer] = canonical[a_key].T, canonical[b_key].T
        flat[(*key, "lora_a")] = np.ascontiguousarray(a, np.float32)
        flat[(*key, "lora_b")] = np.ascontiguousarray(b, np.float32)
    return unflatten_dict(flat)


def canonical_adapters(plan: LoraPlan, adapters: dict[str, Any]) -> dict[str, np.ndarray]:
    """The adapter leaves of a parameter tree (host arrays: multihost.to_host) as canonical torch-layout arrays."""
    flat = flatten_dict(adapters)
    out = {}
    for m in plan.modules:
        site = plan.sites[m]
        key = tuple(site.path.split("."))
        a, b = np.asarray(flat[(*key, "lora_a")]), np.asarray(flat[(*key, "lora_b")])
        if site.layer is not None:
            a, b = a[site.layer], b[site.layer]
        a_key, b_key = lora_keys(m)
        out[a_key], out[b_key] = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    return out


def initial_tree(plan: LoraPlan, seed: int) -> dict[str, Any]:
    """New adapters (contentv_common.lora.training: the torch twin starts from the same values) as tree leaves."""
    return adapter_tree(plan, initial_adapters(plan.shapes, plan.lora.rank, seed))


def merged(plan: LoraPlan, params: dict[str, Any]) -> dict[str, Any]:
    """The plain model's parameter tree: every adapted kernel plus scale * A B (in float32, stored in the kernel's
    dtype), the adapter leaves dropped. Works on sharded arrays (no host copy)."""
    adapters, base = split_adapters(params)
    flat, lora = flatten_dict(base), flatten_dict(adapters)
    for path, modules in plan.paths().items():
        key = tuple(path.split("."))
        scale = jnp.asarray(_scales(plan, path, modules))
        a, b = lora[(*key, "lora_a")].astype(jnp.float32), lora[(*key, "lora_b")].astype(jnp.float32)
        delta = jnp.einsum("...ir,...ro->...io", a, b, precision="highest") * scale[..., None, None]
        kernel = flat[(*key, "kernel")]
        flat[(*key, "kernel")] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return unflatten_dict(flat)


def trained_filter(model: nnx.Module) -> type[nnx.Param]:
    """What an optimizer and the gradients cover: the adapters of an adapted model, else every nnx.Param."""
    return LoraParam if nnx.state(model, LoraParam) else nnx.Param


def adapt_model(model: nnx.Module, lora: LoraConfig, seed: int, mesh: Mesh | None = None) -> LoraPlan:
    """Adapt a live Transformer in place (the reward runs' nnx.Module form): the base cast to `lora.base_dtype`,
    adapters added with their seeded starting values (the torch twin's), placed on `mesh` by the sharding rules of
    their base when given. Returns the plan."""
    from contentv_jax.sharding import param_shardings

    plan = plan_for(model, lora)
    base = nnx.state(model, nnx.Param)
    dtype = jnp.dtype(lora.base_dtype)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), base))
    add_adapters(model, plan)
    tree = initial_tree(plan, seed)
    tree = jax.device_put(tree, param_shardings(tree, mesh)) if mesh is not None else jax.tree.map(jnp.asarray, tree)
    adapters = nnx.state(model, LoraParam)
    nnx.replace_by_pure_dict(adapters, tree)
    nnx.update(model, adapters)
    return plan


def merged_model(model: nnx.Module, plan: LoraPlan) -> nnx.Module:
    """A copy of an adapted model with plain linear layers holding the merged weights (kernel + scale A B), for
    export; `model` is unchanged."""
    copy = nnx.clone(model)
    params = merged(plan, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for path in plan.paths():
        parent, _, name = path.rpartition(".")
        holder = _module(copy, parent) if parent else copy
        adapted = getattr(holder, name)
        *_, d_in, d_out = adapted.kernel.shape
        plain = nnx.Linear(d_in, d_out, dtype=adapted.dtype, param_dtype=adapted.kernel.dtype, rngs=nnx.Rngs(0))
        plain.kernel, plain.bias = nnx.Param(adapted.kernel[...]), nnx.Param(adapted.bias[...])
        setattr(holder, name, plain)
    state = nnx.state(copy, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(copy, state)
    return copy


def merge_adapters(model: nnx.Module, loras: list[Lora]) -> None:
    """Add adapter files (`contentv_common.lora.adapters.open_lora`) to a loaded transformer's weights in place: each
    adapted leaf (a stacked one per layer) in float32 on the host, in the canonical torch layout, cast back once, on
    its own sharding; the very weights `contentv-convert --lora` writes (the torch twin's `merge_adapters`)."""
    from contentv_jax.loading import slots

    items = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        leaf_slots = slots(".".join(map(str, path)), tuple(var.shape), TRANSFORMER_TABLE, model.cfg.num_layers)
        if not any(adapted(s.param.canonical, loras) for s in leaf_slots):
            continue
        value = np.array(jax.device_get(var[...]), np.float32)
        for s in leaf_slots:
            if adapted(s.param.canonical, loras):
                where = () if s.layer is None else (s.layer,)
                torch_layout = np.transpose(value[where], inverse_perm(s.param.jax_perm))
                value[where] = np.transpose(merged_weight(s.param.canonical, torch_layout, loras), s.param.jax_perm)
        items.append((path, var.replace(jax.device_put(value.astype(var.dtype), var[...].sharding))))
    nnx.update(model, nnx.from_flat_state(items))
