"""Config schema: typed, frozen, YAML-loaded; bad input names the file and key."""

import dataclasses

import pytest

from contentv_common.checkpoint.formats import config_from_diffusers, config_to_diffusers
from contentv_common.config.model import ModelConfig, from_dict, load_model_config, named_model_config
from contentv_common.errors import ConfigError

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, hidden_size=32)


def test_shipped_model_configs():
    big = named_model_config("contentv-8b")
    assert (big.num_layers, big.num_attention_heads, big.attention_head_dim, big.hidden_size) == (38, 38, 64, 2432)
    assert (big.patch_size, big.in_channels, big.joint_attention_dim, big.pooled_projection_dim) == (2, 16, 4096, 2048)
    assert big.qk_norm == "rms_norm" and big.pos_embed == "sincos_3d"
    sd35 = named_model_config("sd3.5-large")
    assert sd35.pos_embed == "sd3_2d" and sd35.pos_embed_max_size == 192
    assert dataclasses.replace(sd35, pos_embed="sincos_3d") == big
    assert named_model_config("tiny").num_layers == 2


def test_frozen():
    cfg = from_dict(ModelConfig, TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"num_layerz": 3}, "num_layerz"),
        ({"num_layers": "two"}, "num_layers"),
        ({"num_layers": 2.5}, "num_layers"),
        ({"qk_norm": "layer"}, "qk_norm"),
        ({"hidden_size": 48}, "hidden_size"),
        ({"patch_size": 3}, "patch_size"),
        ({"num_layers": 0}, "num_layers"),
        ({"norm_eps": -1.0}, "norm_eps"),
    ],
)
def test_bad_values_name_the_key(tmp_path, changes, key):
    path = tmp_path / "model.yaml"
    path.write_text(
        "\n".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in {**TINY, **changes}.items())
    )
    with pytest.raises(ConfigError) as e:
        load_model_config(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_missing_key_and_unknown_name(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("num_layers: 2\n")
    with pytest.raises(ConfigError, match="num_attention_heads: required"):
        load_model_config(path)
    with pytest.raises(ConfigError, match="not found"):
        named_model_config("no-such-model")


def test_latent_shape_checks():
    cfg = named_model_config("tiny")
    cfg.check_latent_shape((1, 16, 3, 8, 8))
    with pytest.raises(ValueError, match="W=9"):
        cfg.check_latent_shape((1, 16, 3, 8, 9))
    with pytest.raises(ValueError, match="channels"):
        cfg.check_latent_shape((1, 4, 3, 8, 8))
    with pytest.raises(ValueError, match="1 frame"):
        cfg.replace(pos_embed="sd3_2d").check_latent_shape((1, 16, 3, 8, 8))


def test_diffusers_config_round_trip_and_contentv_class():
    cfg = named_model_config("sd3.5-large")
    assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
    video = named_model_config("contentv-8b")
    assert config_from_diffusers(config_to_diffusers(video)) == video
    # The official ContentV config lists only the constructor arguments of SD3Transformer3DModel.
    minimal = {
        "_class_name": "SD3Transformer3DModel",
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "num_layers": 38,
        "num_attention_heads": 38,
        "attention_head_dim": 64,
    }
    assert config_from_diffusers(minimal) == video
    with pytest.raises(ConfigError, match="dual_attention_layers"):
        config_from_diffusers({**config_to_diffusers(cfg), "dual_attention_layers": [0, 1]})
    with pytest.raises(ConfigError, match="bogus"):
        config_from_diffusers({**config_to_diffusers(cfg), "bogus": 1})
