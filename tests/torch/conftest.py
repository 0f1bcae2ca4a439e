"""A fake torch_npu that computes the documented reference formulas on CPU and records every call, so the NPU
branches of the op registry run (and their argument conventions are checked) without Ascend hardware."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from contentv_torch_npu import device
from tests.stand_in_encoders import StandInEncoders


class FakeTorchNpu(types.ModuleType):
    """Reference semantics of npu_fusion_attention (BNSD, True = masked, scale default 1.0, sparse_mode 0's band
    `i - pre_tockens <= j <= i + next_tockens`, inner_precise 1 = reduced-precision softmax), npu_rms_norm and
    npu_gelu; it refuses arguments the real kernels would reject (masks that broadcast over queries, gamma dtype).
    Meta tensors go through too, so the arguments of a call at real length are checked without computing it."""

    def __init__(self, available: bool = False):
        super().__init__("torch_npu")
        self.calls: list[tuple[str, dict]] = []
        self.npu = types.SimpleNamespace(is_available=lambda: available)

    def npu_fusion_attention(
        self, query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
        scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0, prefix=None,
        actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
    ):  # fmt: skip
        self.calls.append(
            ("npu_fusion_attention", dict(shape=tuple(query.shape), head_num=head_num, input_layout=input_layout,
                                          atten_mask=atten_mask, scale=scale, keep_prob=keep_prob, dtype=query.dtype,
                                          pre_tockens=pre_tockens, next_tockens=next_tockens, pse=pse,
                                          inner_precise=inner_precise, sparse_mode=sparse_mode, sync=sync))
        )  # fmt: skip
        assert input_layout == "BNSD" and query.dim() == 4 and query.shape[1] == head_num
        assert sparse_mode == 0 and inner_precise in (0, 1) and prefix is None and actual_seq_qlen is None
        scores = (query.float() @ key.float().transpose(-1, -2)) * scale
        if atten_mask is not None:
            assert atten_mask.dtype == torch.bool and atten_mask.dim() == 4
            assert atten_mask.shape[-2:] == (query.shape[2], key.shape[2]), "masks must not broadcast over S"
            scores = scores.masked_fill(atten_mask, -math.inf)
        i = torch.arange(query.shape[2], device=query.device)[:, None]
        j = torch.arange(key.shape[2], device=query.device)[None, :]
        scores = scores.masked_fill((j < i - pre_tockens) | (j > i + next_tockens), -math.inf)
        probs = torch.softmax(scores, dim=-1)
        if inner_precise == 1:  # the high-performance mode: probabilities in half precision
            probs = probs.half().float()
        if keep_prob < 1.0:
            probs = F.dropout(probs, p=1.0 - keep_prob)
        out = (probs @ value.float()).to(query.dtype)
        return (out, None, None, None, 0, 0, 0)

    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        self.calls.append(("npu_rms_norm", dict(x_dtype=x.dtype, gamma_dtype=gamma.dtype, epsilon=epsilon)))
        assert gamma.dtype == x.dtype, "npu_rms_norm needs gamma in x's dtype"
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
        return (x.float() * rstd * gamma.float()).to(x.dtype), rstd

    def npu_gelu(self, x, approximate="none"):
        self.calls.append(("npu_gelu", dict(approximate=approximate, dtype=x.dtype)))
        return F.gelu(x, approximate=approximate)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def fake_npu():
    fake = FakeTorchNpu()
    device.set_torch_npu(fake)
    yield fake
    device.set_torch_npu(None)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A synthetic manifest (8 clips of 64x64 and 96x64) and its latent cache, built once per session."""
    from contentv_common.config.recipe import BucketConfig
    from contentv_common.data.build import build_cache
    from contentv_common.data.synthetic import make_synthetic_set

    root = tmp_path_factory.mktemp("tiny_data")
    manifest = make_synthetic_set(root / "videos", num_videos=8, frames=12, fps=8, progress=False)
    buckets = [BucketConfig(64, 64, 9, 2), BucketConfig(96, 64, 9, 2)]
    build_cache(manifest, root / "cache", StandInEncoders, buckets, 8.0, "fake", chunk_size=4, progress=False)
    return {"manifest": str(manifest), "cache_dir": str(root / "cache"), "encoders": "fake", "fps": 8, "chunk_size": 4,
            "buckets": [{"width": 64, "height": 64, "frames": 9, "batch_size": 2},
                        {"width": 96, "height": 64, "frames": 9, "batch_size": 2}]}  # fmt: skip


def _spawn_ranks(fn, args: tuple, nprocs: int, outputs=None) -> None:
    """torch.multiprocessing.spawn, retried once when a rank dies by a signal (gloo's CPU teardown has aborted a rank
    on a loaded machine). Python errors and failed assertions in a rank are never retried; `outputs` (a folder) is
    cleared before the retry so the second run starts from nothing."""
    import shutil

    import torch.multiprocessing as mp

    try:
        mp.spawn(fn, args=args, nprocs=nprocs, join=True)
    except mp.ProcessExitedException as e:
        if e.signal_name is None:
            raise
        print(f"rank {e.error_index} died by {e.signal_name}; retrying the {nprocs}-process run once")
        if outputs is not None:
            shutil.rmtree(outputs, ignore_errors=True)
        mp.spawn(fn, args=args, nprocs=nprocs, join=True)


@pytest.fixture
def spawn_ranks():
    """`spawn_ranks(fn, args, nprocs, outputs=None)`: start a gloo run of `nprocs` ranks (see _spawn_ranks)."""
    return _spawn_ranks
