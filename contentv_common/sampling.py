"""Flow-match Euler sampling, framework-free: the schedule, the update, the noise and the loop both backends share.

The schedule is the one ContentV's pipeline builds with diffusers' `FlowMatchEulerDiscreteScheduler` (static shift):
N sigmas linearly spaced from 1 to 1/N, shifted, then a final sigma of 0; the model sees timestep = sigma * 1000.
Arithmetic is float32 as in diffusers, so a trajectory matches it step for step. `euler_step` and `guide` use only
`+ - *`, so they apply unchanged to numpy, jax and torch arrays.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from tqdm.auto import tqdm

from contentv_common.errors import ConfigError
from contentv_common.sample_mesh import ONE_DEVICE, SampleMesh, pair_rows
from contentv_common.training.schedules import shift_sigmas

if TYPE_CHECKING:
    from contentv_common.backend import Backend

SHIFT = 3.0  # SD3.5-Large's scheduler shift
NUM_TRAIN_TIMESTEPS = 1000
VAE_TIME_FACTOR = 4
VAE_SPACE_FACTOR = 8

Array: TypeAlias = Any  # a numpy, JAX or torch array: the math is the same


@dataclass(frozen=True)
class FlowMatchSchedule:
    """`sigmas` [steps + 1] (last 0) and the model's `timesteps` [steps] = sigmas[:-1] * 1000, float32."""

    sigmas: np.ndarray
    timesteps: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def step_sizes(self) -> np.ndarray:
        """dt[i] = sigmas[i + 1] - sigmas[i] in float32, the size of Euler step i (negative)."""
        return np.diff(self.sigmas)


def flow_match_schedule(steps: int, shift: float, shift_terminal: float | None = None) -> FlowMatchSchedule:
    """The ContentV/SD3 inference schedule: linspace(1, 1/steps, steps) -> static shift -> (optionally) stretched so
    the last sigma is `shift_terminal`, as diffusers' `stretch_shift_to_terminal` -> append sigma 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    sigmas = shift_sigmas(np.linspace(1.0, 1.0 / steps, steps), shift)
    if shift_terminal:
        if not 0.0 < shift_terminal < 1.0:
            raise ValueError(f"shift_terminal must be in (0, 1), got {shift_terminal}")
        one_minus = 1.0 - sigmas
        sigmas = 1.0 - one_minus / (one_minus[-1] / (1.0 - shift_terminal))
    sigmas = sigmas.astype(np.float32)
    timesteps = sigmas * np.float32(NUM_TRAIN_TIMESTEPS)
    return FlowMatchSchedule(sigmas=np.append(sigmas, np.float32(0.0)), timesteps=timesteps)


@dataclass(frozen=True)
class SchedulerSettings:
    """What the sampler takes from a pipeline's `scheduler/scheduler_config.json`."""

    shift: float = 1.0
    shift_terminal: float | None = None


SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# Fields of diffusers' FlowMatchEulerDiscreteScheduler that change nothing here while they keep these values; any
# other value is rejected (that schedule is not implemented), naming the field.
_MUST_BE = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "use_dynamic_shifting": False,
    "invert_sigmas": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}
# Read by diffusers only with use_dynamic_shifting (rejected above), so any value is inert.
_DYNAMIC_ONLY = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")


def scheduler_settings(config: dict[str, Any], where: str = "scheduler_config.json") -> SchedulerSettings:
    """Settings from a diffusers FlowMatchEulerDiscreteScheduler config: `shift` and `shift_terminal` are honoured,
    fields whose value would select another schedule and unknown fields raise ConfigError naming the field."""
    cls = config.get("_class_name", SCHEDULER_CLASS)
    if cls != SCHEDULER_CLASS:
        raise ConfigError(f"{where}: _class_name: only {SCHEDULER_CLASS} is supported, got {cls!r}")
    for key, value in config.items():
        if key.startswith("_") or key in ("shift", "shift_terminal") or key in _DYNAMIC_ONLY:
            continue
        if key not in _MUST_BE:
            raise ConfigError(f"{where}: {key}: unknown {SCHEDULER_CLASS} field")
        if value != _MUST_BE[key] and not (value is None and _MUST_BE[key] is False):
            hint = "; pass --shift for a static shift" if key == "use_dynamic_shifting" else ""
            raise ConfigError(f"{where}: {key}={value!r} is not supported (only {_MUST_BE[key]!r}){hint}")
    shift, terminal = config.get("shift", 1.0), config.get("shift_terminal")
    if not isinstance(shift, (int, float)) or shift <= 0:
        raise ConfigError(f"{where}: shift: must be a positive number, got {shift!r}")
    if terminal is not None and (not isinstance(terminal, (int, float)) or not 0.0 <= terminal < 1.0):
        raise ConfigError(f"{where}: shift_terminal: must be a number in [0, 1), got {terminal!r}")
    return SchedulerSettings(shift=float(shift), shift_terminal=float(terminal) if terminal else None)


def read_scheduler_settings(path: str | Path) -> SchedulerSettings:
    """`scheduler_settings` of a scheduler_config.json file; unreadable JSON is a ConfigError naming the file."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable scheduler config ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    return scheduler_settings(config, str(path))


def euler_step(sample: Array, velocity: Array, dt: Array | float) -> Array:
    """One Euler step of dx/dsigma = velocity over `dt` (a `FlowMatchSchedule.step_sizes` entry)."""
    return sample + dt * velocity


def guide(uncond: Array, cond: Array, guidance: float) -> Array:
    """Classifier-free guidance: uncond + g * (cond - uncond)."""
    return uncond + guidance * (cond - uncond)


def uses_guidance(guidance: float) -> bool:
    """As in diffusers: guidance <= 1 runs the conditional branch alone (one forward, no negative prompt)."""
    return guidance > 1.0


def guidance_batch(
    text: np.ndarray,
    pooled: np.ndarray,
    neg_text: np.ndarray | None,
    neg_pooled: np.ndarray | None,
    guidance: float,
    mesh: SampleMesh | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The text batch of one forward: the negative prompt's and the prompt's rows (`pair_rows`: uncond first, as
    diffusers, on one device) when guidance is on, else the prompt alone; returns (text, pooled, guided). Guidance
    without the negative prompt's embeddings is an error."""
    if not uses_guidance(guidance):
        return text, pooled, False
    if neg_text is None or neg_pooled is None:
        raise ValueError(f"guidance {guidance} > 1 needs neg_text and neg_pooled (the negative prompt)")
    layout = mesh or ONE_DEVICE
    return pair_rows(neg_text, text, layout), pair_rows(neg_pooled, pooled, layout), True


StepFn: TypeAlias = Callable[[Array, np.float32, np.float32], Array]  # (x, timestep, dt) -> x after the step
Prepare: TypeAlias = Callable[
    [Any, np.ndarray, np.ndarray, np.ndarray, bool, float, "SampleMesh | None"], tuple[Array, StepFn]
]


def flow_match_sampler(
    prepare: Prepare, to_numpy: Callable[[Array], np.ndarray], desc: str
) -> Callable[..., np.ndarray]:
    """A backend's `sample`: the schedule, the guidance batch and the loop over the steps are every backend's; the
    backend gives `prepare(model, noise, text, pooled, guided, guidance) -> (x, step)`, its initial latents and one
    guided Euler step on its own arrays (on `mesh`'s devices: contentv_common.sample_mesh; None: where the model's
    weights are), and `to_numpy` for the final latents."""

    def sample(
        model: Any,
        noise: np.ndarray,
        text: np.ndarray,
        pooled: np.ndarray,
        neg_text: np.ndarray | None = None,
        neg_pooled: np.ndarray | None = None,
        steps: int = 50,
        guidance: float = 6.0,
        shift: float = SHIFT,
        progress: bool = True,
        shift_terminal: float | None = None,
        mesh: SampleMesh | None = None,
    ) -> np.ndarray:
        """Denoise `noise` [B, C, F, H, W] into latents (float32 numpy) conditioned on text [B, L, D] and pooled
        [B, P].

        With guidance > 1 the negative prompt's embeddings (the unconditional branch) are required and run in the same
        forward as the prompt's, uncond first as in diffusers. `shift` and `shift_terminal` shape the schedule
        (`flow_match_schedule`). `mesh`: the devices of a sampling mesh and the order of the pair's rows.
        """
        schedule = flow_match_schedule(steps, shift, shift_terminal)
        text, pooled, guided = guidance_batch(text, pooled, neg_text, neg_pooled, guidance, mesh)
        x, step = prepare(model, noise, text, pooled, guided, guidance, mesh)
        for i in tqdm(range(schedule.steps), desc=desc, disable=not progress, leave=False):
            x = step(x, schedule.timesteps[i], schedule.step_sizes[i])
        return to_numpy(x)

    return sample


def latent_shape(channels: int, frames: int, height: int, width: int, batch: int = 1) -> tuple[int, ...]:
    """Latent `[B, C, f, h, w]` of a `frames x height x width` video through the Wan VAE (4x time, 8x space)."""
    if frames < 1 or (frames - 1) % VAE_TIME_FACTOR:
        raise ValueError(f"frames must be 1 + {VAE_TIME_FACTOR} k (1, 5, 9, ...), got {frames}")
    for name, size in (("height", height), ("width", width)):
        if size < 1 or size % (2 * VAE_SPACE_FACTOR):
            raise ValueError(f"{name} must be a positive multiple of {2 * VAE_SPACE_FACTOR} pixels, got {size}")
    return (batch, channels, 1 + (frames - 1) // VAE_TIME_FACTOR, height // VAE_SPACE_FACTOR, width // VAE_SPACE_FACTOR)


def draw_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 noise from numpy's PCG64, so every backend starts from the very same latents."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def initial_noise(kind: str, seed: int, shape: tuple[int, ...], count: int, dtype: str) -> np.ndarray:
    """Noise [count, C, f, h, w] of all prompts: "numpy" draws prompt i from seed + i (any batch size, either backend,
    the same video); "torch" draws all at once from a torch CPU generator seeded with `seed` in `dtype`, exactly as
    the official ContentV demo (diffusers' pipeline with a prompt list) does."""
    if kind == "numpy":
        return np.concatenate([draw_noise(seed + i, shape) for i in range(count)])
    return official_noise(seed, (count, *shape[1:]), dtype)


def official_noise(seed: int, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
    """The initial latents ContentV's demo draws for `seed`, as float32 numpy, whichever backend samples them (torch
    is imported here only for its CPU generator).

    demo.py passes `torch.Generator().manual_seed(seed)` (a CPU generator); the pipeline's `prepare_latents` calls
    diffusers' `randn_tensor` once with shape [B, C, f, h, w] for all B prompts and the prompt embeddings' dtype
    (bfloat16 there), which draws on the CPU with `torch.randn` and only then moves to the device.
    """
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=getattr(torch, dtype)).float().numpy()


def slug(prompt: str, length: int = 40) -> str:
    """The file-name part of a prompt: `<index>-<slug>.mp4`."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length] or "prompt"


@dataclass(frozen=True)
class ClipSettings:
    """How `sample_clips` samples: the video's size, the sampler, the noise and the files."""

    frames: int
    height: int
    width: int
    steps: int = 50
    guidance: float = 6.0
    shift: float = SHIFT
    shift_terminal: float | None = None
    seed: int = 0
    noise: str = "numpy"  # or "torch": initial_noise
    dtype: str = "float32"  # the torch noise's dtype
    negative_prompt: str = ""
    batch_size: int = 1
    fps: float = 24.0


def sample_latents(
    backend: Backend,
    model: Any,
    encoders: Any,
    prompts: list[str],
    noise: np.ndarray,
    settings: ClipSettings,
    progress: bool = True,
    mesh: SampleMesh | None = None,
) -> np.ndarray:
    """Final latents [B, C, f, h, w] of one batch: the prompts (and the negative prompt, with guidance) through the
    encoders, `noise` [B, C, f, h, w] through the backend's sampler on `mesh`. A batch that `mesh.data` does not
    divide is padded with its last prompt (those rows are dropped)."""
    count = len(prompts)
    pad = -count % (mesh.data if mesh else 1)
    prompts = prompts + prompts[-1:] * pad
    noise = np.concatenate([noise, np.repeat(noise[-1:], pad, 0)])
    guided = uses_guidance(settings.guidance)
    text, pooled = encoders.encode_text(prompts + [settings.negative_prompt] * guided)
    negs: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
    if guided:
        negs = (np.repeat(text[-1:], len(prompts), 0), np.repeat(pooled[-1:], len(prompts), 0))
    latents = backend.sample(
        model,
        noise,
        text[: len(prompts)],
        pooled[: len(prompts)],
        *negs,
        steps=settings.steps,
        guidance=settings.guidance,
        shift=settings.shift,
        shift_terminal=settings.shift_terminal,
        progress=progress,
        mesh=mesh,
    )
    return latents[:count]


def sample_clips(
    backend: Backend,
    model: Any,
    encoders: Any,
    decode: Callable[[np.ndarray], np.ndarray],
    prompts: list[str],
    out: Path,
    settings: ClipSettings,
    progress: bool = True,
    mesh: SampleMesh | None = None,
    writer: bool = True,
    latents_out: Path | None = None,
) -> list[Path]:
    """One mp4 per prompt, `out/<index>-<slug>.mp4`, `batch_size` prompts at a time (`sample_latents`) on `mesh`;
    with `latents_out`, the final latents of all prompts as `latents` [prompts, C, f, h, w] in that .npz. Every
    process of a mesh samples; the `writer` alone decodes and writes."""
    from contentv_common.data.video_io import write_video

    shape = latent_shape(model.cfg.in_channels, settings.frames, settings.height, settings.width)
    noise = initial_noise(settings.noise, settings.seed, shape, len(prompts), settings.dtype)
    written, finals = [], []
    for start in range(0, len(prompts), settings.batch_size):
        idx = list(range(start, min(start + settings.batch_size, len(prompts))))
        batch = [prompts[i] for i in idx]
        latents = sample_latents(backend, model, encoders, batch, noise[idx], settings, progress, mesh)
        finals.append(latents)
        if not writer:
            continue
        for i, video in zip(idx, decode(latents), strict=True):
            path = write_video(out / f"{i:03d}-{slug(prompts[i])}.mp4", video, fps=settings.fps)
            print(f"wrote {path} ({video.shape[0]} frames, {video.shape[1]}x{video.shape[2]})")
            written.append(path)
    if latents_out is not None and writer:
        write_latents(latents_out, np.concatenate(finals))
    return written


def write_latents(path: Path, latents: np.ndarray) -> Path:
    """`latents` as key `latents` of the .npz `path` (its folder made), written under a temporary name and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        np.savez(f, latents=latents)
    tmp.replace(path)
    print(f"wrote {path} (latents {list(latents.shape)})")
    return path
