"""The Wan2.1 VAE parameter table: diffusers `AutoencoderKLWan` names <-> our canonical names <-> JAX layout.

Generated from the layer layout of a `VAEConfig`, so it lists exactly the modules of that VAE. Canonical names are
diffusers' names except where diffusers wraps a conv in a container: `down_blocks.{k}.resample.1` becomes
`down_blocks.{k}.resample` and `up_blocks.{i}.upsamplers.0.*` becomes `up_blocks.{i}.upsampler.*`. RMS-norm gammas
keep diffusers' broadcastable shape (`[C, 1, 1, 1]`, or `[C, 1, 1]` in attention) on both sides.
"""

from __future__ import annotations

from contentv_common.checkpoint.param_table import Kind, ParamTable, Rule
from contentv_common.vae.config import VAEConfig, decoder_blocks, encoder_layers, mid_dim


def _same(name: str, kind: Kind) -> Rule:
    return Rule(name, name, kind)


def _residual(prefix: str, in_dim: int, out_dim: int) -> list[Rule]:
    rules = [
        _same(f"{prefix}.norm1.gamma", Kind.TENSOR),
        _same(f"{prefix}.conv1", Kind.CONV3D),
        _same(f"{prefix}.norm2.gamma", Kind.TENSOR),
        _same(f"{prefix}.conv2", Kind.CONV3D),
    ]
    if in_dim != out_dim:
        rules.append(_same(f"{prefix}.conv_shortcut", Kind.CONV3D))
    return rules


def _attention(prefix: str) -> list[Rule]:
    return [
        _same(f"{prefix}.norm.gamma", Kind.TENSOR),
        _same(f"{prefix}.to_qkv", Kind.CONV2D),
        _same(f"{prefix}.proj", Kind.CONV2D),
    ]


def _mid(prefix: str, dim: int) -> list[Rule]:
    return (
        _residual(f"{prefix}.resnets.0", dim, dim)
        + _attention(f"{prefix}.attentions.0")
        + _residual(f"{prefix}.resnets.1", dim, dim)
    )


def vae_table(cfg: VAEConfig) -> ParamTable:
    """The parameter table of the VAE described by `cfg`."""
    rules = [_same("encoder.conv_in", Kind.CONV3D)]
    for k, layer in enumerate(encoder_layers(cfg)):
        prefix = f"encoder.down_blocks.{k}"
        if layer.kind == "residual":
            rules += _residual(prefix, layer.in_dim, layer.out_dim)
        else:
            rules.append(Rule(f"{prefix}.resample.1", f"{prefix}.resample", Kind.CONV2D))
            if layer.kind == "downsample3d":
                rules.append(_same(f"{prefix}.time_conv", Kind.CONV3D))
    mid = mid_dim(cfg)
    rules += _mid("encoder.mid_block", mid)
    rules += [
        _same("encoder.norm_out.gamma", Kind.TENSOR),
        _same("encoder.conv_out", Kind.CONV3D),
        _same("quant_conv", Kind.CONV3D),
        _same("post_quant_conv", Kind.CONV3D),
        _same("decoder.conv_in", Kind.CONV3D),
    ]
    rules += _mid("decoder.mid_block", mid)
    for i, block in enumerate(decoder_blocks(cfg)):
        prefix = f"decoder.up_blocks.{i}"
        in_dim = block.in_dim
        for j in range(cfg.num_res_blocks + 1):
            rules += _residual(f"{prefix}.resnets.{j}", in_dim, block.out_dim)
            in_dim = block.out_dim
        if block.upsample is not None:
            rules.append(Rule(f"{prefix}.upsamplers.0.resample.1", f"{prefix}.upsampler.resample", Kind.CONV2D))
            if block.upsample == "upsample3d":
                rules.append(Rule(f"{prefix}.upsamplers.0.time_conv", f"{prefix}.upsampler.time_conv", Kind.CONV3D))
    rules += [_same("decoder.norm_out.gamma", Kind.TENSOR), _same("decoder.conv_out", Kind.CONV3D)]
    return ParamTable("vae", tuple(rules))
