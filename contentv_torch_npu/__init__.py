"""ContentV-X PyTorch twin: runs on Ascend NPUs through torch_npu, and on CUDA or CPU where torch_npu is absent."""

from contentv_torch_npu.loading import load_transformer, save_torch
from contentv_torch_npu.transformer import Transformer

__all__ = ["Transformer", "load_transformer", "save_torch"]
