"""The CPU demo around a training run (contentv-train with the tiny or demo encoders): its prompts, the clips it
samples after training or reward tuning with `strip.png`, and the LoRA demo's fallback base model."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from contentv_common.config.recipe import Recipe
from contentv_common.config.reward import RewardRecipe
from contentv_common.sampling import ClipSettings, sample_clips

if TYPE_CHECKING:
    from contentv_common.backend import Backend

DEMO_PROMPTS = (
    "a red circle moving right",
    "a blue square moving down",
    "a green circle moving left",
    "a yellow square moving up",
)


def demo_clips(
    backend: Backend,
    transformer: Path,
    encoders: str,
    seed: int,
    prompts: list[str],
    out: Path,
    settings: ClipSettings,
    progress: bool,
) -> list[Path]:
    """Clips of `prompts` from a transformer folder with the "tiny" (seeded by `seed`) or "demo" encoders, as
    `contentv-sample --tiny/--demo --transformer FOLDER` writes them."""
    codecs = backend.encoders(encoders, seed, device="auto")
    model = backend.load_transformer(transformer, "float32", "auto")
    return sample_clips(backend, model, codecs, codecs.decode_latents, prompts, out, settings, progress)


def save_strip(rows: list[np.ndarray], path: Path) -> Path:
    """strip.png: each uint8 clip's frames in a row (contentv_common.training.evaluation.frame_strip), at 2x: 64-pixel
    frames are small on screen."""
    import av

    from contentv_common.training.evaluation import frame_strip

    image = frame_strip(*rows).repeat(2, axis=0).repeat(2, axis=1)
    av.VideoFrame.from_ndarray(image, format="rgb24").to_image().save(path)
    return path


def sample_demo(
    recipe: Recipe, backend: Backend, folder: Path, prompts: list[str], progress: bool, primary: bool = True
) -> None:
    """Sample a clip per prompt from the model just trained (exported to `folder`) into `<run>/samples/` (beside the
    checkpoints), with the loss curve and strip.png: per prompt, the generated frames above a training clip of the
    same caption. Process 0 samples, the others wait."""
    from contentv_common.data.decode import decode_clip
    from contentv_common.data.manifest import read_manifest
    from contentv_common.data.video_io import read_video

    bucket = recipe.data.buckets[0]
    out = Path(recipe.checkpoint.dir).parent / "samples"
    if primary:
        settings = ClipSettings(frames=bucket.frames, height=bucket.height, width=bucket.width, steps=20,
                                guidance=6.0, fps=recipe.data.fps)  # fmt: skip
        written = demo_clips(backend, folder, recipe.data.encoders, recipe.seed, prompts, out, settings, progress)
        clips = {e.caption: e.path for e in read_manifest(recipe.data.manifest) if not e.is_image}
        rows = []
        for prompt, path in zip(prompts, written, strict=True):
            rows.append(read_video(path)[0])
            if prompt in clips:
                rows.append(decode_clip(clips[prompt], recipe.data.fps, bucket.frames, bucket.width, bucket.height))
        save_strip(rows, out / "strip.png")
        loss = Path(recipe.log_dir) / "loss.png"
        if loss.exists():
            shutil.copy(loss, out / "loss.png")
        print(f"samples in {out}: {len(written)} clips, strip.png (generated above a training clip), loss.png")
    backend.barrier("demo")  # JAX: jax.distributed's shutdown barrier would give up after 5 minutes


def sample_reward_demo(recipe: RewardRecipe, backend: Backend, prompts: list[str], progress: bool) -> None:
    """The clips of a reward run that tuned a model of its own (`init_from`): per prompt, the model it started from
    above the tuned one, from the same noise (seeds from the first held-out seed on, the held-out clips themselves when
    the prompts are the rollout's) and the rollout's sampler, into `<run>/samples/{before,after}/` with strip.png and
    reward.png; prints each clip's reward and whether it still shows its caption (the demo test's measure)."""
    from contentv_common.data.video_io import read_video
    from contentv_common.reward.run import black_box_reward
    from contentv_common.training.evaluation import demo_measure

    if recipe.init_from is None:
        raise ValueError("the reward demo compares with the model the run started from: the recipe needs init_from")
    r = recipe.rollout
    out = Path(recipe.checkpoint.dir).parent / "samples"
    settings = ClipSettings(frames=r.frames, height=r.height, width=r.width, steps=r.steps, guidance=r.guidance,
                            shift=r.shift, seed=r.eval_seeds[0], fps=8,
                            negative_prompt=r.negative_prompt or "")  # fmt: skip
    tuned = Path(recipe.checkpoint.dir).parent / "transformer"
    clips = {}
    for name, folder in (("before", Path(recipe.init_from)), ("after", tuned)):
        written = demo_clips(backend, folder, recipe.encoders, recipe.seed, prompts, out / name, settings, progress)
        clips[name] = [read_video(p)[0] for p in written]
    save_strip([clip for pair in zip(clips["before"], clips["after"], strict=True) for clip in pair], out / "strip.png")
    shutil.copy(Path(recipe.log_dir) / "reward.png", out / "reward.png")
    score = black_box_reward(recipe.reward)
    print(f"samples in {out}: per prompt, the clip before tuning above the one after (strip.png), reward.png")
    for i, prompt in enumerate(prompts):
        before, after = clips["before"][i], clips["after"][i]
        rewards = [float(score(clip[:1], [prompt])[0]) for clip in (before, after)]
        shown = ["yes" if demo_measure(clip, prompt)["ok"] else "no" for clip in (before, after)]
        print(f"  {prompt!r}: {recipe.reward.kind} {rewards[0]:.2f} -> {rewards[1]:.2f}; shows its caption: "
              f"{shown[0]} -> {shown[1]}")  # fmt: skip


def lora_demo_base(recipe: Recipe) -> Recipe:
    """The LoRA demo (configs/recipes/lora_tiny.yaml) fine-tunes the tiny demo's exported model; on a fresh clone,
    where there is none yet, it adapts the seeded random model instead (said on one line). Only for the demo's
    tiny/demo encoders: elsewhere a missing `init_from` stays an error."""
    if recipe.lora is None or recipe.init_from is None or recipe.data.encoders not in ("tiny", "demo"):
        return recipe
    if Path(recipe.init_from).exists():
        return recipe
    print(f"init_from {recipe.init_from}: not there (run `python tools/train.py` first); LoRA on the random model")
    return replace(recipe, init_from=None)
