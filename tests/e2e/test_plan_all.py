"""tools/plan.py on one chip of a topology (`--chips`) and `--all`: the table of docs/scale.md regenerated from one
plan per entry (contentv_common.plan.table), each plan stale once its code or recipe changes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contentv_common.cli import plan
from contentv_common.config.model import named_model_config
from contentv_common.plan import table as plan_table
from contentv_common.plan.table import Entry
from contentv_torch_npu.transformer import Transformer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "recipes" / "tiny.yaml"


def test_one_chip_of_a_target(tmp_path):
    """A LoRA recipe on the first chip of 8 fake devices: one device, the frozen base's bytes in the state."""
    out = tmp_path / "plan.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(ROOT / "tools" / "plan.py"), "--recipe", str(TINY), "--target", "cpu:8", "--chips", "1",
           "--hbm-gib", "64", "--json", str(out), "--blocks", "2", "--kinds", "sample", "--text-tokens", "7",
           "lora.rank=4", "lora.base_dtype=bfloat16", "compute_dtype=bfloat16"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["devices"] == 1 and doc["fits"] and [s["kind"] for s in doc["steps"]] == ["sample"]
    state = doc["state_bytes"]
    assert set(state) == {"params", "opt_state", "ema"}
    assert 2 * state["ema"] <= state["opt_state"] < 2 * state["ema"] + 64  # AdamW's moments and its counters
    with torch.device("meta"):
        base = sum(p.numel() for p in Transformer(named_model_config("tiny")).parameters())
    assert state["params"] - state["ema"] == 2 * base  # the frozen base in bf16 beside the fp32 adapters
    assert doc["commit"] is None or len(doc["commit"]) >= 7
    assert "state per device (GiB): params" in proc.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "cpu:8", "--chips", "9"], "--chips 9: the target cpu:8 has 8 chips"),
        (["--target", "cpu:8", "--chips", "2"], "= 1 devices, but the target has 2 (cpu:8 --chips 2)"),
        (["--backend", "torch", "--chips", "1"], "--chips picks chips of a --target"),
        (["--all", "--chips", "1"], "--all plans docs/scale.md's table entries; drop --recipe --hbm-gib --chips"),
        (["--check"], "--check, --force and --jobs go with --all"),
        (["--reuse", "README.md"], "--reuse README.md: Expecting value"),
        (["--reuse", "no_such_plan.json"], "--reuse no_such_plan.json: [Errno 2]"),
    ],
)
def test_bad_chips_and_all_are_one_line_and_exit_2(capsys, argv, message):
    assert plan.main(["--recipe", str(TINY), "--hbm-gib", "64", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_reuse_takes_a_plan_and_the_torch_estimate_refuses_it_and_jobs_are_counted(capsys, tmp_path):
    assert plan.main(["--all", "--jobs", "0"]) == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err
    previous = tmp_path / "plan.json"
    previous.write_text(json.dumps({"recipe": str(TINY)}))
    argv = ["--recipe", str(TINY), "--hbm-gib", "64", "--reuse", str(previous)]
    assert plan.main(argv) == 2
    assert f"--reuse {previous}: not a plan (no 'steps' list)" in capsys.readouterr().err
    previous.write_text(json.dumps({"recipe": str(TINY), "steps": []}))
    assert plan.main([*argv, "--backend", "torch"]) == 2
    assert "--reuse: the torch estimate has no compiled program to reuse" in capsys.readouterr().err


def test_the_table_covers_every_stage_and_reward_recipe():
    entries = plan_table.entries(ROOT)
    keys = [e.key for e in entries]
    assert len(set(keys)) == len(keys)
    recipes = ROOT / "configs" / "recipes"
    for stage in recipes.glob("stage*.yaml"):
        assert f"{stage.stem}.v5p-4x4x4" in keys and f"{stage.stem}.torch" in keys
    for reward in recipes.glob("reward_*.yaml"):
        assert (f"{reward.stem}.v5p-4x4x4" in keys) != reward.stem.endswith(("_tiny", "_demo"))  # the CPU ones
    one = {e.key: e for e in entries if "lora_8b" in e.key}
    assert one["lora_8b_480p.v5p-2x2x1-1chip"].argv()[-4:] == ["--target", "tpu:v5p:2x2x1", "--chips", "1"]
    assert one["lora_8b_256p.v6e-2x2-1chip"].hbm_gib == 32 and one["lora_8b_256p.torch"].hbm_gib == 32


def _git(repo: Path, *args: str) -> str:
    run = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return run.stdout.strip()


def test_a_plan_is_stale_once_its_code_or_recipe_changes(tmp_path):
    repo = tmp_path / "repo"
    (repo / "contentv_jax").mkdir(parents=True)
    (repo / "configs" / "recipes").mkdir(parents=True)
    (repo / "contentv_jax" / "a.py").write_text("x = 1\n")
    (repo / "configs" / "recipes" / "base.yaml").write_text("steps: 1\n")
    (repo / "configs" / "recipes" / "r.yaml").write_text("base: base.yaml\n")
    (repo / "configs" / "recipes" / "other.yaml").write_text("steps: 2\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "code")
    recipe = "configs/recipes/r.yaml"
    assert plan_table.recipe_files(repo, recipe) == [recipe, "configs/recipes/base.yaml"]
    doc = {"recipe": recipe, **plan_table.provenance(repo, recipe)}
    assert doc["commit"] == _git(repo, "rev-parse", "--short=10", "HEAD") and not doc["dirty"]
    assert plan_table.stale(repo, doc) is None
    (repo / "configs" / "recipes" / "other.yaml").write_text("steps: 3\n")  # another recipe: still current
    assert plan_table.stale(repo, doc) is None
    (repo / "configs" / "recipes" / "base.yaml").write_text("steps: 5\n")  # its base: stale, committed or not
    assert "changed since" in plan_table.stale(repo, doc)
    assert plan_table.provenance(repo, recipe)["dirty"]
    _git(repo, "checkout", "-q", "--", ".")
    (repo / "contentv_jax" / "a.py").write_text("x = 2\n")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "change")
    assert "changed since" in plan_table.stale(repo, doc)
    assert "not in this checkout" in plan_table.stale(repo, {**doc, "commit": "0123456789"})
    assert "uncommitted" in plan_table.stale(repo, {**doc, "dirty": True})


@pytest.mark.slow
def test_all_plans_missing_entries_and_writes_the_table(tmp_path, monkeypatch):
    """`--all --jobs 2` on the tiny recipe in the torch estimate (one rank) and in JAX (one CPU device): each plan's
    JSON lands in the plans folder with its commit and date, the table between the markers of the document is
    rewritten around the rest of it; once stale, the JAX plan keeps the figures of its unchanged programs."""
    monkeypatch.setattr(plan_table, "stale", lambda root, doc: None)  # a plan made now is current
    entries = [Entry("tests/recipes/tiny.yaml", "torch", 1), Entry("tests/recipes/tiny.yaml", "jax", 1, "cpu:1")]
    doc_path = tmp_path / "scale.md"
    doc_path.write_text(f"# before\n\n{plan_table.BEGIN}\nold rows\n{plan_table.END}\n\nafter\n")
    plans = tmp_path / "plans"
    assert plan.plan_all(entries, plans, doc_path, force=False, check=True) == 1  # not planned yet
    assert plan.plan_all(entries, plans, doc_path, force=False, check=False, jobs=2) == 0
    doc = json.loads((plans / "tiny.torch.json").read_text())
    assert doc["backend"] == "torch" and doc["recipe"] == "tests/recipes/tiny.yaml" and doc["date"]
    assert set(doc["state_bytes"]) == {"params", "optimizer", "ema"}
    compiled = json.loads((plans / "tiny.cpu-1.json").read_text())
    assert not any(s["reused"] for s in compiled["steps"]) and compiled["compiler"]["jax"]
    assert all(len(s["program"]) == 64 for s in compiled["steps"])
    text = doc_path.read_text()
    assert text.startswith("# before\n\n") and text.endswith("\n\nafter\n") and "old rows" not in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
    steps = [["train", "64x64x9"], ["train", "64x64x1"]]
    assert [r.split(" | ")[3:5] for r in rows] == [*steps, *steps, ["sample", "64x64x9"]]
    assert all(r.startswith("| tiny | torch, 1 rank | 1 x 1 x 1 |") for r in rows[:2])
    assert all(r.startswith("| tiny | cpu x 1 | 1 x 1 x 1 |") for r in rows[2:])
    assert all(f"{doc['date']} " in r for r in rows)
    assert plan.plan_all(entries, plans, doc_path, force=False, check=True) == 0  # nothing left to plan

    # stale (as after any code change): the JAX plan lowers its steps again and keeps the figures of the unchanged
    # programs instead of compiling them; the torch estimate, with no program to compare, runs again
    monkeypatch.setattr(plan_table, "stale", lambda root, doc: "code changed")
    assert plan.plan_all(entries, plans, doc_path, force=False, check=False, jobs=2) == 0
    again = json.loads((plans / "tiny.cpu-1.json").read_text())
    assert [{**s, "reused": True} for s in compiled["steps"]] == again["steps"]
    assert json.loads((plans / "tiny.torch.json").read_text())["steps"] != doc["steps"]  # its trace seconds differ
    doc_path.write_text("no markers\n")
    with pytest.raises(ValueError, match="no generated plan table"):
        plan_table.write_table(doc_path, "x")
