"""data.text: online in the torch twin: each rank encodes its rows' token ids with the frozen tiny text encoders in
the step and trains as the cached text does (same losses, text dropout included); the encoders stay out of the
optimizer and the checkpoints, and resume is exact."""

import numpy as np
import pytest
import torch

from contentv_common.data.cache import LatentCache
from contentv_jax.data import StepBatches
from contentv_torch_npu.text_encoders import tiny_text_encoders
from contentv_torch_npu.train import online_text_encoders, run
from tests.online_caches import build_caches, online_recipe

TOL = 1e-5


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return build_caches(tmp_path_factory.mktemp("online_torch"), tiny_text_encoders(0))


def test_online_trains_as_cached_frozen_and_resumes(caches, rel_err):
    cached = online_recipe(caches, "cached", "cached")
    online = online_recipe(caches, "online", "online")
    empty = LatentCache(cached.data.cache_dir, list(cached.data.buckets)).empty_text
    batches = StepBatches(cached)  # the draws are the torch loader's (tests/parity/test_data_paths.py)
    mask = np.stack([np.all(batches(k)["text"] == empty[None], axis=(1, 2)) for k in range(cached.steps)])
    assert mask.any() and not mask.all(), "the compared steps must drop some captions and keep others"
    want = run(cached, device="cpu", progress=False).losses
    got = run(online, device="cpu", progress=False)
    assert sorted(got.losses) == sorted(want) == [0, 1, 2]
    for k in want:
        assert rel_err(got.losses[k], want[k]) < TOL, (k, got.losses[k], want[k])
    # frozen: the encoders are no parameter of the model, so of neither the optimizer nor the checkpoints
    model, optimizer = got.state["model"], got.state["optimizer"]
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.parameters()}
    text = online_text_encoders(online, torch.device("cpu"))
    assert not any(p.requires_grad for m in (*text.clips, text.t5) for p in m.parameters())
    resumed = online_recipe(caches, "online", "resumed")
    first = run(resumed, device="cpu", progress=False, stop_after=2)
    second = run(resumed, device="cpu", progress=False)
    assert {**first.losses, **second.losses} == got.losses
