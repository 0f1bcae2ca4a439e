"""Validation, framework-free: held-out samples at fixed timesteps, the prompts of `eval.prompts` and their clips'
metrics, clips as image strips, and what a demo clip shows.

Both trainers feed `eval_batch` to their own per-sample flow-matching loss, so the numbers are comparable between
backends and between runs: the noise of held-out sample i is a pure function of (seed, i), the timesteps are fixed,
the text is never dropped and every row weighs 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from contentv_common.data.buckets import BucketLike
from contentv_common.data.cache import LatentCache, bucket_name, read_eval_prompts
from contentv_common.data.synthetic import COLOURS, DIRECTIONS
from contentv_common.errors import DataError
from contentv_common.sampling import draw_noise

if TYPE_CHECKING:
    from contentv_common.eval.clip import ClipEmbeddings
    from contentv_common.eval.dimensions import Scorer


def eval_batch(cache: LatentCache, index: int, timesteps: tuple[float, ...], seed: int) -> dict[str, np.ndarray]:
    """Cached sample `index` once per timestep: latents, noise, sigmas (= t / 1000), weights, text, pooled."""
    sample = cache.sample(index)
    n = len(timesteps)
    noise = np.random.default_rng([seed, 1 << 21, index]).standard_normal(sample["latents"].shape, dtype=np.float32)
    return {
        "latents": np.repeat(sample["latents"][None], n, 0),
        "noise": np.repeat(noise[None], n, 0),
        "sigmas": np.asarray(timesteps, np.float32) / np.float32(1000.0),
        "weights": np.ones(n, np.float32),
        "text": np.repeat(sample["text"][None], n, 0),
        "pooled": np.repeat(sample["pooled"][None], n, 0),
    }


EVAL_CLIP = {"steps": 10, "guidance": 3.0, "shift": 3.0}  # a quick look, not the demo's final samples


def eval_clip_inputs(cache: LatentCache, index: int, seed: int, copies: int = 1) -> dict[str, np.ndarray]:
    """What a validation clip of held-out sample `index` starts from: seeded noise of its latent shape, its cached
    caption embedding and the empty prompt's (the unconditional branch of guidance); `copies` rows of each, so that
    every data-parallel group of a mesh draws the same clip (the first row is the clip)."""
    sample = cache.sample(index)
    rows = {
        "noise": draw_noise(seed, (1, *sample["latents"].shape)),
        "text": sample["text"][None],
        "pooled": sample["pooled"][None],
        "neg_text": cache.empty_text[None],
        "neg_pooled": cache.empty_pooled[None],
    }
    return {k: np.repeat(v, copies, axis=0) for k, v in rows.items()}


@dataclass(frozen=True)
class EvalPrompts:
    """A recipe's `eval.prompts`, ready to sample: prompt i's noise (seed + i, the first cached video bucket's latent
    shape), its text embeddings and the empty prompt's (the unconditional branch, as the in-loop clip's)."""

    prompts: tuple[str, ...]
    noise: np.ndarray  # [N, C, f, h, w]
    text: np.ndarray  # [N, L, D]
    pooled: np.ndarray  # [N, P]
    neg_text: np.ndarray  # [L, D]
    neg_pooled: np.ndarray  # [P]

    def inputs(self, shards: int) -> dict[str, np.ndarray]:
        """The sampler's rows (`clip_latents`), padded with copies of row 0 to a multiple of `shards` (the training
        mesh's data shards); rows N.. are dropped after sampling."""
        n = len(self.prompts)
        rows = [*range(n), *[0] * (-n % shards)]
        return {
            "noise": self.noise[rows],
            "text": self.text[rows],
            "pooled": self.pooled[rows],
            "neg_text": np.repeat(self.neg_text[None], len(rows), 0),
            "neg_pooled": np.repeat(self.neg_pooled[None], len(rows), 0),
        }


def eval_prompts(cache: LatentCache, buckets: Sequence[BucketLike], prompts: tuple[str, ...], seed: int) -> EvalPrompts:
    """`EvalPrompts` of a recipe's `eval.prompts`, from the cache (their embeddings: `read_eval_prompts`); the clips
    take the latent shape of the first video bucket's cached samples."""
    text, pooled = read_eval_prompts(cache.dir, prompts)
    first = bucket_name(next(b for b in buckets if b.frames > 1))
    in_bucket = [i for i, s in enumerate(cache.index.samples) if s["bucket"] == first]
    if not in_bucket:
        raise DataError(f"eval.prompts: {cache.dir} holds no sample of the first video bucket {first}")
    shape = cache.sample(in_bucket[0])["latents"].shape
    noise = np.concatenate([draw_noise(seed + i, (1, *shape)) for i in range(len(prompts))])
    return EvalPrompts(prompts, noise, text, pooled, cache.empty_text, cache.empty_pooled)


def eval_scorers(prompts: Sequence[str], clip: ClipEmbeddings | None) -> dict[str, Scorer]:
    """The metrics of `eval.prompts`' clips (contentv_common.eval.dimensions): temporal flickering; the caption
    accuracy of colour and direction when every prompt is a synthetic-set caption; the CLIP metrics given a CLIP."""
    from contentv_common.eval.dimensions import DIMENSIONS, clip_scorers  # it imports this module

    names = ["temporal_flickering"]
    try:
        for prompt in prompts:
            parse_caption(prompt)
        names += ["caption_colour", "caption_direction"]
    except ValueError:
        pass
    scorers = {name: DIMENSIONS[name] for name in names}
    return scorers | (clip_scorers(clip) if clip is not None else {})


def score_clips(videos: np.ndarray, prompts: Sequence[str], scorers: dict[str, Scorer]) -> dict[str, Any]:
    """Each metric's mean over the clips (uint8 [N, F, H, W, 3], one per prompt) and, under "prompts", every
    prompt's own values."""
    pairs = zip(videos, prompts, strict=True)
    per_prompt = {prompt: {name: score(video, prompt) for name, score in scorers.items()} for video, prompt in pairs}
    means = {name: float(np.mean([values[name] for values in per_prompt.values()])) for name in scorers}
    return {**means, "prompts": per_prompt}


def frame_strip(*videos: np.ndarray, gap: int = 2) -> np.ndarray:
    """uint8 videos [F, H, W, 3] (same F, H, W) -> one image: each video's frames side by side, videos stacked with a
    `gap`-pixel white line between rows."""
    rows = [np.concatenate(list(v), axis=1) for v in videos]
    line = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    out = [rows[0]]
    for row in rows[1:]:
        out += [line, row]
    return np.concatenate(out, axis=0)


BRIGHT = 100  # the synthetic set's backgrounds stay below 50 in every channel, its shapes reach 200+ in one


def shape_motion(video: np.ndarray, colour: str, direction: str) -> dict[str, float]:
    """What a clip of "a <colour> <shape> moving <direction>" shows, measured on uint8 frames [F, H, W, 3].

    `colour_share`: of the bright pixels (any channel above BRIGHT), the fraction nearest in RGB to the named colour
    among the synthetic set's colours. `along` / `across`: how far (pixels) the centroid of the named colour's pixels
    moves from the first to the last frame along the named direction and perpendicular to it.
    """
    video = np.asarray(video, np.float32)
    palette = np.asarray(list(COLOURS.values()), np.float32)
    bright = video.max(axis=-1) > BRIGHT
    nearest = np.argmin(((video[..., None, :] - palette) ** 2).sum(-1), axis=-1)
    named = bright & (nearest == list(COLOURS).index(colour))
    share = float(named.sum() / max(bright.sum(), 1))
    centroids = []
    for mask in (named[0], named[-1]):
        ys, xs = np.nonzero(mask)
        centroids.append(np.array([xs.mean(), ys.mean()]) if len(xs) else np.full(2, np.nan))
    move = centroids[1] - centroids[0]
    dx, dy = DIRECTIONS[direction]
    return {"colour_share": share, "along": float(move @ [dx, dy]), "across": float(abs(move @ [-dy, dx]))}


MIN_SHARE, MIN_MOVE = 0.5, 4.0  # most bright pixels in the named colour; a move of 4 px, more along than across


def shows_colour(motion: dict[str, float], min_share: float = MIN_SHARE) -> bool:
    """`shape_motion`'s numbers show the named colour: most bright pixels are nearest to it."""
    return motion["colour_share"] >= min_share


def shows_direction(motion: dict[str, float], min_move: float = MIN_MOVE) -> bool:
    """`shape_motion`'s numbers show the named direction: `min_move` px along it, more than across it."""
    return motion["along"] >= min_move and motion["along"] > motion["across"]


def shows_caption(
    video: np.ndarray, colour: str, direction: str, min_share: float = MIN_SHARE, min_move: float = MIN_MOVE
) -> bool:
    """The clip shows the named colour moving the named way (`shows_colour` and `shows_direction`)."""
    m = shape_motion(video, colour, direction)
    return shows_colour(m, min_share) and shows_direction(m, min_move)


def parse_caption(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, direction) of a synthetic-set caption "a <colour> <shape> moving <direction>" (the shape is
    not checked: what the clip shows is measured by colour and motion alone)."""
    words = prompt.split()
    if (
        len(words) != 5
        or (words[0], words[3]) != ("a", "moving")
        or words[1] not in COLOURS
        or words[4] not in DIRECTIONS
    ):
        raise ValueError(
            f"{prompt!r} is not a synthetic-set caption 'a <colour> <shape> moving <direction>' (colours "
            f"{', '.join(COLOURS)}; directions {', '.join(DIRECTIONS)})"
        )
    return words[1], words[2], words[4]


DARK_MEAN = 110  # the mean pixel value a clip stays under while its background is the synthetic set's dark one


def demo_measure(video: np.ndarray, prompt: str) -> dict[str, float | bool]:
    """What the CPU demo checks in a clip of one of its captions ("a <colour> <shape> moving <direction>"), on uint8
    frames [F, H, W, 3]: `shape_motion`'s numbers, the mean pixel value, and `ok`: the clip shows its caption
    (`shows_caption`) on a dark background."""
    colour, _, direction = parse_caption(prompt)
    measured: dict[str, float | bool] = dict(shape_motion(video, colour, direction))
    measured["mean"] = float(np.mean(video))
    measured["ok"] = shows_caption(video, colour, direction) and measured["mean"] < DARK_MEAN
    return measured
