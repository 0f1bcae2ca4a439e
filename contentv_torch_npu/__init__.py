"""ContentV-X PyTorch twin: runs on Ascend NPUs through torch_npu, and on CUDA or CPU where torch_npu is absent."""

from contentv_torch_npu.loading import load_transformer, save_torch
from contentv_torch_npu.transformer import Transformer
from contentv_torch_npu.vae import WanVAE, load_vae, save_vae

__all__ = ["Transformer", "WanVAE", "load_vae", "save_vae", "load_transformer", "save_torch"]
