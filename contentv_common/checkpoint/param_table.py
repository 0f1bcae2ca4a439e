"""One declarative parameter-name/layout table, used by every converter in both directions (framework-free).

A `Rule` maps a diffusers module name to our canonical module name and names the module's kind. The kind fixes the
module's leaves and, per leaf, the layout change between the torch layout (diffusers on disk, our torch twin) and the
JAX layout. Canonical parameter names are `<canonical module>.<torch leaf>`: the torch twin's `state_dict` keys are
exactly the canonical names, and the JAX twin's flat NNX paths are `<canonical module>.<jax leaf>`.

Patterns may contain `{i}` (a block index): `transformer_blocks.{i}.attn.to_q` <-> `blocks.{i}.attn.to_q`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from contentv_common.errors import UnknownParameterError


@dataclass(frozen=True)
class Leaf:
    torch: str  # leaf name in torch / diffusers ("" when the module name is the tensor name)
    jax: str  # leaf name in the NNX module
    jax_perm: tuple[int, ...] | None = None  # torch layout -> JAX layout axis permutation


class Kind(Enum):
    """Parameter kinds and their leaves; the permutation turns the torch layout into the JAX layout."""

    LINEAR = (Leaf("weight", "kernel", (1, 0)), Leaf("bias", "bias"))
    LINEAR_NO_BIAS = (Leaf("weight", "kernel", (1, 0)),)
    CONV2D = (Leaf("weight", "kernel", (2, 3, 1, 0)), Leaf("bias", "bias"))  # OIHW -> HWIO
    CONV3D = (Leaf("weight", "kernel", (2, 3, 4, 1, 0)), Leaf("bias", "bias"))  # OIDHW -> DHWIO
    RMS_NORM = (Leaf("weight", "scale"),)
    LAYER_NORM = (Leaf("weight", "scale"), Leaf("bias", "bias"))
    EMBEDDING = (Leaf("weight", "embedding"),)
    TENSOR = (Leaf("", ""),)  # a plain tensor (fixed table, gamma): same layout on both sides

    @property
    def leaves(self) -> tuple[Leaf, ...]:
        return self.value


@dataclass(frozen=True)
class Rule:
    diffusers: str
    canonical: str
    kind: Kind


@dataclass(frozen=True)
class Param:
    """One parameter resolved through the table."""

    canonical: str  # our name (= torch twin state_dict key)
    diffusers: str  # diffusers / original checkpoint key
    jax: str  # dotted NNX path
    jax_perm: tuple[int, ...] | None


def _join(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if leaf else module


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"\Z")


class ParamTable:
    """Resolves names between the diffusers, canonical (torch) and JAX spellings."""

    def __init__(self, name: str, rules: tuple[Rule, ...]):
        self.name = name
        self.rules = rules
        self._by_space: dict[str, list[tuple[re.Pattern[str], Rule, Leaf]]] = {
            "diffusers": [],
            "canonical": [],
            "jax": [],
        }
        for rule in rules:
            for leaf in rule.kind.leaves:
                self._by_space["diffusers"].append((_compile(_join(rule.diffusers, leaf.torch)), rule, leaf))
                self._by_space["canonical"].append((_compile(_join(rule.canonical, leaf.torch)), rule, leaf))
                self._by_space["jax"].append((_compile(_join(rule.canonical, leaf.jax)), rule, leaf))

    def _resolve(self, space: str, name: str) -> Param:
        for pattern, rule, leaf in self._by_space[space]:
            m = pattern.match(name)
            if m:
                index = m.groupdict().get("i")

                def fill(p: str, index: str | None = index) -> str:
                    return p.replace("{i}", index) if index is not None else p

                return Param(
                    canonical=fill(_join(rule.canonical, leaf.torch)),
                    diffusers=fill(_join(rule.diffusers, leaf.torch)),
                    jax=fill(_join(rule.canonical, leaf.jax)),
                    jax_perm=leaf.jax_perm,
                )
        raise UnknownParameterError(f"{self.name}: no rule in the parameter table matches {space} key {name!r}")

    def from_diffusers(self, key: str) -> Param:
        return self._resolve("diffusers", key)

    def from_canonical(self, key: str) -> Param:
        return self._resolve("canonical", key)

    def from_jax(self, path: str) -> Param:
        return self._resolve("jax", path)


def inverse_perm(perm: tuple[int, ...]) -> tuple[int, ...]:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return tuple(out)


def jax_shape(torch_shape: tuple[int, ...], perm: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(torch_shape) if perm is None else tuple(torch_shape[p] for p in perm)


_B = "transformer_blocks.{i}"

TRANSFORMER_TABLE = ParamTable(
    "transformer",
    (
        Rule("pos_embed.proj", "patch_embed.proj", Kind.CONV2D),
        Rule("pos_embed.pos_embed", "patch_embed.pos_table", Kind.TENSOR),
        Rule("time_text_embed.timestep_embedder.linear_1", "time_embed.timestep.linear_1", Kind.LINEAR),
        Rule("time_text_embed.timestep_embedder.linear_2", "time_embed.timestep.linear_2", Kind.LINEAR),
        Rule("time_text_embed.text_embedder.linear_1", "time_embed.pooled.linear_1", Kind.LINEAR),
        Rule("time_text_embed.text_embedder.linear_2", "time_embed.pooled.linear_2", Kind.LINEAR),
        Rule("context_embedder", "context_embedder", Kind.LINEAR),
        Rule(f"{_B}.norm1.linear", "blocks.{i}.norm1", Kind.LINEAR),
        Rule(f"{_B}.norm1_context.linear", "blocks.{i}.norm1_context", Kind.LINEAR),
        Rule(f"{_B}.attn.to_q", "blocks.{i}.attn.to_q", Kind.LINEAR),
        Rule(f"{_B}.attn.to_k", "blocks.{i}.attn.to_k", Kind.LINEAR),
        Rule(f"{_B}.attn.to_v", "blocks.{i}.attn.to_v", Kind.LINEAR),
        Rule(f"{_B}.attn.to_out.0", "blocks.{i}.attn.to_out", Kind.LINEAR),
        Rule(f"{_B}.attn.add_q_proj", "blocks.{i}.attn.add_q", Kind.LINEAR),
        Rule(f"{_B}.attn.add_k_proj", "blocks.{i}.attn.add_k", Kind.LINEAR),
        Rule(f"{_B}.attn.add_v_proj", "blocks.{i}.attn.add_v", Kind.LINEAR),
        Rule(f"{_B}.attn.to_add_out", "blocks.{i}.attn.add_out", Kind.LINEAR),
        Rule(f"{_B}.attn.norm_q", "blocks.{i}.attn.norm_q", Kind.RMS_NORM),
        Rule(f"{_B}.attn.norm_k", "blocks.{i}.attn.norm_k", Kind.RMS_NORM),
        Rule(f"{_B}.attn.norm_added_q", "blocks.{i}.attn.norm_added_q", Kind.RMS_NORM),
        Rule(f"{_B}.attn.norm_added_k", "blocks.{i}.attn.norm_added_k", Kind.RMS_NORM),
        Rule(f"{_B}.ff.net.0.proj", "blocks.{i}.ff.fc1", Kind.LINEAR),
        Rule(f"{_B}.ff.net.2", "blocks.{i}.ff.fc2", Kind.LINEAR),
        Rule(f"{_B}.ff_context.net.0.proj", "blocks.{i}.ff_context.fc1", Kind.LINEAR),
        Rule(f"{_B}.ff_context.net.2", "blocks.{i}.ff_context.fc2", Kind.LINEAR),
        Rule("norm_out.linear", "norm_out", Kind.LINEAR),
        Rule("proj_out", "proj_out", Kind.LINEAR),
    ),
)
