"""Recipes are checked against their own mesh when they load: the shipped ContentV stages are valid, bad ones fail
naming the file and the bucket, and the curriculum (video first, duration before resolution, joint image+video)
is kept."""

from pathlib import Path

import pytest

from contentv_common.config.recipe import (
    MeshConfig,
    check_buckets_on_mesh,
    check_device_count,
    image_tokens,
    load_recipe,
)
from contentv_common.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"
STAGES = sorted(RECIPES.glob("stage*.yaml"))
TRAINING = sorted(p for p in RECIPES.glob("*.yaml") if not p.name.startswith(("reward_", "distill_")))


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.stem)
def test_every_shipped_recipe_fits_its_own_mesh(path):
    recipe = load_recipe(path)
    mesh = recipe.mesh
    for b in recipe.data.buckets:
        assert b.batch_size % (mesh.data * mesh.fsdp) == 0, b.name
        assert image_tokens(b, recipe.model_config.patch_size) % mesh.sequence == 0, b.name
    check_buckets_on_mesh(recipe.data.buckets, mesh, recipe.model_config.patch_size)


def test_contentv_stages_run_on_one_64_device_pod():
    for path in STAGES:
        check_device_count(load_recipe(path).mesh, 64)


def test_curriculum_video_first_then_joint_then_longer_then_larger():
    stages = [load_recipe(p).data.buckets for p in STAGES]
    assert [p.stem.split("_")[0] for p in STAGES] == [f"stage{i}" for i in range(1, 6)]
    assert all(b.frames > 1 for b in stages[0])  # stage 1: video only
    assert all(any(b.frames == 1 for b in s) for s in stages[1:])  # then joint image + video
    frames = [max(b.frames for b in s) for s in stages]
    pixels = [max(b.width * b.height for b in s if b.frames > 1) for s in stages]
    assert frames[2] > frames[1] and pixels[2] == pixels[1]  # duration grows first ...
    assert pixels[4] > pixels[3] > pixels[2]  # ... then resolution


BASE = """
model: tiny
data: {manifest: m.jsonl, cache_dir: c, buckets: [{width: 64, height: 64, frames: 9, batch_size: 4}]}
checkpoint: {dir: ck}
steps: 5
"""


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"mesh.data": 2, "mesh.fsdp": 4}, r"data.buckets\[0\] \(64x64x9\): batch_size 4 does not split over mesh "),
        ({"mesh.sequence": 5}, r"data.buckets\[0\] \(64x64x9\): 48 image tokens per sample do not split over mesh "),
        (
            {
                "mesh.data": 2,
                "data.buckets": [
                    {"width": 64, "height": 64, "frames": 9, "batch_size": 4},
                    {"width": 80, "height": 48, "frames": 1, "batch_size": 3},
                ],
            },
            r"data.buckets\[1\] \(80x48x1\): batch_size 3",
        ),
    ],
)
def test_a_bucket_the_mesh_cannot_run_names_file_and_bucket(tmp_path, overrides, match):
    path = tmp_path / "r.yaml"
    path.write_text(BASE)
    with pytest.raises(ConfigError, match=match) as e:
        load_recipe(path, overrides)
    assert str(path) in str(e.value)


def test_device_count_must_match_the_mesh():
    check_device_count(MeshConfig(2, 2, 2, 1), 8)
    with pytest.raises(ConfigError, match=r"mesh: data x fsdp x sequence x tensor = 4 x 16 x 1 x 1 = 64 .* has 8"):
        check_device_count(MeshConfig(4, 16, 1, 1), 8)
