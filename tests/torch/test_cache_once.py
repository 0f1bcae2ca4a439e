"""Under torchrun, rank 0 alone builds the latent/text cache; the other ranks wait until it is complete."""

import threading
import time
from pathlib import Path

import pytest

from contentv_common.backend import get
from contentv_common.config.recipe import load_recipe
from contentv_common.data.cache import read_index
from contentv_common.data.prepare import prepare_data_once
from contentv_common.data.synthetic import make_synthetic_set

pytestmark = pytest.mark.multiprocess  # every test here starts several processes

TINY = Path(__file__).resolve().parents[2] / "tests" / "recipes" / "tiny.yaml"


def test_other_ranks_wait_for_rank_0s_cache(tmp_path):
    manifest = make_synthetic_set(tmp_path / "set", num_videos=2, num_images=0, frames=12, fps=8, progress=False)
    buckets = [{"width": w, "height": 64, "frames": 9, "batch_size": 1} for w in (64, 96)]
    recipe = load_recipe(
        TINY, {"data.manifest": str(manifest), "data.cache_dir": str(tmp_path / "cache"), "data.buckets": buckets}
    )
    rank1 = threading.Thread(target=prepare_data_once, args=(recipe, get("torch"), False, False, 0.05))
    rank1.start()
    time.sleep(0.5)
    assert rank1.is_alive() and not (tmp_path / "cache").exists()  # waits, builds nothing
    prepare_data_once(recipe, get("torch"), True, False, 0.05)  # rank 0
    rank1.join(timeout=30)
    assert not rank1.is_alive()
    assert len(read_index(tmp_path / "cache").samples) == 2
