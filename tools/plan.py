"""Ahead-of-time memory planner: will every step of a recipe fit its devices? Nothing is allocated, no TPU needed.

    python tools/plan.py --recipe R --target tpu:v5p:4x4x4 --hbm-gib 64 --json OUT [--blocks N] [key=value ...]
    python tools/plan.py --recipe R --target cpu:8 --hbm-gib 16
    python tools/plan.py --backend torch --recipe R --hbm-gib 64 --json OUT
    python tools/plan.py --recipe R --target tpu:v5p:2x2x1 --chips 1 --hbm-gib 64      # one chip of a host
    python tools/plan.py --all [--check | --force]                                    # docs/scale.md's table

JAX: compiles the real train step of every bucket and one sampling step (cond/uncond pair batched) at the largest
bucket (a reward recipe, configs/recipes/reward_*.yaml: its update step, kind "reward", contentv_jax.reward.plan),
and with `--kinds text` SD3.5's text encoders on that bucket's batch of 333-token prompts (the recipe's pipeline
folder's encoders, or the official full-size CLIP-L/CLIP-G/T5-XXL when the folder is not here), with abstract inputs
sharded over the recipe's mesh, built from the target's devices: `tpu:<libtpu topology>`
(chips = the product, e.g. v5p:4x4x4 = 64; needs `pip install .[tpu]`) or `cpu:N` fake CPU devices. Prints per-device
argument, temporary, output and aliased bytes, peak, compile time, model FLOPs and fit; lists parameters left
replicated. `--blocks N` plans a shallower model for quick checks. Torch: contentv_torch_npu.memory_plan.

`--all` plans every entry of docs/scale.md's table (contentv_common.plan.table: every bucket of every stage and
reward recipe on 64 v5p chips and in the torch estimate, the one-device LoRA recipes) whose JSON in docs/plans/ is
missing or stale (`--force`: all of them), one subprocess each, then rewrites the table; `--check` only lists them.

Exit status: 0 when every step fits, 1 when one does not, 2 on bad input (one line on stderr, before any compile);
`--all`: 0 when every plan ran and fits, 1 otherwise; `--all --check`: 0 when no plan is missing or stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contentv_common.config.recipe import Recipe, check_device_count, load_recipe, parse_override  # noqa: E402
from contentv_common.config.reward import RewardRecipe, is_reward_recipe, load_reward_recipe  # noqa: E402
from contentv_common.errors import ConfigError  # noqa: E402
from contentv_common.plan import table as plan_table  # noqa: E402
from contentv_common.plan.report import GIB, StepPlan, format_table, gib, report  # noqa: E402

KINDS = ("train", "sample", "text")
DEFAULT_KINDS = ("train", "sample")
SCALE_DOC = ROOT / "docs" / "scale.md"


class BadInput(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise BadInput(message)


def parse_target(text: str) -> tuple[str, str | None, int]:
    """`tpu:<topology>` -> ("tpu", topology, chips); `cpu:N` -> ("cpu", None, N)."""
    platform, _, rest = text.partition(":")
    if platform == "cpu" and rest.isdigit() and int(rest) > 0:
        return "cpu", None, int(rest)
    if platform == "tpu":
        _, _, dims = rest.rpartition(":")
        sizes = dims.split("x")
        if ":" in rest and all(s.isdigit() and int(s) > 0 for s in sizes):
            return "tpu", rest, math.prod(int(s) for s in sizes)
    raise BadInput(f"--target {text!r}: expected tpu:<libtpu topology> (e.g. tpu:v5p:4x4x4) or cpu:<devices>")


def load(args: argparse.Namespace) -> Recipe | RewardRecipe:
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        if is_reward_recipe(args.recipe):
            recipe = load_reward_recipe(args.recipe, overrides)
        else:
            recipe = load_recipe(args.recipe, overrides)
    except ConfigError as e:
        raise BadInput(str(e)) from None
    reward = isinstance(recipe, RewardRecipe)
    if reward and args.backend != "jax":
        raise BadInput(f"{args.recipe}: reward recipes are planned by the JAX backend (--backend jax)")
    if reward and (args.buckets or args.kinds_given):
        raise BadInput(f"{args.recipe}: a reward recipe plans its one update step; drop --buckets / --kinds")
    if not reward and recipe.stages:
        raise BadInput(f"{args.recipe}: has stages; plan each stage's recipe file")
    if args.blocks is not None:
        if args.blocks < 1:
            raise BadInput(f"--blocks must be >= 1, got {args.blocks}")
        model = dataclasses.replace(recipe.model_config, num_layers=args.blocks)
        recipe = dataclasses.replace(recipe, model=model)
    if reward:
        return recipe
    names = {b.name for b in recipe.data.buckets}
    unknown = sorted(set(args.buckets or ()) - names)
    if unknown:
        raise BadInput(f"--buckets {unknown}: not in {args.recipe} (buckets: {sorted(names)})")
    return recipe


def jax_devices(platform: str, topology: str | None, count: int) -> list[Any]:
    """The target's devices; set XLA_FLAGS for fake CPU devices before jax is imported."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if platform == "cpu":
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    import jax

    if platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise BadInput(f"--target cpu:{count}: jax has only {len(devices)} CPU devices (jax imported before?)")
        return devices[:count]
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: other processes may hold libtpu
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # libtpu missing or an unknown topology name
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(
            f"--target tpu:{topology}: no TPU topology ({first}); libtpu comes with `pip install .[tpu]`"
        ) from None


def target_devices(args: argparse.Namespace) -> int:
    """Devices the plan runs on: `--chips` of the target's, else all of them."""
    count = parse_target(args.target)[2]
    if args.chips is not None and not 1 <= args.chips <= count:
        raise BadInput(f"--chips {args.chips}: the target {args.target} has {count} chips")
    return count if args.chips is None else args.chips


def plan_jax(args: argparse.Namespace, recipe: Recipe, hbm: int) -> tuple[list[StepPlan], dict[str, Any]]:
    platform, topology, total = parse_target(args.target)
    count = target_devices(args)
    try:
        check_device_count(recipe.mesh, count)
    except ConfigError as e:
        chips = "" if args.chips is None else f" --chips {count}"
        raise BadInput(f"{args.recipe}: {e} ({args.target}{chips})") from None
    devices = jax_devices(platform, topology, total)[:count]

    from contentv_jax.memory_plan import plan_recipe, replicated_params, state_bytes
    from contentv_jax.sharding import make_mesh

    mesh = make_mesh(recipe.mesh, devices)
    print(format_table([], hbm).splitlines()[0], flush=True)
    on_plan = lambda p: print(format_table([p], hbm).splitlines()[-1], flush=True)  # noqa: E731
    try:
        if isinstance(recipe, RewardRecipe):
            return plan_reward_recipe(args, recipe, mesh, hbm, on_plan, devices[0].device_kind)
        plans = plan_recipe(
            recipe, mesh, hbm, kinds=args.kinds, buckets=args.buckets, text_tokens=args.text_tokens, on_plan=on_plan
        )
    except ValueError as e:  # a shape the mesh cannot split (contentv_jax.sharding names the dimension and axis)
        raise BadInput(f"{args.recipe}: {e}") from None
    state = state_bytes(recipe, mesh)
    print("state per device (GiB): " + ", ".join(f"{k} {gib(v)}" for k, v in state.items()))
    replicated, unsplit = replicated_params(recipe, mesh)
    total = sum(r["bytes"] for r in replicated)
    print(f"{len(replicated)} parameters left whole on every device ({gib(total)} GiB), largest:")
    for r in replicated[:5]:
        print(f"  {r['name']} {tuple(r['shape'])}")
    print(f"{len(unsplit)} parameter dimensions a rule splits but the mesh does not divide:")
    for line in unsplit[:5]:
        print(f"  {line}")
    meta = {"target": args.target, "devices": count, "device_kind": devices[0].device_kind, "state_bytes": state}
    return plans, {**meta, "replicated_params": replicated, "replicated_bytes": total, "unsplit_params": unsplit}


def plan_reward_recipe(
    args: argparse.Namespace, recipe: RewardRecipe, mesh: Any, hbm: int, on_plan: Any, device_kind: str
) -> tuple[list[StepPlan], dict[str, Any]]:
    """The reward update step (contentv_jax.reward.plan), and the state a run keeps between steps per device."""
    from contentv_jax.reward.plan import plan_reward, state_bytes

    plan = plan_reward(recipe, mesh, hbm, text_tokens=args.text_tokens)
    on_plan(plan)
    state = state_bytes(recipe, mesh)
    print("state per device (GiB): " + ", ".join(f"{k} {gib(v)}" for k, v in state.items()))
    meta = {"target": args.target, "devices": len(mesh.devices.flat), "device_kind": device_kind}
    return [plan], {**meta, "method": recipe.method, "state_bytes": state}


def plan_torch(args: argparse.Namespace, recipe: Recipe, hbm: int) -> tuple[list[StepPlan], dict[str, Any]]:
    try:
        from contentv_torch_npu.memory_plan import plan_recipe
    except ImportError as e:
        raise BadInput(f"--backend torch: the torch planner is not available ({e})") from None
    plans, state = plan_recipe(recipe, hbm)
    print(format_table(plans, hbm), flush=True)
    print("state per device (GiB): " + ", ".join(f"{k} {gib(v)}" for k, v in state.items()))
    return plans, {"state_bytes": state}


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
        "--kinds", help="steps to plan, comma-separated: train,sample,text (default train,sample; text: the encoders)"
    )
    parser.add_argument("--buckets", help="only these bucket names, comma-separated (e.g. 832x480x121)")
    parser.add_argument("--text-tokens", type=int, default=333, help="text tokens per sample (SD3.5: 333)")
    parser.add_argument("--all", action="store_true", help="plan docs/scale.md's missing or stale table entries")
    parser.add_argument("--check", action="store_true", help="with --all: list missing / stale plans, plan nothing")
    parser.add_argument("--force", action="store_true", help="with --all: plan every entry, current or not")
    parser.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides, e.g. mesh.fsdp=8")
    try:
        args = parser.parse_intermixed_args(argv)
        if args.all:
            named = ("recipe", "hbm_gib", "json", "target", "chips", "blocks", "kinds", "buckets")
            given = [f"--{k.replace('_', '-')}" for k in named if getattr(args, k) is not None] + args.overrides
            if given:
                raise BadInput(f"--all plans docs/scale.md's table entries; drop {' '.join(given)}")
            return plan_all(plan_table.entries(ROOT), ROOT / plan_table.PLANS, SCALE_DOC, args.force, args.check)
        if args.check or args.force:
            raise BadInput("--check and --force go with --all")
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
        if args.backend == "jax" and not args.target:
            raise BadInput("--target is required with --backend jax (e.g. tpu:v5p:4x4x4 or cpu:8)")
        if args.backend == "jax":
            target_devices(args)
        elif args.chips is not None:
            raise BadInput("--chips picks chips of a --target (--backend jax); the torch world is the recipe's mesh")
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise BadInput(f"--json {args.json}: directory does not exist")
        recipe = load(args)
        hbm = int(args.hbm_gib * GIB)
        print(
            f"plan {args.recipe} ({recipe.model_config.num_layers} blocks, mesh data x fsdp x sequence x tensor = "
            f"{' x '.join(map(str, recipe.mesh.shape))}) on {args.target or args.backend}, {args.hbm_gib:g} GiB",
            flush=True,
        )
        plans, meta = (plan_jax if args.backend == "jax" else plan_torch)(args, recipe, hbm)
    except BadInput as e:
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


def plan_all(entries: list[plan_table.Entry], plans: Path, doc_path: Path, force: bool, check: bool) -> int:
    """Plan the entries whose JSON in `plans` is missing or stale (all with `force`), each in its own process (a
    failure or crash leaves the last plan in place), then rewrite the table in `doc_path`."""
    todo = []
    for entry in entries:
        doc = plan_table.read_plan(plans, entry)
        why = "not planned" if doc is None else plan_table.stale(ROOT, doc)
        status = why or f"current (planned at {doc['commit']})"
        print(f"{entry.key}: {status}", flush=True)
        if why or force:
            todo.append(entry)
    if check:
        return 1 if todo else 0
    plans.mkdir(parents=True, exist_ok=True)
    failed = []
    for i, entry in enumerate(todo, 1):
        print(f"\n[{i}/{len(todo)}] python tools/plan.py {' '.join(entry.argv())}", flush=True)
        out = plan_table.plan_path(plans, entry)
        cmd = [sys.executable, str(Path(__file__).resolve()), *entry.argv(), "--json", str(out)]
        if subprocess.run(cmd, cwd=ROOT).returncode not in (0, 1):
            failed.append(entry.key)
    docs = [(e, plan_table.read_plan(plans, e)) for e in entries]
    plan_table.write_table(doc_path, plan_table.table(ROOT, docs))
    print(f"wrote {len(docs)} plans into {doc_path}" + (f"; these failed: {', '.join(failed)}" if failed else ""))
    return 0 if not failed and all(d is not None and d["fits"] for _, d in docs) else 1


if __name__ == "__main__":
    sys.exit(main())
