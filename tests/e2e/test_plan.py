"""tools/plan.py: the ahead-of-time planner compiles a narrow recipe's steps on fake devices and for a TPU topology
(libtpu, the .[tpu] extra), writes consistent JSON, and exits 0 / 1 / 2 for fits / does not fit / bad input."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from contentv_common.cli import plan
from contentv_common.config.model import named_model_config
from contentv_common.config.recipe import load_recipe
from contentv_common.model.flops import text_encoder_flops, transformer_flops, vae_encode_flops
from contentv_common.plan.report import GIB, StepPlan
from contentv_common.tiny_models import tiny_text
from contentv_common.vae.config import tiny_vae_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "recipes" / "tiny.yaml"
# the tiny model on a 2 x 2 x 2 mesh: one video bucket, one image bucket; 7 text tokens (the tiny encoders')
NARROW = [
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.sequence=2",
    "data.buckets=[{width: 64, height: 64, frames: 9, batch_size: 4}, {width: 64, height: 64, frames: 1, "
    "batch_size: 8}]",
    "--text-tokens",
    "7",
]
FIELDS = {f for f in StepPlan.__dataclass_fields__}


def _check_consistent(doc: dict, hbm_gib: float) -> None:
    cfg = dataclasses.replace(named_model_config("tiny"), num_layers=doc["blocks"])
    assert doc["hbm_bytes"] == int(hbm_gib * GIB)
    assert doc["fits"] == all(s["fits"] for s in doc["steps"])
    for s in doc["steps"]:
        assert set(s) == FIELDS
        assert s["peak_bytes"] == s["argument_bytes"] + s["temp_bytes"] + s["output_bytes"] - s["alias_bytes"]
        assert s["peak_bytes"] > 0 and s["temp_bytes"] > 0 and s["compile_s"] > 0
        assert s["fits"] == (s["peak_bytes"] <= doc["hbm_bytes"])
        w, h, f = map(int, s["bucket"].split("x"))
        image = (1 + (f - 1) // 4) * (h // 16) * (w // 16)
        assert s["tokens"] == image + 7
        per_sample = transformer_flops(cfg, image, 7, 1).step(s["kind"])
        assert s["flops"] == pytest.approx(per_sample * s["batch"], rel=1e-12)


@pytest.mark.slow
def test_cpu_plan_of_a_narrow_recipe_fits_and_reports_every_step(tmp_path):
    out = tmp_path / "plan.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # the planner sets the fake device count itself
    cmd = [sys.executable, str(ROOT / "tools" / "plan.py"), "--recipe", str(TINY), "--target", "cpu:8"]
    cmd += ["--hbm-gib", "64", "--json", str(out), "--blocks", "1", *NARROW]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["devices"] == 8 and doc["blocks"] == 1 and doc["fits"] is True
    assert doc["mesh"] == {"data": 2, "fsdp": 2, "sequence": 2, "tensor": 1}
    assert [(s["kind"], s["bucket"], s["batch"]) for s in doc["steps"]] == [
        ("train", "64x64x9", 4),
        ("train", "64x64x1", 8),
        ("sample", "64x64x9", 8),  # the largest bucket, cond/uncond pair batched
    ]
    _check_consistent(doc, 64)
    names = {r["name"] for r in doc["replicated_params"]}
    assert "last_block.attn.norm_q.scale" in names  # norm scales and biases stay whole, every kernel is split
    assert not any(name.endswith(".kernel") for name in names)
    assert doc["replicated_bytes"] == sum(r["bytes"] for r in doc["replicated_params"])
    assert isinstance(doc["unsplit_params"], list)
    assert "| train | 64x64x9 |" in proc.stdout


def test_a_step_over_the_memory_is_exit_1(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    out = tmp_path / "plan.json"
    argv = ["--recipe", str(TINY), "--target", "cpu:8", "--hbm-gib", "1e-6", "--json", str(out), "--blocks", "1"]
    assert plan.main(argv + ["--kinds", "sample", *NARROW]) == 1
    doc = json.loads(out.read_text())
    assert doc["fits"] is False and [s["fits"] for s in doc["steps"]] == [False]
    _check_consistent(doc, 1e-6)


def test_text_encoders_plan(tmp_path, monkeypatch):
    """`--kinds text`: the recipe's text encoders (here the tiny ones) encode the largest bucket's batch of 77 + 256
    token prompts, T5 and CLIP split over fsdp and tensor, prompts over data x fsdp."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    out = tmp_path / "plan.json"
    argv = ["--recipe", str(TINY), "--target", "cpu:8", "--hbm-gib", "1", "--json", str(out), "--kinds", "text"]
    argv += ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "data.encoders=tiny", NARROW[3]]
    assert plan.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["mesh"] == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2} and doc["fits"] is True
    [step] = doc["steps"]
    assert (step["kind"], step["bucket"], step["tokens"], step["batch"]) == ("text", "prompts", 333, 4)
    assert step["flops"] == text_encoder_flops(tiny_text().configs, 77, 256, 4)
    assert step["argument_bytes"] > 0 and step["temp_bytes"] > 0
    # per device: one of the 4 prompts' [333, 48] embeddings and [24] pooled (float32) comes out (XLA aligns buffers)
    one = (333 * 48 + 24) * 4
    assert one <= step["output_bytes"] < 1.1 * one


def test_vae_encode_plan(tmp_path, monkeypatch):
    """`--kinds encode`: the cache builder's Wan VAE encode of one clip at the largest bucket, on one of the mesh's
    devices: a 4-frame chunk after frame 0 with its causal history, FLOPs those of that chunk, the frames in fp32
    as arguments."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    out = tmp_path / "plan.json"
    argv = ["--recipe", str(TINY), "--target", "cpu:8", "--hbm-gib", "1", "--json", str(out), "--kinds", "encode"]
    assert plan.main([*argv, "mesh.data=8", "data.encoders=tiny"]) == 0
    [step] = json.loads(out.read_text())["steps"]
    recipe = load_recipe(TINY)
    b = max(recipe.data.buckets, key=lambda b: b.width * b.height * b.frames)
    cfg = tiny_vae_config()
    chunk = vae_encode_flops(cfg, 5, b.height, b.width) - vae_encode_flops(cfg, 1, b.height, b.width)
    assert (step["kind"], step["bucket"], step["batch"], step["flops"]) == ("encode", b.name, 1, chunk)
    assert step["argument_bytes"] > 4 * b.height * b.width * 3 * 4 and step["temp_bytes"] > 0 and step["fits"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "gpu:8"], "--target 'gpu:8': expected tpu:<libtpu topology>"),
        (["--target", "tpu:v5p"], "--target 'tpu:v5p'"),
        (["--target", "cpu:4"], "= 8 devices, but the target has 4"),
        (["--target", "cpu:8", "--hbm-gib", "-3"], "--hbm-gib must be a positive number"),
        (["--target", "cpu:8", "--hbm-gib", "lots"], "--hbm-gib: invalid float value"),
        (["--target", "cpu:8", "--buckets", "1x1x1"], "--buckets ['1x1x1']: not in"),
        (["--target", "cpu:8", "--kinds", "reward"], "--kinds reward: choose from train,sample"),
        (["--target", "cpu:8", "--blocks", "0"], "--blocks must be >= 1"),
        (["--target", "cpu:8", "mesh.fsdp=3"], "data.buckets[0] (64x64x9): batch_size 4 does not split"),
        (["--target", "cpu:8", "--json", "/no/such/dir/p.json"], "--json /no/such/dir/p.json: directory does not"),
        ([], "--target is required with --backend jax"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    hbm = [] if "--hbm-gib" in argv else ["--hbm-gib", "64"]
    full = ["--recipe", str(TINY), *hbm, *NARROW[:4], *argv]
    assert plan.main(full) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_missing_and_reward_recipes_are_exit_2(capsys, tmp_path):
    assert plan.main(["--recipe", str(tmp_path / "none.yaml"), "--target", "cpu:8", "--hbm-gib", "64"]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    reward = ROOT / "configs" / "recipes" / "reward_refl_480p.yaml"
    assert plan.main(["--recipe", str(reward), "--target", "cpu:8", "--hbm-gib", "64"]) == 2
    assert (
        "reward_refl_480p.yaml: mesh: data x fsdp x sequence x tensor = 1 x 8 x 8 x 1 = 64 devices, but the target "
        "has 8" in capsys.readouterr().err
    )
    assert plan.main(["--recipe", str(reward), "--target", "cpu:8", "--hbm-gib", "64", "--buckets", "a"]) == 2
    assert "a reward recipe plans its one update step; drop --buckets / --kinds" in capsys.readouterr().err
    assert plan.main(["--recipe", str(reward), "--backend", "torch", "--hbm-gib", "64"]) == 2
    assert "reward recipes are planned by the JAX backend" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_plan_of_a_narrow_reward_recipe(tmp_path):
    """The shipped 4-step GRPO recipe on the tiny model, 64x64x5 rollouts, mesh 1 x 8 x 1 x 1: one "reward" row (the
    update step of 32 rollouts) and the state a run keeps per device."""
    out = tmp_path / "plan.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(ROOT / "tools" / "plan.py"), "--recipe", str(ROOT / "configs" / "recipes" /
           "reward_grpo_4step.yaml"), "--target", "cpu:8", "--hbm-gib", "64", "--json", str(out), "--blocks", "1",
           "--text-tokens", "7", "model=tiny", "mesh.sequence=1", "rollout.width=64", "rollout.height=64",
           "rollout.frames=5", "data.buckets=[{width: 64, height: 64, frames: 5, batch_size: 8}]"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["fits"] is True and doc["method"] == "grpo" and doc["blocks"] == 1
    assert doc["mesh"] == {"data": 1, "fsdp": 8, "sequence": 1, "tensor": 1}
    [step] = doc["steps"]
    assert (step["kind"], step["bucket"], step["tokens"], step["batch"]) == ("reward", "64x64x5", 32 + 7, 32)
    assert (
        step["peak_bytes"] == step["argument_bytes"] + step["temp_bytes"] + step["output_bytes"] - step["alias_bytes"]
    )
    assert step["temp_bytes"] > 0 and step["alias_bytes"] > 0  # model and optimizer donated, as in training
    state = doc["state_bytes"]
    assert set(state) == {"params", "optimizer", "anchor"} and state["anchor"] == state["params"]
    assert 1.9 * state["params"] < state["optimizer"] < 2.1 * state["params"]  # AdamW's two moments, sharded alike
    assert "| reward | 64x64x5 |" in proc.stdout


def test_torch_backend_without_its_planner_is_exit_2(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "contentv_torch_npu.memory_plan", None)  # import fails as if absent
    assert plan.main(["--backend", "torch", "--recipe", str(TINY), "--hbm-gib", "64"]) == 2
    assert "--backend torch: the torch planner is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_tpu_topology_compile_of_a_narrow_model(tmp_path):
    """The planner on a TPU target (libtpu from the .[tpu] extra, which the README's test command installs)."""
    assert importlib.util.find_spec("libtpu"), "libtpu is not installed: install the .[tpu] extra (README: Tests)"
    out = tmp_path / "plan.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tools" / "plan.py"), "--recipe", str(TINY), "--target", "tpu:v5p:2x2x2"]
    cmd += ["--hbm-gib", "64", "--json", str(out), "--blocks", "1", "--kinds", "sample", *NARROW]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["devices"] == 8 and "TPU v5" in doc["device_kind"]
    _check_consistent(doc, 64)


def test_a_program_the_tpu_compiler_refuses_is_a_plan_that_does_not_fit():
    import jax

    from contentv_jax.memory_plan import compile_plan

    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (187.22G) "
        "exceeds available HBM (95.74G)."
    )  # XLA:TPU's words, measured on a tiny model at 720p x 121 frames with XLA attention

    def lower():
        raise jax.errors.JaxRuntimeError(message)

    p = compile_plan("train", "1280x720x121", 111_933, 8, 1.0, lower, args=3 * 2**30, hbm=64 * 2**30)
    assert not p.fits and p.temp_bytes == int(187.22 * 2**30) and p.argument_bytes == 3 * 2**30
    assert p.peak_bytes == p.argument_bytes + p.temp_bytes

    def broken():
        raise jax.errors.JaxRuntimeError("INVALID_ARGUMENT: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT"):
        compile_plan("train", "b", 1, 1, 1.0, broken, args=0, hbm=1)


def test_a_known_program_keeps_its_figures_and_a_changed_one_compiles():
    from contentv_jax.memory_plan import compile_plan, compiler_versions, program_hash, reusable

    class Lowered:  # what compile_plan uses of jax.stages.Lowered
        def __init__(self, text: str) -> None:
            self.text, self.compiled = text, False

        def as_text(self) -> str:
            return self.text

        def compile(self):
            self.compiled = True
            return self  # its memory_analysis() is itself too

        def memory_analysis(self):
            return SimpleNamespace(
                argument_size_in_bytes=5, temp_size_in_bytes=7, output_size_in_bytes=2, alias_size_in_bytes=1
            )

    first = Lowered("module @step { a }")
    p = compile_plan("train", "b", 10, 2, 3.0, lambda: first, args=5, hbm=100)
    assert first.compiled and not p.reused and p.peak_bytes == 13 and p.program == program_hash(first)
    doc = {"device_kind": "cpu", "compiler": compiler_versions(), "steps": [dataclasses.asdict(p)]}
    known = reusable([doc], doc["device_kind"])
    same = Lowered("module @step { a }")
    q = compile_plan("train", "b", 10, 2, 4.0, lambda: same, args=5, hbm=12, known=known)
    assert not same.compiled and q.reused and q.peak_bytes == 13 and q.flops == 4.0 and not q.fits
    changed = Lowered("module @step { b }")
    r = compile_plan("train", "b", 10, 2, 3.0, lambda: changed, args=5, hbm=100, known=known)
    assert changed.compiled and not r.reused and r.program != p.program
    assert reusable([doc], "TPU v5") == {}
    assert reusable([{**doc, "compiler": {**doc["compiler"], "jax": "0.0.1"}}], doc["device_kind"]) == {}
    unfit = {**doc, "steps": [dataclasses.asdict(dataclasses.replace(p, fits=False))]}
    assert reusable([unfit], doc["device_kind"]) == {}  # a step that did not fit is a lower bound: compiled again


def test_online_text_train_plan_counts_the_encoders(tmp_path, monkeypatch):
    """`data.text=online`: the train step takes the token ids and the text encoders' parameters (split by
    TEXT_PARAM_AXES) instead of the cached text, so it has more argument bytes, and its FLOPs add the encoders'
    forward on the batch's prompts (77 CLIP + 256 T5 tokens)."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    argv = ["--recipe", str(TINY), "--target", "cpu:8", "--hbm-gib", "1", "--kinds", "train", "--blocks", "1"]
    argv += ["--buckets", "64x64x9", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "data.encoders=tiny", NARROW[3]]
    steps, state = {}, {}
    for text in ("cached", "online"):
        out = tmp_path / f"{text}.json"
        assert plan.main([*argv, "--json", str(out), f"data.text={text}"]) == 0
        doc = json.loads(out.read_text())
        [steps[text]], state[text] = doc["steps"], doc["state_bytes"]
    cached, online = steps["cached"], steps["online"]
    # the encoders' float32 weights beside the train state, split over the mesh (between 1/8 and all of them)
    weights = 4 * sum(a.size for tensors in tiny_text().weights for a in tensors.values())
    assert state["online"] == {**state["cached"], "text_encoders": state["online"]["text_encoders"]}
    assert weights / 8 < state["online"]["text_encoders"] < weights
    assert (online["kind"], online["bucket"], online["batch"], online["tokens"]) == ("train", "64x64x9", 4, 48 + 333)
    assert online["flops"] - cached["flops"] == text_encoder_flops(tiny_text().configs, 77, 256, 4)
    assert online["argument_bytes"] > cached["argument_bytes"] and online["fits"]
