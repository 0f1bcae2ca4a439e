"""The ContentV forward assembled from diffusers' own modules: the independent numerical reference for parity.

diffusers' `SD3Transformer2DModel` supplies every layer; ContentV's only changes (per-frame patching and diffusers'
`get_3d_sincos_pos_embed` with spatial interpolation scale 0.5, temporal 1.0) are applied around them exactly as the
official ContentV code does. Weights are read with diffusers' names straight from the safetensors files, without our
parameter table, so a table mistake cannot hide. Needs diffusers (the [dev] extra).
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange

from contentv_common.checkpoint.formats import config_to_diffusers, open_safetensors_source
from contentv_common.checkpoint.safetensors_io import weight_files
from contentv_common.config.model import ModelConfig


def build_diffusers(cfg: ModelConfig):
    """An SD3Transformer2DModel with our config's sizes (random weights)."""
    from diffusers import SD3Transformer2DModel

    kwargs = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
    return SD3Transformer2DModel(**kwargs)


def load_diffusers(path: str | Path) -> tuple[torch.nn.Module, ModelConfig]:
    """A diffusers transformer folder loaded into diffusers' SD3Transformer2DModel by diffusers' own key names."""
    from safetensors.torch import load_file

    cfg = open_safetensors_source(path).config
    model = build_diffusers(cfg)
    state = {}
    for file in weight_files(Path(path), "diffusion_pytorch_model"):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "pos_embed.pos_embed"]  # absent from ContentV checkpoints
    if missing or unexpected:
        raise ValueError(f"{path}: diffusers reference load: missing {missing}, unexpected {unexpected}")
    return model.eval(), cfg


@torch.no_grad()
def reference_forward(
    model: torch.nn.Module,
    cfg: ModelConfig,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    trace: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`[B, C, F, H, W]` -> velocity `[B, C, F, H, W]`, recording named intermediates into `trace` if given."""
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    record = trace if trace is not None else {}
    b, _, f, h, w = hidden_states.shape
    p = cfg.patch_size
    if cfg.pos_embed == "sd3_2d":
        if f != 1:
            raise ValueError("sd3_2d reference takes 1 frame")
        x = model.pos_embed(hidden_states[:, :, 0])
    else:
        frames = rearrange(hidden_states, "b c f h w -> (b f) c h w")
        x = rearrange(model.pos_embed.proj(frames), "(b f) d h w -> b (f h w) d", b=b)
        pos = get_3d_sincos_pos_embed(
            cfg.hidden_size,
            (w // p, h // p),
            f,
            spatial_interpolation_scale=cfg.spatial_interpolation_scale,
            temporal_interpolation_scale=cfg.temporal_interpolation_scale,
            output_type="pt",
        )
        x = (x + pos.reshape(1, -1, cfg.hidden_size).to(x.device, torch.float32)).to(x.dtype)
    record["patch_embed"] = x
    temb = model.time_text_embed(timestep, pooled_projections)
    record["conditioning"] = torch.nn.functional.silu(temb)
    context = model.context_embedder(encoder_hidden_states)
    record["context_embedder"] = context
    for i, block in enumerate(model.transformer_blocks):
        context, x = block(hidden_states=x, encoder_hidden_states=context, temb=temb)
        record[f"blocks.{i}.x"] = x
        if context is not None:
            record[f"blocks.{i}.context"] = context
    x = model.proj_out(model.norm_out(x, temb))
    out = rearrange(x, "b (f h w) (p q c) -> b c f (h p) (w q)", f=f, h=h // p, w=w // p, p=p, q=p)
    record["output"] = out
    return out
