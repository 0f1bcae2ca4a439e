"""Hugging Face Hub ids where a local folder is accepted (`tools/sample.py --pipeline/--transformer`, a recipe's
`init_from`, `load_transformer` and `load_vae` in both backends), read offline from a cache laid out as
huggingface_hub lays it out (blobs, refs/main, snapshots/<commit>/ of links); nothing downloads."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest
import torch
from flax import nnx
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

import contentv_jax
import contentv_jax.encoders as jax_encoders
import contentv_torch_npu
from contentv_common.checkpoint import hub
from contentv_common.checkpoint.formats import open_checkpoint, write_diffusers
from contentv_common.cli import sample as sample_tool
from contentv_common.cli import train
from contentv_common.config.recipe import load_recipe
from contentv_common.config.reward import load_reward_recipe
from contentv_common.data.video_io import read_video
from contentv_common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
REPO = "owner/tiny-contentv"
VAE_REPO = "owner/tiny-vae"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SNAPSHOT = f"models--owner--tiny-contentv/snapshots/{COMMIT}"
DECOY = "diffusion_pytorch_model.fp16.safetensors"
ARGS = ["--prompt", "a cat walking", "--frames", "5", "--size", "32x48", "--steps", "1", "--guidance", "1"]


def write_hub_cache(hub_cache: Path, repo: str, folder: Path) -> None:
    """`folder`'s files as the Hub cache holds one snapshot of `repo`: content-named blobs, relative links to them
    under snapshots/<commit>/, refs/main naming the commit."""
    storage = hub_cache / f"models--{repo.replace('/', '--')}"
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / COMMIT / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A tiny ContentV pipeline in the official diffusers layout (text encoders, tokenizers, Wan VAE, transformer)."""
    folder = jax_encoders.tiny_encoders(seed=2).save(tmp_path_factory.mktemp("hub") / "pipe")
    ours = sample_tool.random_tiny_checkpoint(folder / "ours", seed=1)
    source = open_checkpoint(ours)
    transformer = write_diffusers(folder / "transformer", source.config, source.tensors(), max_shard_bytes=2**17)
    shards = sorted(transformer.glob("*.safetensors"))
    assert len(shards) > 1 and (transformer / "diffusion_pytorch_model.safetensors.index.json").exists()
    shutil.copy(shards[0], transformer / DECOY)  # a variant beside the indexed shards: the loader never reads it
    for file in ours.iterdir():
        file.unlink()
    ours.rmdir()
    (folder / "ours").rmdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return folder


@pytest.fixture
def offline_hub(pipeline, tmp_path, monkeypatch) -> Path:
    """HF_HOME with REPO (the pipeline) and VAE_REPO (a VAE at the root, and a nested copy not to fetch) cached,
    HF_HUB_OFFLINE=1; huggingface_hub read both at import, so its constants follow."""
    home = tmp_path / "hf_home"
    write_hub_cache(home / "hub", REPO, pipeline)
    vae = shutil.copytree(pipeline / "vae", tmp_path / "vae_repo")
    shutil.copytree(pipeline / "vae", vae / "nested")
    write_hub_cache(home / "hub", VAE_REPO, vae)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def test_sampling_from_a_hub_id_equals_the_local_folder(pipeline, offline_hub, tmp_path):
    """`--pipeline owner/name` samples from the cached snapshot: the very frames of the local folder."""
    frames = {}
    for name, source in (("local", str(pipeline)), ("hub", REPO)):
        argv = [*ARGS, "--pipeline", source, "--out", str(tmp_path / name), "--no-progress"]
        (path,) = sample_tool.main(argv)
        frames[name], _ = read_video(path)
    assert frames["hub"].shape == (5, 32, 48, 3)
    assert np.array_equal(frames["hub"], frames["local"])


def _jax_arrays(module: nnx.Module) -> dict[str, np.ndarray]:
    return {str(path): np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(module))}


def _torch_arrays(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in module.state_dict().items()}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_loaders_read_hub_ids_in_both_backends(pipeline, offline_hub):
    """load_transformer(owner/name/transformer) and load_vae(owner/name/vae) give the local folders' weights."""
    for backend, arrays in ((contentv_jax, _jax_arrays), (contentv_torch_npu, _torch_arrays)):
        for load, sub in ((backend.load_transformer, "transformer"), (backend.load_vae, "vae")):
            from_hub, local = arrays(load(f"{REPO}/{sub}")), arrays(load(pipeline / sub))
            assert len(local) > 10 and _same(from_hub, local), f"{backend.__name__}.{load.__name__}"


def test_only_the_files_a_loader_reads_are_asked_for(pipeline, offline_hub, monkeypatch):
    """The patterns given to snapshot_download, applied to the repo's files by huggingface_hub's own filter: config
    files (and the safetensors index) first, then the shards the index lists, never a variant beside them; the VAE
    takes vae/ alone, a pipeline all but a transformer it does not use."""
    calls = []
    download = huggingface_hub.snapshot_download  # hub.py imports it from the package at each call

    def record(repo_id, allow_patterns, ignore_patterns):
        listing = files if repo_id == REPO else vae_repo_files
        calls.append(
            sorted(filter_repo_objects(listing, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        )
        return download(repo_id, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", record)
    files = sorted(p.relative_to(pipeline).as_posix() for p in pipeline.rglob("*") if p.is_file())
    vae = [f for f in files if f.startswith("vae/")]
    transformer = [f for f in files if f.startswith("transformer/") and not f.endswith(DECOY)]
    index = "transformer/diffusion_pytorch_model.safetensors.index.json"
    small = [f for f in files if f.endswith(".json") or f.startswith("tokenizer")]

    assert hub.vae_folder(f"{REPO}/vae") == offline_hub / "hub" / SNAPSHOT / "vae"
    assert calls == [["vae/config.json"], vae]
    calls.clear()
    hub.transformer_folder(f"{REPO}/transformer")
    assert calls == [["transformer/config.json", index], transformer]
    calls.clear()
    hub.pipeline_folder(REPO, transformer=False)
    hub.pipeline_folder(REPO)
    no_transformer = [f for f in files if not f.startswith("transformer/")]
    assert calls == [
        [f for f in small if not f.startswith("transformer/")],
        no_transformer,
        small,
        sorted(no_transformer + transformer),
    ]
    calls.clear()
    with pytest.raises(ConfigError, match=f"{REPO}: a pipeline on the Hub: name its vae subfolder, e.g. {REPO}/vae"):
        hub.vae_folder(REPO)
    assert calls == [["model_index.json"]]
    calls.clear()
    vae_repo_files = [f.removeprefix("vae/") for f in vae] + [f.replace("vae/", "nested/") for f in vae]
    hub.vae_folder(VAE_REPO)  # a model at the repo's root: its own files, not the nested folder's
    assert calls == [["config.json"], [f.removeprefix("vae/") for f in vae]]


def test_a_missing_id_offline_is_one_line_naming_it(offline_hub, tmp_path):
    """In the library, in both CLIs (sample: exit status 2 through run_cli) and for a recipe's init_from."""
    message = "nobody/missing: no such folder, and Hub repo nobody/missing is not in the Hugging Face cache"
    for load in (contentv_torch_npu.load_transformer, contentv_jax.load_vae):
        with pytest.raises(ConfigError, match=message) as error:
            load("nobody/missing")
        assert "\n" not in str(error.value) and "HF_HUB_OFFLINE" in str(error.value)
    reward = ROOT / "configs" / "recipes" / "reward_grpo_demo.yaml"
    for recipe in (ROOT / "configs" / "recipes" / "tiny.yaml", reward):
        with pytest.raises(ConfigError, match=f"{recipe}: init_from: {message}"):
            train.main(["--config", str(recipe), "init_from=nobody/missing", "--no-progress"])
    resolved = train.local_init_from(load_reward_recipe(reward, {"init_from": f"{REPO}/transformer"}))
    assert resolved.init_from == str(offline_hub / "hub" / SNAPSHOT / "transformer")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "tools" / "sample.py"), "--pipeline", "nobody/missing", "--prompt", "x"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith(f"sample: error: {message} ({offline_hub / 'hub'})") and "HF_HUB_OFFLINE" in last


def test_a_local_folder_named_like_an_id_wins(pipeline, offline_hub, tmp_path, monkeypatch):
    """A relative folder `owner/tiny-contentv/transformer` that exists is read, not the cached repo's."""
    monkeypatch.chdir(tmp_path)
    local = sample_tool.random_tiny_checkpoint(tmp_path / REPO, seed=7)
    assert hub.hub_id(f"{REPO}/transformer") is None and hub.hub_id("nobody/missing") == ("nobody/missing", "")
    got = _torch_arrays(contentv_torch_npu.load_transformer(f"{REPO}/transformer"))
    assert _same(got, _torch_arrays(contentv_torch_npu.load_transformer(local)))
    assert not _same(got, _torch_arrays(contentv_torch_npu.load_transformer(pipeline / "transformer")))


def test_a_recipes_init_from_takes_a_hub_id_in_both_backends(pipeline, offline_hub):
    """Both trainers start from `init_from: owner/name/transformer` (read from the cache) as from the folder."""
    from contentv_jax.train import initial_params
    from contentv_torch_npu.distributed import Topology
    from contentv_torch_npu.train import build_model

    def recipe(init_from):
        return load_recipe(ROOT / "tests" / "recipes" / "tiny.yaml", {"init_from": init_from})

    local, from_hub = recipe(str(pipeline / "transformer")), recipe(f"{REPO}/transformer")
    assert _same(_torch_arrays(build_model(from_hub, Topology())), _torch_arrays(build_model(local, Topology())))
    leaves = [jax.tree.leaves(initial_params(r)) for r in (from_hub, local)]
    assert len(leaves[1]) > 10 and all(np.array_equal(a, b) for a, b in zip(*leaves, strict=True))


def test_a_path_under_a_local_folder_is_not_an_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.hub_id("runs/tiny/transformer") == ("runs/tiny", "transformer")  # no runs/ here: could be an id
    (tmp_path / "runs").mkdir()
    assert hub.hub_id("runs/tiny/transformer") is None  # runs/ exists: the run's own folder, not yet written
    assert hub.transformer_folder("runs/tiny/transformer") == Path("runs/tiny/transformer")
