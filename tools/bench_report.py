"""Write tools/bench.py results into docs/benchmarks.md: `python -m tools.bench_report RESULT.json ... --docs FILE`.

The section between the markers `<!-- bench:device:begin -->` and `<!-- bench:device:end -->` is replaced by the
device, date, commit and command, the matmul peak, the attention kernels' rates, one table per mode and the goals of
issue 27 checked against the rows (tools/bench_device.sh runs this last). Everything else in the file is kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from contentv_common.cli import run_cli

BEGIN, END = "<!-- bench:device:begin -->", "<!-- bench:device:end -->"
GOAL_TRAIN_MFU = 0.55  # JAX training step at 33,093 tokens
GOAL_SAMPLE_FLOOR = 1.1  # sampling forward within 1.1x of its floor


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1e3:,.1f}" if seconds else "-"


def rows_table(rows: list[dict[str, Any]]) -> list[str]:
    """One markdown table: a row per (backend, tokens); `vs diffusers` > 1 means faster than the reference."""
    ref = {(r["mode"], r["tokens"]): r["step_s_median"] for r in rows if r["backend"] == "diffusers"}
    out = [
        "| backend | blocks | tokens | latent | step ms | TFLOP/s | MFU | vs diffusers | /floor | peak GiB | options |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t, base = r["step_s_median"], ref.get((r["mode"], r["tokens"]))
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items() if v not in (None, False, 0, "none")) or "-"
        if r["status"] != "ok":
            opts = f"**{r['status']}**: {str(r['error'])[:160]}"
        mem = r["peak_memory_bytes"]
        cells = [
            r["backend"],
            str(r["blocks"]),
            f"{r['tokens']:,}",
            "x".join(map(str, r["latent_shape"])),
            _ms(t),
            f"{r['tflops']:.3g}" if r["tflops"] else "-",
            f"{r['mfu']:.1%}" if r["mfu"] else "-",
            f"{base / t:.2f}x" if t and base else "-",
            f"{r['vs_floor']:.2f}" if r["vs_floor"] else "-",
            f"{mem / 2**30:.3g}" if mem else "-",
            opts,
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def attention_table(reports: list[dict[str, Any]]) -> list[str]:
    """The attention kernels alone at each shape: torch SDPA (the floor's rate) and the JAX model's kernel."""
    out = [
        "| mode | latent | torch SDPA TFLOP/s | JAX kernel | JAX TFLOP/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for rep in reports:
        jax_rates = {(a["mode"], tuple(a["latent_shape"])): a for a in rep.get("jax_attention", [])}
        for a in rep["attention"]:
            j = jax_rates.get((a["mode"], tuple(a["latent_shape"])), {})
            torch_rate = f"{a['tflops']:.3g}" if a.get("tflops") else f"error: {a.get('error')}"
            jax_rate = f"{j['tflops']:.3g}" if j.get("tflops") else (f"error: {j['error']}" if j.get("error") else "-")
            latent = "x".join(map(str, a["latent_shape"]))
            out.append(f"| {a['mode']} | {latent} | {torch_rate} | {j.get('kernel', '-')} | {jax_rate} |")
    return out


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 27's goals, each met or not, from the largest training shape and the sampling rows."""
    lines = []
    train = [r for r in rows if r["mode"] == "train" and r["status"] == "ok"]
    if train:
        tokens = max(r["tokens"] for r in train)
        at = {r["backend"]: r for r in train if r["tokens"] == tokens}
        if "jax" in at:
            j = at["jax"]
            met = j["mfu"] is not None and j["mfu"] >= GOAL_TRAIN_MFU
            lines.append(
                f"- JAX training step at {tokens:,} tokens: {j['mfu']:.1%} MFU, {j['vs_floor']:.2f}x its floor "
                f"(goal {GOAL_TRAIN_MFU:.0%} MFU): **{'met' if met else 'not met'}**"
                if j["mfu"] and j["vs_floor"]
                else f"- JAX training step at {tokens:,} tokens: no MFU (no peak measured)"
            )
        if "torch" in at and "diffusers" in at:
            ratio = at["diffusers"]["step_s_median"] / at["torch"]["step_s_median"]
            lines.append(
                f"- torch twin vs diffusers, training at {tokens:,} tokens: {ratio:.2f}x the reference's speed "
                f"(goal >= 1.00x): **{'met' if ratio >= 1 else 'not met'}**"
            )
    for r in rows:
        if r["mode"] == "sample" and r["status"] == "ok" and r["vs_floor"]:
            met = r["vs_floor"] <= GOAL_SAMPLE_FLOOR
            lines.append(
                f"- {r['backend']} sampling forward, {r['blocks']} blocks, batch {r['batch']}, {r['tokens']:,} tokens: "
                f"{_ms(r['step_s_median'])} ms, {r['vs_floor']:.2f}x its floor (goal <= {GOAL_SAMPLE_FLOOR}x): "
                f"**{'met' if met else 'not met'}**"
            )
    return lines


def section(reports: list[dict[str, Any]], commit: str, wall_s: float | None, command: str) -> str:
    first = reports[0]
    rows = [r for rep in reports for r in rep["results"]]
    peaks = {f"{rep['peak']['tflops']:.3g} TFLOP/s ({rep['peak']['what']})" for rep in reports if rep["peak"]["tflops"]}
    wall = f", {wall_s:.0f} s wall including compiles" if wall_s else ""
    lines = [
        BEGIN,
        f"### {first['device']}, {first['date'][:10]}, commit {commit}",
        "",
        f"Made by `{command}`{wall}; the tables are written by `tools/bench_report.py` from the JSON of these runs:",
        "",
        *[f"- `{rep['command']}`" for rep in reports],
        "",
        f"Matmul peak (the MFU denominator), measured per run: {'; '.join(sorted(peaks)) or 'not measured'}.",
        "",
        "Attention alone (training: forward + backward counted as 3x the forward FLOPs):",
        "",
        *attention_table(reports),
        "",
    ]
    for mode in ("train", "sample"):
        mode_rows = [r for r in rows if r["mode"] == mode]
        if mode_rows:
            title = "Training step (fwd + bwd + AdamW)" if mode == "train" else "Sampling forward"
            lines += [f"{title}:", "", *rows_table(mode_rows), ""]
    warnings = [w for rep in reports for w in rep["warnings"]]
    lines += ["Goals (issue 27):", "", *(goals(rows) or ["- no row to judge"]), ""]
    lines += [f"Warning: {w}" for w in warnings]
    lines.append(END)
    return "\n".join(lines)


def replace_section(text: str, new: str) -> str:
    """`text` with the marked section replaced by `new`; appended at the end when the markers are absent."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + new + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + new + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, nargs="+", help="JSON files written by tools/bench.py --out")
    p.add_argument("--docs", type=Path, required=True, help="the markdown file to update (docs/benchmarks.md)")
    p.add_argument("--commit", default="unknown", help="the commit the figures were measured at")
    p.add_argument("--wall", type=float, default=None, help="seconds the whole benchmark took")
    p.add_argument("--command", default="bash tools/bench_device.sh", help="the command that made the results")
    args = p.parse_args(argv)
    reports = [json.loads(path.read_text()) for path in args.results]  # a missing file: one line, exit 2
    text = args.docs.read_text()
    args.docs.write_text(replace_section(text, section(reports, args.commit, args.wall, args.command)))
    print(f"wrote the device section of {args.docs}")
    return 0


if __name__ == "__main__":
    run_cli(main)
