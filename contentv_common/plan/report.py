"""One row of a memory plan and its report: shared by the JAX planner (ahead-of-time compile) and the torch one
(FakeTensorMode trace), so `tools/plan.py` prints and writes the same table and JSON for either backend."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
# the steps a plan can compile, and those it compiles unless asked (text, encode, decode: the encoders' and the VAE's)
KINDS = ("train", "sample", "text", "encode", "decode")
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


# tools/sample.py's default number of sampling steps, and the weights each step of a sampling job runs
SAMPLING_STEPS = 50
JOB_WEIGHTS = {"text": "text", "sample": "transformer", "decode": "vae", "decode-tiles": "vae"}


def job_summary(
    plans: Sequence[StepPlan], resident: dict[str, int], hbm_bytes: int, steps: int = SAMPLING_STEPS
) -> dict[str, Any]:
    """A sampling job as a whole (tools/sample.py loads the text encoders, the VAE and the transformer before the
    first prompt and keeps them all): each step's peak on the first device, which holds all three, with the weights
    of the other two resident beside it; the job's peak (the largest); the model FLOPs of one video (the prompt pair
    encoded once and `steps` guided steps; the VAE decode has no FLOP counter and is left out); compile seconds."""
    peaks = {
        p.kind: p.peak_bytes + sum(n for name, n in resident.items() if name != JOB_WEIGHTS[p.kind]) for p in plans
    }
    flops = sum(p.flops * (steps if p.kind == "sample" else 1) for p in plans)
    peak = max(peaks.values())
    return {
        "sampling_steps": steps,
        "step_peak_bytes": peaks,
        "peak_bytes": peak,
        "fits": peak <= hbm_bytes,
        "flops": flops,
        "compile_s": sum(p.compile_s for p in plans),
    }


def format_job(job: dict[str, Any], resident: dict[str, int], hbm_bytes: int) -> str:
    """The job summary in a few lines (GiB per device)."""
    weights = ", ".join(f"{name} {gib(n)}" for name, n in resident.items())
    steps = ", ".join(f"{kind} {gib(n)}" for kind, n in job["step_peak_bytes"].items())
    return (
        f"weights kept loaded on the first device (GiB): {weights}\n"
        f"each step's peak with them (GiB): {steps}\n"
        f"job peak {gib(job['peak_bytes'])} GiB per device, headroom {gib(hbm_bytes - job['peak_bytes'])} GiB; "
        f"{job['flops'] / 1e12:,.1f} TFLOP per video ({'text + ' * ('text' in job['step_peak_bytes'])}"
        f"{job['sampling_steps']} guided steps; decode not counted); compile {job['compile_s']:.0f} s"
    )
