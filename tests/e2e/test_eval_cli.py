"""tools/eval.py end to end on tiny hand-made mp4 clips: scores per clip and overall in its JSON and table; bad input
is an error naming what is wrong (one line and exit status 2 from the command) before any clip is decoded."""

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from contentv_common.cli import BAD_INPUT, one_line
from contentv_common.cli.eval import main, wait_for
from contentv_common.data.synthetic import render
from contentv_common.data.video_io import write_video
from contentv_common.prompt_suite import suite_pairs

ROOT = Path(__file__).resolve().parents[2]
DIMS = "temporal_flickering,caption_colour,caption_direction"


def _clips(folder: Path) -> None:
    static = render("square", "green", "left", 64, 64, 1, seed=3).repeat(9, axis=0)
    flicker = static.copy()
    flicker[1::2] = np.clip(flicker[1::2].astype(np.int16) + 80, 0, 255).astype(np.uint8)  # first, last frame as static
    write_video(folder / "a green square moving left-0.mp4", static, fps=8)  # still: no flicker, no motion
    write_video(folder / "a green square moving left-1.mp4", flicker, fps=8)
    write_video(folder / "a red circle moving right-0.mp4", render("circle", "red", "right", 64, 64, 8, 1), fps=8)
    write_video(folder / "a red circle moving left-0.mp4", render("circle", "red", "right", 64, 64, 8, 2), fps=8)


def test_eval_scores_a_folder(tmp_path, capsys):
    _clips(tmp_path)
    (tmp_path / "notes.txt").write_text("not a clip: ignored")
    result = main([str(tmp_path), "--dimensions", DIMS, "--json", str(tmp_path / "out" / "eval.json"), "--no-progress"])
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == result
    flicker = result["dimensions"]["temporal_flickering"]["per_video"]
    assert flicker["a green square moving left-0.mp4"] > 0.999, "a still clip scores the maximum"
    assert flicker["a green square moving left-1.mp4"] < 0.9, "a flickering clip scores clearly lower"
    direction = result["dimensions"]["caption_direction"]["per_video"]
    assert direction == {
        "a green square moving left-0.mp4": 0.0,
        "a green square moving left-1.mp4": 0.0,
        "a red circle moving left-0.mp4": 0.0,
        "a red circle moving right-0.mp4": 1.0,
    }
    assert result["dimensions"]["caption_direction"]["score"] == 0.25
    assert result["dimensions"]["caption_colour"]["score"] == 1.0
    overall = result["dimensions"]["temporal_flickering"]
    assert overall["score"] == np.mean(list(flicker.values()))
    assert overall["normalised"] == (overall["score"] - 0.6293) / (1.0 - 0.6293)
    assert result["total"] is None and "dynamic_degree" in result["missing"]["quality"]
    assert result["benchmark"].startswith("VBench (")
    out = capsys.readouterr().out
    assert "| caption_direction | 25.00 |" in out and "Quality (and Total) not computed: missing" in out


def test_eval_bad_input_is_one_line_exit_2(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    write_video(good / "a cat on a sofa-0.mp4", np.zeros((2, 16, 16, 3), np.uint8), fps=8)
    badly_named = tmp_path / "badly_named"
    badly_named.mkdir()
    (badly_named / "clip.mp4").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    short = tmp_path / "short"
    short.mkdir()
    write_video(short / "a red circle moving right-0.mp4", np.zeros((1, 16, 16, 3), np.uint8), fps=8)
    cases = [
        ([str(good), "--dimensions", "subject_consistency"], "subject_consistency not supported; supported:"),
        ([str(good), "--dimensions", "nonsense"], "nonsense not supported; supported: temporal_flickering"),
        ([str(tmp_path / "missing"), "--dimensions", "temporal_flickering"], "no such folder"),
        ([str(tmp_path / "empty"), "--dimensions", "temporal_flickering"], "no .mp4 videos"),
        ([str(badly_named), "--dimensions", "temporal_flickering"], "clip.mp4: not named {prompt}-{index}.mp4"),
        ([str(good), "--dimensions", "caption_colour"], "'a cat on a sofa' is not a synthetic-set caption"),
        ([str(short), "--dimensions", "caption_colour,caption_direction"], "1 frame(s); caption_direction needs 2"),
        ([str(good), "--dimensions", "clip_score"], "--clip DIR (a local CLIPModel folder) is needed"),
        ([str(good), "--dimensions", "clip_score", "--clip", str(tmp_path / "no_clip")], "no config.json"),
    ]
    for args, expected in cases:  # in-process: each is an error run_cli turns into one line and exit status 2
        with pytest.raises(BAD_INPUT) as error:
            main([*args, "--json", str(tmp_path / "x.json")])
        assert expected in one_line(error.value), (args, one_line(error.value))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(args: list[str]) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "tools" / "eval.py"), *args, "--json", str(tmp_path / "x.json")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)

    with ThreadPoolExecutor(max_workers=2) as pool:  # the command itself: one line on stderr, exit status 2
        results = list(pool.map(run, [cases[0][0], cases[4][0]]))
    for (args, expected), proc in zip([cases[0], cases[4]], results, strict=True):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, proc.stderr)
    assert not (tmp_path / "x.json").exists()


def _suite(path: Path) -> Path:
    entries = [
        {"prompt_en": "In a still frame, a stop sign", "dimension": ["temporal_flickering"]},
        {"prompt_en": "a dog running", "dimension": ["dynamic_degree", "temporal_flickering"]},
        {"prompt_en": "a red apple", "dimension": ["color"]},
    ]
    path.write_text(json.dumps(entries))
    return path


def test_generate_samples_the_suite_then_scores_each_dimension_on_its_prompts(tmp_path, capsys):
    """`--generate --suite`: the prompts of the asked dimensions (not the others'), `--seeds` videos each, named as
    VBench names them, then scored; a second run keeps every clip (resumes) and gives the same scores. Scoring with
    --suite skips clips of prompts the dimension does not list."""
    suite, out = _suite(tmp_path / "VBench_full_info.json"), tmp_path / "suite"
    argv = [str(out), "--dimensions", "temporal_flickering", "--json", str(tmp_path / "eval.json"), "--no-progress"]
    argv += ["--generate", "--suite", str(suite), "--seeds", "2", "--", "--tiny", "--frames", "5", "--size", "32x32"]
    first = main([*argv, "--steps", "1", "--no-progress"])
    names = sorted(p.name for p in out.glob("*.mp4"))
    expected = [f"{p}-{i}.mp4" for p in ("In a still frame, a stop sign", "a dog running") for i in (0, 1)]
    assert names == expected and first is not None
    assert sorted(first["dimensions"]["temporal_flickering"]["per_video"]) == expected
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    again = main([*argv, "--steps", "1", "--no-progress"])
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == stamps and again == first
    assert "wrote 0, skipped 4 already there" in capsys.readouterr().out
    write_video(out / "a red apple-0.mp4", np.zeros((5, 32, 32, 3), np.uint8), fps=8)  # not a flickering prompt
    scored = main([str(out), "--dimensions", "temporal_flickering", "--json", str(tmp_path / "e2.json"),
                   "--suite", str(suite), "--no-progress"])  # fmt: skip
    assert scored is not None and sorted(scored["dimensions"]["temporal_flickering"]["per_video"]) == expected
    unfiltered = main([str(out), "--dimensions", "temporal_flickering", "--json", str(tmp_path / "e3.json")])
    assert unfiltered is not None and len(unfiltered["dimensions"]["temporal_flickering"]["per_video"]) == 5


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--generate", "--", "--tiny"], "--generate samples a prompt suite: give --suite"),
        (["--generate", "--suite", "S", "--", "--tiny", "--out", "x"], "--out: --generate sets the sampler's"),
        (["--generate", "--suite", "S", "--", "--tiny", "--prompt=a cat"], "--prompt=a cat: --generate sets"),
        (["--generate", "--suite", "S"], "give the sampler's arguments after --"),
        (["--suite", "S", "--", "--tiny"], "arguments after -- are the sampler's: give --generate"),
        (["--generate", "--suite", "S", "--seeds", "0", "--", "--tiny"], "--seeds must be >= 1"),
        (["--generate", "--suite", "missing.json", "--", "--tiny"], "missing.json: no such file"),
        (["--suite", "S"], "temporal_flickering: no clip of its prompts in the folder"),
    ],
)
def test_generate_bad_input_is_one_line_before_any_model(tmp_path, extra, message):
    suite = _suite(tmp_path / "S")
    folder = tmp_path / "clips"
    folder.mkdir()
    write_video(folder / "a red apple-0.mp4", np.zeros((2, 16, 16, 3), np.uint8), fps=8)
    extra = [str(suite) if a == "S" else str(tmp_path / a) if a == "missing.json" else a for a in extra]
    with pytest.raises(BAD_INPUT) as error:
        main([str(folder), "--dimensions", "temporal_flickering", "--json", str(tmp_path / "x.json"), *extra])
    assert message in one_line(error.value)
    assert not (tmp_path / "x.json").exists() and len(list(folder.glob("*.mp4"))) == 1


def test_generate_over_two_ranks_scores_once_on_rank_0(tmp_path, monkeypatch, capsys):
    """Two torchrun ranks (RANK / WORLD_SIZE): rank 1 samples its share and returns without scoring; rank 0 samples
    its own, then scores every clip of the suite."""
    suite, out = _suite(tmp_path / "VBench_full_info.json"), tmp_path / "suite"
    argv = [str(out), "--dimensions", "temporal_flickering", "--json", str(tmp_path / "eval.json"), "--no-progress"]
    argv += ["--generate", "--suite", str(suite), "--seeds", "2", "--", "--tiny", "--backend", "torch"]
    argv += ["--frames", "5", "--size", "32x32", "--steps", "1", "--no-progress"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(argv) is None and not (tmp_path / "eval.json").exists()
    assert (
        len(list(out.glob("*.mp4"))) == 2 and "process 1: its share of the suite is written" in capsys.readouterr().out
    )
    monkeypatch.setenv("RANK", "0")
    result = main(argv)
    assert result is not None and len(result["dimensions"]["temporal_flickering"]["per_video"]) == 4


def test_rank_0_waits_for_the_other_shares(tmp_path, capsys):
    pairs = suite_pairs(["a cat"], 2)
    write_video(tmp_path / pairs[0].name, np.zeros((2, 16, 16, 3), np.uint8), fps=8)
    late = threading.Timer(0.3, lambda: write_video(tmp_path / pairs[1].name, np.zeros((2, 16, 16, 3), np.uint8), 8))
    late.start()
    wait_for(pairs, tmp_path, poll_s=0.05)
    late.join()
    assert "waiting for 1 clips of the other processes' shares, e.g. a cat-1.mp4" in capsys.readouterr().out
