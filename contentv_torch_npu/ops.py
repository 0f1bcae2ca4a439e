"""Op registry of the torch twin: eager torch (SDPA) or Ascend fused kernels, chosen by device.

Every NPU wrapper owns its semantic conversions (layout, explicit scale, mask polarity, keep_prob, dtypes), so the rest
of the model is backend-agnostic. torch_npu comes from `device.torch_npu()`, which tests replace with a fake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from contentv_torch_npu import device as device_mod


class Ops(Protocol):
    name: str

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout: float = 0.0
    ) -> torch.Tensor: ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def gelu_tanh(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TorchOps:
    """Eager torch: SDPA attention (flash/efficient kernels on GPU), float32 norms."""

    name: str = "torch"

    def attention(self, q, k, v, mask=None, dropout=0.0):
        """q, k, v: [B, heads, N, d]. `mask`: bool, True = attend (broadcastable to [B, heads, Nq, Nk])."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)

    def rms_norm(self, x, weight, eps):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return (y * weight.float()).to(x.dtype)

    def gelu_tanh(self, x):
        return F.gelu(x, approximate="tanh")


# npu_fusion_attention's precision knobs, pinned because their defaults changed between CANN releases (the 7.0
# docs default inner_precise to 1, later ones to 0). inner_precise 0 is the documented high-precision mode (1 trades
# precision for speed); sync False keeps the dropout-mask generation asynchronous (no effect on the result).
INNER_PRECISE = 0
SYNC = False


@dataclass(frozen=True)
class NpuOps:
    """Ascend kernels through torch_npu: npu_fusion_attention (BNSD), npu_rms_norm, npu_gelu."""

    name: str = "npu"

    def attention(self, q, k, v, mask=None, dropout=0.0):
        """Same contract as TorchOps.attention; converts to npu_fusion_attention's conventions.

        With sparse_mode 0 the kernel keeps key j for query i only when `i - pre_tockens <= j <= i + next_tockens`
        (a band); both are set to the longer of the query and key lengths, so every query sees every key at any
        length (the 65536 of the official ContentV code would band stage 5's 111,933 tokens).
        """
        head_dim, q_len, k_len = q.shape[-1], q.shape[-2], k.shape[-2]
        atten_mask = None if mask is None else npu_mask(mask, q_len, k_len)
        window = max(q_len, k_len)
        out = device_mod.torch_npu().npu_fusion_attention(
            q,
            k,
            v,
            q.shape[1],
            input_layout="BNSD",
            pse=None,
            atten_mask=atten_mask,
            scale=1.0 / math.sqrt(head_dim),
            keep_prob=1.0 - dropout,
            pre_tockens=window,
            next_tockens=window,
            inner_precise=INNER_PRECISE,
            sparse_mode=0,
            sync=SYNC,
        )
        return out[0]

    def rms_norm(self, x, weight, eps):
        y, _rstd = device_mod.torch_npu().npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)
        return y

    def gelu_tanh(self, x):
        return device_mod.torch_npu().npu_gelu(x, approximate="tanh")


def npu_mask(mask: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """SDPA's keep-mask (True = attend, broadcastable) -> npu_fusion_attention's: True = masked, 4-D, query axis
    materialised (the kernel takes BNSS / B1SS / 11SS, never a [B, 1, 1, Sk] key-padding mask)."""
    m = mask.bool()
    if m.dim() > 4:
        raise ValueError(f"attention mask must have at most 4 dims [B, heads, Nq, Nk], got shape {tuple(m.shape)}")
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    return (~m.expand(m.shape[0], m.shape[1], q_len, k_len)).contiguous()


OPS: dict[str, Ops] = {"torch": TorchOps(), "npu": NpuOps()}


def ops_for(choice: str | Ops, device_type: str) -> Ops:
    """`choice` "auto" picks by the tensor's device type (npu -> NpuOps, else TorchOps); "torch"/"npu" force one.

    An `Ops` object is used as given (the sequence-parallel wrapper of contentv_torch_npu.distributed is one).
    """
    if not isinstance(choice, str):
        return choice
    if choice == "auto":
        return OPS["npu" if device_type == "npu" else "torch"]
    if choice not in OPS:
        raise ValueError(f"ops {choice!r} is not one of auto, {', '.join(OPS)}")
    return OPS[choice]
