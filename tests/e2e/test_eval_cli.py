"""tools/eval.py end to end on tiny hand-made mp4 clips: scores per clip and overall in its JSON and table; bad input
is an error naming what is wrong (one line and exit status 2 from the command) before any clip is decoded."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from contentv_common.cli import BAD_INPUT, one_line
from contentv_common.cli.eval import main
from contentv_common.data.synthetic import render
from contentv_common.data.video_io import write_video

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
        ([str(short), "--dimensions", "caption_colour,caption_direction"], "1 frame(s); caption_direction need 2"),
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
