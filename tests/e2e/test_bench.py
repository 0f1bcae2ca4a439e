"""tools/bench.py on the CPU with --tiny: all three backends, both modes, JSON with the expected fields; padding."""

from __future__ import annotations

import json
from dataclasses import replace

import jax
import numpy as np
import pytest

from contentv_common.cli import bench
from contentv_common.config.model import named_model_config
from contentv_common.model.flops import transformer_flops

ROW_FIELDS = {
    "backend", "mode", "status", "model", "blocks", "batch", "dtype", "latent_shape", "image_tokens", "text_tokens",
    "tokens", "options", "flops_per_step", "step_s_median", "step_s", "tflops", "mfu", "attention_tflops", "floor_s",
    "vs_floor", "peak_memory_bytes", "peak_memory_source", "device", "error",
}  # fmt: skip


@pytest.mark.slow
def test_tiny_run_all_backends_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--mode", "train,sample", "--cfg-batch", "--pad-to", "16", "--warmup", "1", "--repeats", "2"]
    argv += ["--in-process", "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report) == {
        "date", "command", "device", "peak", "flop_formula", "warnings", "attention", "jax_attention", "results"
    }  # fmt: skip
    assert report["warnings"] == []  # every row ran on the device whose peak was measured
    assert report["device"].startswith("CPU") and "fp32" in report["peak"]["what"] and report["peak"]["tflops"] > 0
    rows = report["results"]
    assert [(r["backend"], r["mode"]) for r in rows] == [(b, m) for m in bench.MODES for b in bench.BACKENDS]
    cfg = named_model_config("tiny")
    for r in rows:
        assert set(r) == ROW_FIELDS and r["status"] == "ok", r
        assert len(r["step_s"]) == 2 and r["step_s_median"] == pytest.approx(float(np.median(r["step_s"])))
        assert r["batch"] == (2 if r["mode"] == "sample" else 1)
        count = transformer_flops(cfg, r["image_tokens"], r["text_tokens"], r["batch"])
        flops = count.step(r["mode"])
        assert r["flops_per_step"] == flops and r["tokens"] == 39 and r["latent_shape"][2:] == [1, 8, 16]
        assert r["tflops"] == pytest.approx(flops / r["step_s_median"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / report["peak"]["tflops"])
        floor = (
            flops / count.forward * (count.linear / report["peak"]["tflops"] + count.attention / r["attention_tflops"])
        )
        assert r["floor_s"] == pytest.approx(floor / 1e12)
        assert r["vs_floor"] == pytest.approx(r["step_s_median"] / r["floor_s"])
    assert [a["mode"] for a in report["attention"]] == list(bench.MODES)
    assert all(a["status"] == "ok" and a["tflops"] > 0 for a in report["attention"])
    assert [(a["mode"], a["kernel"]) for a in report["jax_attention"]] == [(m, "xla") for m in bench.MODES]
    assert all(a["status"] == "ok" and a["tflops"] > 0 for a in report["jax_attention"])
    jax_rows = [r for r in rows if r["backend"] == "jax"]
    assert all(r["peak_memory_bytes"] > 0 and r["peak_memory_source"] == "xla-estimate" for r in jax_rows)
    assert all(r["options"]["attention"] == "xla" and r["options"]["pad_to"] == 16 for r in jax_rows)  # auto: CPU
    table = capsys.readouterr().out
    assert "matmul peak" in table and table.count("diffusers") == 2 and "1.00x" in table


@pytest.mark.slow
def test_failing_case_is_reported_not_fatal(tmp_path):
    """Cases run in worker subprocesses by default; cuDNN attention does not exist on the CPU: the row says so and
    the exit status is 1."""
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--backends", "jax", "--attention", "cudnn", "--warmup", "0", "--repeats", "1", "--out", str(out)]
    assert bench.main(argv) == 1
    (row,) = json.loads(out.read_text())["results"]
    assert row["status"] == "error" and row["error"] and row["tflops"] is None


def test_token_targets_pick_contentv_shapes():
    patch = 2
    assert bench.latent_for_tokens(33_093, 333, bench.GRIDS, patch) == (21, 60, 104)  # 480x832, 81 frames
    assert bench.latent_for_tokens(41_805, 333, bench.GRIDS, patch) == (32, 54, 96)  # 432x768, 125 frames
    assert bench.image_grid(32_760) == (180, 182) and bench.image_grid(41_472) == (192, 216)
    with pytest.raises(ValueError, match="text tokens"):
        bench.latent_for_tokens(300, 333, bench.GRIDS, patch)
    with pytest.raises(SystemExit):
        bench.parse_args(["--backends", "jax,tensorflow"])


def _has_pad(jaxpr) -> bool:
    from jax.extend.core import jaxprs_in_params

    return any(e.primitive.name == "pad" or any(_has_pad(s) for s in jaxprs_in_params(e.params)) for e in jaxpr.eqns)


@pytest.mark.slow
def test_pad_to_reaches_the_model_and_keeps_its_output(rel_err):
    """--pad-to sets the model's attention padding (39 tokens -> 48); the output is unchanged."""
    from flax import nnx

    case = bench.Case("jax", "sample", "tiny", 2, 1, 8, 16, 7, 1, "float32", 0, 1)
    data = bench._inputs(case)
    args = [data[k] for k in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")]
    outs = []
    for pad_to in (0, 16):
        graphdef, state = nnx.split(bench.jax_model(replace(case, pad_to=pad_to)))
        jaxpr = jax.make_jaxpr(lambda s, *a, g=graphdef: nnx.merge(g, s)(*a))(state, *args).jaxpr
        assert _has_pad(jaxpr) == bool(pad_to)
        outs.append(nnx.merge(graphdef, state)(*args))
    assert rel_err(outs[1], outs[0]) < 1e-6
