"""What a reward fine-tuning run does the same way in both backends (numpy): batches, held-out evaluation inputs,
reward construction from the recipe, the per-step log (JSONL) with its plot, and what a checkpoint records besides
tensors (`ResumePoint`).

Every random draw is a pure function of (seed, step) through `contentv_common.training.schedules.step_rng`, so the JAX
run and the torch run of one recipe see the same prompts, noise, SFT samples and exploration noise, and the step alone
is the data and RNG position a resumed run needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contentv_common.config.reward import RewardModelConfig, RewardRecipe
from contentv_common.data.build import build_data_cache, data_settings
from contentv_common.data.cache import Encoders, LatentCache, cache_is_current
from contentv_common.errors import CheckpointError, ConfigError, RunStopped
from contentv_common.reward.models import BlackBoxReward, as_black_box, load_black_box
from contentv_common.reward.sde import exploration_noise
from contentv_common.sampling import latent_shape
from contentv_common.training.divergence import DivergenceGuard
from contentv_common.training.schedules import flow_inputs, resolve_shift, step_rng


class RewardData:
    """Numpy batches of one run: rollout inputs per step, SFT batches from the latent cache, held-out eval inputs."""

    def __init__(self, recipe: RewardRecipe, encoders: Encoders, cache: LatentCache | None):
        self.recipe, self.cache = recipe, cache
        r = recipe.rollout
        self.prompts = list(r.prompts)
        self.text, self.pooled = encoders.encode_text(self.prompts)
        neg_text, neg_pooled = encoders.encode_text([r.negative_prompt])
        self.neg_text, self.neg_pooled = neg_text[0], neg_pooled[0]
        self.group = recipe.grpo.group_size if recipe.method == "grpo" else 1
        self.rows = r.batch_size * self.group
        self.latent_shape = latent_shape(encoders.latent_channels, r.frames, r.height, r.width, self.rows)

    def _prompt_rows(self, prompt_ids: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.repeat(prompt_ids, self.group)
        n = len(ids)
        return {
            "text": self.text[ids],
            "pooled": self.pooled[ids],
            "neg_text": np.repeat(self.neg_text[None], n, axis=0),
            "neg_pooled": np.repeat(self.neg_pooled[None], n, axis=0),
        }

    def rollout(
        self, step: int, noise_rows: slice | None = None
    ) -> tuple[dict[str, np.ndarray], list[str], np.ndarray | None]:
        """(batch without tokens, the prompt of each row, GRPO's SDE exploration noise [n, rows, ...]) for a step,
        n the explored steps (`GrpoConfig.explored_steps`), on `grpo.noise_grid`'s cells when set.

        Each row's exploration noise comes from its own generator of (seed, step, row), so a process that runs some
        rows draws `noise_rows` alone (at 8B, 32 rollouts x 16 explored steps of noise are 2.7 GB)."""
        rng = step_rng(self.recipe.seed, step)
        ids = rng.integers(len(self.prompts), size=self.recipe.rollout.batch_size)
        batch = self._prompt_rows(ids)
        if self.recipe.method == "grpo" and self.recipe.grpo.shared_start:  # one start per group
            starts = rng.standard_normal((len(ids), *self.latent_shape[1:]), dtype=np.float32)
            batch["noise"] = np.repeat(starts, self.group, axis=0)
        else:
            batch["noise"] = rng.standard_normal(self.latent_shape, dtype=np.float32)
        step_noise = None
        if self.recipe.method == "grpo":
            grpo = self.recipe.grpo
            rows = range(self.rows)[noise_rows or slice(None)]
            shape = (grpo.explored_steps(self.recipe.rollout.steps), *self.latent_shape[1:])
            step_noise = np.empty((shape[0], len(rows), *shape[1:]), np.float32)
            for i, row in enumerate(rows):
                row_rng = np.random.default_rng([self.recipe.seed, step, row])
                step_noise[:, i] = exploration_noise(row_rng, shape, grpo.noise_grid)
        return batch, [self.prompts[i] for i in np.repeat(ids, self.group)], step_noise

    def evaluation(self) -> tuple[dict[str, np.ndarray], list[str]]:
        """Held-out inputs: one row per eval seed (prompts cycled), noise from the seed alone."""
        seeds = self.recipe.rollout.eval_seeds
        ids = np.arange(len(seeds)) % len(self.prompts)
        batch = {
            "text": self.text[ids],
            "pooled": self.pooled[ids],
            "neg_text": np.repeat(self.neg_text[None], len(seeds), axis=0),
            "neg_pooled": np.repeat(self.neg_pooled[None], len(seeds), axis=0),
        }
        shape = self.latent_shape[1:]
        batch["noise"] = np.stack([np.random.default_rng(s).standard_normal(shape, dtype=np.float32) for s in seeds])
        return batch, [self.prompts[i] for i in ids]

    def sft(self, step: int) -> dict[str, np.ndarray]:
        """A real batch (same bucket) with its flow-matching noise, sigmas and weights; {} when there is no SFT."""
        if self.cache is None or len(self.cache) == 0:
            return {}
        rng = step_rng(self.recipe.seed + 1, step)
        bucket_ids = np.asarray(self.cache.bucket_ids)
        bucket = bucket_ids[rng.integers(len(bucket_ids))]
        members = np.flatnonzero(bucket_ids == bucket)
        n = self.recipe.rollout.batch_size
        picked = rng.choice(members, size=n, replace=len(members) < n)
        real = self.cache.batch([int(i) for i in picked])
        obj = self.recipe.objective
        _, _, f, h, w = real["latents"].shape
        tokens = f * (h // 2) * (w // 2)
        draws = flow_inputs(rng, real["latents"].shape, logit_mean=obj.logit_mean, logit_std=obj.logit_std,
                            shift=resolve_shift(obj.shift_mode, obj.shift, tokens, obj.base_tokens),
                            weighting=obj.weighting)  # fmt: skip
        return {
            "sft_x0": real["latents"].astype(np.float32),
            "sft_noise": draws["noise"],
            "sft_sigmas": draws["sigmas"],
            "sft_weights": draws["weights"],
            "sft_text": real["text"].astype(np.float32),
            "sft_pooled": real["pooled"].astype(np.float32),
        }


def open_sft_cache(recipe: RewardRecipe, encoders: Encoders, progress: bool = True) -> LatentCache | None:
    """The SFT term's latent cache (built with the run's encoders when stale), or None without a data section."""
    data = recipe.data
    if data is None:
        return None
    if not cache_is_current(data.cache_dir, data_settings(data)):
        build_data_cache(data, lambda: encoders, progress=progress)
    return LatentCache(data.cache_dir, list(data.buckets))


def black_box_reward(cfg: RewardModelConfig, backend_clip: Any = None) -> BlackBoxReward:
    """The recipe's reward as a scorer on uint8 frames (GRPO): built-ins, `module:factory`, or a backend CLIP reward."""
    if cfg.kind == "black_box":
        assert cfg.black_box is not None  # the reward recipe's check
        return load_black_box(cfg.black_box, **cfg.kwargs)
    if cfg.kind == "clip":
        return as_black_box(backend_clip)
    return as_black_box(differentiable_builtin(cfg))


def evaluated_updates(step: int, recipe: RewardRecipe) -> int | None:
    """The updates the model that step `step` evaluates on the held-out seeds has had, or None: every
    `rollout.eval_interval` steps the model the step starts from (`step`; at step 0 the model the run tunes), and at
    the last step the tuned model, after its update (`step + 1`)."""
    if step == recipe.steps - 1:
        return step + 1
    return step if step % recipe.rollout.eval_interval == 0 else None


def eval_record(rewards: np.ndarray, prompts: Sequence[str], updates: int) -> dict[str, float]:
    """The log's held-out entries: the reward's mean and std over the eval clips, the updates the evaluated model had,
    and where a prompt has several seeds, the seed-to-seed std (`eval_seed_std`: the std of each clip's reward about
    its prompt's mean, pooled over the prompts, with one degree of freedom per prompt taken by its mean): the spread a
    change must clear to mean something, without the differences between prompts."""
    rewards = np.asarray(rewards, np.float64)
    record = {"eval_reward_mean": float(rewards.mean()), "eval_reward_std": float(rewards.std())}
    record["eval_updates"] = updates
    names, which = np.unique(np.asarray(prompts), return_inverse=True)
    if len(names) < len(rewards):
        residuals = rewards - (np.bincount(which, rewards) / np.bincount(which))[which]
        record["eval_seed_std"] = float(np.sqrt((residuals**2).sum() / (len(rewards) - len(names))))
    return record


def differentiable_builtin(cfg: RewardModelConfig):
    """`brightness` / `target_colour` / `object_area` from the recipe (array-generic, either backend), with the
    recipe's `reward.kwargs` (object_area: dark, lit, cap)."""
    return cfg.builtin()


def optimizer_updates(recipe: RewardRecipe) -> int:
    """Optimizer updates of the whole run (the length of the learning-rate schedule): GRPO makes
    `updates_per_rollout` per step."""
    return recipe.steps * (recipe.grpo.updates_per_rollout if recipe.method == "grpo" else 1)


def divergence_guard(
    recipe: RewardRecipe, point: ResumePoint | None, history: Mapping[str, Any] | None = None
) -> DivergenceGuard:
    """The run's divergence guard, counting on from a checkpoint's skipped updates; with `history` (the guard's
    `state()` a checkpoint saved, as training's do) also its spike window and first bad step."""
    state = dict(history) if history else {"skipped": point.skipped if point else 0}
    return DivergenceGuard(recipe.divergence, recipe.nan_skip_limit, state)


def check_divergence(guard: DivergenceGuard, checkpoint_dir: str | Path) -> None:
    """RunStopped once more updates were skipped than `nan_skip_limit` allows."""
    if guard.stopped:
        raise RunStopped(guard.stop_message(f"resume point: the latest checkpoint in {checkpoint_dir}"))


def uses_anchor(recipe: RewardRecipe) -> bool:
    """Whether the loss has a reference policy: ReFL's anchor (frozen or EMA), GRPO's KL term."""
    return recipe.refl.anchor != "none" if recipe.method == "refl" else recipe.grpo.kl_weight > 0


def uses_ema_anchor(recipe: RewardRecipe) -> bool:
    """The anchor that changes during training (so a checkpoint must carry it): ReFL with `refl.anchor: ema`."""
    return recipe.method == "refl" and recipe.refl.anchor == "ema"


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint's counters: the next step (also the data/RNG position), the reward log's line count when it was
    written (later lines belong to steps the resumed run redoes), the seed, whether it holds an EMA anchor or an EMA
    of the weights, and the divergent updates skipped so far (older checkpoints lack the last two: 0)."""

    step: int
    log_lines: int
    seed: int
    ema_anchor: int
    ema_weights: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def read(cls, values: Mapping[str, Any], recipe: RewardRecipe, where: str | Path) -> ResumePoint:
        """Parse a checkpoint's counters and check that `recipe` can continue from them (errors name the key)."""
        try:
            point = cls(
                **{k: int(values[k]) for k in ("step", "log_lines", "seed", "ema_anchor")},
                **{k: int(values.get(k, 0)) for k in ("ema_weights", "skipped")},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: not a reward-run checkpoint ({type(e).__name__}: {e})") from None
        if point.seed != recipe.seed:
            raise ConfigError(
                f"seed: the recipe has {recipe.seed} but the checkpoint in {where} continues a run with seed "
                f"{point.seed}; use the same seed or a new checkpoint.dir"
            )
        if uses_ema_anchor(recipe) and not point.ema_anchor:
            raise ConfigError(
                f"refl.anchor: ema, but the checkpoint in {where} holds no EMA anchor; use the anchor it was "
                "written with or a new checkpoint.dir"
            )
        if recipe.optimizer.ema_decay is not None and not point.ema_weights:
            raise ConfigError(
                f"optimizer.ema_decay: set, but the checkpoint in {where} holds no EMA of the weights; drop it or use "
                "a new checkpoint.dir"
            )
        return point


class RewardLog:
    """Appends one JSON line per step to `<log_dir>/reward_log.jsonl` (flushed, so a crash loses nothing logged) and
    draws `reward.png` (reward mean +- std per step, held-out reward) from it. A distillation run keeps its log the
    same way under another `name` (contentv_common.distill.run).

    `keep_lines` > 0 resumes a log: its first `keep_lines` lines (the steps a checkpoint covers) stay and the rest,
    written by steps after that checkpoint, is cut (atomically) because the resumed run writes them again.
    """

    def __init__(self, log_dir: str | Path, keep_lines: int = 0, name: str = "reward_log.jsonl"):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / name
        if keep_lines == 0:
            self.path.unlink(missing_ok=True)
            self.lines = 0
            return
        lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        if len(lines) < keep_lines:
            raise CheckpointError(
                f"{self.path}: {len(lines)} lines, but the checkpoint being resumed was written after "
                f"{keep_lines}; restore the log or start a new run (new checkpoint.dir)"
            )
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.writelines(lines[:keep_lines])
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        self.lines = keep_lines

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: (float(v) if isinstance(v, (np.floating, np.integer)) else v)
                                for k, v in record.items()}) + "\n")  # fmt: skip
            f.flush()
            os.fsync(f.fileno())
        self.lines += 1

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self, title: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.records()
        train = [r for r in rows if "reward_mean" in r]
        evals = [r for r in rows if "eval_reward_mean" in r]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = np.array([r["step"] for r in train])
        mean = np.array([r["reward_mean"] for r in train])
        std = np.array([r["reward_std"] for r in train])
        ax.plot(steps, mean, label="train reward (mean)")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.25, label="train reward (std)")
        if evals:
            at = [r.get("eval_updates", r["step"]) for r in evals]  # older logs lack the last two
            seeded = all("eval_seed_std" in r for r in evals)  # else one seed per prompt: the std over the clips
            spread = [r["eval_seed_std"] if seeded else r.get("eval_reward_std", 0.0) for r in evals]
            ax.errorbar(at, [r["eval_reward_mean"] for r in evals], yerr=spread, fmt="o-", capsize=3,
                        label=f"held-out seeds (mean, {'seed-to-seed std' if seeded else 'std'})")  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel("reward")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        out = self.dir / "reward.png"
        tmp = self.dir / "reward.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(out)
        return out
