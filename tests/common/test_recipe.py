"""The recipe schema: shipped recipes load, bad keys are named, overrides and stages resolve."""

from pathlib import Path

import pytest

from contentv_common.config.distill import DistillRecipe, is_distill_recipe, load_distill_recipe
from contentv_common.config.recipe import Recipe, apply_overrides, load_recipe, parse_override
from contentv_common.config.reward import RewardRecipe, is_reward_recipe, load_reward_recipe
from contentv_common.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    """Every shipped recipe, training, reward and distillation, loads and passes the checks made at load (mesh splits
    included)."""
    if is_distill_recipe(path):
        distill = load_distill_recipe(path)
        assert isinstance(distill, DistillRecipe) and distill.model_config.hidden_size > 0
        return
    if is_reward_recipe(path):
        recipe = load_reward_recipe(path)
        assert isinstance(recipe, RewardRecipe) and recipe.method in path.name
        assert recipe.model_config.hidden_size > 0
        return
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    for _, stage in recipe.stage_recipes():
        assert stage.model_config.hidden_size > 0


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = """
model: tiny
data: {manifest: m.jsonl, cache_dir: c, buckets: [{width: 64, height: 64, frames: 9, batch_size: 2}]}
checkpoint: {dir: ck}
steps: 5
"""


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"optimizer.lrr": 1.0}, "optimizer.lrr"),
        ({"optimizer.lr": "fast"}, "optimizer.lr"),
        ({"optimizer.lr": -1.0}, "optimizer.lr"),
        ({"data.buckets": [{"width": 64, "height": 64, "frames": 8, "batch_size": 2}]}, "data.buckets[0].frames"),
        ({"data.buckets": [{"width": 60, "height": 64, "frames": 9, "batch_size": 2}]}, "data.buckets[0].width"),
        ({"mesh.fsdp": 0}, "mesh.fsdp"),
        ({"remat": "some"}, "remat"),
        ({"model": "no-such-model"}, "model"),
        ({"objective.shift_mode": "dynamic"}, "objective.shift_mode"),
        ({"steps": None}, "steps"),
        ({"eval.prompts": ["a red circle moving right"]}, "eval.prompts"),  # sampled every interval steps: 0 is off
        ({"eval": {"interval": 2, "prompts": ["a", "a"]}}, "eval.prompts"),
        ({"eval": {"interval": 2, "prompts": ["a", " "]}}, "eval.prompts"),
        ({"eval": {"interval": 2, "prompts": "a"}}, "eval.prompts"),
        ({"eval": {"interval": 2, "prompts": ["a"], "clip": "no/such/clip"}}, "eval.clip"),
        ({"eval": {"interval": 2, "clip": "no/such/clip"}}, "eval.clip"),  # no prompts to score
        (
            {
                "eval": {"interval": 2, "prompts": ["a"]},
                "data.buckets": [{"width": 64, "height": 64, "frames": 1, "batch_size": 2}],
            },
            "eval.prompts",
        ),  # fmt: skip
    ],
)
def test_errors_name_the_file_and_key(tmp_path, overrides, key):
    path = _write(tmp_path, BASE)
    with pytest.raises(ConfigError) as e:
        load_recipe(path, overrides)
    assert str(path) in str(e.value) and f"{key}:" in str(e.value) and "\n" not in str(e.value)


def test_eval_prompts_and_a_clip_folder(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    prompts = ["a red circle moving right", "a dog"]
    recipe = load_recipe(
        _write(tmp_path, BASE), {"eval": {"interval": 5, "prompts": prompts, "clip": str(tmp_path / "clip")}}
    )
    assert recipe.eval.prompts == tuple(prompts) and recipe.eval.clip == str(tmp_path / "clip")
    assert load_recipe(_write(tmp_path, BASE)).eval.prompts == ()  # default: no prompts sampled


def test_missing_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint: required key is missing"):
        load_recipe(_write(tmp_path, BASE.replace("checkpoint: {dir: ck}", "")))


def test_overrides_and_inline_model(tmp_path):
    recipe = load_recipe(
        _write(tmp_path, BASE),
        dict([parse_override("optimizer.lr=3e-4"), parse_override("optimizer.ema_decay=null"), ("mesh.data", 2)]),
    )
    assert recipe.optimizer.lr == 3e-4 and recipe.optimizer.ema_decay is None and recipe.mesh.shape == (2, 1, 1, 1)
    inline = {"num_layers": 1, "num_attention_heads": 1, "attention_head_dim": 16, "hidden_size": 16}
    recipe = load_recipe(_write(tmp_path, BASE), {"model": inline})
    assert recipe.model_config.num_layers == 1
    with pytest.raises(ConfigError, match="not key=value"):
        parse_override("optimizer.lr")
    with pytest.raises(ConfigError, match="steps"):
        apply_overrides({"steps": 1}, {"steps.x": 1})


def test_base_and_stages(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    child = tmp_path / "child.yaml"
    child.write_text(
        "base: base.yaml\nsteps: 7\nstages:\n  - {name: a}\n  - {name: b, overrides: {optimizer.lr: 0.5, steps: 3}}\n"
    )
    recipe = load_recipe(child)
    assert recipe.steps == 7 and recipe.data.manifest == "m.jsonl"
    (na, a), (nb, b) = recipe.stage_recipes()
    assert (na, nb) == ("a", "b")
    assert a.resume_from is None and a.steps == 7 and a.checkpoint.dir == str(Path("ck") / "a")
    assert b.resume_from == a.checkpoint.dir and b.steps == 3 and b.optimizer.lr == 0.5
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "loop.yaml")


def test_a_reward_recipe_refuses_online_text():
    """The SFT term reads its captions' embeddings from the cache: a reward recipe with data.text online is one
    ConfigError naming the key, at load."""
    with pytest.raises(ConfigError, match=r"data\.text: .*set data\.text: cached"):
        load_reward_recipe(RECIPES / "reward_grpo_tiny.yaml", {"data.text": "online"})
    assert load_reward_recipe(RECIPES / "reward_grpo_tiny.yaml").data.text == "cached"
