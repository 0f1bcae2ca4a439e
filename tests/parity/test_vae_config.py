"""Wan2.1 VAE config, parameter table, time chunks and tile plans (framework-free, no model runs)."""

import json

import pytest

from contentv_common.errors import CheckpointError, ConfigError, UnknownParameterError
from contentv_common.vae.checkpoint import read_vae_config
from contentv_common.vae.chunks import CausalHistory, Tiling, encode_chunks, tile_plan
from contentv_common.vae.config import (
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    VAEConfig,
    config_from_diffusers,
    config_to_diffusers,
    tiny_vae_config,
)
from contentv_common.vae.table import vae_table

# The vae/config.json of the released Wan2.1 diffusers folders (as ContentV-8B reuses it).
WAN21_CONFIG = {
    "_class_name": "AutoencoderKLWan",
    "_diffusers_version": "0.33.0.dev0",
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "latents_mean": list(WAN21_LATENTS_MEAN),
    "latents_std": list(WAN21_LATENTS_STD),
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}


def test_wan21_config_reads_and_round_trips():
    cfg = config_from_diffusers(WAN21_CONFIG)
    assert cfg == VAEConfig()
    assert (cfg.temporal_factor, cfg.spatial_factor, cfg.latent_frames(125)) == (4, 8, 32)
    assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
    tiny = tiny_vae_config()
    assert (tiny.z_dim, tiny.temporal_factor, tiny.spatial_factor) == (16, 4, 8)
    assert config_from_diffusers(config_to_diffusers(tiny)) == tiny


@pytest.mark.parametrize(
    "change, match",
    [
        ({"foo": 1}, r"config\.json: foo: unsupported VAE config key"),
        ({"is_residual": True}, r"is_residual: only the Wan2\.1 VAE"),
        ({"patch_size": 2}, r"patch_size: only the Wan2\.1 VAE"),
        ({"latents_mean": [0.0] * 15}, r"latents_mean: needs z_dim = 16 values, got 15"),
        ({"latents_std": [0.0] * 16}, r"latents_std: values must be positive"),
        ({"base_dim": "96"}, r"base_dim: must be int"),
        ({"temperal_downsample": [True]}, r"temperal_downsample: needs one entry per downsampling stage"),
        ({"scale_factor_spatial": 16}, r"scale_factor_spatial: 16 contradicts the architecture's factor 8"),
        ({"attn_scales": [0.5]}, r"attn_scales: attention inside the down blocks is not supported"),
        ({"_class_name": "AutoencoderKL"}, r"_class_name 'AutoencoderKL' is not AutoencoderKLWan"),
    ],
)
def test_bad_config_names_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        config_from_diffusers(WAN21_CONFIG | change, "vae/config.json")


def test_pipeline_folder_is_pointed_at_its_vae(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(WAN21_CONFIG))
    with pytest.raises(CheckpointError, match="pass its vae/ subfolder"):
        read_vae_config(tmp_path)
    assert read_vae_config(tmp_path / "vae") == VAEConfig()


def test_table_renames_containers_and_permutes_convs():
    table = vae_table(tiny_vae_config())
    up = table.from_diffusers("decoder.up_blocks.0.upsamplers.0.resample.1.weight")
    assert (up.canonical, up.jax, up.jax_perm) == (
        "decoder.up_blocks.0.upsampler.resample.weight",
        "decoder.up_blocks.0.upsampler.resample.kernel",
        (2, 3, 1, 0),
    )
    conv = table.from_diffusers("encoder.down_blocks.3.time_conv.weight")
    assert (conv.canonical, conv.jax_perm) == ("encoder.down_blocks.3.time_conv.weight", (2, 3, 4, 1, 0))
    gamma = table.from_jax("encoder.mid_block.attentions.0.norm.gamma")
    assert (gamma.diffusers, gamma.jax_perm) == ("encoder.mid_block.attentions.0.norm.gamma", None)
    with pytest.raises(UnknownParameterError, match="decoder.up_blocks.3.upsamplers.0.resample.1.weight"):
        table.from_diffusers("decoder.up_blocks.3.upsamplers.0.resample.1.weight")  # the last stage has no upsampler


def test_encode_chunks_follow_the_causal_layout():
    assert encode_chunks(9, 4) == [(0, 1), (1, 5), (5, 9)]
    assert encode_chunks(11, 4) == [(0, 1), (1, 5), (5, 9)]  # like diffusers, frames past the last chunk drop
    assert encode_chunks(1, 4) == [(0, 1)]


def test_tile_plan_covers_the_latent_with_overlaps():
    tiling = Tiling(tile_height=24, tile_width=24, stride_height=16, stride_width=16)
    assert tile_plan(3, 3, tiling, 8) is None  # fits in one tile: decoded whole
    plan = tile_plan(4, 5, tiling, 8)
    assert plan.rows == ((0, 3), (2, 4)) and plan.cols == ((0, 3), (2, 5), (4, 5))
    assert (plan.blend_height, plan.keep_height, plan.height, plan.width) == (8, 16, 32, 40)
    with pytest.raises(ValueError, match="stride_width=12 is not a multiple"):
        tile_plan(4, 5, Tiling(24, 24, 16, 12), 8)
    with pytest.raises(ValueError, match="stride_height=32 must be in"):
        Tiling(24, 24, 32, 16)


def test_causal_history_replays_in_call_order():
    first = CausalHistory()
    assert first.first and first.take() is None
    first.give("a")
    first.give("b")
    second = CausalHistory(first.current)
    assert not second.first and (second.take(), second.take()) == ("a", "b")
    with pytest.raises(RuntimeError, match="more layers read"):
        second.take()
