"""The JAX core on bf16 and fp32 checkpoints in fresh processes where torch cannot be imported (`.[jax]` alone).

Text encoders, the latent/text cache and the VAE all run in JAX: training, reward runs and sampling need no torch;
parity against torch ends in one line naming the `[torch]` extra. tests/run_extras.sh also runs this file in a
virtual environment holding only `.[jax]`.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from contentv_common.data.video_io import read_video
from tests.fresh.runner import (
    NOT_TORCH,
    check_bf16_sampling,
    check_loader_outputs,
    convert_round_trip,
    one_line_error,
    run_blocked,
    sample_argv,
)

pytestmark = pytest.mark.slow  # every test here trains, tunes or compiles for real

SAMPLE = sample_argv("jax")


def test_loaders_read_bf16_and_fp32(jax_outputs, rel_err):
    """load_transformer, load_vae and load_clip_reward, then one forward each, from sharded bf16 and fp32 folders."""
    check_loader_outputs(jax_outputs, rel_err)


def test_convert_cli(checkpoints, tmp_path):
    """tools/convert.py: bf16 diffusers -> JAX (orbax) -> diffusers fp32, an exact upcast of every tensor."""
    convert_round_trip(NOT_TORCH, checkpoints / "transformer_bf16", tmp_path / "jax", "jax", tmp_path / "diffusers")


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None,
    reason="runs in the .[jax]-only environment of tests/run_extras.sh (about 3 minutes of compiles); with torch "
    "installed, tests/e2e cover each step and tests/common/test_imports.py that contentv_jax never imports the twin",
)
def test_jax_alone_trains_tunes_and_samples_a_pipeline(tmp_path):
    """`.[jax]` alone, in one process: the demo training (on 4 synthetic clips: the latent/text cache by the JAX demo
    encoders, 2 steps, one sampled clip), a tiny ReFL reward run (its SFT cache by the tiny JAX encoders) and
    tools/sample.py --pipeline on a folder the JAX encoders wrote (CLIP-L/CLIP-G/T5, tokenizers, Wan VAE); then a
    pipeline without tokenizer_3/ ends in one line naming it, exit status 2, before any compile."""
    from contentv_common.cli.sample import random_tiny_checkpoint
    from contentv_common.data.synthetic import make_synthetic_set
    from contentv_jax.encoders import tiny_encoders

    pipe = tiny_encoders(seed=1).save(tmp_path / "pipe")
    random_tiny_checkpoint(pipe, seed=1, backend="jax")
    broken = tmp_path / "broken"
    shutil.copytree(pipe, broken)
    shutil.rmtree(broken / "tokenizer_3")
    manifest = make_synthetic_set(tmp_path / "synthetic", num_videos=4, sizes=((64, 64),), progress=False)
    demo, reward = tmp_path / "demo", tmp_path / "reward"
    data = [f"data.manifest={manifest}", "data.buckets=[{width: 64, height: 64, frames: 9, batch_size: 2}]"]
    train = ["tools/train.py", "--no-progress", "steps=2", "--sample-prompt", "a red circle moving right", *data]
    train += [f"data.cache_dir={demo}/cache", f"checkpoint.dir={demo}/checkpoints", f"log_dir={demo}/logs"]
    refl = ["tools/train.py", "--no-progress", "--config", "configs/recipes/reward_refl_tiny.yaml", "steps=1", *data]
    refl += [f"data.cache_dir={reward}/cache", f"checkpoint.dir={reward}/checkpoints", f"log_dir={reward}/logs"]
    sample = [*SAMPLE[2:], "--pipeline", pipe, "--out", tmp_path / "sample"]
    result = run_blocked(
        NOT_TORCH,
        train,
        refl,
        ["tools/sample.py", *sample],
        ["tools/sample.py", *SAMPLE[2:], "--pipeline", broken, "--out", tmp_path / "never"],
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"sample: error: {broken / 'tokenizer_3'}: missing; an SD3.5/ContentV pipeline folder has "
        "text_encoder{,_2,_3}/ and tokenizer{,_2,_3}/"
    )
    assert not (tmp_path / "never").exists()
    (clip,) = (demo / "samples").glob("*.mp4")
    assert read_video(clip)[0].shape == (9, 64, 64, 3)
    assert len((reward / "logs" / "reward_log.jsonl").read_text().splitlines()) == 1
    frames, _ = read_video(next((tmp_path / "sample").glob("*.mp4")))
    assert frames.shape == (1, 32, 32, 3) and frames.std() > 5


def test_sample_cli(checkpoints, tmp_path):
    """tools/sample.py --backend jax --tiny in a fresh process without torch, on the bf16 folder (bf16 weights), gives
    the fp32 folder's frame within bf16 rounding; parity against torch ends in one line naming `.[torch]`."""
    parity = run_blocked(
        NOT_TORCH, ["tools/parity.py", "--checkpoint", checkpoints / "transformer_bf16", "--backends", "jax,torch"]
    )
    one_line_error(parity, "torch")
    assert "parity:" not in parity.stdout  # nothing traced
    check_bf16_sampling(NOT_TORCH, "jax", checkpoints, tmp_path)
