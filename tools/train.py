"""Train ContentV with flow matching: `python tools/train.py [--config RECIPE] [--backend jax|torch] [key=value ...]`.

Flags and overrides may come in any order. Everything is checked before any model or data work (recipe file, YAML,
overrides, mesh vs devices, the checkpoint dir's run lock, then the data): a problem is one line naming the file or
key, exit status 2; a run that stops (divergence, a failed checkpoint save) is one line and exit status 1.

With the default tiny recipe the run is self-contained: it generates the synthetic moving-shapes set, caches its
latents and text embeddings with the demo encoders (configs/demo_vae + word embeddings), trains the demo model on CPU,
writes a loss-curve PNG and samples the four demo prompts into `<run>/samples/` beside a strip image.
Logs go to `<log_dir>/metrics.jsonl` and TensorBoard; multi-stage recipes run their stages in order.
Several processes (JAX: jax.distributed, see contentv_jax.multihost and tools/launch_local.py; torch: torchrun) run
the same command; process / rank 0 alone builds the data cache, writes the logs and samples the demo clip.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contentv_common.checkpoint.run_lock import check_unlocked  # noqa: E402
from contentv_common.cli import run_cli  # noqa: E402
from contentv_common.config.model import ModelConfig  # noqa: E402
from contentv_common.config.recipe import Recipe, load_recipe, parse_override  # noqa: E402
from contentv_common.config.reward import RewardRecipe, is_reward_recipe, load_reward_recipe  # noqa: E402
from contentv_common.data.buckets import BucketBatchSampler  # noqa: E402
from contentv_common.data.cache import build_cache, cache_is_current, cache_settings, read_index  # noqa: E402
from contentv_common.data.synthetic import make_synthetic_set  # noqa: E402
from contentv_common.errors import ConfigError, DataError  # noqa: E402
from contentv_common.text.sd3_prompt import check_text_widths, read_text_configs  # noqa: E402

TINY = ROOT / "configs" / "recipes" / "tiny.yaml"
DEMO_PROMPTS = (
    "a red circle moving right",
    "a blue square moving down",
    "a green circle moving left",
    "a yellow square moving up",
)


class MetricsLog:
    """Keeps the losses for the plot; the trainers themselves write metrics.jsonl and TensorBoard (one stream,
    contentv_common/training/metrics.py)."""

    def __init__(self, log_dir: str | Path):
        self.dir = Path(log_dir)
        self.steps: list[int] = []
        self.losses: list[float] = []

    def __call__(self, metrics: dict[str, Any]) -> None:
        if not metrics["skipped"]:
            self.steps.append(metrics["step"])
            self.losses.append(metrics["loss"])

    def plot(self) -> Path:
        """loss.png: raw losses and a moving average."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(self.steps, self.losses, alpha=0.35, label="loss")
        k = max(1, min(20, len(self.losses) // 5))
        if len(self.losses) >= k:
            smooth = np.convolve(self.losses, np.ones(k) / k, mode="valid")
            ax.plot(self.steps[k - 1 :], smooth, label=f"moving average ({k})")
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching loss")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "loss.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def load_encoders(name: str, seed: int, backend: str):
    """The VAE + text encoders that build the cache, in the run's backend: "tiny" (random), "demo" (trained tiny VAE)
    or a pipeline folder."""
    if backend == "jax":
        from contentv_jax.encoders import named_encoders
    else:
        from contentv_torch_npu.encoders import named_encoders
    return named_encoders(name, seed)


def check_encoder_widths(name: str, cfg: ModelConfig) -> None:
    """A pipeline's text encoders must give the model's text and pooled widths: ConfigError naming the encoder's
    config file and key, from config files alone (before any data or weight is read)."""
    if name not in ("tiny", "demo"):
        check_text_widths(read_text_configs(name), name, cfg.joint_attention_dim, cfg.pooled_projection_dim)


def prepare_data(recipe: Recipe, progress: bool = True, backend: str = "jax") -> None:
    """Make sure the cache matches the recipe: generate the synthetic set if the manifest is missing and it is the
    demo's, then (re)build the latent/text cache when its settings differ, with the backend's encoders."""
    data = recipe.data
    manifest = Path(data.manifest)
    if not manifest.exists() and "synthetic" in manifest.parts:
        make_synthetic_set(manifest.parent, seed=recipe.seed, progress=progress)
    if not manifest.is_file():
        raise DataError(f"data.manifest: {manifest}: no such file")
    settings = cache_settings(manifest, list(data.buckets), data.fps, data.encoders)
    if not cache_is_current(data.cache_dir, settings):  # a current cache needs no encoders
        check_encoder_widths(data.encoders, recipe.model_config)
        build_cache(
            manifest,
            data.cache_dir,
            load_encoders(data.encoders, recipe.seed, backend),
            list(data.buckets),
            data.fps,
            encoders_name=data.encoders,
            progress=progress,
        )
    index = read_index(data.cache_dir)
    skipped = index.skip_counts
    print(f"cache {data.cache_dir}: {len(index.samples)} samples" + (f", skipped {skipped}" if skipped else ""))
    check_batches(index, recipe)


def check_batches(index, recipe: Recipe) -> None:
    """DataError unless the cache makes at least one full batch; names the manifest and the first skipped file."""
    names = [b.name for b in recipe.data.buckets]
    ids = [names.index(s["bucket"]) for s in index.samples if s["bucket"] in names]
    try:
        BucketBatchSampler(ids, [b.batch_size for b in recipe.data.buckets], recipe.seed)
    except ValueError as e:
        first = f"; first skipped: {index.skipped[0]['message']}" if index.skipped else ""
        raise DataError(f"{recipe.data.manifest}: {len(index.samples)} usable samples, {e}{first}") from None


def check_devices(recipe: Recipe, backend: str) -> bool:
    """ConfigError unless the recipe's mesh matches the devices (JAX) or the torchrun world size (torch); returns
    whether this is the main process (the one that will hold the checkpoint dir's lock)."""
    if backend == "jax":
        from contentv_jax import multihost
        from contentv_jax.train import check_devices as check

        multihost.initialize()  # before any other JAX call
        check(recipe)
        return multihost.is_primary()
    from contentv_torch_npu.distributed import check_mesh

    try:
        check_mesh(recipe.mesh, int(os.environ.get("WORLD_SIZE", "1")), recipe.model_config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return os.environ.get("RANK", "0") == "0"


def prepare_data_once(recipe: Recipe, backend: str, primary: bool, progress: bool, poll_s: float = 2.0) -> None:
    """prepare_data in process 0 only. JAX processes wait for it at a barrier; torch ranks (no process group yet)
    until the cache is current, for as long as it takes: torchrun stops every rank if rank 0 fails."""
    if primary:
        prepare_data(recipe, progress, backend)
    if backend == "jax":
        from contentv_jax import multihost

        multihost.barrier("data")
        return
    settings = cache_settings(recipe.data.manifest, list(recipe.data.buckets), recipe.data.fps, recipe.data.encoders)
    while not cache_is_current(recipe.data.cache_dir, settings):
        time.sleep(poll_s)


def train_stage(recipe: Recipe, backend: str, progress: bool, primary: bool = True) -> MetricsLog | None:
    log = MetricsLog(recipe.log_dir) if primary else None
    if backend == "jax":
        from contentv_jax.train import run
    else:
        from contentv_torch_npu.train import run
    run(recipe, progress=progress, on_step=log)
    return log


def export_transformer(recipe: Recipe, backend: str) -> Path:
    """The last checkpoint's weights (EMA when kept) as a transformer folder that load_transformer reads, a LoRA
    run's adapters merged into its base, in `<checkpoint.dir>/../transformer` (either backend)."""
    out = Path(recipe.checkpoint.dir).parent / "transformer"
    if backend == "torch":
        from contentv_torch_npu.checkpointing import export_weights, latest_checkpoint

        step = latest_checkpoint(recipe.checkpoint.dir)
        if step is None:
            raise FileNotFoundError(f"{recipe.checkpoint.dir}: no checkpoint to export")
        return export_weights(step, out, "ema" if (step / "ema").is_dir() else "model", recipe.lora)
    from contentv_jax.checkpointing import Checkpointer
    from contentv_jax.multihost import export_model
    from contentv_jax.train import default_mesh, get_trainer

    trainer = get_trainer(recipe, default_mesh(recipe))
    ckpt = Checkpointer(recipe.checkpoint, writer=False)
    state, _ = ckpt.restore(trainer.checkpointed(trainer.abstract_state()))
    ckpt.close()
    return export_model(out, trainer.plain_model(trainer.final_params(state)))  # every process takes part


def sample_clips(transformer: Path, encoders: str, seed: int, backend: str, prompts: list[str], out: Path,
                 settings: list[str], progress: bool) -> list[Path]:  # fmt: skip
    """tools/sample.py's clips of `prompts` from a transformer folder with the "tiny" (seeded) or "demo" encoders;
    `settings`: its sampler and size flags."""
    from tools import sample

    names = ["--demo"] if encoders == "demo" else ["--tiny", "--encoder-seed", str(seed)]
    args = [*names, "--transformer", str(transformer), "--backend", backend, "--out", str(out), *settings]
    args += [a for p in prompts for a in ("--prompt", p)]
    return sample.main(args + ([] if progress else ["--no-progress"]))


def save_strip(rows: list[np.ndarray], path: Path) -> Path:
    """strip.png: each uint8 clip's frames in a row (contentv_common.training.evaluation.frame_strip), at 2x: 64-pixel
    frames are small on screen."""
    import av

    from contentv_common.training.evaluation import frame_strip

    image = frame_strip(*rows).repeat(2, axis=0).repeat(2, axis=1)
    av.VideoFrame.from_ndarray(image, format="rgb24").to_image().save(path)
    return path


def sample_demo(recipe: Recipe, backend: str, prompts: list[str], progress: bool, primary: bool = True) -> None:
    """Sample a clip per prompt from the model just trained into `<run>/samples/` (beside the checkpoints), with
    the loss curve and strip.png: per prompt, the generated frames above a training clip of the same caption. Process 0
    samples; the others wait."""
    from contentv_common.data.decode import decode_clip
    from contentv_common.data.manifest import read_manifest
    from contentv_common.data.video_io import read_video

    bucket = recipe.data.buckets[0]
    out = Path(recipe.checkpoint.dir).parent / "samples"
    folder = export_transformer(recipe, backend) if primary or backend == "jax" else None  # JAX: every process
    if primary:
        settings = ["--frames", str(bucket.frames), "--size", f"{bucket.height}x{bucket.width}", "--steps", "20"]
        settings += ["--guidance", "6.0", "--fps", str(recipe.data.fps)]
        written = sample_clips(folder, recipe.data.encoders, recipe.seed, backend, prompts, out, settings, progress)
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
    if backend == "jax":  # the others wait: jax.distributed's shutdown barrier would give up after 5 minutes
        from contentv_jax import multihost

        multihost.barrier("demo")


def sample_reward_demo(recipe: RewardRecipe, backend: str, prompts: list[str], progress: bool) -> None:
    """The clips of a reward run that tuned a model of its own (`init_from`): per prompt, the model it started from
    above the tuned one, from the same noise (seeds from the first held-out seed on, the held-out clips themselves when
    the prompts are the rollout's) and the rollout's sampler, into `<run>/samples/{before,after}/` with strip.png and
    reward.png; prints each clip's reward and whether it still shows its caption (the demo test's measure)."""
    from contentv_common.data.video_io import read_video
    from contentv_common.reward.run import black_box_reward
    from contentv_common.training.evaluation import demo_measure

    r = recipe.rollout
    out = Path(recipe.checkpoint.dir).parent / "samples"
    settings = ["--frames", str(r.frames), "--size", f"{r.height}x{r.width}", "--steps", str(r.steps), "--guidance",
                str(r.guidance), "--shift", str(r.shift), "--seed", str(r.eval_seeds[0]), "--fps", "8"]  # fmt: skip
    if r.negative_prompt:
        settings += ["--negative-prompt", r.negative_prompt]
    tuned = Path(recipe.checkpoint.dir).parent / "transformer"
    clips = {}
    for name, folder in (("before", Path(recipe.init_from)), ("after", tuned)):
        written = sample_clips(folder, recipe.encoders, recipe.seed, backend, prompts, out / name, settings, progress)
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


def read_jax_init(recipe: Recipe, backend: str) -> None:
    """The torch twin starts from a JAX-format `init_from` (e.g. the tiny demo's export) through contentv_jax's
    reader, registered by importing it (as tools/sample.py does)."""
    from contentv_common.checkpoint.formats import detect_format

    if backend == "torch" and recipe.init_from and Path(recipe.init_from).is_dir():
        if detect_format(recipe.init_from) == "jax":
            import contentv_jax  # noqa: F401


def train_reward(path: str, overrides: dict[str, Any], backend: str, progress: bool, prompts: list[str]) -> int:
    """Reward fine-tuning (ReFL or GRPO): recipes with a `method` key (configs/recipes/reward_*.yaml). A run that
    tunes a model of its own (`init_from`) with the tiny or demo encoders then samples `prompts` before and after."""
    recipe = load_reward_recipe(path, overrides)
    if recipe.init_from is not None and not Path(recipe.init_from).exists():
        hint = " (the CPU demo's model: run `python tools/train.py` first)" if recipe.encoders == "demo" else ""
        raise ConfigError(f"{path}: init_from: {recipe.init_from}: no such folder{hint}")
    if backend == "torch":  # torchrun's world against the recipe's mesh, before any data work
        from contentv_torch_npu.reward.run import check_world

        check_world(recipe, int(os.environ.get("WORLD_SIZE", "1")))
        primary = os.environ.get("RANK", "0") == "0"
    else:  # JAX processes of one run (several hosts) join first, then the mesh is checked against all devices
        from contentv_jax import multihost
        from contentv_jax.reward.mesh import reward_mesh

        multihost.initialize()
        reward_mesh(recipe)
        primary = multihost.is_primary()
    if primary:
        check_unlocked(recipe.checkpoint.dir)
    check_encoder_widths(recipe.encoders, recipe.model_config)
    if recipe.data is not None:
        prepare_data_once(recipe, backend, primary, progress)
    if backend == "jax":
        from contentv_jax.reward.run import run
    else:
        from contentv_torch_npu.reward.run import run
    read_jax_init(recipe, backend)
    record = run(recipe, progress=progress and primary)
    if primary:
        print(f"reward fine-tuning ({recipe.method}, {backend}): last step {record}")
        if prompts and recipe.init_from is not None and recipe.encoders in ("tiny", "demo"):
            sample_reward_demo(recipe, backend, prompts, progress)
    if backend == "jax":  # the others wait for process 0's clips
        from contentv_jax import multihost

        multihost.barrier("reward-demo")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY), help="recipe YAML (default: the tiny CPU demo)")
    parser.add_argument("--backend", choices=("jax", "torch"), default="jax")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--sample-prompt",
        action="append",
        help="after training (or reward-tuning a model) with tiny or demo encoders, sample a clip with this prompt "
        "(repeatable; default: the four demo prompts; '' to skip)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.lr=3e-4 steps=50")
    args = parser.parse_intermixed_args(argv)
    progress = not args.no_progress
    overrides = dict(parse_override(o) for o in args.overrides)
    prompts = [p for p in (args.sample_prompt or DEMO_PROMPTS) if p]
    if is_reward_recipe(args.config):
        return train_reward(args.config, overrides, args.backend, progress, prompts)
    recipe = lora_demo_base(load_recipe(args.config, overrides))
    stages = recipe.stage_recipes()
    primary = check_devices(recipe, args.backend)  # joins a multi-process run first
    if primary:  # fail fast; the trainer's main process takes the lock itself
        for _, stage in stages:
            check_unlocked(stage.checkpoint.dir)
    progress = progress and primary
    for name, stage in stages:
        print(f"stage {name}: {stage.steps} steps, checkpoints in {stage.checkpoint.dir}")
        prepare_data_once(stage, args.backend, primary, progress)
        read_jax_init(stage, args.backend)
        log = train_stage(stage, args.backend, progress, primary)
        if log is not None and log.losses:
            plot = log.plot()
            print(f"stage {name}: loss {log.losses[0]:.4f} -> {log.losses[-1]:.4f}; curve {plot}")
    if prompts and stage.data.encoders in ("tiny", "demo"):
        sample_demo(stage, args.backend, prompts, progress, primary)
    return 0


if __name__ == "__main__":
    run_cli(main)
