"""The memory table of docs/scale.md, regenerated rather than edited: which plans it holds, where each plan's JSON
lives (docs/plans/), when a plan is stale, and the table's text. `tools/plan.py --all` runs the plans.

The table holds every bucket of every stage and reward recipe on 64 TPU v5p chips, every stage in the torch twin's
estimate (64 ranks), and the one-device LoRA recipes on one chip and one rank. Each plan records the commit it was
planned at; it is stale once the planner's code, the model configs or its recipe (with its `base`) differ from that
commit (`git diff`), or when it was planned from uncommitted code. Re-planning a stale JAX plan compiles only the steps
whose lowered program changed (`tools/plan.py --reuse`); the torch estimates run again.
"""

from __future__ import annotations

import datetime
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from contentv_common.plan.report import GIB

# what a plan depends on besides its recipe: the three packages, the planner, the model configs, the pinned versions
CODE_PATHS = (
    "contentv_common",
    "contentv_jax",
    "contentv_torch_npu",
    "tools/plan.py",
    "configs/model",
    "pyproject.toml",
)
PLANS = Path("docs") / "plans"
BEGIN = "<!-- plan table: written by `python tools/plan.py --all` from docs/plans/*.json; edit the code, not this -->"
END = "<!-- end of plan table -->"
JOB_BEGIN = (
    "<!-- sampling job table: written by `python tools/plan.py --all` from docs/plans/job_*.json; edit the code, "
    "not this -->"
)
JOB_END = "<!-- end of sampling job table -->"
V5P_POD, V5P_HOST, V5P_TWO_HOSTS, V6E_HOST = "tpu:v5p:4x4x4", "tpu:v5p:2x2x1", "tpu:v5p:2x2x2", "tpu:v6e:2x2"


@dataclass(frozen=True)
class Entry:
    """One plan of the table: a recipe (path from the repository root) on a backend, target and memory goal."""

    recipe: str  # "" for a sampling job
    backend: str  # "jax" or "torch"
    hbm_gib: float
    target: str = ""  # JAX: tpu:<topology>; torch: none
    chips: int | None = None  # JAX: the first N chips of the target
    job: str = ""  # a sampling job's video (tools/plan.py --sample-job), e.g. 1280x720x121
    mesh: str = ""  # the sampling job's --mesh, e.g. data=1,sequence=4,cfg=2

    @property
    def key(self) -> str:
        """The plan's file name stem, e.g. stage5_720p.v5p-4x4x4, lora_8b_480p.torch or job_1280x720x121.v5p-2x2x2."""
        name = f"job_{self.job}" if self.job else Path(self.recipe).stem
        if self.backend == "torch":
            return f"{name}.torch"
        where = self.target.removeprefix("tpu:").replace(":", "-")
        return f"{name}.{where}" + (f"-{self.chips}chip" if self.chips else "")

    def argv(self) -> list[str]:
        """tools/plan.py's arguments for this plan (without --json)."""
        what = ["--sample-job", self.job, "--mesh", self.mesh] if self.job else ["--recipe", self.recipe]
        out = [*what, "--hbm-gib", f"{self.hbm_gib:g}"]
        if self.backend == "torch":
            return [*out, "--backend", "torch"]
        return [*out, "--target", self.target, *(["--chips", str(self.chips)] if self.chips else [])]


def entries(root: Path) -> list[Entry]:
    """The one-device LoRA recipes on one v5p chip / one v6e chip and one rank; every stage recipe on 64 v5p chips
    and in the torch estimate; every reward recipe (the CPU ones aside: tiny and demo) on 64 v5p chips (JAX only)."""
    recipes = root / "configs" / "recipes"

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    out = []
    for name, hbm, target in (("lora_8b_480p", 64, V5P_HOST), ("lora_8b_256p", 32, V6E_HOST)):
        recipe = rel(recipes / f"{name}.yaml")
        out += [Entry(recipe, "jax", hbm, target, 1), Entry(recipe, "torch", hbm)]
    for stage in sorted(recipes.glob("stage*.yaml")):
        out += [Entry(rel(stage), "jax", 64, V5P_POD), Entry(rel(stage), "torch", 64)]
    rewards = [p for p in sorted(recipes.glob("reward_*.yaml")) if not p.stem.endswith(("_tiny", "_demo"))]
    return out + [Entry(rel(p), "jax", 64, V5P_POD) for p in rewards] + job_entries()


# the sampling jobs: 1 chip, 4 chips (one v5p host), 8 chips (two hosts) and the torch twin's 8 ranks
JOB_VIDEOS = ("768x432x125", "1280x720x121")
JOB_MESHES = (
    ("data=1,sequence=1,cfg=1", V5P_HOST, 1),
    ("data=1,sequence=2,cfg=2", V5P_HOST, None),
    ("data=1,sequence=4,cfg=2", V5P_TWO_HOSTS, None),
)
TORCH_JOB_MESH = "data=1,sequence=4,cfg=2"


def job_entries() -> list[Entry]:
    """tools/sample.py's job at ContentV's default video and at 720p on 1, 4 and 8 v5p chips and 8 torch ranks."""
    out = []
    for video in JOB_VIDEOS:
        out += [Entry("", "jax", 64, target, chips, video, mesh) for mesh, target, chips in JOB_MESHES]
        out.append(Entry("", "torch", 64, job=video, mesh=TORCH_JOB_MESH))
    return out


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def recipe_files(root: Path, recipe: str) -> list[str]:
    """The recipe file and the `base` files it reads, as paths from the repository root (files outside it are not
    followed)."""
    out, path, top = [], (root / recipe).resolve(), root.resolve()
    while path.is_file() and path.is_relative_to(top) and path.relative_to(top).as_posix() not in out:
        out.append(path.relative_to(top).as_posix())
        base = (yaml.safe_load(path.read_text()) or {}).get("base")
        if not isinstance(base, str):
            break
        path = (path.parent / base).resolve()
    return out


def provenance(root: Path, recipe: str) -> dict[str, Any]:
    """When and from which code a plan is made: the date, the commit, and whether the code or recipe had uncommitted
    changes (such a plan is stale from the start: nobody can check out what it measured)."""
    date = datetime.date.today().isoformat()
    head = _git(root, "rev-parse", "--short=10", "HEAD")
    if head.returncode:
        return {"date": date, "commit": None, "dirty": True}
    status = _git(root, "status", "--porcelain", "--", *CODE_PATHS, *recipe_files(root, recipe))
    return {"date": date, "commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def stale(root: Path, doc: dict[str, Any]) -> str | None:
    """Why a plan no longer describes the code (None while it does)."""
    commit = doc.get("commit")
    if not commit:
        return "planned outside a git checkout"
    if doc.get("dirty"):
        return f"planned from uncommitted changes on {commit}"
    diff = _git(root, "diff", "--quiet", commit, "--", *CODE_PATHS, *recipe_files(root, doc["recipe"]))
    if diff.returncode == 1:
        return f"code or recipe changed since {commit}"
    return None if diff.returncode == 0 else f"commit {commit} is not in this checkout"


def plan_path(plans: Path, entry: Entry) -> Path:
    return plans / f"{entry.key}.json"


def read_plan(plans: Path, entry: Entry) -> dict[str, Any] | None:
    path = plan_path(plans, entry)
    return json.loads(path.read_text()) if path.is_file() else None


def _mesh(doc: dict[str, Any]) -> str:
    m = doc["mesh"]
    text = f"{m['data']} x {m['fsdp']} x {m['sequence']}" + (f" x {m['tensor']}" if m["tensor"] > 1 else "")
    return text + (" (ZeRO-3 over data too)" if m.get("shard_data") else "")


def _where(doc: dict[str, Any]) -> str:
    if doc["backend"] == "torch":
        m = doc["mesh"]
        ranks = m["data"] * m["fsdp"] * m["sequence"]
        return f"torch, {ranks} rank{'s' * (ranks > 1)}"
    return f"{doc['device_kind']} x {doc['devices']}"


def table(root: Path, plans: list[tuple[Entry, dict[str, Any] | None]]) -> str:
    """The generated section of docs/scale.md: how to regenerate it, then one row per planned step."""
    head = (
        "| recipe | planned on | mesh (d x f x s) | step | bucket | tokens | batch | state GiB | args GiB | temp GiB "
        "| peak GiB | goal GiB | fits | planned at |"
    )
    rows = [head, "|" + " --- |" * 14]
    stale_count = 0
    plans = [(entry, doc) for entry, doc in plans if not entry.job]
    for entry, doc in plans:
        name = Path(entry.recipe).stem
        if doc is None:
            rows.append(f"| {name} | {entry.key} | | not planned yet |" + " |" * 8 + f" {entry.hbm_gib:g} | | |")
            continue
        why = stale(root, doc)
        stale_count += why is not None
        when = f"{doc['date']} {doc['commit'] or '?'}" + (" **stale**" if why else "")
        state = sum(doc.get("state_bytes", {}).values()) / GIB
        goal = doc["hbm_bytes"] / GIB
        for s in doc["steps"]:
            rows.append(
                f"| {name} | {_where(doc)} | {_mesh(doc)} | {s['kind']} | {s['bucket']} | {s['tokens']:,} "
                f"| {s['batch']} | {state:.2f} | {s['argument_bytes'] / GIB:.2f} | {s['temp_bytes'] / GIB:.2f} "
                f"| {s['peak_bytes'] / GIB:.2f} | {goal:g} | {'yes' if s['fits'] else '**NO**'} | {when}"
                f"{' (reused)' * s.get('reused', False)} |"
            )
    today = datetime.date.today().isoformat()
    head_commit = _git(root, "rev-parse", "--short=10", "HEAD").stdout.strip() or "?"
    intro = (
        f"Written {today} at commit {head_commit} by `python tools/plan.py --all`. A row is **stale** when the "
        "planner's code (contentv_common, contentv_jax, contentv_torch_npu, tools/plan.py), the model configs, "
        "pyproject.toml or its recipe changed after the commit in its last column: `python tools/plan.py --all "
        "--check` lists the stale plans, `python tools/plan.py --all` re-plans them (and only them) and rewrites "
        "this table. A JAX step marked (reused) lowered at that commit to the very program (sha256 of its StableHLO) "
        "an earlier plan compiled on the same target with the same jax, jaxlib and libtpu, so it keeps those figures "
        f"instead of compiling again. Stale plans now: {stale_count} of {len(plans)}."
    )
    return "\n".join([BEGIN, "", intro, "", *rows, "", END])


def job_table(root: Path, plans: list[tuple[Entry, dict[str, Any] | None]]) -> str:
    """The generated sampling job section of docs/scale.md: one row per job (GiB on the first device, which holds
    every model's weights)."""
    head = (
        "| video | planned on | mesh (d, s, c) | text GiB | sample step GiB | decode GiB | job peak GiB | goal GiB "
        "| fits | TFLOP per video | compile s | planned at |"
    )
    rows = [head, "|" + " --- |" * 12]
    jobs = [(entry, doc) for entry, doc in plans if entry.job]
    stale_count = 0
    for entry, doc in jobs:
        if doc is None:
            rows.append(f"| {entry.job} | {entry.key} | {entry.mesh} | not planned yet |" + " |" * 8)
            continue
        why = stale(root, doc)
        stale_count += why is not None
        job, m = doc["job"], doc["mesh"]
        peaks = job["step_peak_bytes"]
        decode = next((k for k in ("decode", "decode-tiles") if k in peaks), None)
        cells = [peaks.get("text"), peaks.get("sample"), peaks.get(decode) if decode else None]
        text, sample, dec = (f"{n / GIB:.2f}" if n is not None else "-" for n in cells)
        dec += " (tiles)" if decode == "decode-tiles" else ""
        where = (
            f"torch, {doc['devices']} ranks"
            if doc["backend"] == "torch"
            else f"{doc['device_kind']} x {doc['devices']}"
        )
        reused = sum(s.get("reused", False) for s in doc["steps"])
        when = f"{doc['date']} {doc['commit'] or '?'}" + (" **stale**" if why else "")
        when += f" ({reused} of {len(doc['steps'])} steps reused)" if reused else ""
        rows.append(
            f"| {doc['sample_job']} | {where} | {m['data']}, {m['sequence']}, {m['cfg']} | {text} | {sample} | {dec} "
            f"| {job['peak_bytes'] / GIB:.2f} | {doc['hbm_bytes'] / GIB:g} | {'yes' if job['fits'] else '**NO**'} "
            f"| {job['flops'] / 1e12:,.0f} | {job['compile_s']:.0f} | {when} |"
        )
    intro = (
        "Written by `python tools/plan.py --all` (each row: `python tools/plan.py --sample-job VIDEO --mesh MESH "
        "--hbm-gib 64 --target ...`, its JSON docs/plans/job_*.json); stale as the table above. "
        f"Stale jobs now: {stale_count} of {len(jobs)}."
    )
    return "\n".join([JOB_BEGIN, "", intro, "", *rows, "", JOB_END])


def write_table(doc_path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the generated section of `doc_path` (between the lines `begin` and `end`) with `text`."""
    doc = doc_path.read_text()
    start, stop = doc.find(begin), doc.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"{doc_path}: no generated plan table (the lines {begin!r} ... {end!r})")
    doc_path.write_text(doc[:start] + text + doc[stop + len(end) :])
