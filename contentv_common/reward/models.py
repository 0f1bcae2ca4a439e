"""Reward models behind one interface, shared by both backends (imports neither jax nor torch).

A reward is any callable `score(frames, prompts) -> [B]`, higher is better, where `frames` are float RGB images in
[0, 1], channels last: `[B, H, W, 3]` (the first decoded frame of each video). The array type is the backend's
(jax.Array for contentv_jax, torch.Tensor for the twin, numpy for black-box scoring); a differentiable reward must be
written with operations both array types share, or per backend (the CLIP scorer lives in contentv_*/reward_clip.py).

Black-box rewards (a VLM, a torch-only model, a script) take uint8 frames `[B, H, W, 3]` as numpy and return numpy
`[B]`; they drive the sample-based (GRPO) method, which needs no gradient of the reward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from contentv_common.data.synthetic import COLOURS


class Reward(Protocol):
    """`reward(frames, prompts) -> [B]`; inside a compiled step use `score_tokens(frames, tokenize(prompts))`.

    Prompts are tokenised outside the step (numpy int32 `[B, L]`, `L = 0` for prompt-free rewards), so a jitted
    step takes arrays only and compiles once.
    """

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray: ...

    def score_tokens(self, frames: Any, tokens: Any) -> Any: ...

    def __call__(self, frames: Any, prompts: Sequence[str]) -> Any: ...


def _check_frames(frames: Any) -> None:
    shape = tuple(frames.shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"reward frames must be [B, H, W, 3] (channels last, RGB), got shape {shape}")


class RewardBase:
    """`__call__` = `score_tokens(frames, tokenize(prompts))`; prompt-free by default (tokens `[B, 0]`)."""

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return np.zeros((len(prompts), 0), dtype=np.int32)

    def score_tokens(self, frames: Any, tokens: Any) -> Any:
        raise NotImplementedError

    def __call__(self, frames: Any, prompts: Sequence[str]) -> Any:
        _check_frames(frames)
        return self.score_tokens(frames, self.tokenize(prompts))


class PromptFreeReward(RewardBase):
    """A reward of the frames alone: subclasses define `score(frames)`."""

    def score_tokens(self, frames: Any, tokens: Any) -> Any:
        _check_frames(frames)
        return self.score(frames)

    def score(self, frames: Any) -> Any:
        raise NotImplementedError


BlackBoxReward = Callable[[np.ndarray, Sequence[str]], np.ndarray]
"""uint8 frames [B, H, W, 3] (numpy) and prompts -> float rewards [B] (numpy)."""


@dataclass(frozen=True, eq=True)
class MeanBrightness(PromptFreeReward):
    """Mean pixel value per image: the simplest differentiable reward (tests, sanity runs)."""

    def score(self, frames: Any) -> Any:
        return frames.reshape(frames.shape[0], -1).mean(-1)


@dataclass(frozen=True, eq=True)
class TargetColour(PromptFreeReward):
    """Minus the mean squared distance of every pixel to one RGB colour in [0, 1]: maximal (0) on a flat image.

    Frozen (hashable by value), so compiled steps that carry it as a static argument are reused across instances.
    """

    target: tuple[float, float, float] = (1.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        target = tuple(float(c) for c in self.target)
        if len(target) != 3 or not all(0.0 <= c <= 1.0 for c in target):
            raise ValueError(f"target colour must be 3 values in [0, 1], got {tuple(self.target)}")
        object.__setattr__(self, "target", target)

    def score(self, frames: Any) -> Any:
        b = frames.shape[0]
        per_channel = [((frames[..., c] - t) ** 2).reshape(b, -1).mean(-1) for c, t in enumerate(self.target)]
        return -(per_channel[0] + per_channel[1] + per_channel[2]) / 3.0


@dataclass(frozen=True, eq=True)
class ObjectArea(RewardBase):
    """The share of the frame, in percent, that the colour the prompt names covers, up to `cap`: the size of the
    shape in the CPU demo's clips ("a red circle moving right"), which a person sees grow. A pixel counts by its RGB
    distance d to the named colour of the synthetic set's palette: 1 - d^2 / radius^2, clipped to [0, 1], so the
    soft edges of a shape carry the gradient while the dark background and the other palette colours count nothing.
    The cap ends the push at a larger shape (past it the only way up would be painting the background, which the
    reward no longer pays for). It asks for more of what the prompt says, never for another colour; a prompt that
    names no palette colour scores 0."""

    cap: float = 100.0
    radius: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.cap <= 100.0 or not 0.0 < self.radius <= 1.0:
            raise ValueError(f"object_area needs 0 < cap <= 100 and 0 < radius <= 1, got {self.cap}, {self.radius}")

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """One-hot [B, 4] of the palette colour each prompt names, float32 (it weighs the frames' float areas)."""
        words = [set(p.lower().split()) for p in prompts]
        return np.array([[name in w for name in COLOURS] for w in words], np.float32).reshape(
            len(prompts), len(COLOURS)
        )

    def score_tokens(self, frames: Any, tokens: Any) -> Any:
        b = frames.shape[0]
        area = 0.0
        for c, rgb in enumerate(COLOURS.values()):
            d2 = sum((frames[..., k] - v / 255.0) ** 2 for k, v in enumerate(rgb))
            near = (1.0 - d2 * (1.0 / self.radius**2)).clip(0.0, 1.0)
            area = area + (100.0 * near.reshape(b, -1).mean(-1)) * tokens[:, c]
        return (area + self.cap - abs(area - self.cap)) * 0.5  # min(area, cap) with the operations every array shares


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[0, 1] float frames -> uint8 (round to nearest), the form black-box scorers receive."""
    return np.clip(np.rint(np.asarray(frames, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def as_black_box(reward: Reward) -> BlackBoxReward:
    """Any array-generic reward (e.g. TargetColour) as a black-box scorer on uint8 numpy frames."""

    def score(frames: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        if frames.dtype != np.uint8:
            raise ValueError(f"black-box rewards take uint8 frames, got {frames.dtype}")
        return np.asarray(reward(frames.astype(np.float32) / 255.0, prompts), dtype=np.float32)

    return score


def per_video(scores: Any, frames: int) -> Any:
    """Scores of `frames` consecutive frames per video [B * F] -> each video's mean [B] (any array type)."""
    return scores.reshape(-1, frames).mean(-1)


def score_black_box(black_box: BlackBoxReward, frames: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """uint8 frames of whole videos or their first frame [B, F, H, W, 3] -> each video's mean score [B] (float32):
    every frame scored with its video's prompt."""
    b, f = frames.shape[:2]
    scores = black_box(frames.reshape(b * f, *frames.shape[2:]), [p for p in prompts for _ in range(f)])
    return per_video(np.asarray(scores, np.float32), f)


SIMPLE_REWARDS: dict[str, Callable[..., Reward]] = {
    "brightness": MeanBrightness,
    "target_colour": TargetColour,
    "object_area": ObjectArea,
}


def simple_reward(name: str, **kwargs: Any) -> Reward:
    """A built-in array-generic reward by name (`brightness`, `target_colour`, `object_area`), usable from either
    backend."""
    if name not in SIMPLE_REWARDS:
        raise ValueError(f"unknown simple reward {name!r} (known: {sorted(SIMPLE_REWARDS)})")
    return SIMPLE_REWARDS[name](**kwargs)


def load_black_box(spec: str, **kwargs: Any) -> BlackBoxReward:
    """`"package.module:factory"` -> the scorer `factory(**kwargs)` returns (a callable on uint8 frames)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"black-box reward {spec!r} must be 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"black-box reward {spec!r}: cannot import ({e})") from None
    scorer = factory(**kwargs)
    if not callable(scorer):
        raise ValueError(f"black-box reward {spec!r}: factory returned a non-callable {type(scorer).__name__}")
    return scorer


def group_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
    """GRPO advantages: each reward minus its group's mean, over the group's std (groups are consecutive rows)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards shape {rewards.shape} is not a multiple of group_size {group_size}")
    groups = rewards.reshape(-1, group_size)
    adv = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + eps)
    return adv.reshape(-1).astype(np.float32)
