"""tools/plan.py --sample-job: tools/sample.py's job (the prompt pair through the text encoders, one guided step of
the mesh sampler, the VAE decode) planned on fake CPU devices with the narrow model (38 heads, 333 text tokens) and
the tiny encoders, the job's peak and FLOPs consistent with its steps; bad input is one line and exit 2."""

import json
import os
from pathlib import Path

import pytest
import yaml

from contentv_common.cli import plan
from contentv_common.plan import table as plan_table
from contentv_common.plan.report import GIB, JOB_WEIGHTS, SAMPLING_STEPS
from tests.narrow_model import NARROW

# 20 x 4 patches x 3 latent frames: 240 image tokens (split over sequence=4), and 40 latents wide, more than one of
# the VAE's 32-latent tiles, so a job on several devices decodes in tiles
ROOT = Path(__file__).resolve().parents[2]
VIDEO = "320x64x9"
IMAGE_TOKENS = 240


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "narrow.yaml"
    path.write_text(yaml.safe_dump({**NARROW, "num_layers": 1, "pos_embed": "sincos_3d"}))
    return path


def _job(model: Path, out: Path, mesh: str, *extra: str) -> dict:
    argv = ["--sample-job", VIDEO, "--model", str(model), "--encoders", "tiny", "--mesh", mesh, "--hbm-gib", "16"]
    assert plan.main([*argv, "--target", "cpu:8", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _check_job(doc: dict) -> None:
    steps, job, resident = {s["kind"]: s for s in doc["steps"]}, doc["job"], doc["resident_bytes"]
    assert set(resident) == {"transformer", "text", "vae"} and all(n > 0 for n in resident.values())
    for kind, s in steps.items():
        others = sum(n for name, n in resident.items() if name != JOB_WEIGHTS[kind])
        assert job["step_peak_bytes"][kind] == s["peak_bytes"] + others
        assert s["peak_bytes"] == s["argument_bytes"] + s["temp_bytes"] + s["output_bytes"] - s["alias_bytes"]
    assert job["peak_bytes"] == max(job["step_peak_bytes"].values()) and job["fits"] is doc["fits"] is True
    assert job["flops"] == steps["text"]["flops"] + SAMPLING_STEPS * steps["sample"]["flops"] > 0
    assert job["compile_s"] == pytest.approx(sum(s["compile_s"] for s in doc["steps"]))
    sample = steps["sample"]
    assert (sample["tokens"], sample["batch"]) == (IMAGE_TOKENS + 333, 2)  # one prompt and its negative
    assert resident["transformer"] < sample["argument_bytes"]  # the step's arguments: the weights and its inputs
    assert (steps["text"]["batch"], steps["text"]["tokens"]) == (2, 333)


def test_a_job_on_a_sequence_and_cfg_mesh_splits_the_step_and_decodes_in_tiles(model, tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    one = _job(model, tmp_path / "one.json", "data=1,sequence=1,cfg=1", "--chips", "1")
    # the second plan reuses the one-device text program the first compiled (same program, chip kind, compiler)
    many = _job(model, tmp_path / "many.json", "sequence=4,cfg=2", "--reuse", str(tmp_path / "one.json"))
    for doc in one, many:
        _check_job(doc)
    assert [s["kind"] for s in one["steps"]] == ["text", "sample", "decode"] and one["devices"] == 1
    assert [s["kind"] for s in many["steps"]] == ["text", "sample", "decode-tiles"] and many["devices"] == 8
    assert many["mesh"] == {"data": 1, "sequence": 4, "cfg": 2} and many["sample_job"] == VIDEO
    text_one, text_many = one["steps"][0], many["steps"][0]
    assert text_many["reused"] and text_many["program"] == text_one["program"]
    assert text_many["peak_bytes"] == text_one["peak_bytes"]
    # the transformer's weights split over sequence as the sampler loads them (ZeRO-3's "embed" rule: fsdp x
    # sequence), the encoders' whole on the first device; the pair's rows and the tokens split 2 x 4 ways
    weights_one, weights_many = one["resident_bytes"], many["resident_bytes"]
    assert weights_one["transformer"] / 4.5 < weights_many["transformer"] < weights_one["transformer"] / 3.5
    assert (weights_many["text"], weights_many["vae"]) == (weights_one["text"], weights_one["vae"])
    assert many["steps"][1]["temp_bytes"] < one["steps"][1]["temp_bytes"] / 2
    assert many["steps"][2]["batch"] == 8  # one tile per device of the first process


def test_the_torch_estimate_of_a_job_at_8_ranks(capsys, tmp_path):
    out = tmp_path / "torch.json"
    argv = ["--sample-job", "64x64x9", "--backend", "torch", "--mesh", "sequence=4,cfg=2", "--hbm-gib", "64"]
    assert plan.main([*argv, "--blocks", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [s["kind"] for s in doc["steps"]] == ["sample", "decode"] and doc["devices"] == 8
    steps, job, resident = {s["kind"]: s for s in doc["steps"]}, doc["job"], doc["resident_bytes"]
    assert resident["text"] > 10 * 2**30  # SD3.5's encoders in bf16: T5-XXL's 4.8 B parameters and both CLIPs
    for kind, s in steps.items():
        others = sum(n for name, n in resident.items() if name != JOB_WEIGHTS[kind])
        assert job["step_peak_bytes"][kind] == s["peak_bytes"] + others
    assert job["flops"] == SAMPLING_STEPS * steps["sample"]["flops"] > 0
    assert (steps["sample"]["tokens"], steps["sample"]["batch"]) == (4 * 4 * 3 + 333, 2)
    assert steps["sample"]["argument_bytes"] >= resident["transformer"]  # whole on every rank, as the sampler loads
    assert "job peak" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mesh", "sequence=2,cfg=2"], "data x sequence x cfg = 4 does not match the 8 devices (cpu:8)"),
        (["--mesh", "data=2,sequence=2,cfg=2"], "a job is one prompt (data=1)"),
        (["--mesh", "sequence=8"], "image tokens 36 do not split over mesh axis sequence=8"),
        (["--mesh", "cfg=3"], "cfg is 1 or 2"),
        (["--sample-job", "64x64x8"], "frames: must be 4k+1, got 8"),
        (["--sample-job", "72x64x9"], "width: must be a positive multiple of 16"),
        (["--sample-job", "64x64"], "expected WIDTHxHEIGHTxFRAMES"),
        (["--recipe", "r.yaml"], "drop --recipe"),
        (["--backend", "torch"], "--target and --chips are the JAX planner's"),
        (["--encoders", "no_such_folder"], "--encoders no_such_folder: not a folder"),
    ],
)
def test_bad_job_input_is_one_line_and_exit_2(capsys, argv, message):
    base = {"--sample-job": "64x48x9", "--mesh": "sequence=4,cfg=2", "--target": "cpu:8", "--hbm-gib": "64"}
    given = dict(zip(argv[::2], argv[1::2], strict=True))
    assert plan.main([a for k, v in {**base, **given}.items() for a in (k, v)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_mesh_goes_with_a_sample_job(capsys):
    assert plan.main(["--recipe", "r.yaml", "--hbm-gib", "64", "--mesh", "sequence=2"]) == 2
    assert "--mesh goes with --sample-job" in capsys.readouterr().err


def test_the_jobs_are_entries_of_the_plan_table_with_their_own_rows(monkeypatch):
    entries = {e.key: e for e in plan_table.job_entries()}
    assert set(entries) == {
        f"job_{video}.{where}"
        for video in ("768x432x125", "1280x720x121")
        for where in ("v5p-2x2x1-1chip", "v5p-2x2x1", "v5p-2x2x2", "torch")
    }
    assert set(entries) <= {e.key for e in plan_table.entries(ROOT)}
    eight = entries["job_1280x720x121.v5p-2x2x2"]
    assert eight.argv() == [
        *("--sample-job", "1280x720x121", "--mesh", "data=1,sequence=4,cfg=2", "--hbm-gib", "64"),
        *("--target", "tpu:v5p:2x2x2"),
    ]
    assert entries["job_768x432x125.torch"].argv()[-2:] == ["--backend", "torch"]
    monkeypatch.setattr(plan_table, "stale", lambda root, doc: None)
    steps = [{"kind": "text", "reused": True}, {"kind": "sample"}, {"kind": "decode-tiles"}]
    job = {"step_peak_bytes": {"text": 2 * GIB, "sample": 30 * GIB, "decode-tiles": 3 * GIB}, "peak_bytes": 30 * GIB}
    job |= {"fits": True, "flops": 5.5e15, "compile_s": 400.0}
    doc = {"sample_job": "1280x720x121", "backend": "jax", "device_kind": "TPU v5", "devices": 8, "steps": steps}
    doc |= {"mesh": {"data": 1, "sequence": 4, "cfg": 2}, "job": job, "hbm_bytes": 64 * GIB}
    doc |= {"date": "2026-12-07", "commit": "abc"}
    text = plan_table.job_table(ROOT, [(eight, doc), (entries["job_1280x720x121.torch"], None)])
    assert text.startswith(plan_table.JOB_BEGIN) and text.endswith(plan_table.JOB_END)
    assert (
        "| 1280x720x121 | TPU v5 x 8 | 1, 4, 2 | 2.00 | 30.00 | 3.00 (tiles) | 30.00 | 64 | yes | 5,500 | 400 "
        "| 2026-12-07 abc (1 of 3 steps reused) |" in text
    )
    assert "| 1280x720x121 | job_1280x720x121.torch | data=1,sequence=4,cfg=2 | not planned yet |" in text
