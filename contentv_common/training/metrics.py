"""The one metrics stream of a training run: `<log_dir>/metrics.jsonl` plus TensorBoard, the same in both backends.

Each trainer's `run` writes its records here (main process only), so a run has exactly one line per logged step with
the same fields whatever the backend: step (0-based), loss, grad_norm, lr, skipped, nan_skips, step_time, batch.
Validation (recipe `eval`) adds `eval/...` scalars and a frame-strip image to TensorBoard and an `{"eval": ...}`
line to the JSONL; with `eval.prompts`, their clips' metrics as `eval/<metric>` scalars and an `{"eval_samples": ...}`
line, the clips as an image in TensorBoard and `<log_dir>/eval_samples/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FIELDS = ("step", "loss", "grad_norm", "lr", "skipped", "nan_skips", "step_time", "batch")


class MetricsWriter:
    """Appends records to metrics.jsonl (every `interval`-th step) and mirrors the scalars to TensorBoard."""

    def __init__(self, log_dir: str | Path, interval: int = 1):
        from tensorboardX import SummaryWriter

        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.interval = interval
        self.jsonl = (self.dir / "metrics.jsonl").open("a")
        self.tb = SummaryWriter(str(self.dir / "tensorboard"))

    def step(self, record: dict[str, Any]) -> None:
        missing = [f for f in FIELDS if f not in record]
        if missing:
            raise KeyError(f"metrics record lacks {missing}")
        if (record["step"] + 1) % self.interval:
            return
        self.jsonl.write(json.dumps({f: record[f] for f in FIELDS}) + "\n")
        self.jsonl.flush()
        for name in ("loss", "grad_norm", "lr", "step_time"):
            self.tb.add_scalar(f"train/{name}", record[name], record["step"])

    def evaluation(self, step: int, losses: dict[float, float], strip: np.ndarray | None = None) -> None:
        """Validation losses by timestep (and their mean) and optionally a sampled clip as one image [H, W, 3]."""
        mean = float(np.mean(list(losses.values())))
        by_t = {f"t{t:g}": v for t, v in losses.items()}
        self.jsonl.write(json.dumps({"eval": {"step": step, "loss": mean, **by_t}}) + "\n")
        self.jsonl.flush()
        self.tb.add_scalar("eval/loss", mean, step)
        for t, v in losses.items():
            self.tb.add_scalar(f"eval/loss_t{t:g}", v, step)
        if strip is not None:
            self.tb.add_image("eval/sample", strip, step, dataformats="HWC")
        self.tb.flush()

    def eval_samples(self, step: int, scores: dict[str, Any], videos: np.ndarray) -> Path:
        """The clips of `eval.prompts` (uint8 [N, F, H, W, 3]) and their metrics (`score_clips`): an
        `{"eval_samples": ...}` line, `eval/<metric>` scalars (the means), and the clips as one frame strip (a row
        per prompt) in TensorBoard and in `<log_dir>/eval_samples/step_<step>.png` (lossless: the very frames scored),
        whose path it returns."""
        from contentv_common.training.evaluation import frame_strip

        self.jsonl.write(json.dumps({"eval_samples": {"step": step, **scores}}) + "\n")
        self.jsonl.flush()
        for name, value in scores.items():
            if name != "prompts":
                self.tb.add_scalar(f"eval/{name}", value, step)
        strip = frame_strip(*videos)
        self.tb.add_image("eval/prompts", strip, step, dataformats="HWC")
        self.tb.flush()
        return save_png(strip, self.dir / "eval_samples" / f"step_{step:07d}.png")

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def save_png(image: np.ndarray, path: Path) -> Path:
    """A uint8 [H, W, 3] image as PNG, its folder made first."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").to_image().save(path)
    return path


class LossCurve:
    """The losses of a run's steps as they come (an `on_step` callback), for `loss.png`: raw and a moving average."""

    def __init__(self, log_dir: str | Path):
        self.dir = Path(log_dir)
        self.steps: list[int] = []
        self.losses: list[float] = []

    def __call__(self, metrics: dict[str, Any]) -> None:
        if not metrics["skipped"]:
            self.steps.append(metrics["step"])
            self.losses.append(metrics["loss"])

    def plot(self) -> Path:
        """`<log_dir>/loss.png`: raw losses and a moving average, log scale."""
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
