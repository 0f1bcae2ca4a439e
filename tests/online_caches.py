"""Two caches of one synthetic set for the online-text tests: one with the text embeddings of the tiny random text
encoders (data.text: cached), one with the latents alone (data.text: online); the latents are the stand-in encoders'
(the same in both)."""

from pathlib import Path

from contentv_common.config.recipe import Recipe, load_recipe
from contentv_common.data.build import build_cache
from contentv_common.data.synthetic import make_synthetic_set
from tests.stand_in_encoders import StandInEncoders

TINY = Path(__file__).resolve().parent / "recipes" / "tiny.yaml"
BUCKETS = [{"width": 64, "height": 64, "frames": 9, "batch_size": 4}]


class TinyTextEncoders(StandInEncoders):
    """The stand-in's latents, the text of a backend's tiny random text encoders (`text.encode`)."""

    def __init__(self, text):
        super().__init__()
        self.text = text

    def encode_text(self, captions):
        return self.text.encode(list(captions))


def online_recipe(root: Path, text: str, name: str, **overrides) -> Recipe:
    """The tests' tiny recipe on `root`'s cache for `text` (cached / online), the tiny encoders of seed 0, half the
    captions dropped."""
    base = {
        "data.manifest": str(root / "set" / "manifest.jsonl"),
        "data.cache_dir": str(root / text),
        "data.encoders": "tiny",
        "data.text": text,
        "data.text_dropout": 0.5,
        "data.num_threads": 0,
        "data.buckets": BUCKETS,
        "seed": 0,
        "steps": 3,
        "compute_dtype": "float32",
        "optimizer.warmup_steps": 0,
        "checkpoint.dir": str(root / name / "ckpt"),
        "checkpoint.interval": 2,
        "log_dir": str(root / name / "logs"),
    }
    return load_recipe(TINY, base | overrides)


def build_caches(root: Path, text_encoders) -> Path:
    """The set (8 videos) and its two caches under `root`; `text_encoders` encode the cached one's captions."""
    manifest = make_synthetic_set(root / "set", num_videos=8, frames=12, fps=8, progress=False)
    recipe = online_recipe(root, "cached", "build")
    encoders = TinyTextEncoders(text_encoders)
    for text in ("cached", "online"):
        cached = text == "cached"
        build_cache(
            manifest, root / text, lambda: encoders, list(recipe.data.buckets), 8, "tiny", progress=False, text=cached
        )
    return root
