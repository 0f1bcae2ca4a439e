"""Weights in and out of the torch transformer through the shared parameter table (no model logic here).

The model is built on the meta device and each tensor is materialised as it is read, so host memory holds the model
once plus one tensor. Reads diffusers folders (official SD3.5-Large / ContentV-8B layout) and our torch format;
our JAX (orbax) format is read through contentv_jax when jax is installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from contentv_common.checkpoint.formats import TensorSource, check_keys, open_checkpoint, write_torch
from contentv_common.checkpoint.hub import transformer_folder
from contentv_common.checkpoint.param_table import TRANSFORMER_TABLE, ParamTable
from contentv_torch_npu.transformer import Transformer


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """numpy -> torch without copies through float64; ml_dtypes bfloat16 arrays are reinterpreted bit for bit."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """torch -> numpy, bit for bit (bf16 becomes ml_dtypes.bfloat16)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def canonical_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def canonical_tensors(model: torch.nn.Module) -> Iterator[tuple[str, np.ndarray]]:
    for name, tensor in model.state_dict().items():
        yield name, torch_to_numpy(tensor)


def fill_from_source(
    model: torch.nn.Module, source: TensorSource, dtype: torch.dtype, table: ParamTable = TRANSFORMER_TABLE
) -> torch.nn.Module:
    """Load a checkpoint into a meta-device model, checking every key and shape first (`table` names them)."""
    skip = check_keys(source, canonical_shapes(model), table)
    state = {}
    for name, array in source.tensors(skip) if skip else source.tensors():  # sources in memory take no skip
        state[name] = numpy_to_torch(array).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_transformer(
    path: str | Path,
    dtype: torch.dtype | None = None,
    pos_embed: Literal["sincos_3d", "sd3_2d"] | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    ops: str = "auto",
    device: str | torch.device = "cpu",
) -> Transformer:
    """Load a transformer checkpoint folder (diffusers, torch or jax format) or a Hugging Face Hub id
    (`owner/name/transformer`); same contract as contentv_jax's.

    `dtype` is the parameter dtype (default float32; bf16 is cast directly, never via float64). `pos_embed`
    overrides the checkpoint's mode ("sincos_3d" turns an SD3/SD3.5 image checkpoint into the video model).
    """
    source = open_checkpoint(transformer_folder(path))
    cfg = source.config if pos_embed is None else source.config.replace(pos_embed=pos_embed)
    with torch.device("meta"):
        model = Transformer(cfg, compute_dtype=compute_dtype, ops=ops)
    model = fill_from_source(model, source, dtype or torch.float32)
    return model.to(device)


def save_torch(folder: str | Path, model: Transformer, overwrite: bool = False) -> Path:
    """Write our torch format: contentv_config.json + model*.safetensors with canonical names."""
    return write_torch(folder, model.cfg, canonical_tensors(model), overwrite=overwrite)
