"""Ahead-of-time memory planner: will every step of a recipe fit its devices? Nothing is allocated, no TPU needed.

    python tools/plan.py --recipe R --target tpu:v5p:4x4x4 --hbm-gib 64 --json OUT [--blocks N] [key=value ...]
    python tools/plan.py --recipe R --target cpu:8 --hbm-gib 16
    python tools/plan.py --backend torch --recipe R --hbm-gib 64 --json OUT
    python tools/plan.py --recipe R --target tpu:v5p:2x2x1 --chips 1 --hbm-gib 64      # one chip of a host
    python tools/plan.py --recipe R --target tpu:v5p:4x4x4 --hbm-gib 64 --json OUT --reuse OUT  # compile changes only
    python tools/plan.py --all [--check | --force] [--jobs N]                         # docs/scale.md's table
    python tools/plan.py --sample-job 1280x720x121 --mesh data=1,sequence=4,cfg=2 --target tpu:v5p:2x2x2 --hbm-gib 64
    python tools/plan.py --sample-job 1280x720x121 --mesh data=1,sequence=4,cfg=2 --backend torch --hbm-gib 64

JAX: compiles the real train step of every bucket and one sampling step (cond/uncond pair batched) at the largest bucket
(a reward recipe, configs/recipes/reward_*.yaml: its update step, kind "reward", contentv_jax.reward.plan), and with
`--kinds text` SD3.5's text encoders on that bucket's batch of 333-token prompts (the recipe's pipeline folder's
encoders, or the official full-size CLIP-L/CLIP-G/T5-XXL when the folder is not here), with `--kinds encode` the Wan VAE
encode of one clip at that bucket on one device (a chunk of 4 frames after the first, as the cache builder runs it), and
with `--kinds decode` the Wan VAE decode of one clip at that bucket (whole on one device; diffusers' tiles, one per
device), with abstract inputs sharded over the recipe's mesh, built from the target's devices: `tpu:<libtpu topology>`
(chips = the product, e.g. v5p:4x4x4 = 64; needs `pip install .[tpu]`) or `cpu:N` fake CPU devices. Prints per-device
argument, temporary, output and aliased bytes, peak, compile time, model FLOPs and fit; lists parameters left
replicated. `--blocks N` plans a shallower model for quick checks. `--reuse PLAN.json` (repeatable) lowers every step
(seconds) and compiles only those whose program (sha256 of the lowered StableHLO: its device count and every sharding
included) is not a fitting step of one of those plans, compiled for the same kind of chip by the same jax / jaxlib /
libtpu; the others keep that plan's figures (marked reused). Torch: contentv_torch_npu.memory_plan.

`--sample-job WIDTHxHEIGHTxFRAMES --mesh data=1,sequence=S,cfg=C` plans `tools/sample.py --mesh ... --dtype bfloat16`
making one video of the `--model` (contentv-8b) from one prompt and its negative: the text encoders on the pair
(`--encoders`: a pipeline folder's, tiny, or the official full-size ones), one guided step of the mesh sampler
(attention auto: splash on TPU), the VAE decode (whole on one device; in tiles over the first process's devices when
the mesh has more), each step's peak with the weights sample.py keeps loaded beside it, the job's peak, its model
TFLOP per video (text + 50 steps; the decode uncounted) and compile seconds (JAX: compiled for --target; torch:
traced as rank 0 of the mesh's ranks, contentv_torch_npu.memory_plan.plan_sample_job).

`--all` plans every entry of docs/scale.md's tables (contentv_common.plan.table: every bucket of every stage and
reward recipe on 64 v5p chips and in the torch estimate, the one-device LoRA recipes, the sampling jobs at 768x432x125
and 1280x720x121 on 1, 4 and 8 v5p chips and 8 torch ranks) whose JSON in docs/plans/ is missing or stale
(`--force`: all of them), one subprocess each (`--jobs N` at a time), then rewrites the tables;
`--check` only lists them. A JAX plan is made with `--reuse` of every JAX plan there (`--force`: without), so a change
that leaves its programs alone costs seconds; the torch estimates run again.

Exit status: 0 when every step (a job: the job) fits, 1 when not, 2 on bad input (one line on stderr, before any
compile); `--all`: 0 when every plan ran and fits, 1 otherwise; `--all --check`: 0 when no plan is missing or stale.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from contentv_common.backend import get
from contentv_common.config.model import ModelConfig, named_model_config
from contentv_common.config.recipe import BucketConfig, Recipe, load_recipe, parse_override
from contentv_common.config.reward import RewardRecipe, is_reward_recipe, load_reward_recipe
from contentv_common.errors import ConfigError
from contentv_common.model.flops import image_tokens
from contentv_common.plan import table as plan_table
from contentv_common.plan.report import DEFAULT_KINDS, GIB, KINDS, format_job, job_summary, report
from contentv_common.sample_mesh import SampleMesh, check_mesh_devices, check_sample_mesh, parse_mesh
from contentv_common.sampling import latent_shape

ROOT = Path(__file__).resolve().parents[2]

SCALE_DOC = ROOT / "docs" / "scale.md"


class BadInput(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise BadInput(message)


@dataclass(frozen=True)
class Target:
    """A plan's `--target`: `platform` "tpu" (a libtpu `topology`) or "cpu" (fake devices), its `total` devices and
    the `count` planned on (`--chips`, else all)."""

    text: str
    platform: str
    topology: str | None
    total: int
    chips: int | None

    @property
    def count(self) -> int:
        return self.total if self.chips is None else self.chips

    @property
    def where(self) -> str:
        return self.text + ("" if self.chips is None else f" --chips {self.chips}")


def parse_target(text: str, chips: int | None = None) -> Target:
    """`tpu:<topology>` (chips = the product of its sizes) or `cpu:N`, and `--chips` of it."""
    platform, _, rest = text.partition(":")
    target = None
    if platform == "cpu" and rest.isdigit() and int(rest) > 0:
        target = Target(text, "cpu", None, int(rest), chips)
    if platform == "tpu":
        _, _, dims = rest.rpartition(":")
        sizes = dims.split("x")
        if ":" in rest and all(s.isdigit() and int(s) > 0 for s in sizes):
            target = Target(text, "tpu", rest, math.prod(int(s) for s in sizes), chips)
    if target is None:
        raise BadInput(f"--target {text!r}: expected tpu:<libtpu topology> (e.g. tpu:v5p:4x4x4) or cpu:<devices>")
    if chips is not None and not 1 <= chips <= target.total:
        raise BadInput(f"--chips {chips}: the target {text} has {target.total} chips")
    return target


def ask_for_devices(target: Target) -> None:
    """Fake CPU devices exist only if XLA_FLAGS asks for them before jax is imported: set it here, framework-free."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if target.platform == "cpu":
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={target.total}".strip()


def load(args: argparse.Namespace) -> Recipe | RewardRecipe:
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        if is_reward_recipe(args.recipe):
            recipe = load_reward_recipe(args.recipe, overrides)
        else:
            recipe = load_recipe(args.recipe, overrides)
    except ConfigError as e:
        raise BadInput(str(e)) from None
    if isinstance(recipe, RewardRecipe):
        if args.buckets or args.kinds_given:
            raise BadInput(f"{args.recipe}: a reward recipe plans its one update step; drop --buckets / --kinds")
    elif recipe.stages:
        raise BadInput(f"{args.recipe}: has stages; plan each stage's recipe file")
    if args.blocks is not None:
        if args.blocks < 1:
            raise BadInput(f"--blocks must be >= 1, got {args.blocks}")
        model = dataclasses.replace(recipe.model_config, num_layers=args.blocks)
        recipe = dataclasses.replace(recipe, model=model)
    if isinstance(recipe, RewardRecipe):
        return recipe
    if recipe.data is None:
        raise BadInput(f"{args.recipe}: has no data section, whose buckets a plan needs")
    names = {b.name for b in recipe.data.buckets}
    unknown = sorted(set(args.buckets or ()) - names)
    if unknown:
        raise BadInput(f"--buckets {unknown}: not in {args.recipe} (buckets: {sorted(names)})")
    return recipe


def read_previous(paths: list[str] | None) -> list[dict[str, Any]]:
    """`--reuse`'s plan documents (BadInput when one is unreadable or not a plan)."""
    docs = []
    for path in paths or ():
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise BadInput(f"--reuse {path}: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list):
            raise BadInput(f"--reuse {path}: not a plan (no 'steps' list)")
        docs.append(doc)
    return docs


def parse_job(args: argparse.Namespace) -> tuple[ModelConfig, BucketConfig, SampleMesh, Target | None]:
    """`--sample-job`'s model, video and mesh, checked as tools/sample.py checks them (BadInput, before any
    compile): WIDTHxHEIGHTxFRAMES of 1 + 4k frames and multiples of 16 pixels, a mesh of one prompt (data=1) whose
    devices are the target's chips (torch: its ranks) and whose sequence axis splits the image tokens."""
    named = ("recipe", "kinds", "buckets")
    given = [f"--{k}" for k in named if getattr(args, k) is not None] + args.overrides
    if given:
        raise BadInput(f"--sample-job plans tools/sample.py's job, not a recipe: drop {' '.join(given)}")
    sizes = args.sample_job.split("x")
    if len(sizes) != 3 or not all(s.isdigit() for s in sizes):
        raise BadInput(f"--sample-job {args.sample_job!r}: expected WIDTHxHEIGHTxFRAMES, e.g. 1280x720x121")
    width, height, frames = map(int, sizes)
    try:
        bucket = BucketConfig(width, height, frames, 1)
        cfg = named_model_config(args.model)
    except ConfigError as e:
        raise BadInput(f"--sample-job {args.sample_job}: {e}") from None
    if args.blocks is not None:
        if args.blocks < 1:
            raise BadInput(f"--blocks must be >= 1, got {args.blocks}")
        cfg = dataclasses.replace(cfg, num_layers=args.blocks)
    if args.encoders not in ("official", "tiny") and not Path(args.encoders).is_dir():
        raise BadInput(f"--encoders {args.encoders}: not a folder (a pipeline folder, tiny or official)")
    mesh = args.mesh or SampleMesh()
    if mesh.data != 1:
        raise BadInput(f"--mesh {mesh}: a job is one prompt (data=1); data=D runs D such jobs side by side")
    target = None
    if args.backend == "jax":
        if args.target is None:
            raise BadInput("--target is required with --backend jax (e.g. tpu:v5p:2x2x2 or cpu:8)")
        target = parse_target(args.target, args.chips)
    elif args.target is not None or args.chips is not None:
        raise BadInput("--target and --chips are the JAX planner's; the torch world is the mesh's ranks")
    try:
        if target is not None:
            check_mesh_devices(mesh, target.count)
        _, _, f, h, w = latent_shape(cfg.in_channels, frames, height, width)
        check_sample_mesh(mesh, image_tokens(cfg, f, h, w), cfg.num_attention_heads, True, 1)
    except ValueError as e:
        raise BadInput(f"{e} ({target.where if target else 'torch'})") from None
    return cfg, bucket, mesh, target


def plan_job(args: argparse.Namespace) -> int:
    """`--sample-job`: plan tools/sample.py's job, print and write it; 0 when the job fits, 1 when not."""
    cfg, bucket, mesh, target = parse_job(args)
    if args.backend == "torch" and args.reuse:
        raise BadInput("--reuse: the torch estimate has no compiled program to reuse (--backend jax)")
    previous = read_previous(args.reuse)
    hbm = int(args.hbm_gib * GIB)
    print(
        f"plan tools/sample.py --mesh {mesh} --dtype bfloat16: {args.model} ({cfg.num_layers} blocks), "
        f"{bucket.name}, one prompt and its negative, on {target.where if target else f'torch, {mesh.devices} ranks'}, "
        f"{args.hbm_gib:g} GiB",
        flush=True,
    )
    if target is not None:
        ask_for_devices(target)
    options = {"target": target, "encoders": args.encoders, "text_tokens": args.text_tokens, "previous": previous}
    plans, meta = get(args.backend).plan_job(cfg, bucket, mesh, hbm, **options)
    resident = meta["resident_bytes"]
    job = job_summary(plans, resident, hbm)
    print(format_job(job, resident, hbm))
    where = {"recipe": "", "backend": args.backend, "model": args.model, "blocks": cfg.num_layers}
    where |= {"sample_job": bucket.name, "mesh": dataclasses.asdict(mesh), "encoders": args.encoders}
    doc = report(plans, hbm, **where, **meta, job=job, **plan_table.provenance(ROOT, ""))
    doc["fits"] = job["fits"]
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print("the job fits" if job["fits"] else "the job does NOT fit", f"{args.hbm_gib:g} GiB per device")
    return 0 if job["fits"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="training or reward recipe YAML (configs/recipes/*.yaml)")
    parser.add_argument("--target", help="tpu:<topology> (tpu:v5p:4x4x4, tpu:v6e:8x8) or cpu:<devices>; JAX only")
    parser.add_argument(
        "--chips",
        type=int,
        help="plan on the first N chips of --target (libtpu's smallest v5p "
        "topology is one host, 2x2x1: --target tpu:v5p:2x2x1 --chips 1 plans one chip)",
    )
    parser.add_argument("--hbm-gib", type=float, help="memory per device to fit in, GiB")
    parser.add_argument("--json", help="write the plan here (JSON)")
    parser.add_argument("--backend", choices=("jax", "torch"), default="jax")
    parser.add_argument("--blocks", type=int, help="plan this many transformer blocks instead of the model's")
    parser.add_argument(
        "--kinds",
        help="steps to plan, comma-separated: train,sample,text,encode,decode (default train,sample; text: the "
        "text encoders; encode: the Wan VAE encode of one clip at the largest bucket (the cache builder's), on one "
        "device; decode: its decode, whole and in tiles over the devices)",
    )
    parser.add_argument("--buckets", help="only these bucket names, comma-separated (e.g. 832x480x121)")
    parser.add_argument("--text-tokens", type=int, default=333, help="text tokens per sample (SD3.5: 333)")
    parser.add_argument("--all", action="store_true", help="plan docs/scale.md's missing or stale table entries")
    parser.add_argument("--check", action="store_true", help="with --all: list missing / stale plans, plan nothing")
    parser.add_argument("--force", action="store_true", help="with --all: plan every entry, current or not")
    parser.add_argument("--jobs", type=int, default=1, help="with --all: plans run at once (default 1)")
    parser.add_argument(
        "--reuse",
        action="append",
        help="JAX: a previous plan JSON whose unchanged programs are not compiled again (repeatable)",
    )
    parser.add_argument(
        "--sample-job",
        metavar="WxHxF",
        help="plan tools/sample.py's job (text, sampling step, decode) for one video, e.g. 1280x720x121",
    )
    parser.add_argument(
        "--mesh",
        type=parse_mesh,
        metavar="data=1,sequence=S,cfg=C",
        help="with --sample-job: tools/sample.py's --mesh (default one device)",
    )
    parser.add_argument("--model", default="contentv-8b", help="with --sample-job: configs/model/ name or YAML")
    parser.add_argument(
        "--encoders",
        default="official",
        help="with --sample-job: a pipeline folder (its text encoders' and VAE's configs), tiny, or official "
        "(SD3.5's CLIP-L, CLIP-G and T5-XXL, Wan2.1's VAE, at full size)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides, e.g. mesh.fsdp=8")
    try:
        args = parser.parse_intermixed_args(argv)
        if args.all:
            named = ["recipe", "hbm_gib", "json", "target", "chips", "blocks", "kinds", "buckets", "reuse"]
            named += ["sample_job", "mesh"]
            given = [f"--{k.replace('_', '-')}" for k in named if getattr(args, k) is not None] + args.overrides
            if given:
                raise BadInput(f"--all plans docs/scale.md's table entries; drop {' '.join(given)}")
            if args.jobs < 1:
                raise BadInput(f"--jobs must be >= 1, got {args.jobs}")
            entries = plan_table.entries(ROOT)
            return plan_all(entries, ROOT / plan_table.PLANS, SCALE_DOC, args.force, args.check, args.jobs)
        if args.check or args.force or args.jobs != 1:
            raise BadInput("--check, --force and --jobs go with --all")
        if args.hbm_gib is not None and not (args.hbm_gib > 0 and math.isfinite(args.hbm_gib)):
            raise BadInput(f"--hbm-gib must be a positive number, got {args.hbm_gib}")
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise BadInput(f"--json {args.json}: directory does not exist")
        if args.sample_job is not None:
            if args.hbm_gib is None:
                raise BadInput("--hbm-gib is required")
            return plan_job(args)
        if args.mesh is not None:
            raise BadInput("--mesh goes with --sample-job (a recipe's mesh is its mesh section)")
        if args.recipe is None or args.hbm_gib is None:
            raise BadInput("--recipe and --hbm-gib are required (or --all)")
        args.kinds_given = args.kinds is not None
        args.kinds = tuple(k for k in (args.kinds or ",".join(DEFAULT_KINDS)).split(",") if k)
        if not args.kinds or set(args.kinds) - set(KINDS):
            raise BadInput(f"--kinds {','.join(args.kinds)}: choose from {','.join(KINDS)}")
        args.buckets = tuple(args.buckets.split(",")) if args.buckets else None
        if not (args.hbm_gib > 0 and math.isfinite(args.hbm_gib)):
            raise BadInput(f"--hbm-gib must be a positive number, got {args.hbm_gib}")
        if args.text_tokens < 1:
            raise BadInput(f"--text-tokens must be positive, got {args.text_tokens}")
        target = None if args.target is None else parse_target(args.target, args.chips)
        previous = read_previous(args.reuse)
        recipe = load(args)
        hbm = int(args.hbm_gib * GIB)
        print(
            f"plan {args.recipe} ({recipe.model_config.num_layers} blocks, mesh data x fsdp x sequence x tensor = "
            f"{' x '.join(map(str, recipe.mesh.shape))}) on {args.target or args.backend}, {args.hbm_gib:g} GiB",
            flush=True,
        )
        if target is not None:
            ask_for_devices(target)
        options = {"target": target, "chips": args.chips, "kinds": args.kinds, "buckets": args.buckets}
        options |= {"text_tokens": args.text_tokens, "recipe_path": args.recipe, "previous": previous}
        plans, meta = get(args.backend).plan(recipe, hbm, **options)
    except (BadInput, ConfigError) as e:
        print(f"plan.py: error: {e}", file=sys.stderr)
        return 2
    mesh = dict(zip(("data", "fsdp", "sequence", "tensor"), recipe.mesh.shape, strict=True))
    if recipe.mesh.shard_data:
        mesh["shard_data"] = True
    where = {"recipe": args.recipe, "backend": args.backend, "blocks": recipe.model_config.num_layers, "mesh": mesh}
    doc = report(plans, hbm, **where, **meta, **plan_table.provenance(ROOT, args.recipe))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print("every step fits" if doc["fits"] else "a step does NOT fit", f"{args.hbm_gib:g} GiB per device")
    return 0 if doc["fits"] else 1


def plan_all(
    entries: list[plan_table.Entry], plans: Path, doc_path: Path, force: bool, check: bool, jobs: int = 1
) -> int:
    """Plan the entries whose JSON in `plans` is missing or stale (all with `force`), each in its own process, `jobs`
    at a time (a failure or crash leaves the last plan in place; a JAX plan reuses its unchanged programs unless
    `force`), then rewrite the table in `doc_path`."""
    todo = []
    for entry in entries:
        doc = plan_table.read_plan(plans, entry)
        why = "not planned" if doc is None else plan_table.stale(ROOT, doc)
        status = why or f"current (planned at {doc['commit'] if doc else ''})"
        print(f"{entry.key}: {status}", flush=True)
        if why or force:
            todo.append(entry)
    if check:
        return 1 if todo else 0
    plans.mkdir(parents=True, exist_ok=True)
    # every JAX plan there: a step whose program one of them compiled keeps its figures (one-device text, tiles)
    compiled = [p for e in entries if e.backend == "jax" and (p := plan_table.plan_path(plans, e)).is_file()]

    def run(numbered: tuple[int, plan_table.Entry]) -> str | None:
        i, entry = numbered
        out = plan_table.plan_path(plans, entry)
        reuse = [] if entry.backend == "torch" or force else [a for path in compiled for a in ("--reuse", str(path))]
        argv = [*entry.argv(), "--json", str(out), *reuse]
        print(f"[{i}/{len(todo)}] python tools/plan.py {' '.join(argv)}", flush=True)
        cmd = [sys.executable, "-m", "contentv_common.cli.plan", *argv]
        if jobs == 1:
            code = subprocess.run(cmd, cwd=ROOT).returncode
        else:  # whole outputs, one plan at a time, so that parallel plans do not interleave their tables
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            print(f"\n[{i}/{len(todo)}] {entry.key}:\n{proc.stdout}{proc.stderr}", end="", flush=True)
            code = proc.returncode
        return None if code in (0, 1) else entry.key

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        failed = [key for key in pool.map(run, enumerate(todo, 1)) if key is not None]
    docs = [(e, plan_table.read_plan(plans, e)) for e in entries]
    plan_table.write_table(doc_path, plan_table.table(ROOT, docs))
    if any(e.job for e in entries):
        plan_table.write_table(doc_path, plan_table.job_table(ROOT, docs), plan_table.JOB_BEGIN, plan_table.JOB_END)
    print(f"wrote {len(docs)} plans into {doc_path}" + (f"; these failed: {', '.join(failed)}" if failed else ""))
    return 0 if not failed and all(d is not None and d["fits"] for _, d in docs) else 1


def entry() -> None:
    """The `contentv-plan` command (its errors are its own: one line, exit status 2)."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
