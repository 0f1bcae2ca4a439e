"""One row of a memory plan and its report: shared by the JAX planner (ahead-of-time compile) and the torch one
(FakeTensorMode trace), so `tools/plan.py` prints and writes the same table and JSON for either backend."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
# the steps a plan can compile, and those it compiles unless asked (text, decode: the encoders' and the VAE's own)
KINDS = ("train", "sample", "text", "decode")
DEFAULT_KINDS = ("train", "sample")


@dataclass(frozen=True)
class StepPlan:
    """One compiled (or traced) step: per-device bytes and whether it fits."""

    kind: str  # "train", "sample" or "reward"
    bucket: str  # bucket name, e.g. "848x480x121"
    tokens: int  # image + text tokens of one sequence
    batch: int  # global batch of the step
    argument_bytes: int  # per device
    temp_bytes: int  # per device
    output_bytes: int  # per device
    alias_bytes: int  # per device (donated/aliased, counted once)
    peak_bytes: int  # per device: argument + temp + output - alias
    compile_s: float  # compile (JAX) or trace (torch) seconds
    flops: float  # exact model FLOPs of the whole step (contentv_common/model/flops.py), all devices together
    fits: bool  # peak_bytes <= hbm
    program: str = ""  # JAX: sha256 of the lowered program (contentv_jax.memory_plan.program_hash); torch: ""
    reused: bool = False  # JAX: figures kept from the previous plan of the same program (`--reuse`), not compiled


def peak_bytes(argument: int, temp: int, output: int, alias: int) -> int:
    """Live bytes at the step's peak on one device: donated arguments are reused for outputs, so aliases count once."""
    return argument + temp + output - alias


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_table(plans: Sequence[StepPlan], hbm_bytes: int) -> str:
    """Markdown table, one row per step: GiB per device, headroom to `hbm_bytes`, compile seconds (of the earlier
    compile when its figures were reused), TFLOPs."""
    head = (
        "| step | bucket | tokens | batch | args GiB | temp GiB | out GiB | alias GiB | peak GiB | headroom GiB "
        "| compile s | TFLOP | fits |"
    )
    rows = [head, "|" + " --- |" * 13]
    for p in plans:
        rows.append(
            f"| {p.kind} | {p.bucket} | {p.tokens:,} | {p.batch} | {gib(p.argument_bytes)} | {gib(p.temp_bytes)} "
            f"| {gib(p.output_bytes)} | {gib(p.alias_bytes)} | {gib(p.peak_bytes)} | {gib(hbm_bytes - p.peak_bytes)} "
            f"| {p.compile_s:.1f}{' (reused)' * p.reused} | {p.flops / 1e12:,.1f} | {'yes' if p.fits else 'NO'} |"
        )
    return "\n".join(rows)


def report(plans: Sequence[StepPlan], hbm_bytes: int, **meta: Any) -> dict[str, Any]:
    """The JSON document `tools/plan.py --json` writes: `meta` (recipe, target, ...), every step, overall fit."""
    return {
        **meta,
        "hbm_bytes": hbm_bytes,
        "fits": all(p.fits for p in plans),
        "steps": [dataclasses.asdict(p) for p in plans],
    }
