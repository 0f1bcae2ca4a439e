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
V5P_POD, V5P_HOST, V6E_HOST = "tpu:v5p:4x4x4", "tpu:v5p:2x2x1", "tpu:v6e:2x2"


@dataclass(frozen=True)
class Entry:
    """One plan of the table: a recipe (path from the repository root) on a backend, target and memory goal."""

    recipe: str
    backend: str  # "jax" or "torch"
    hbm_gib: float
    target: str = ""  # JAX: tpu:<topology>; torch: none
    chips: int | None = None  # JAX: the first N chips of the target

    @property
    def key(self) -> str:
        """The plan's file name stem, e.g. stage5_720p.v5p-4x4x4 or lora_8b_480p.torch."""
        if self.backend == "torch":
            return f"{Path(self.recipe).stem}.torch"
        where = self.target.removeprefix("tpu:").replace(":", "-")
        return f"{Path(self.recipe).stem}.{where}" + (f"-{self.chips}chip" if self.chips else "")

    def argv(self) -> list[str]:
        """tools/plan.py's arguments for this plan (without --json)."""
        out = ["--recipe", self.recipe, "--hbm-gib", f"{self.hbm_gib:g}"]
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
    return out + [Entry(rel(p), "jax", 64, V5P_POD) for p in rewards]


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


def write_table(doc_path: Path, text: str) -> None:
    """Replace the generated section of `doc_path` (between BEGIN and END) with `text`."""
    doc = doc_path.read_text()
    start, end = doc.find(BEGIN), doc.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{doc_path}: no generated plan table (the lines {BEGIN!r} ... {END!r})")
    doc_path.write_text(doc[:start] + text + doc[end + len(END) :])
